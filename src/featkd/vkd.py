"""VkD (Miles et al., CVPR 2024): orthogonal projection of the student + teacher normalisation.

``distance(P pool(student), normalize(sg(pool(teacher))))`` with ``P`` a ``D_t x D_s`` matrix with
orthonormal columns (matrix exponential of a skew-symmetric generator, first ``D_s`` columns).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featkd._checks import (
    ChoiceError,
    ShapeError,
    check_finite,
    check_floating,
    check_rank,
    check_same_batch,
    check_same_device,
    check_width,
    describe_shape,
)
from featkd._options import check_choice, check_int, check_positive
from featkd._precision import result_dtype, work_dtype
from featkd.normalize import Whitening, batch_standardize, layer_norm, whiten
from featkd.pooling import POOL_MODES, pool
from featkd.projector import OrthogonalProjector

__all__ = ["DISTANCES", "NORMALIZATIONS", "VkDLoss", "vkd_loss"]

NORMALIZATIONS = ("layer_norm", "batch_standardize", "whitening", "none")
DISTANCES = ("smooth_l1", "mse")
_STUDENT = {2: "(B, D_s)", 3: "(B, N, D_s)", 4: "(B, D_s, H, W)"}
_TEACHER = {2: "(B, D_t)", 3: "(B, N, D_t)", 4: "(B, D_t, H, W)"}


def _pooled(x: torch.Tensor, name: str, layouts, mode: str, num_prefix_tokens: int):
    check_rank(x, name, layouts)
    check_floating(x, name)
    return pool(x, mode, num_prefix_tokens=num_prefix_tokens, name=name)


def _check_options(
    normalize: Any, distance: Any, student_pool: Any, teacher_pool: Any, prefix: Any, eps: Any
) -> float:
    """The options shared by :func:`vkd_loss` and :class:`VkDLoss`; returns ``eps``."""
    check_choice(normalize, "normalize", NORMALIZATIONS)
    check_choice(distance, "distance", DISTANCES)
    check_choice(student_pool, "student_pool", POOL_MODES)
    check_choice(teacher_pool, "teacher_pool", POOL_MODES)
    check_int(prefix, "num_prefix_tokens", 0)
    for side, mode in (("student_pool", student_pool), ("teacher_pool", teacher_pool)):
        if mode == "cls" and prefix == 0:
            raise ChoiceError(
                f"{side}: 'cls' takes the first prefix token, but num_prefix_tokens is 0"
            )
    # eps divides (layer norm, standardisation) or regularises a Cholesky factor: 0, negative
    # or NaN give NaN losses
    return check_positive(eps, "eps")


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "smooth_l1":
        return F.smooth_l1_loss(a, b, beta=1.0)
    return F.mse_loss(a, b)


def vkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    projection: torch.Tensor,
    *,
    normalize: str = "layer_norm",
    distance: str = "smooth_l1",
    student_pool: str = "patch_mean",
    teacher_pool: str = "gap",
    num_prefix_tokens: int = 1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The VkD feature loss with a given projection matrix.

    ``distance(pool(student) P^T, normalize(sg(pool(teacher))))``. The teacher is normalised
    with ``layer_norm`` (per sample across channels, no affine: the classification prior),
    ``batch_standardize`` (per channel over the batch, applied to both sides: the detection
    prior), ``whitening`` (Cholesky whitening with this batch's statistics: the generative
    prior) or ``none``. The distance is smooth-L1 (beta 1, mean; as in the official code) or
    MSE (as written in the paper).

    Pooling is by named layout (see :func:`featkd.pool`): ``student_pool`` for the student
    (default ``patch_mean``: mean of the patch tokens, prefix tokens excluded), ``teacher_pool``
    for the teacher (default ``gap``: global average pool of a conv map). ``(B, D)`` inputs
    are already pooled and pass through.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        projection: ``(D_t, D_s)`` matrix, typically :attr:`OrthogonalProjector.weight`.

    Shape:
        - student: ``(B, D_s)``, ``(B, N, D_s)`` or ``(B, D_s, H, W)``
        - teacher: ``(B, D_t)``, ``(B, N, D_t)`` or ``(B, D_t, H, W)``
        - projection: ``(D_t, D_s)``
        - output: scalar

    Example:
        >>> student = torch.randn(8, 1 + 16, 32)          # CLS + 4x4 patches
        >>> teacher = torch.randn(8, 64, 7, 7)            # a CNN map
        >>> proj = torch.eye(64, 32)
        >>> vkd_loss(student, teacher, proj).shape
        torch.Size([])
    """
    eps = _check_options(normalize, distance, student_pool, teacher_pool, num_prefix_tokens, eps)
    s = _pooled(student, "student", _STUDENT, student_pool, num_prefix_tokens)
    t = _pooled(teacher, "teacher", _TEACHER, teacher_pool, num_prefix_tokens)
    check_same_batch(s, t, "student", "teacher")
    check_same_device({"student": s, "teacher": t, "projection": projection})
    check_rank(projection, "projection", {2: "(D_t, D_s)"})
    if projection.shape != (t.shape[1], s.shape[1]):
        raise ShapeError(
            f"projection: expected ({t.shape[1]}, {s.shape[1]}) = (D_t, D_s) for the pooled "
            f"student {describe_shape(s.shape)} and teacher {describe_shape(t.shape)}, "
            f"got {describe_shape(projection.shape)}"
        )
    if normalize in ("batch_standardize", "whitening") and s.shape[0] < 2:
        raise ShapeError(
            f"student: expected a batch of at least 2 for normalize={normalize!r} "
            f"(batch statistics), got {describe_shape(student.shape)}"
        )
    check_finite(s, "student")
    check_finite(t, "teacher")
    work = work_dtype(s, t)
    with torch.autocast(s.device.type, enabled=False):
        projected = s.to(work) @ projection.to(work).mT
        target = t.detach().to(work)
        if normalize == "layer_norm":
            target = layer_norm(target, eps)
        elif normalize == "batch_standardize":
            target = batch_standardize(target, eps, name="teacher")
            projected = batch_standardize(projected, eps, name="student")
        elif normalize == "whitening":
            target = whiten(target, "cholesky", eps, name="teacher")
        return _distance(projected, target, distance).to(result_dtype(student.dtype))


