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

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from featkd._checks import (
    FeatkdInputError,
    ShapeError,
    check_choice,
    check_same_device,
    describe_shape,
)

__all__ = ["GRAD_MODES", "GlobalBatch", "gather_with_grad", "is_distributed"]

GRAD_MODES = ("ddp", "exact", "all_reduce")

# Shape metadata exchanged before a gather: [kind, ndim, dtype code, d_0, ..., d_{MAX-1}].
_MAX_DIMS = 8
_ABSENT, _TENSOR, _NOT_A_TENSOR, _BAD_RANK = 0, 1, 2, 3
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}


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


def _describe(row: Sequence[int]) -> str:
    kind = row[0]
    if kind == _ABSENT:
        return "None"
    if kind == _NOT_A_TENSOR:
        return "a non-tensor"
    ndim, code = row[1], row[2]
    if kind == _BAD_RANK:
        return f"a tensor with {ndim} dimensions"
    dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else "an unusual dtype"
    return f"{describe_shape(row[3 : 3 + ndim])} {dtype}"


def _meta_row(x: Any) -> list[int]:
    row = [0] * (3 + _MAX_DIMS)
    if x is None:
        return row
    if not isinstance(x, torch.Tensor):
        row[0] = _NOT_A_TENSOR
        return row
    row[1], row[2] = x.ndim, _DTYPE_CODE.get(x.dtype, -1)
    if x.ndim == 0 or x.ndim > _MAX_DIMS:
        row[0] = _BAD_RANK
        return row
    row[0] = _TENSOR
    row[3 : 3 + x.ndim] = list(x.shape)
    return row


def _exchange_shapes(
    tensors: Sequence[tuple[str, Any]], group: Any, world: int, equal_shards: bool
) -> list[list[list[int]]]:
    """Every rank's metadata for every named tensor: ``result[rank][i]`` describes tensor ``i``.

    One small all-gather and one host synchronisation for all the tensors together. Every rank
    receives the same table, so every rank raises the same error on a mismatch (no hang).
    With ``equal_shards`` the exchange is skipped: every rank is assumed to hold this rank's
    shapes.
    """
    names = [name for name, _ in tensors]
    local = [_meta_row(x) for _, x in tensors]
    if equal_shards:
        table = [local] * world
    else:
        device = next(
            (x.device for _, x in tensors if isinstance(x, torch.Tensor)), torch.device("cpu")
        )
        mine = torch.tensor(local, dtype=torch.int64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=group)
        table = torch.stack(everyone).tolist()  # the one host sync
    _validate_table(names, table)
    return table


def _validate_table(names: Sequence[str], table: list[list[list[int]]]) -> None:
    """The same argument must have the same kind, ndim, dtype and trailing shape on every rank;
    arguments paired per sample (student, teacher, labels) the same batch size per rank."""
    for i, name in enumerate(names):
        rows = [ranks[i] for ranks in table]
        for rank, row in enumerate(rows):
            if row[0] == _NOT_A_TENSOR:
                raise FeatkdInputError(
                    f"{name}: expected a torch.Tensor on every process, "
                    f"got {_describe(row)} on rank {rank}"
                )
            if row[0] == _BAD_RANK:
                raise ShapeError(
                    f"{name}: expected a batch-first tensor with 1 to {_MAX_DIMS} dimensions "
                    f"on every process, got {_describe(row)} on rank {rank}"
                )
        first = rows[0]
        for rank, row in enumerate(rows[1:], start=1):
            if row[0] != first[0] or row[1:3] != first[1:3] or row[4:] != first[4:]:
                raise ShapeError(
                    f"{name}: expected the same number of dimensions, dtype and trailing "
                    f"shape on every process (only the batch size may differ), "
                    f"got {_describe(first)} on rank 0 and {_describe(row)} on rank {rank}"
                )
    for rank, ranks in enumerate(table):
        present = [(names[i], row) for i, row in enumerate(ranks) if row[0] == _TENSOR]
        if not present:
            continue
        first_name, first = present[0]
        for name, row in present[1:]:
            if row[3] != first[3]:
                raise ShapeError(
                    f"{name}: expected batch size {first[3]} on rank {rank} (the batch of "
                    f"{first_name} there), got {row[3]} (shape {_describe(row)})"
                )


