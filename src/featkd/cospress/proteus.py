"""Proteus-style feature distillation: student heads mapping up to the teacher, MSE.

The baseline CosPress is compared against. Student-side heads ``g = LayerNorm(D_s) ->
Linear(D_s, D_t)`` (:class:`~featkd.LinearHead`) map the student's features into the teacher's
width, where they are regressed onto the raw teacher features with a mean squared error: one
head and term for the CLS token, one for all tokens, in which the CLS slot goes through the CLS
head and the other tokens through the token head, as in the official code. (Proteus' optional
masked-patch term, weight 0 in the CosPress comparison runs, is not included.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from featkd._checks import ChoiceError, check_feature_pair, check_same_device
from featkd._loss import DistillationLoss, Terms, check_reduction, evaluate
from featkd._options import check_choice, check_int, check_weights, keyword_widths
from featkd.cospress.heads import LinearHead
from featkd.pooling import pool

__all__ = ["ProteusLoss", "proteus_loss"]

# the order of featkd 0.1's positional weights tuple
_POSITIONAL_WEIGHTS = ("tokens", "cls")
# which head maps the CLS token inside the tokens term: the official code's, or featkd 0.1's
_CLS_ROUTES = ("cls_head", "token_head")


def _check_route(value: Any) -> str:
    check_choice(value, "cls_in_token_term", _CLS_ROUTES)
    return value


def _check_head(head: Any, name: str, widths: tuple[int, int] | None = None) -> LinearHead:
    if not isinstance(head, LinearHead):
        raise ChoiceError(
            f"{name}: expected a featkd.LinearHead (LayerNorm -> Linear from the student's width "
            f"to the teacher's), got {type(head).__name__}"
        )
    if widths is not None and (head.in_features, head.out_features) != widths:
        raise ChoiceError(
            f"{name}: expected a LinearHead({widths[0]}, {widths[1]}) like cls_head, got "
            f"LinearHead({head.in_features}, {head.out_features})"
        )
    return head


def _check_inputs(
    student: torch.Tensor, teacher: torch.Tensor, cls_head: LinearHead, token_head: Any
) -> None:
    check_feature_pair(
        student, teacher, student_dim=cls_head.in_features, teacher_dim=cls_head.out_features
    )
    heads = {"cls_head": cls_head.weight}
    if student.ndim == 3:
        if token_head is None:
            raise ChoiceError(
                "token_head: required for token inputs (B, N, D_s): pass a second LinearHead, "
                "or pooled (B, D_s) features for the CLS term alone"
            )
        heads["token_head"] = token_head.weight
    check_same_device({"student": student, **heads})


def _mse(mapped: torch.Tensor, target: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """The mean squared error over all elements: per sample ``(B,)``, or over the whole batch in
    one pass (the value of featkd 0.1, bit for bit)."""
    if not per_sample:
        return F.mse_loss(mapped, target)
    return F.mse_loss(mapped, target, reduction="none").flatten(1).mean(dim=1)


def _proteus_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cls_head: LinearHead,
    token_head: LinearHead | None,
    num_prefix_tokens: int,
    per_sample: bool,
    cls_in_token_term: str = "cls_head",
) -> Terms:
    """Unchecked core: the CLS term and, for token inputs, the tokens term; per sample ``(B,)``,
    or their batch means with ``per_sample=False``. The heads run in their parameters' dtype.
    With ``cls_in_token_term="cls_head"`` and a CLS token, the tokens term compares
    ``cat(cls_head(S_cls), token_head(S_rest))`` with ``T``."""
    tokens = student.ndim == 3
    heads = (cls_head, token_head) if tokens else (cls_head,)
    work = student.dtype  # a float64 head makes the maths float64, as float64 features do
    for head in heads:
        work = torch.promote_types(work, head.weight.dtype)
    mode = "cls" if num_prefix_tokens >= 1 else "mean"
    target = teacher.detach().to(work)
    s_cls = pool(student.to(cls_head.weight.dtype), mode, num_prefix_tokens=num_prefix_tokens)
    t_cls = pool(target, mode, num_prefix_tokens=num_prefix_tokens)
    # the callers validated the inputs: the heads skip their own finiteness check (a host sync)
    mapped_cls = cls_head(s_cls, finite_check=False).to(work)
    terms = {"cls": _mse(mapped_cls, t_cls, per_sample)}
    if tokens:
        own_cls = cls_in_token_term == "cls_head" and num_prefix_tokens >= 1
        rest = student[:, 1:] if own_cls else student
        # the CLS slot through the CLS head (official), the other tokens through token_head
        parts = [mapped_cls.unsqueeze(1)] if own_cls else []
        if rest.shape[1] > 0:  # a CLS token alone has no other tokens
            parts.append(token_head(rest.to(token_head.weight.dtype), finite_check=False))
        mapped = torch.cat([part.to(work) for part in parts], dim=1)
        terms["tokens"] = _mse(mapped, target, per_sample)
    return Terms(terms)


def proteus_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cls_head: LinearHead,
    token_head: LinearHead | None = None,
    *,
    num_prefix_tokens: int = 1,
    cls_in_token_term: str = "cls_head",
    weights: Mapping[str, float] | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proteus feature distillation with student heads you own.

    ``loss = w_cls MSE(g_cls(S_cls), sg(T_cls)) + w_tokens MSE(cat(g_cls(S_cls),
    g_tokens(S_rest)), sg(T))``, the terms in this order, each the mean squared error over a
    sample's elements (the CLS vector, or all its tokens), then over the batch. In the tokens
    term the CLS slot goes through the CLS head and every other token (further prefix tokens
    and patches) through the token head, as in the official code, so the CLS head learns from
    both terms; ``cls_in_token_term="token_head"`` maps all tokens with the token head instead
    (featkd 0.1). With ``num_prefix_tokens=0`` there is no CLS slot: all tokens go through the
    token head. For pooled ``(B, D)`` inputs only the CLS term exists, on the pooled vectors.
    The student gets gradient from every term; the teacher never. The heads run with autocast off in their parameters' dtype (see
    :class:`~featkd.LinearHead`), the MSE in float32 or wider (float64 for float64 features or
    heads); the loss comes back in float32 (float64 for float64 students).

    Args:
        student: the student's features.
        teacher: the teacher's features (detached inside).
        cls_head: the :class:`~featkd.LinearHead` ``(D_s, D_t)`` of the CLS term.
        token_head: the ``LinearHead(D_s, D_t)`` of the tokens term; required for token inputs.
        num_prefix_tokens: leading non-patch tokens; token 0 is the CLS token. With 0, the mean
            token stands in for the CLS token.
        cls_in_token_term: which head maps the CLS token inside the tokens term:
            ``"cls_head"`` (the official code, default) or ``"token_head"`` (featkd 0.1: the
            token head maps all tokens).
        weights: weights by term name, e.g. ``{"cls": 0.5}``; unnamed terms weigh 1.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per sample).
        labels: accepted for the common call and unused.

    Shape:
        - student: ``(B, N, D_s)`` tokens (CLS first) or ``(B, D_s)`` pooled
        - teacher: ``(B, N, D_t)`` or ``(B, D_t)``, the same layout as ``student``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> from featkd import LinearHead
        >>> cls_head, token_head = LinearHead(32, 64), LinearHead(32, 64)
        >>> student, teacher = torch.randn(4, 17, 32), torch.randn(4, 17, 64)
        >>> proteus_loss(student, teacher, cls_head, token_head).shape
        torch.Size([])
        >>> proteus_loss(student[:, 0], teacher[:, 0], cls_head, reduction="none").shape
        torch.Size([4])
    """
    cls_head = _check_head(cls_head, "cls_head")
    if token_head is not None:
        _check_head(token_head, "token_head", (cls_head.in_features, cls_head.out_features))
    num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
    cls_in_token_term = _check_route(cls_in_token_term)
    weights = check_weights(weights or {}, "weights", _POSITIONAL_WEIGHTS, "proteus_loss")
    reduction = check_reduction(reduction)
    _check_inputs(student, teacher, cls_head, token_head)
    per_sample = reduction != "mean"
    loss, _ = evaluate(
        _proteus_terms,
        student,
        teacher,
        cls_head,
        token_head,
        num_prefix_tokens,
        per_sample,
        cls_in_token_term,
        weights=weights,
        reduction=reduction,
    )
    return loss


