"""Hinton logit distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featkd._checks import (
    check_positive,
    check_same_batch,
    check_same_device,
    check_width,
    compute_dtype,
    result_dtype,
    validate_features,
)

__all__ = ["KDLoss", "kd_loss"]

_LOGITS = {2: "(B, K)"}


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Knowledge distillation of logits (Hinton et al., 2015).

    ``T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T))``, the ``T^2`` keeping the
    gradient scale independent of the temperature. The teacher receives no gradient. Computed
    in float32 (float64 for float64 inputs), and returned so (float32 for half-precision logits).

    Shape:
        - student_logits: ``(B, K)``
        - teacher_logits: ``(B, K)``
        - output: scalar

    Example:
        >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
        >>> kd_loss(s, t, temperature=4.0).shape
        torch.Size([])
        >>> float(kd_loss(t, t))
        0.0
    """
    validate_features(student_logits, "student_logits", _LOGITS)
    validate_features(teacher_logits, "teacher_logits", _LOGITS)
    check_same_batch(student_logits, teacher_logits, "student_logits", "teacher_logits")
    check_width(teacher_logits, "teacher_logits", student_logits.shape[1], "K")
    check_same_device({"student_logits": student_logits, "teacher_logits": teacher_logits})
    check_positive(temperature, "temperature")
    work = compute_dtype(student_logits, teacher_logits)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_q = F.log_softmax(student_logits.to(work) / temperature, dim=1)
        log_p = F.log_softmax(teacher_logits.detach().to(work) / temperature, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return (kl * temperature**2).to(result_dtype(student_logits.dtype))


class KDLoss(nn.Module):
    """Hinton logit distillation as a module; see :func:`kd_loss`.

    Args:
        temperature: softening temperature ``T`` (4.0 as in FCFD's CIFAR runs).

    Shape:
        - student: ``(B, K)`` logits
        - teacher: ``(B, K)`` logits
        - output: scalar

    Example:
        >>> loss_fn = KDLoss(temperature=4.0)
        >>> loss = loss_fn(torch.randn(8, 10, requires_grad=True), torch.randn(8, 10))
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_positive(temperature, "temperature")
        self.temperature = float(temperature)
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss = kd_loss(student, teacher, self.temperature)
        self.last_parts = {"kd": loss.detach()}
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
