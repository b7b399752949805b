"""Squared 2-Wasserstein (Bures) distance between Gaussians fitted to the two batches (KD2M).

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.
"""

from __future__ import annotations

import torch

from featkd._loss import Terms, check_reduction, evaluate
from featkd._options import check_bool, check_choice
from featkd.kd2m._base import BATCH_LEVEL, MatchingLoss
from featkd.kd2m._gaussian import bures_residual, centre, common_frame
from featkd.kd2m._sets import (
    check_class_reduction,
    make_groups,
    validate_pair,
)

__all__ = ["GaussianWassersteinLoss", "gaussian_wasserstein_loss"]

COVARIANCES = ("full", "diag")
_COVARIANCE = "a covariance needs two samples"
_BATCH_LEVEL = f"the distance between fitted Gaussians {BATCH_LEVEL}"


def _check_options(
    covariance: str, conditional: bool, class_reduction: str, num_classes: int | None
) -> None:
    check_choice(covariance, "covariance", COVARIANCES)
    check_bool(conditional, "conditional")
    check_class_reduction(class_reduction, conditional, num_classes)


def _gaussian_wasserstein_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    covariance: str,
    conditional: bool,
    class_reduction: str = "mean",
    num_classes: int | None = None,
) -> Terms:
    """Unchecked core (inputs in the working dtype): the batch-level term, and its mean and
    covariance parts apart."""
    # W2^2 of (x - m) / c is W2^2 of x over c^2: compute on entries in [-1, 1], rescale
    scaled_s, scaled_t, scale = common_frame(student, teacher.detach())
    groups = make_groups(scaled_s, scaled_t, labels, conditional, num_classes)
    counts = groups.counts
    mean_s, centred_s = centre(groups.student, groups.mask, counts)
    mean_t, centred_t = centre(groups.teacher, groups.mask, counts)
    mean_term = (mean_s - mean_t).square().sum(dim=-1)
    if covariance == "diag":
        std_s = torch.linalg.vector_norm(centred_s, dim=-2)  # sqrt(n) * sigma, zero-safe
        std_t = torch.linalg.vector_norm(centred_t, dim=-2)
        cov_term = (std_s - std_t).square().sum(dim=-1) / counts
    else:
        cov_term = bures_residual(centred_s, centred_t) / counts
    # times c twice: c^2 alone overflows float32 from c = 2^64 on
    mean_term, cov_term = mean_term * scale * scale, cov_term * scale * scale
    diagnostics = {
        "mean": groups.reduce(mean_term.detach(), class_reduction),
        "covariance": groups.reduce(cov_term.detach(), class_reduction),
    }
    if conditional:
        diagnostics["classes"] = groups.number()
    total = groups.reduce(mean_term + cov_term, class_reduction)
    return Terms({"gaussian_wasserstein": total}, diagnostics)


