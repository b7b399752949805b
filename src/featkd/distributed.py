"""Global-batch losses under ``torch.distributed``: all-gather features with the right gradients.

Under data parallelism each process sees only its shard of the batch. A per-sample loss (KD on
logits, VkD's distance after layer norm) is unchanged by that: the mean of the shard means is the
batch mean. A batch-level loss is not: a similarity matrix over the batch, a distribution
distance between batches, a covariance or whitening statistic computed on 32 samples per process
is a different (noisier, often biased) quantity than the one computed on 256. Gathering the
features of every process first restores the single-process loss.

The tools:

- :func:`gather_with_grad` concatenates the shards of every rank along the batch axis. Its
  backward hands each rank the gradient of ITS shard (see ``grad_mode``), so gradients reach
  the student through the rank that computed each sample, exactly once.
- :class:`GlobalBatch` wraps any ``loss_fn(student, teacher, *, labels=None)``: it gathers the
  student (with gradient), the teacher and the labels (without), then calls the loss on the
  global batch. Its parameters are the wrapped loss's parameters.

Both are the identity when ``torch.distributed`` is not initialised or the group has one process,
so the same code runs on one device unchanged.

Gradient scaling (``grad_mode``), derivation in ``docs/distributed.md``: every rank computes the
same global loss ``L`` from identical gathered tensors, so the slice of ``dL/d(gathered)`` that
belongs to rank ``r`` is already the exact gradient ``dL/dx_r`` (``"exact"``). The student's
parameters ``theta`` on rank ``r`` see only their own shard, ``dL/dx_r dx_r/dtheta``, and
DistributedDataParallel then AVERAGES over the ``R`` ranks, giving ``(1/R) dL/dtheta``. The
default ``"ddp"`` multiplies the shard gradient by ``R`` to cancel that average. Parameters used
after the gather (a loss-owned head applied to the gathered teacher) get the full ``dL/dphi`` on
every rank and the average leaves them right, whatever the mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from featkd._checks import FeatkdInputError
from featkd._gather import all_gather_padded, batch_sizes, exchange_metadata
from featkd._options import check_bool, check_choice

__all__ = ["GRAD_MODES", "GlobalBatch", "gather_with_grad", "is_distributed"]

GRAD_MODES = ("ddp", "exact", "all_reduce")


def _group_size(group: Any) -> int:
    """World size of ``group``, or 1 when torch.distributed is unavailable or uninitialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def is_distributed(group: Any = None) -> bool:
    """Whether gathering over ``group`` would do anything (initialised, more than one process).

    Example:
        >>> is_distributed()  # a plain single-process run
        False
    """
    return _group_size(group) > 1


def _group_rank(group: Any) -> int:
    rank = dist.get_rank(group)
    if rank < 0:
        raise FeatkdInputError(
            "group: expected a process group this process belongs to, "
            f"got one it is not a member of (global rank {dist.get_rank()})"
        )
    return rank


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: this rank's slice of the incoming gradient,
    scaled or summed over ranks according to ``grad_mode``."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group, grad_mode):  # type: ignore[override]
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_mode = sizes, rank, group, grad_mode
        return all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.grad_mode == "all_reduce":
            # Each rank may have computed a different loss from the gathered batch: the
            # gradient of a shard is the sum of what every rank's loss sends it.
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        mine = grad[start : start + ctx.sizes[ctx.rank]]
        if ctx.grad_mode == "ddp":
            mine = mine * len(ctx.sizes)
        return mine, None, None, None, None


def _gather_one(
    x: torch.Tensor, sizes: list[int], rank: int, group: Any, grad_mode: str
) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherWithGrad.apply(x, sizes, rank, group, grad_mode)
    return all_gather_padded(x.detach(), sizes, group)


