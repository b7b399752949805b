"""Proteus-style feature distillation: student heads mapping up to the teacher, MSE.

The baseline CosPress is compared against. Student-side heads ``g = LayerNorm(D_s) ->
Linear(D_s, D_t)`` (:class:`~featkd.LinearHead`) map the student's features into the teacher's
width, where they are regressed onto the raw teacher features with a mean squared error: one
head and term for the CLS token, one for all tokens. (Proteus' optional masked-patch term is
not included.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featkd._checks import check_feature_pair, check_same_device
from featkd._options import check_int, check_weights
from featkd._precision import result_dtype, work_dtype
from featkd.heads import LinearHead
from featkd.pooling import pool

__all__ = ["ProteusLoss"]

_TERMS = ("tokens", "cls")


class ProteusLoss(nn.Module):
    """Student heads + MSE against the raw teacher (the Proteus baseline of CosPress).

    ``loss = w_tokens MSE(g_tokens(S), sg(T)) + w_cls MSE(g_cls(S_cls), sg(T_cls))``, each MSE the
    mean over all elements. ``g_tokens`` and ``g_cls`` are separate :class:`~featkd.LinearHead`
    s (``LayerNorm(D_s) -> Linear(D_s, D_t)``). For pooled ``(B, D)`` inputs only the CLS term
    exists, on the pooled vectors. The heads and the student get gradient from every term; the
    teacher never. The heads run with autocast off in their own dtype and the MSE in float32
    or wider; the loss comes back in float32 (float64 for float64 students). After each call
    ``last_parts`` holds the detached terms that exist (``tokens``, ``cls``).

    Note:
        Owns parameters (the two heads): add ``loss_fn.parameters()`` to the optimiser.

    Args:
        student_dim: student width ``D_s``.
        teacher_dim: teacher width ``D_t``.
        num_prefix_tokens: leading non-patch tokens; token 0 is the CLS token. With 0, the mean
            token stands in for the CLS token.
        weights: weights of the terms ``(tokens, cls)``.
        device: where to create the heads.
        dtype: dtype of the heads' parameters.

    Shape:
        - student: ``(B, N, D_s)`` tokens (CLS first) or ``(B, D_s)`` pooled
        - teacher: ``(B, N, D_t)`` or ``(B, D_t)``, the same layout as ``student``
        - output: scalar

    Example:
        >>> loss_fn = ProteusLoss(student_dim=32, teacher_dim=64)
        >>> student = torch.randn(4, 17, 32, requires_grad=True)
        >>> loss = loss_fn(student, torch.randn(4, 17, 64))
        >>> loss.backward()
        >>> sorted(loss_fn.last_parts)
        ['cls', 'tokens']
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        num_prefix_tokens: int = 1,
        weights: dict[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # checked here, or the heads would report them as in_features and out_features
        check_int(student_dim, "student_dim", 1)
        check_int(teacher_dim, "teacher_dim", 1)
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.weights = tuple(
            check_weights(weights or {}, "weights", _TERMS, type(self).__name__).values()
        )
        self.token_head = LinearHead(student_dim, teacher_dim, device=device, dtype=dtype)
        self.cls_head = LinearHead(student_dim, teacher_dim, device=device, dtype=dtype)
        self.last_parts: dict[str, torch.Tensor] = {}

    @property
    def student_dim(self) -> int:
        return self.cls_head.in_features

    @property
    def teacher_dim(self) -> int:
        return self.cls_head.out_features

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the loss; ``labels`` is accepted for a uniform call and unused."""
        check_feature_pair(
            student, teacher, student_dim=self.student_dim, teacher_dim=self.teacher_dim
        )
        check_same_device({"student": student, "heads": self.cls_head.weight})
        work = work_dtype(student, teacher, self.cls_head.weight)
        mode = "cls" if self.num_prefix_tokens >= 1 else "mean"
        with torch.autocast(student.device.type, enabled=False):
            head_dtype = self.cls_head.weight.dtype
            target = teacher.detach().to(work)
            s = student.to(head_dtype)
            s_cls = pool(s, mode, num_prefix_tokens=self.num_prefix_tokens)
            t_cls = pool(target, mode, num_prefix_tokens=self.num_prefix_tokens)
            # the inputs are validated above: the heads skip their own finiteness check
            s_cls_mapped = self.cls_head(s_cls, finite_check=False)
            parts = {"cls": F.mse_loss(s_cls_mapped.to(work), t_cls)}
            if student.ndim == 3:
                s_mapped = self.token_head(s, finite_check=False)
                parts["tokens"] = F.mse_loss(s_mapped.to(work), target)
            weight = dict(zip(_TERMS, self.weights, strict=True))
            total = sum(weight[name] * value for name, value in parts.items())
        self.last_parts = {name: parts[name].detach() for name in _TERMS if name in parts}
        return total.to(result_dtype(student.dtype))

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, weights={self.weights}"
        )
