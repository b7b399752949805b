"""Hinton logit distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featkd._checks import check_same_batch, check_same_device, check_width, validate_features
from featkd._loss import DistillationLoss, Terms, check_reduction, evaluate
from featkd._options import check_positive

__all__ = ["KDLoss", "kd_loss"]

_LOGITS = {2: "(B, K)"}


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor) -> None:
    validate_features(student, "student", _LOGITS)
    validate_features(teacher, "teacher", _LOGITS)
    check_same_batch(student, teacher, "student", "teacher")
    check_width(teacher, "teacher", student.shape[1], "K")
    check_same_device({"student": student, "teacher": teacher})


def _kd_terms(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> Terms:
    """Unchecked core: one ``T^2 KL`` per sample."""
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p = F.log_softmax(teacher.detach() / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return Terms({"kd": kl * temperature**2})


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 4.0,
    *,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge distillation of logits (Hinton et al., 2015).

    ``T^2 * KL(softmax(t_b / T) || softmax(s_b / T))`` per sample ``b``, the ``T^2`` keeping the
    gradient scale independent of the temperature; the mean over the batch by default. The
    teacher receives no gradient. Computed in float32 (float64 for float64 inputs) with
    autocast off, and returned so (float32 for half-precision logits).

    Args:
        student: the student's logits.
        teacher: the teacher's logits (detached inside).
        temperature: softening temperature ``T`` > 0.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per sample).
        labels: accepted for the common call and unused.

    Shape:
        - student: ``(B, K)``
        - teacher: ``(B, K)``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
        >>> kd_loss(s, t, temperature=4.0).shape
        torch.Size([])
        >>> kd_loss(s, t, reduction="none").shape
        torch.Size([8])
        >>> float(kd_loss(t, t))
        0.0
    """
    temperature = check_positive(temperature, "temperature")
    reduction = check_reduction(reduction)
    _check_inputs(student, teacher)
    loss, _ = evaluate(_kd_terms, student, teacher, temperature, reduction=reduction)
    return loss


class KDLoss(DistillationLoss):
    """Hinton logit distillation as a module; see :func:`kd_loss`.

    Args:
        temperature: softening temperature ``T`` (4.0 as in FCFD's CIFAR runs).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.

    Shape:
        - student: ``(B, K)`` logits
        - teacher: ``(B, K)`` logits
        - labels: ignored
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    ``last_parts``: ``"total"`` and ``"kd"`` (equal: one term).

    Example:
        >>> loss_fn = KDLoss(temperature=4.0)
        >>> loss = loss_fn(torch.randn(8, 10, requires_grad=True), torch.randn(8, 10))
        >>> loss.backward()
        >>> list(loss_fn.last_parts)
        ['total', 'kd']
    """

    def __init__(self, temperature: float = 4.0, *, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.reduction = check_reduction(reduction)

    def _check(self, student, teacher, labels) -> None:
        _check_inputs(student, teacher)

    def _terms(self, student, teacher, labels) -> Terms:
        return _kd_terms(student, teacher, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