def gather_with_grad(
    x: torch.Tensor,
    *,
    group: Any = None,
    grad_mode: str = "ddp",
    equal_shards: bool = False,
    name: str = "x",
) -> torch.Tensor:
    """All-gather the batch shards of every process into the global batch, with gradients.

    Every rank gets the same ``(sum_r B_r, ...)`` tensor, the shards in rank order. In backward
    this rank receives the gradient for its own shard only:

    - ``"ddp"`` (default): this rank's slice of the incoming gradient times the world size
      ``R``. Use it when gradients are then averaged over ranks (DistributedDataParallel, FSDP,
      most ZeRO setups) and every rank computes the same loss from the gathered tensor (what
      :class:`GlobalBatch` does): after the average the student's gradient equals the
      single-process gradient on the full batch.
    - ``"exact"``: this rank's slice, unscaled: the exact gradient of the global loss with
      respect to this shard. Use it when gradients are summed over ranks, or not reduced.
    - ``"all_reduce"``: the incoming gradients are summed over ranks (one more collective in
      backward), then sliced. Use it when ranks compute DIFFERENT losses from the gathered
      tensor (each rank's own rows against the global batch, or per-rank random projections);
      under DDP's average this gives the gradient of the mean of the ranks' losses. When every
      rank computes the same loss it equals ``"ddp"``.

    Without an initialised process group, or with a group of one process, ``x`` is returned
    unchanged. Inputs that do not require gradient are gathered without the autograd node.
    Shards may differ in batch size (the sizes are exchanged first: one small all-gather and one
    host synchronisation); rank, dtype and the trailing dimensions must agree, or every rank
    raises the same :class:`~featkd.ShapeError`. A shard on a device the group's backend cannot
    gather from (``meta``, a CPU tensor under NCCL) raises the same
    :class:`~featkd.DeviceError` on every rank. Every process of the group must call this.

    Args:
        x: this rank's shard, batch first.
        group: the process group (``None``: the default group).
        grad_mode: ``"ddp"``, ``"exact"`` or ``"all_reduce"``, see above.
        equal_shards: promise that every rank passes the same shape; skips the size exchange
            and its host synchronisation. A broken promise is undefined behaviour (the
            collective may fail, hang or, with NCCL, gather garbage). Without the exchange a
            bad device raises only on the rank that has it, while the others wait in the
            gather.
        name: the argument's name in error messages.

    Shape:
        - x: ``(B_r, *)`` on rank ``r``
        - output: ``(B_0 + ... + B_{R-1}, *)``

    Example:
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> gather_with_grad(x) is x  # single process: the identity
        True
    """
    check_choice(grad_mode, "grad_mode", GRAD_MODES)
    world = _group_size(group)
    if world == 1:
        return x
    rank = _group_rank(group)
    table = exchange_metadata([(name, x)], group, world, rank, equal_shards, required=[name])
    return _gather_one(x, batch_sizes(table), rank, group, grad_mode)