class VkDLoss(nn.Module):
    """VkD: orthogonal projection of the student into the teacher's width + normalised teacher.

    ``distance(P pool(student), normalize(sg(pool(teacher))))`` where ``P`` (``D_t x D_s``,
    orthonormal columns) is an owned :class:`OrthogonalProjector` (``map="matrix_exp"`` by
    default: the first ``D_s`` columns of ``expm(A)``, ``A`` skew-symmetric, starting at the
    identity columns). Defaults follow the official code: smooth-L1 distance (the paper writes
    MSE: ``distance="mse"``), layer-normalised teacher for classification. ``"whitening"``
    uses an owned :class:`Whitening` (Cholesky, batch statistics in training, running
    statistics in eval), ``"batch_standardize"`` standardises both sides over the batch.

    Note:
        Owns parameters: add ``loss_fn.parameters()`` to the optimiser, or the projection
        silently stays at its initial value.

    Args:
        student_dim: ``D_s``.
        teacher_dim: ``D_t`` (``>= D_s``).
        normalize: ``"layer_norm"``, ``"batch_standardize"``, ``"whitening"`` or ``"none"``.
        distance: ``"smooth_l1"`` or ``"mse"``.
        map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"`` (see :class:`OrthogonalProjector`).
        student_pool: pooling mode for student tokens or maps (``"patch_mean"``: CLS excluded).
        teacher_pool: pooling mode for teacher maps or tokens (``"gap"`` for CNN maps; use
            ``"mean"``, ``"cls"`` or ``"patch_mean"`` for a token teacher).
        num_prefix_tokens: leading non-patch tokens of token inputs.
        eps: layer norm / standardisation epsilon, and relative whitening shrinkage; > 0.

    Every option is checked when the loss is built (:class:`~featkd.ChoiceError` naming it):
    an ``eps`` that is not a finite number > 0, a pool mode :func:`featkd.pool` does not know
    (or ``"cls"`` with ``num_prefix_tokens=0``), widths that are not positive ints.

    Shape:
        - student: ``(B, D_s)``, ``(B, N, D_s)`` or ``(B, D_s, H, W)``
        - teacher: ``(B, D_t)``, ``(B, N, D_t)`` or ``(B, D_t, H, W)``
        - output: scalar

    Example:
        >>> loss_fn = VkDLoss(student_dim=32, teacher_dim=64)
        >>> student = torch.randn(8, 17, 32, requires_grad=True)   # CLS + 16 patches
        >>> teacher = torch.randn(8, 64, 7, 7)                     # CNN map
        >>> loss = loss_fn(student, teacher)
        >>> loss.backward()
        >>> loss_fn.projector.generator.grad is not None
        True
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        normalize: str = "layer_norm",
        distance: str = "smooth_l1",
        map: str = "matrix_exp",
        student_pool: str = "patch_mean",
        teacher_pool: str = "gap",
        num_prefix_tokens: int = 1,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(student_dim, "student_dim", 1)
        check_int(teacher_dim, "teacher_dim", 1)
        eps = _check_options(
            normalize, distance, student_pool, teacher_pool, num_prefix_tokens, eps
        )
        if teacher_dim < student_dim:
            raise ChoiceError(
                f"teacher_dim: expected >= student_dim={student_dim} (VkD projects the student "
                f"up into the teacher's width), got {teacher_dim}"
            )
        self.projector = OrthogonalProjector(
            student_dim, teacher_dim, map=map, device=device, dtype=dtype
        )
        self.whitening = (
            Whitening(teacher_dim, eps=eps, device=device) if normalize == "whitening" else None
        )
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.normalize, self.distance = normalize, distance
        self.student_pool, self.teacher_pool = student_pool, teacher_pool
        self.num_prefix_tokens, self.eps = num_prefix_tokens, eps
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        s = _pooled(student, "student", _STUDENT, self.student_pool, self.num_prefix_tokens)
        t = _pooled(teacher, "teacher", _TEACHER, self.teacher_pool, self.num_prefix_tokens)
        check_width(s, "student", self.student_dim, "D_s")
        check_width(t, "teacher", self.teacher_dim, "D_t")
        normalize = self.normalize
        if self.whitening is not None:  # the teacher meets the whitening before vkd_loss's checks
            check_same_device({"student": s, "teacher": t})
            check_same_batch(s, t, "student", "teacher")
            # the whitening checks the rest (finite, batch of two, its statistics' device)
            t = self.whitening(t.detach(), name="teacher")  # running statistics for eval mode
            normalize = "none"
        loss = vkd_loss(
            s,
            t,
            self.projector.weight,
            normalize=normalize,
            distance=self.distance,
            eps=self.eps,
        )
        self.last_parts = {"vkd": loss.detach()}
        return loss

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"normalize={self.normalize!r}, distance={self.distance!r}, "
            f"student_pool={self.student_pool!r}, teacher_pool={self.teacher_pool!r}"
        )
