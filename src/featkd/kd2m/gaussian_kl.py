"""Kullback-Leibler divergence between Gaussians fitted to the two batches (KD2M eq. 6).

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.
"""

from __future__ import annotations

import math

import torch

from featkd._loss import Terms, check_reduction, evaluate
from featkd._options import check_bool, check_choice, check_positive, renamed
from featkd.kd2m._base import BATCH_LEVEL, MatchingLoss
from featkd.kd2m._gaussian import (
    centre,
    common_frame,
    shrunk_covariance,
    shrunk_logdet,
    shrunk_mahalanobis,
    shrunk_trace_inverse_product,
)
from featkd.kd2m._sets import make_groups, validate_pair

__all__ = ["KL_DIRECTIONS", "GaussianKLLoss", "gaussian_kl_loss"]

COVARIANCES = ("full", "diag")
_COVARIANCE = "a covariance needs two samples"
KL_DIRECTIONS = ("student_teacher", "teacher_student")
_BATCH_LEVEL = f"the divergence between fitted Gaussians {BATCH_LEVEL}"
_RIDGE = 1e-3


def _check_options(covariance: str, direction: str, ridge: float, conditional: bool) -> float:
    check_choice(covariance, "covariance", COVARIANCES)
    check_choice(direction, "direction", KL_DIRECTIONS)
    check_bool(conditional, "conditional")
    return check_positive(ridge, "ridge")


def _gaussian_kl_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    covariance: str,
    direction: str,
    ridge: float,
    conditional: bool,
) -> Terms:
    """Unchecked core (inputs in the working dtype): the batch-level term, and its mean and
    covariance parts apart."""
    # full covariances: inverses with condition numbers up to ||S|| / ridge, so float64
    work = torch.float64 if covariance == "full" else student.dtype
    # KL is invariant under x -> (x - m) / c applied to both sides with ridge -> ridge / c^2:
    # the maths sees entries and shrinkage at most 1 (ridge stays in the caller's units)
    scaled_s, scaled_t, scale = common_frame(
        student.to(work), teacher.detach().to(work), floor=math.sqrt(ridge)
    )
    # in float64, where c^2 of any float32 c is exact (in float32, 1 / c^2 overflows for
    # c ~ 1e-19); clamped so that an ridge far below huge features cannot become 0
    shrink = (ridge / scale.double().square()).to(work).clamp_min(torch.finfo(work).tiny)
    groups = make_groups(scaled_s, scaled_t, labels, conditional)
    counts = groups.counts
    mean_s, centred_s = centre(groups.student, groups.mask, counts)
    mean_t, centred_t = centre(groups.teacher, groups.mask, counts)
    # KL(p || q): p is the first-named side of `direction`
    if direction == "student_teacher":
        mean_p, centred_p, mean_q, centred_q = mean_s, centred_s, mean_t, centred_t
    else:
        mean_p, centred_p, mean_q, centred_q = mean_t, centred_t, mean_s, centred_s
    width = student.shape[1]
    delta = mean_p - mean_q
    if covariance == "diag":
        var_p = centred_p.square().sum(dim=-2) / counts[:, None] + shrink
        var_q = centred_q.square().sum(dim=-2) / counts[:, None] + shrink
        mahalanobis = (delta.square() / var_q).sum(dim=-1)
        rest = (var_p / var_q - 1 + var_q.log() - var_p.log()).sum(dim=-1)
    else:
        cov_p = shrunk_covariance(centred_p, counts, shrink)
        cov_q = shrunk_covariance(centred_q, counts, shrink, invertible=True)
        mahalanobis = shrunk_mahalanobis(cov_q, delta)
        rest = (
            shrunk_trace_inverse_product(cov_q, cov_p)
            - width
            + shrunk_logdet(cov_q)
            - shrunk_logdet(cov_p)
        )
    per_group = 0.5 * (mahalanobis + rest)
    diagnostics = {
        "mean": 0.5 * mahalanobis.detach().mean(),
        "covariance": 0.5 * rest.detach().mean(),
    }
    if conditional:
        diagnostics["classes"] = torch.tensor(float(len(groups.sizes)))
    return Terms({"gaussian_kl": per_group.mean()}, diagnostics)


