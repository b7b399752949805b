"""The VkD loss as a function of a given projection: :func:`vkd_loss`, its checks and the
unchecked core that :class:`featkd.VkDLoss` calls too."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from featkd._checks import (
    ChoiceError,
    ShapeError,
    check_finite,
    check_floating,
    check_min_batch,
    check_rank,
    check_same_batch,
    check_same_device,
    check_width,
    describe_shape,
)
from featkd._loss import Terms, check_reduction, evaluate
from featkd._options import check_choice, check_int, check_positive, renamed
from featkd.pooling import POOL_MODES, pool, pooled_width
from featkd.vkd import _normalization
from featkd.vkd.normalize import Whitening

__all__ = ["DISTANCES", "NORMALIZATIONS", "vkd_loss"]

NORMALIZATIONS = ("layer_norm", "batch_standardize", "whitening", "none")
DISTANCES = ("smooth_l1", "mse")
_STUDENT = {2: "(B, D_s)", 3: "(B, N, D_s)", 4: "(B, D_s, H, W)"}
_TEACHER = {2: "(B, D_t)", 3: "(B, N, D_t)", 4: "(B, D_t, H, W)"}
_EPS = 1e-5  # the default normalisation epsilon, and the default relative whitening shrinkage
# with these normalisations every sample's target depends on the whole batch
_BATCH_STATISTICS = ("batch_standardize", "whitening")


def _check_options(
    normalize: Any,
    distance: Any,
    student_pool: Any,
    teacher_pool: Any,
    prefix: Any,
    eps: Any,
    shrinkage: Any,
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
    if shrinkage is not None and normalize != "whitening":
        raise ChoiceError(
            f"shrinkage: only used by normalize='whitening', got normalize={normalize!r}"
        )
    # eps divides (layer norm, standardisation): 0, negative or NaN give NaN losses
    return check_positive(eps, "eps")


def _whitening_eps(normalize: str, eps: float) -> float | None:
    # featkd 0.1 took the relative whitening shrinkage as eps: an eps other than the default
    # with normalize="whitening" is that, passed on to renamed() for its FutureWarning
    return eps if normalize == "whitening" and eps != _EPS else None


def _pooled_width(x: Any, name: str, layouts: dict, mode: str, prefix: int) -> int:
    """Checks ``x`` (a floating tensor of one of ``layouts`` that ``pool`` takes with ``mode``)
    and returns its width after pooling, without pooling it: the batch is pooled once, in the
    core."""
    check_rank(x, name, layouts)
    return pooled_width(x, mode, num_prefix_tokens=prefix, name=name)


def _check_inputs(
    student: Any,
    teacher: Any,
    *,
    student_pool: str,
    teacher_pool: str,
    num_prefix_tokens: int,
    normalize: str,
    whitening: Whitening | None,
    projection: tuple[str, torch.Tensor],
    student_dim: int | None = None,
    teacher_dim: int | None = None,
) -> tuple[int, int]:
    """The one validation of a VkD call; returns the pooled widths ``(D_s, D_t)``.
    ``projection`` is named as the caller knows it (the argument, or the loss's projector)."""
    d_s = _pooled_width(student, "student", _STUDENT, student_pool, num_prefix_tokens)
    d_t = _pooled_width(teacher, "teacher", _TEACHER, teacher_pool, num_prefix_tokens)
    if student_dim is not None:
        check_width(student, "student", student_dim, "D_s", dim=1 if student.ndim == 4 else -1)
    if teacher_dim is not None:
        check_width(teacher, "teacher", teacher_dim, "D_t", dim=1 if teacher.ndim == 4 else -1)
    check_same_batch(student, teacher, "student", "teacher")
    check_same_device({"student": student, "teacher": teacher, projection[0]: projection[1]})
    if whitening is not None:
        whitening.check_batch(teacher, "teacher")
    elif normalize in _BATCH_STATISTICS:
        check_min_batch(student, "student", 2, f"batch statistics of normalize={normalize!r}")
    check_finite(student, "student")
    check_finite(teacher, "teacher")
    return d_s, d_t


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str, per_sample: bool) -> torch.Tensor:
    if not per_sample:  # the mean over every element, as featkd 0.1 computed it (bit for bit)
        if distance == "smooth_l1":
            return F.smooth_l1_loss(a, b, beta=1.0)
        return F.mse_loss(a, b)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(a, b, beta=1.0, reduction="none").mean(dim=1)
    return F.mse_loss(a, b, reduction="none").mean(dim=1)