def gaussian_wasserstein_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    covariance: str = "full",
    conditional: bool = False,
    class_reduction: str = "mean",
    num_classes: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Squared Bures-Wasserstein distance between Gaussians fitted to the batches (KD2M eq. 5).

    ``||mu_s - mu_t||^2 + tr(S_s) + tr(S_t) - 2 tr((S_s^{1/2} S_t S_s^{1/2})^{1/2})`` with the
    maximum-likelihood moments (covariance divided by ``B``). The *squared* distance is returned
    (the distance itself has an infinite gradient at zero).

    ``covariance="full"`` never forms a ``D x D`` square root. With the centred batches
    ``X_s, X_t`` the covariance part equals ``min_O ||X_s - O X_t||_F^2 / B`` over orthogonal
    ``O``, attained at the polar factor of the ``B x B`` cross-Gram ``X_s X_t^T`` (of a
    ``D x D`` product of QR factors when ``B > D``), and is computed as that sum of squared
    residuals rather than as ``tr S_s + tr S_t - 2 tr(...)``: it is never negative, identical
    batches give zero to squared rounding and nearly identical ones (a converged distillation)
    keep their significant digits. Its gradient uses the polar factor over the non-zero
    singular values, finite for identical batches, constant features and ``B < D``.
    ``covariance="diag"`` is ``||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2`` with per-feature
    standard deviations (the official KD2M code's choice).

    ``conditional=True`` averages the distance over the classes present in ``labels``; a class
    seen once has a zero covariance on both sides and contributes ``||s - t||^2``, the
    distance between its two points (the exact ``W_2^2`` between single points).
    ``class_reduction="sum"`` sums over the classes instead (the official KD2M code's
    reduction; the mean keeps the loss's scale independent of the classes in the batch).

    Computed in float32 (float64 for float64 inputs) with autocast off, on the two batches
    shifted by their joint mean and divided by a common power of two ``c`` (entries in
    ``[-1, 1]``, detached), the result multiplied by ``c^2``: exact, and squares of features
    cannot overflow or underflow. Returned in float32 (float64 for a float64 student); the
    teacher gets no gradient.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices, for ``conditional``.
        covariance: ``"full"`` or ``"diag"``.
        conditional: average over the classes in ``labels``.
        class_reduction: ``"mean"`` (default) or ``"sum"`` (official KD2M) of the per-class
            distances; ``"sum"`` needs ``conditional=True``.
        num_classes: the number of classes, for ``conditional``: static shapes and no host
            synchronisation (see docs/reliability.md).
        reduction: ``"mean"`` only: the distance is a property of the two batches, with no
            per-sample values.

    Shape:
        - student: ``(B, D)``, ``B >= 2`` unless conditional
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer
        - output: scalar

    Example:
        >>> s = torch.randn(64, 128, dtype=torch.float64)
        >>> bool(gaussian_wasserstein_loss(s, s).abs() < 1e-9)
        True
        >>> one_d = torch.randn(1000, 1, dtype=torch.float64)
        >>> shifted = gaussian_wasserstein_loss(one_d, one_d + 10)  # N(m,s) vs N(m+10,s)
        >>> round(float(shifted), 6)
        100.0
    """
    _check_options(covariance, conditional, class_reduction, num_classes)
    check_reduction(reduction, batch_level=_BATCH_LEVEL)
    validate_pair(
        student, teacher, labels, conditional, batch_statistic=_COVARIANCE, num_classes=num_classes
    )
    loss, _ = evaluate(
        _gaussian_wasserstein_terms,
        student,
        teacher,
        labels,
        covariance=covariance,
        conditional=conditional,
        class_reduction=class_reduction,
        num_classes=num_classes,
    )
    return loss


class GaussianWassersteinLoss(MatchingLoss):
    """Squared Bures-Wasserstein distance between fitted Gaussians; see
    :func:`gaussian_wasserstein_loss`.

    Note:
        With a ``projector`` (for example ``torch.nn.Linear(D_s, D_t)`` when the widths
        differ) the module owns parameters: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        covariance: ``"full"`` or ``"diag"``.
        conditional: mean over the classes in ``labels`` of the per-class distance.
        class_reduction: ``"mean"`` or ``"sum"`` (official KD2M) over the classes.
        num_classes: the number of classes, for ``conditional`` without a host sync.
        projector: optional module applied to the student first (owned and trained).
        reduction: ``"mean"`` only (a batch-level distance).

    Shape:
        - student: ``(B, D_s)`` (``(B, D)`` without a projector)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    ``last_parts``: ``"total"``, ``"gaussian_wasserstein"`` (equal: one term), ``"mean"`` (``||mu_s - mu_t||^2``),
    ``"covariance"`` (the Bures term) and, when conditional, ``"classes"``.

    Example:
        >>> loss_fn = GaussianWassersteinLoss(projector=torch.nn.Linear(32, 64))
        >>> s, t = torch.randn(16, 32), torch.randn(16, 64)
        >>> loss_fn(s, t).backward()
        >>> loss_fn.projector.weight.grad.shape
        torch.Size([64, 32])
    """

    def __init__(
        self,
        covariance: str = "full",
        *,
        conditional: bool = False,
        class_reduction: str = "mean",
        num_classes: int | None = None,
        projector: torch.nn.Module | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(projector)
        _check_options(covariance, conditional, class_reduction, num_classes)
        self.reduction = check_reduction(reduction, batch_level=_BATCH_LEVEL)
        self.covariance = covariance
        self.conditional = conditional
        self.class_reduction = class_reduction
        self.num_classes = num_classes

    def _check(self, student, teacher, labels) -> int | None:
        return validate_pair(
            *(student, teacher, labels, self.conditional),
            batch_statistic=_COVARIANCE,
            num_classes=self.num_classes,
        )

    def _terms(self, student, teacher, labels) -> Terms:
        return _gaussian_wasserstein_terms(
            student,
            teacher,
            labels,
            covariance=self.covariance,
            conditional=self.conditional,
            class_reduction=self.class_reduction,
            num_classes=self.num_classes,
        )

    def extra_repr(self) -> str:
        text = f"covariance={self.covariance!r}, conditional={self.conditional}"
        if self.class_reduction != "mean":
            text += f", class_reduction={self.class_reduction!r}"
        if self.num_classes is not None:
            text += f", num_classes={self.num_classes}"
        return text