class GlobalBatch(nn.Module):
    """Compute a batch-level loss on the global batch of all processes.

    Gathers ``student`` (with gradient, see ``grad_mode`` in :func:`gather_with_grad`),
    ``teacher`` (detached: the teacher never receives gradient) and ``labels`` from every rank
    of ``group``, then returns ``loss_fn(student, teacher, labels=labels)`` on the gathered
    tensors. Every rank computes the same value: the loss a single process would compute on the
    concatenated batch. Without an initialised process group, or with one process, it just calls
    ``loss_fn``.

    Wrap the losses whose value depends on which samples share a batch: similarities across the
    batch (CosPress's global term), distribution distances (every KD2M loss), covariance and
    whitening statistics (VkD with ``batch_standardize`` or ``Whitening``). Per-sample losses
    (KD on logits, VkD with layer norm, Proteus) do not need it: their shard means average to
    the batch mean under DDP.

    Note:
        Owns the parameters of ``loss_fn`` (as the submodule ``loss_fn``): add
        ``GlobalBatch(loss).parameters()`` to the optimiser, and put them under DDP together
        with the student, or in a DDP of their own (see ``docs/distributed.md``).

    Every process must call it in the same order (it runs collectives). Bad input on any rank
    (mismatched widths, a missing teacher, a teacher on another device than the student) is
    reported on every rank, with the same error; errors the wrapped loss raises on the gathered
    batch are raised on every rank too. With ``equal_shards=True`` nothing is exchanged, and a
    device mismatch raises only on the rank that has it (the others wait in the gather until
    the backend's timeout).

    With a wrapped loss built with ``reduction="none"`` (one value per sample), each rank gets
    the values of its own samples, ``(B_r,)``, computed with the global batch's statistics.

    Args:
        loss_fn: a loss ``loss_fn(student, teacher, *, labels=None)``; an ``nn.Module`` or any
            callable. ``labels`` is passed only when given (every featkd loss accepts it), as
            are ``student_logits`` (gathered with gradient) and ``teacher_logits`` (without),
            the joint Wasserstein cost's further inputs.
        group: the process group (``None``: the default group).
        grad_mode: ``"ddp"`` (default), ``"exact"`` or ``"all_reduce"``; see
            :func:`gather_with_grad`.
        equal_shards: promise equal shard shapes on every rank to skip the shape exchange
            (and the checks it makes on every rank's devices).

    Shape:
        - student: ``(B_r, *)`` on rank ``r``
        - teacher: ``(B_r, *)``
        - labels: ``(B_r,)``, optional
        - student_logits, teacher_logits: ``(B_r, K)``, optional
        - output: scalar, the wrapped loss on ``B = B_0 + ... + B_{R-1}`` samples; ``(B_r,)``
          for a wrapped loss with ``reduction="none"``

    Example:
        >>> from featkd import KDLoss
        >>> global_kd = GlobalBatch(KDLoss(temperature=4.0))
        >>> s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
        >>> bool(global_kd(s, t) == KDLoss(temperature=4.0)(s, t))  # one process: unchanged
        True
        >>> sorted(global_kd.last_parts)
        ['kd', 'total']
    """

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        *,
        group: Any = None,
        grad_mode: str = "ddp",
        equal_shards: bool = False,
    ) -> None:
        super().__init__()
        if not callable(loss_fn):
            raise FeatkdInputError(
                f"loss_fn: expected a callable loss(student, teacher, *, labels=None), "
                f"got {type(loss_fn).__name__}"
            )
        check_choice(grad_mode, "grad_mode", GRAD_MODES)
        self.loss_fn = loss_fn
        self.group = group
        self.grad_mode = grad_mode
        self.equal_shards = check_bool(equal_shards, "equal_shards")

    @property
    def last_parts(self) -> dict[str, torch.Tensor]:
        """The wrapped loss's ``last_parts`` (computed on the global batch); ``{}`` if it has
        none."""
        return getattr(self.loss_fn, "last_parts", {})

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        world = _group_size(self.group)
        rows = None
        extra = {
            "labels": labels,
            "student_logits": student_logits,
            "teacher_logits": teacher_logits,
        }
        if world > 1:
            student, teacher, extra, rows = self._gather(student, teacher, extra, world)
        # only what was given: a loss without logits (or labels) keeps its own signature
        loss = self.loss_fn(student, teacher, **{k: v for k, v in extra.items() if v is not None})
        if rows is not None and loss.ndim > 0 and loss.shape[0] == student.shape[0]:
            # reduction="none": one value per sample of the global batch; this rank keeps the
            # values of its own samples, as a per-sample loss without GlobalBatch would give
            loss = loss[rows]
        return loss

    def _gather(
        self, student: Any, teacher: Any, extra: dict[str, Any], world: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], slice]:
        rank = _group_rank(self.group)
        named = [("student", student), ("teacher", teacher), *extra.items()]
        # Devices are checked in the exchange too, not before it: a device that is wrong on
        # one rank only must raise on every rank, or the others wait in the gather.
        table = exchange_metadata(
            named, self.group, world, rank, self.equal_shards, required=["student", "teacher"]
        )
        sizes = batch_sizes(table)
        student = _gather_one(student, sizes, rank, self.group, self.grad_mode)
        teacher = all_gather_padded(teacher.detach(), sizes, self.group)
        gathered = {}
        for name, value in extra.items():
            if value is None:
                gathered[name] = None
            elif name == "student_logits":  # the student's: with gradient, like the student
                gathered[name] = _gather_one(value, sizes, rank, self.group, self.grad_mode)
            else:  # labels and the teacher's logits: no gradient
                gathered[name] = all_gather_padded(value.detach(), sizes, self.group)
        start = sum(sizes[:rank])
        return student, teacher, gathered, slice(start, start + sizes[rank])

    def extra_repr(self) -> str:
        extra = f"grad_mode={self.grad_mode!r}"
        if self.group is not None:
            extra += f", group={self.group!r}"
        if self.equal_shards:
            extra += ", equal_shards=True"
        return extra