def _vkd_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    projection: torch.Tensor,
    *,
    normalize: str,
    distance: str,
    student_pool: str,
    teacher_pool: str,
    num_prefix_tokens: int,
    eps: float,
    shrinkage: float,
    whitening: Whitening | None,
    per_sample: bool,
) -> Terms:
    """Unchecked core, in the working dtype: the ``vkd`` term, per sample ``(B,)`` (the mean
    over the teacher's width), or with ``per_sample=False`` already its mean over the batch."""
    s = pool(student, student_pool, num_prefix_tokens=num_prefix_tokens, name="student")
    t = pool(teacher.detach(), teacher_pool, num_prefix_tokens=num_prefix_tokens, name="teacher")
    projected = s @ projection.to(s.dtype).mT
    if normalize == "layer_norm":
        t = _normalization.layer_norm(t, eps)
    elif normalize == "batch_standardize":
        t = _normalization.batch_standardize(t, eps)
        projected = _normalization.batch_standardize(projected, eps)
    elif normalize == "whitening" and whitening is not None:
        t = whitening.whiten_unchecked(t)
    elif normalize == "whitening":
        t = _normalization.whiten(t, *_normalization.covariance(t), "cholesky", shrinkage)
    return Terms({"vkd": _distance(projected, t, distance, per_sample)})


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
    eps: float = _EPS,
    shrinkage: float | None = None,
    whitening: Whitening | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The VkD feature loss with a given projection matrix.

    ``distance(pool(student) P^T, normalize(sg(pool(teacher))))``, per sample the mean over the
    teacher's width; the mean over the batch by default. The teacher is normalised with
    ``layer_norm`` (per sample across channels, no affine: the classification prior),
    ``batch_standardize`` (per channel over the batch, applied to both sides: the detection
    prior), ``whitening`` (Cholesky whitening: the generative prior) or ``none``. The distance
    is smooth-L1 (beta 1; as in the official code) or squared error (``"mse"``, as written in
    the paper). Computed in float32 (float64 for float64 inputs) with autocast off; returned
    in float32 (float64 for float64 students).

    ``whitening=None`` whitens with this batch's statistics. Pass a :class:`Whitening` to whiten
    as it does: batch statistics folded into its running estimates in training mode, the
    running estimates in eval mode. ``vkd_loss(s, t, loss_fn.projector.weight,
    normalize="whitening", whitening=loss_fn.whitening)`` is ``loss_fn(s, t)`` of a
    :class:`VkDLoss` in either mode.

    With ``batch_standardize`` or whitening by batch statistics, each sample's value depends on
    the whole batch through the statistics: the values of ``reduction="none"`` are per sample
    but not independent of each other, and shards of a batch do not average to the batch's
    loss (see :class:`featkd.GlobalBatch`).

    Pooling is by named layout (see :func:`featkd.pool`): ``student_pool`` for the student
    (default ``patch_mean``: mean of the patch tokens, prefix tokens excluded), ``teacher_pool``
    for the teacher (default ``gap``: global average pool of a conv map). ``(B, D)`` inputs
    are already pooled and pass through.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        projection: ``(D_t, D_s)`` matrix, typically :attr:`OrthogonalProjector.weight`.
        normalize: ``"layer_norm"``, ``"batch_standardize"``, ``"whitening"`` or ``"none"``.
        distance: ``"smooth_l1"`` or ``"mse"``.
        student_pool: pooling mode of the student.
        teacher_pool: pooling mode of the teacher.
        num_prefix_tokens: leading non-patch tokens of token inputs.
        eps: layer norm / standardisation epsilon, > 0.
        shrinkage: ``normalize="whitening"`` without ``whitening`` only: the relative shrinkage
            of the batch covariance (see :func:`featkd.functional.whiten`), > 0; default 1e-5.
            (featkd 0.1 took it as ``eps``; that still works for one release, with a
            ``FutureWarning``.)
        whitening: ``normalize="whitening"`` only: the :class:`Whitening` to whiten with (its
            own method and shrinkage apply).
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per sample).
        labels: accepted for the common call and unused.

    Shape:
        - student: ``(B, D_s)``, ``(B, N, D_s)`` or ``(B, D_s, H, W)``
        - teacher: ``(B, D_t)``, ``(B, N, D_t)`` or ``(B, D_t, H, W)``
        - projection: ``(D_t, D_s)``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> student = torch.randn(8, 1 + 16, 32)          # CLS + 4x4 patches
        >>> teacher = torch.randn(8, 64, 7, 7)            # a CNN map
        >>> proj = torch.eye(64, 32)
        >>> vkd_loss(student, teacher, proj).shape
        torch.Size([])
        >>> vkd_loss(student, teacher, proj, reduction="none").shape
        torch.Size([8])
    """
    eps = _check_options(
        normalize, distance, student_pool, teacher_pool, num_prefix_tokens, eps, shrinkage
    )
    old_eps = _whitening_eps(normalize, eps)
    shrinkage_given = shrinkage is not None or old_eps is not None
    shrinkage = renamed("vkd_loss", "eps", "shrinkage", old_eps, shrinkage, _EPS)
    shrinkage = check_positive(shrinkage, "shrinkage" if old_eps is None else "eps")
    reduction = check_reduction(reduction)
    if whitening is not None:
        if not isinstance(whitening, Whitening):
            raise ChoiceError(
                f"whitening: expected None or a featkd.Whitening, got {type(whitening).__name__}"
            )
        if normalize != "whitening":
            raise ChoiceError(
                f"whitening: only used by normalize='whitening', got normalize={normalize!r}"
            )
        if shrinkage_given:
            raise ChoiceError(
                f"shrinkage: the whitening module has its own "
                f"(shrinkage={whitening.shrinkage}); pass shrinkage or whitening, not both"
            )
    check_rank(projection, "projection", {2: "(D_t, D_s)"})
    check_floating(projection, "projection")
    d_s, d_t = _check_inputs(
        student,
        teacher,
        student_pool=student_pool,
        teacher_pool=teacher_pool,
        num_prefix_tokens=num_prefix_tokens,
        normalize=normalize,
        whitening=whitening,
        projection=("projection", projection),
    )
    if projection.shape != (d_t, d_s):
        raise ShapeError(
            f"projection: expected ({d_t}, {d_s}) = (D_t, D_s) for the student "
            f"{describe_shape(student.shape)} and teacher {describe_shape(teacher.shape)}, "
            f"got {describe_shape(projection.shape)}"
        )
    if whitening is not None and whitening.dim != d_t:
        raise ShapeError(
            f"whitening: expected dim D_t={d_t} (the width of the teacher "
            f"{describe_shape(teacher.shape)}), got Whitening({whitening.dim})"
        )
    loss, _ = evaluate(
        _vkd_terms,
        student,
        teacher,
        projection,
        normalize=normalize,
        distance=distance,
        student_pool=student_pool,
        teacher_pool=teacher_pool,
        num_prefix_tokens=num_prefix_tokens,
        eps=eps,
        shrinkage=shrinkage,
        whitening=whitening,
        per_sample=reduction != "mean",
        reduction=reduction,
    )
    return loss