def gaussian_kl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    covariance: str = "full",
    direction: str = "student_teacher",
    ridge: float | None = None,
    conditional: bool = False,
    reduction: str = "mean",
    eps: float | None = None,
) -> torch.Tensor:
    """KL divergence between Gaussians fitted to the student and teacher batches (KD2M eq. 6).

    With ``p`` the first and ``q`` the second side of ``direction`` (``"student_teacher"``:
    ``KL(P_S || P_T)``, the form written in KD2M; ``"teacher_student"``: ``KL(P_T || P_S)``)::

        0.5 [tr(S_q^-1 S_p) + (mu_q - mu_p)^T S_q^-1 (mu_q - mu_p) - D
             + log det S_q - log det S_p]

    The covariances are the maximum-likelihood ones (divided by ``B``) shrunk by ``ridge``:
    ``S + ridge I``. Shrinkage is required: with ``B <= D`` a batch covariance is singular, and it
    sets the scale of the loss (directions the teacher does not span cost ``~ variance / ridge``),
    so keep ``ridge`` fixed across a run. ``ridge`` is in the units of the features (it is not
    relative to their scale). When ``B < D`` the inverses and log-determinants go through the
    Woodbury identity and the matrix determinant lemma on ``B x B`` matrices, never a
    ``D x D`` one, with the quadratic forms as sums of squares of residuals rather than
    Woodbury's difference ``(|v|^2 - |R^-T F v|^2) / ridge`` (which loses every digit when the
    features are far above ``sqrt(ridge)``). The two batches are shifted by their joint mean and
    divided by a common power of two ``c`` (detached; ``ridge`` by ``c^2``), which leaves the
    divergence unchanged exactly. The full-covariance maths runs in float64 (its inverses have
    condition numbers up to ``||S|| / ridge``); the diagonal form in float32 (float64 for float64
    inputs). The result is returned in float32 (float64 for a float64 student); the teacher
    gets no gradient.

    ``conditional=True`` averages over the classes present in ``labels``; a class seen once
    has covariance ``ridge I`` on both sides and contributes ``||s - t||^2 / (2 ridge)``.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices, for ``conditional``.
        covariance: ``"full"`` or ``"diag"``.
        direction: ``"student_teacher"`` (``KL(P_S || P_T)``) or ``"teacher_student"``.
        ridge: the absolute covariance regulariser ``S + ridge I``, ``> 0`` (default ``1e-3``).
        conditional: average over the classes in ``labels``.
        reduction: ``"mean"`` only: the divergence is a property of the two batches, with no
            per-sample values.
        eps: the former name of ``ridge`` (deprecated; a ``FutureWarning``).

    Shape:
        - student: ``(B, D)``, ``B >= 2`` unless conditional
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer
        - output: scalar

    Example:
        >>> s, t = torch.randn(32, 64), torch.randn(32, 64)
        >>> bool(gaussian_kl_loss(s, t) > 0)
        True
        >>> bool(gaussian_kl_loss(t, t).abs() < 1e-3)
        True
    """
    ridge = renamed("gaussian_kl_loss", "eps", "ridge", eps, ridge, default=_RIDGE)
    ridge = _check_options(covariance, direction, ridge, conditional)
    check_reduction(reduction, batch_level=_BATCH_LEVEL)
    validate_pair(student, teacher, labels, conditional, batch_statistic=_COVARIANCE)
    loss, _ = evaluate(
        _gaussian_kl_terms,
        student,
        teacher,
        labels,
        covariance=covariance,
        direction=direction,
        ridge=ridge,
        conditional=conditional,
    )
    return loss


class GaussianKLLoss(MatchingLoss):
    """KL divergence between fitted Gaussians; see :func:`gaussian_kl_loss`.

    Note:
        With a ``projector`` (for example ``torch.nn.Linear(D_s, D_t)`` when the widths
        differ) the module owns parameters: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        covariance: ``"full"`` or ``"diag"``.
        direction: ``"student_teacher"`` (``KL(P_S || P_T)``) or ``"teacher_student"``.
        ridge: the absolute covariance regulariser ``S + ridge I``, ``> 0``.
        conditional: mean over the classes in ``labels`` of the per-class divergence.
        projector: optional module applied to the student first (owned and trained).
        reduction: ``"mean"`` only (a batch-level divergence).
        eps: the former name of ``ridge`` (deprecated; a ``FutureWarning``).

    Shape:
        - student: ``(B, D_s)`` (``(B, D)`` without a projector)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    ``last_parts``: ``"total"``, ``"gaussian_kl"`` (equal: one term), ``"mean"`` (half the Mahalanobis term),
    ``"covariance"`` (the rest) and, when conditional, ``"classes"``.

    Example:
        >>> loss_fn = GaussianKLLoss(covariance="diag", direction="teacher_student")
        >>> s, t = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        >>> loss_fn(s, t).backward()
        >>> s.grad.shape
        torch.Size([16, 8])
    """

    def __init__(
        self,
        covariance: str = "full",
        *,
        direction: str = "student_teacher",
        ridge: float | None = None,
        conditional: bool = False,
        projector: torch.nn.Module | None = None,
        reduction: str = "mean",
        eps: float | None = None,
    ) -> None:
        super().__init__(projector)
        ridge = renamed("GaussianKLLoss", "eps", "ridge", eps, ridge, default=_RIDGE)
        self.ridge = _check_options(covariance, direction, ridge, conditional)
        self.reduction = check_reduction(reduction, batch_level=_BATCH_LEVEL)
        self.covariance = covariance
        self.direction = direction
        self.conditional = conditional

    def _check(self, student, teacher, labels) -> None:
        validate_pair(student, teacher, labels, self.conditional, batch_statistic=_COVARIANCE)

    def _terms(self, student, teacher, labels) -> Terms:
        return _gaussian_kl_terms(
            student,
            teacher,
            labels,
            covariance=self.covariance,
            direction=self.direction,
            ridge=self.ridge,
            conditional=self.conditional,
        )

    def extra_repr(self) -> str:
        return (
            f"covariance={self.covariance!r}, direction={self.direction!r}, ridge={self.ridge}, "
            f"conditional={self.conditional}"
        )