class ProteusLoss(DistillationLoss):
    """Student heads + MSE against the raw teacher (the Proteus baseline of CosPress).

    The loss of :func:`proteus_loss` with two :class:`~featkd.LinearHead` s of its own
    (``LayerNorm(D_s) -> Linear(D_s, D_t)``), ``cls_head`` and ``token_head``. The heads run
    with autocast off in their parameters' dtype and the MSE in float32 or wider; the loss comes
    back in float32 (float64 for float64 students). In the tokens term the CLS slot goes through
    ``cls_head`` as in the official code (``cls_in_token_term="token_head"`` for featkd 0.1's
    routing, the token head on all tokens). After each call ``last_parts`` holds
    ``"total"`` and the terms that exist, in the order ``cls``, ``tokens``. ``labels`` is
    accepted and unused.

    Note:
        Owns parameters (the two heads): add ``loss_fn.parameters()`` to the optimiser.

    Args:
        student_dim: student width ``D_s`` (keyword-only; positional ``(student_dim,
            teacher_dim)`` still work for one release, with a ``FutureWarning``).
        teacher_dim: teacher width ``D_t``.
        num_prefix_tokens: leading non-patch tokens; token 0 is the CLS token. With 0, the mean
            token stands in for the CLS token.
        cls_in_token_term: which head maps the CLS token inside the tokens term:
            ``"cls_head"`` (the official code, default) or ``"token_head"`` (featkd 0.1).
        weights: weights by term name (``"cls"``, ``"tokens"``); unnamed terms weigh 1.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per sample).
        device: where to create the heads.
        dtype: dtype of the heads' parameters.

    Shape:
        - student: ``(B, N, D_s)`` tokens (CLS first) or ``(B, D_s)`` pooled
        - teacher: ``(B, N, D_t)`` or ``(B, D_t)``, the same layout as ``student``
        - labels: ignored
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> loss_fn = ProteusLoss(student_dim=32, teacher_dim=64)
        >>> student = torch.randn(4, 17, 32, requires_grad=True)
        >>> loss = loss_fn(student, torch.randn(4, 17, 64))
        >>> loss.backward()
        >>> list(loss_fn.last_parts)
        ['total', 'cls', 'tokens']
    """

    def __init__(
        self,
        *widths: int,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        num_prefix_tokens: int = 1,
        cls_in_token_term: str = "cls_head",
        weights: Mapping[str, float] | None = None,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        # checked here, or the heads would report them as in_features and out_features
        student_dim, teacher_dim = keyword_widths(
            name, widths, ("student_dim", "teacher_dim"), student_dim, teacher_dim
        )
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.cls_in_token_term = _check_route(cls_in_token_term)
        self.weights = check_weights(weights or {}, "weights", _POSITIONAL_WEIGHTS, name)
        self.reduction = check_reduction(reduction)
        self.token_head = LinearHead(student_dim, teacher_dim, device=device, dtype=dtype)
        self.cls_head = LinearHead(student_dim, teacher_dim, device=device, dtype=dtype)

    @property
    def student_dim(self) -> int:
        return self.cls_head.in_features

    @property
    def teacher_dim(self) -> int:
        return self.cls_head.out_features

    def _check(self, student, teacher, labels) -> None:
        _check_inputs(student, teacher, self.cls_head, self.token_head)

    def _terms(self, student, teacher, labels) -> Terms:
        per_sample = self.reduction != "mean"
        return _proteus_terms(
            student,
            teacher,
            self.cls_head,
            self.token_head,
            self.num_prefix_tokens,
            per_sample,
            self.cls_in_token_term,
        )

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, "
            f"cls_in_token_term={self.cls_in_token_term!r}, weights={self.weights}, "
            f"reduction={self.reduction!r}"
        )