def _all_gather(x: torch.Tensor, sizes: Sequence[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0; shards may differ in size (padded to the
    largest for the collective, unpadded after)."""
    largest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < largest:
        pad = x.new_zeros((largest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    pieces = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(pieces, x, group=group)
    if all(size == largest for size in sizes):
        return torch.cat(pieces)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: this rank's slice of the incoming gradient,
    scaled or summed over ranks according to ``grad_mode``."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group, grad_mode):  # type: ignore[override]
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_mode = sizes, rank, group, grad_mode
        return _all_gather(x, sizes, group)

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
    return _all_gather(x.detach(), sizes, group)


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
    raises the same :class:`~featkd.ShapeError`. Every process of the group must call this.

    Args:
        x: this rank's shard, batch first.
        group: the process group (``None``: the default group).
        grad_mode: ``"ddp"``, ``"exact"`` or ``"all_reduce"``, see above.
        equal_shards: promise that every rank passes the same shape; skips the size exchange
            and its host synchronisation. A broken promise is undefined behaviour (the
            collective may fail, hang or, with NCCL, gather garbage).
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
    table = _exchange_shapes([(name, x)], group, world, equal_shards)
    sizes = [ranks[0][3] for ranks in table]
    return _gather_one(x, sizes, rank, group, grad_mode)


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
    (mismatched widths, a missing teacher) is reported on every rank; errors the wrapped loss
    raises on the gathered batch are raised on every rank too.

    Args:
        loss_fn: a loss ``loss_fn(student, teacher, *, labels=None)``; an ``nn.Module`` or any
            callable. ``labels`` is passed only when given.
        group: the process group (``None``: the default group).
        grad_mode: ``"ddp"`` (default), ``"exact"`` or ``"all_reduce"``; see
            :func:`gather_with_grad`.
        equal_shards: promise equal shard shapes on every rank to skip the shape exchange.

    Shape:
        - student: ``(B_r, *)`` on rank ``r``
        - teacher: ``(B_r, *)``
        - labels: ``(B_r,)``, optional
        - output: scalar, the wrapped loss on ``B = B_0 + ... + B_{R-1}`` samples

    Example:
        >>> from featkd import KDLoss
        >>> global_kd = GlobalBatch(KDLoss(temperature=4.0))
        >>> s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
        >>> bool(global_kd(s, t) == KDLoss(temperature=4.0)(s, t))  # one process: unchanged
        True
        >>> sorted(global_kd.last_parts)
        ['kd']
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
        self.equal_shards = bool(equal_shards)

    @property
    def last_parts(self) -> dict[str, torch.Tensor]:
        """The wrapped loss's ``last_parts`` (computed on the global batch); ``{}`` if it has
        none."""
        return getattr(self.loss_fn, "last_parts", {})

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        world = _group_size(self.group)
        if world > 1:
            student, teacher, labels = self._gather(student, teacher, labels, world)
        if labels is None:
            return self.loss_fn(student, teacher)
        return self.loss_fn(student, teacher, labels=labels)

    def _gather(
        self, student: Any, teacher: Any, labels: Any, world: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        rank = _group_rank(self.group)
        named = [("student", student), ("teacher", teacher), ("labels", labels)]
        # Checked before any collective: a process-local mistake, made alike on every rank.
        check_same_device({n: x for n, x in named if isinstance(x, torch.Tensor)})
        table = _exchange_shapes(named, self.group, world, self.equal_shards)
        if table[0][1][0] == _ABSENT or table[0][0][0] == _ABSENT:
            which = "student" if table[0][0][0] == _ABSENT else "teacher"
            raise FeatkdInputError(f"{which}: expected a torch.Tensor on every rank, got None")
        sizes = [ranks[0][3] for ranks in table]
        student = _gather_one(student, sizes, rank, self.group, self.grad_mode)
        teacher = _all_gather(teacher.detach(), sizes, self.group)
        if labels is not None:
            labels = _all_gather(labels, sizes, self.group)
        return student, teacher, labels

    def extra_repr(self) -> str:
        extra = f"grad_mode={self.grad_mode!r}"
        if self.group is not None:
            extra += f", group={self.group!r}"
        if self.equal_shards:
            extra += ", equal_shards=True"
        return extra
