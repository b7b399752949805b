"""The CosPress loss: :func:`cospress_loss` with a head you manage, :class:`CosPressLoss` owning
one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from featkd._checks import (
    ChoiceError,
    ShapeError,
    check_feature_pair,
    check_min_batch,
    check_same_device,
    describe_shape,
    validate_features,
)
from featkd._loss import DistillationLoss, Terms, check_reduction, evaluate
from featkd._options import check_choice, check_int, check_weights, keyword_widths
from featkd._precision import full_precision
from featkd.cospress._cosine import flat_cosine_distance
from featkd.cospress._neighbourhood import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_TEMPERATURES,
    KL_STYLES,
    check_temperatures,
    neighbourhood_kl_per_set,
)
from featkd.cospress.heads import LinearHead, TeacherCompressionHead
from featkd.pooling import pool

__all__ = ["CosPressLoss", "cospress_loss"]

# the order of featkd 0.1's positional weights tuple
_POSITIONAL_WEIGHTS = ("local", "global", "tokens", "cls")
_GLOBAL_TERM = (
    "the global term of CosPress compares the samples of the batch with each other (pass "
    "weights={'global': 0.0} to leave it out of the loss)"
)


def _check_reduction(reduction: Any, weights: Mapping[str, float]) -> str:
    """A reduction other than ``"mean"`` needs the (batch-level) global term weighted 0."""
    return check_reduction(reduction, None if weights["global"] == 0 else _GLOBAL_TERM)


def _check_head(head: Any) -> LinearHead:
    if not isinstance(head, LinearHead):
        raise ChoiceError(
            "head: expected a featkd.TeacherCompressionHead (LayerNorm -> Linear from the "
            f"teacher's width to the student's), got {type(head).__name__}"
        )
    return head


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, head: LinearHead) -> None:
    check_feature_pair(
        student, teacher, student_dim=head.out_features, teacher_dim=head.in_features
    )
    check_min_batch(student, "student", 2, "the global term compares the samples of a batch")
    if student.ndim == 3 and student.shape[1] < 2:
        raise ShapeError(
            f"student: expected at least 2 tokens per image for the local term, "
            f"got {describe_shape(student.shape)}; pass pooled (B, D_s) features instead"
        )
    check_same_device({"student": student, "head": head.weight})


def _global_vectors(x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """One vector per image: the CLS token (token 0), or the mean token when the model has no
    prefix token; pooled ``(B, D)`` inputs pass through."""
    return pool(x, "cls" if num_prefix_tokens >= 1 else "mean", num_prefix_tokens=num_prefix_tokens)


def _compress(head: LinearHead, teacher: torch.Tensor) -> torch.Tensor:
    """``h(sg(teacher))`` in the head's dtype; called with autocast off. The callers validated
    the teacher: no second finiteness check (a host synchronisation)."""
    return head(teacher.detach().to(head.weight.dtype), finite_check=False)


def _cospress_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    head: LinearHead,
    num_prefix_tokens: int,
    temperatures: tuple[float, ...],
    style: str,
    chunk_elements: int,
) -> Terms:
    """Unchecked core: the batch-level global term, then per image ``(B,)`` the CLS term and,
    for token inputs, the local and tokens terms."""
    # a float64 head makes the maths float64, as float64 features do
    work = torch.promote_types(student.dtype, head.weight.dtype)
    target = teacher.detach().to(work)
    compressed = _compress(head, teacher).to(work)
    s = student.to(work)
    t_global = _global_vectors(target, num_prefix_tokens)
    c_global = _global_vectors(compressed, num_prefix_tokens)
    kl_options = (temperatures, style, chunk_elements)
    terms = {
        # .mean() over the one set rather than [0]: a view of the autograd Function's output
        # trips aot_autograd's alias replay after a graph break (torch 2.13)
        "global": neighbourhood_kl_per_set(t_global[None], c_global[None], *kl_options).mean(),
        "cls": flat_cosine_distance(_global_vectors(s, num_prefix_tokens), c_global.detach()),
    }
    if student.ndim == 3:
        terms["local"] = neighbourhood_kl_per_set(target, compressed, *kl_options)
        terms["tokens"] = flat_cosine_distance(s, compressed.detach())
    return Terms(terms)


def cospress_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    head: TeacherCompressionHead,
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    style: str = "full",
    weights: Mapping[str, float] | None = None,
    num_prefix_tokens: int = 1,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """CosPress feature distillation with a teacher compression head you own.

    ``loss = w_global L_global + w_cls L_cls + w_local L_local + w_tokens L_tokens``, the terms
    in this order (the last two for token inputs only):

    - ``L_global``: :func:`~featkd.cospress.neighbourhood_kl` between the CLS vectors of
      ``sg(teacher)`` and of ``h(sg(teacher))`` over the batch (the pooled vectors for
      ``(B, D)`` inputs): a batch-level term;
    - ``L_cls``: :func:`~featkd.cospress.flat_cosine_loss` between the student's CLS token
      and ``sg(h(teacher))``'s, per image;
    - ``L_local``: the neighbourhood KL between the tokens of each image of ``sg(teacher)``
      and of ``h(sg(teacher))``, per image;
    - ``L_tokens``: the flat cosine loss between the student tokens and ``sg(h(teacher))``, all
      tokens of an image flattened into one vector, per image.

    The head ``h`` gets gradient from the two KL terms only; the student from the two cosine
    terms only; the teacher never. The head runs in its parameters' dtype with autocast off
    (see :class:`~featkd.TeacherCompressionHead`); the KL and cosine maths in float32 or wider
    (float64 for float64 features or a float64 head) with autocast off; the loss comes back in
    float32 (float64 for float64 students). See :class:`CosPressLoss` for the details.

    Args:
        student: the student's features.
        teacher: the teacher's features (detached inside).
        head: the :class:`~featkd.TeacherCompressionHead` mapping ``D_t -> D_s``; put its
            parameters in the optimiser.
        temperatures: softmax temperatures of the KL terms, each in ``[1e-6, 1e6]``.
        style: ``"full"`` or ``"half"`` (see :func:`~featkd.cospress.neighbourhood_kl`).
        weights: weights by term name, e.g. ``{"global": 0.5}``; unnamed terms weigh 1.
        num_prefix_tokens: leading non-patch tokens; token 0 is the CLS token. With 0, the
            mean token stands in for the CLS token.
        chunk_elements: memory bound of the KL working tensors.
        reduction: ``"mean"`` over the batch; ``"sum"`` or ``"none"`` (one value per image)
            only with ``weights["global"] == 0``: the global term has no per-image value.
        labels: accepted for the common call and unused.

    Shape:
        - student: ``(B, N, D_s)`` tokens (CLS first) or ``(B, D_s)`` pooled, ``B >= 2``
        - teacher: ``(B, N, D_t)`` or ``(B, D_t)``, the same layout as ``student``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> from featkd import TeacherCompressionHead
        >>> head = TeacherCompressionHead(student_dim=32, teacher_dim=64)
        >>> student, teacher = torch.randn(4, 17, 32), torch.randn(4, 17, 64)
        >>> cospress_loss(student, teacher, head).shape
        torch.Size([])
        >>> cospress_loss(
        ...     student, teacher, head, weights={"global": 0.0}, reduction="none"
        ... ).shape
        torch.Size([4])
    """
    head = _check_head(head)
    temperatures = check_temperatures(temperatures)
    check_choice(style, "style", KL_STYLES)
    weights = check_weights(weights or {}, "weights", _POSITIONAL_WEIGHTS, "cospress_loss")
    num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
    chunk_elements = check_int(chunk_elements, "chunk_elements", 1)
    reduction = _check_reduction(reduction, weights)
    _check_inputs(student, teacher, head)
    loss, _ = evaluate(
        _cospress_terms,
        student,
        teacher,
        head,
        num_prefix_tokens,
        temperatures,
        style,
        chunk_elements,
        weights=weights,
        reduction=reduction,
    )
    return loss


class CosPressLoss(DistillationLoss):
    """CosPress feature distillation: a teacher compression head and the student loss.

    The loss of :func:`cospress_loss` with a :class:`~featkd.TeacherCompressionHead` ``h``
    (``LayerNorm -> Linear``) of its own: the head gets gradient from the two KL terms
    (``global``, ``local``) only; the student from the two cosine terms (``cls``, ``tokens``)
    only; the teacher never. Follows the official code: symmetrised joint distributions
    (``style="full"``), temperatures 0.01 to 0.10, all weights 1; ``style="half"`` is the
    row-wise conditional KL. The KL maths runs in float32 or wider with autocast off; the loss
    comes back in float32 (float64 for float64 students). A dead (all-zero) student sample or
    CLS token gets a finite gradient of the usual size (see
    :func:`~featkd.cospress.flat_cosine_loss`). After each call ``last_parts`` holds
    ``"total"`` and the terms that exist, in the order ``global``, ``cls``, ``local``,
    ``tokens`` (the paper's ``L_global``, ``L_token``, ``L_local``, ``L_fea``). ``labels`` is
    accepted and unused.

    The global term is over the batch on this device; with data parallelism each device sees
    only its own share of the batch. Wrap the loss in ``featkd.GlobalBatch`` to compute it
    over the global batch of all processes.

    Note:
        Owns parameters (the head): add ``loss_fn.parameters()`` to the optimiser, or the head
        stays at its random initialisation and the student learns a random projection.

    Args:
        student_dim: student width ``D_s`` (keyword-only; featkd 0.1 took
            ``(teacher_dim, student_dim)`` by position, still read so for one release with a
            ``FutureWarning``).
        teacher_dim: teacher width ``D_t``.
        temperatures: softmax temperatures of the KL terms, each in ``[1e-6, 1e6]``.
        style: ``"full"`` or ``"half"`` (see :func:`~featkd.cospress.neighbourhood_kl`).
        weights: weights by term name (``"global"``, ``"cls"``, ``"local"``, ``"tokens"``);
            unnamed terms weigh 1.
        num_prefix_tokens: leading non-patch tokens; token 0 is the CLS token. With 0, the
            mean token stands in for the CLS token.
        chunk_elements: memory bound of the KL working tensors.
        reduction: ``"mean"``; ``"sum"`` or ``"none"`` only with ``weights["global"] == 0``.
        device: where to create the head.
        dtype: dtype of the head's parameters.

    Shape:
        - student: ``(B, N, D_s)`` tokens (CLS first) or ``(B, D_s)`` pooled, ``B >= 2``
        - teacher: ``(B, N, D_t)`` or ``(B, D_t)``, the same layout as ``student``
        - labels: ignored
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> loss_fn = CosPressLoss(student_dim=32, teacher_dim=64)
        >>> student = torch.randn(4, 17, 32, requires_grad=True)
        >>> loss = loss_fn(student, torch.randn(4, 17, 64))
        >>> loss.backward()
        >>> list(loss_fn.last_parts)
        ['total', 'global', 'cls', 'local', 'tokens']
        >>> loss_fn.compress(torch.randn(4, 17, 64)).shape
        torch.Size([4, 17, 32])
    """

    def __init__(
        self,
        *widths: int,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
        style: str = "full",
        weights: Mapping[str, float] | None = None,
        num_prefix_tokens: int = 1,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        student_dim, teacher_dim = keyword_widths(
            name, widths, ("teacher_dim", "student_dim"), student_dim, teacher_dim
        )
        self.temperatures = check_temperatures(temperatures)
        check_choice(style, "style", KL_STYLES)
        self.style = style
        self.weights = check_weights(weights or {}, "weights", _POSITIONAL_WEIGHTS, name)
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.chunk_elements = check_int(chunk_elements, "chunk_elements", 1)
        self.reduction = _check_reduction(reduction, self.weights)
        self.head = TeacherCompressionHead(
            student_dim=student_dim, teacher_dim=teacher_dim, device=device, dtype=dtype
        )

    @property
    def teacher_dim(self) -> int:
        return self.head.teacher_dim

    @property
    def student_dim(self) -> int:
        return self.head.student_dim

    def compress(self, teacher: torch.Tensor) -> torch.Tensor:
        """The head applied to (detached) teacher features as the loss applies it (autocast
        off, in the head's dtype): what the student is trained to match. For evaluation, or to
        precompute targets (call it under ``torch.no_grad()``).

        Shape:
            - teacher: ``(..., D_t)``
            - output: ``(..., D_s)``, in the teacher's dtype

        Example:
            >>> CosPressLoss(student_dim=32, teacher_dim=64).compress(torch.randn(8, 64)).shape
            torch.Size([8, 32])
        """
        layouts = {1: "(D_t,)", 2: "(B, D)", 3: "(B, N, D)"}
        validate_features(teacher, "teacher", layouts, width=self.teacher_dim, symbol="D_t")
        with full_precision(teacher):
            return _compress(self.head, teacher).to(teacher.dtype)

    def _check(self, student, teacher, labels) -> None:
        _check_inputs(student, teacher, self.head)
        if self.reduction != "mean":  # weights is a plain attribute: it may have changed
            _check_reduction(self.reduction, self.weights)

    def _terms(self, student, teacher, labels) -> Terms:
        return _cospress_terms(
            student,
            teacher,
            self.head,
            self.num_prefix_tokens,
            self.temperatures,
            self.style,
            self.chunk_elements,
        )

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"temperatures={self.temperatures}, style={self.style!r}, weights={self.weights}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, reduction={self.reduction!r}"
        )
