"""Kullback-Leibler divergence between Gaussians fitted to the two batches (KD2M eq. 6).

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.
"""

from __future__ import annotations

import math

import torch

from featkd._checks import ChoiceError
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
from featkd.kd2m._sets import (
    check_class_reduction,
    make_groups,
    validate_pair,
)

__all__ = ["KL_DIRECTIONS", "GaussianKLLoss", "gaussian_kl_loss"]

COVARIANCES = ("full", "diag")
_COVARIANCE = "a covariance needs two samples"
KL_DIRECTIONS = ("student_teacher", "teacher_student")
_BATCH_LEVEL = f"the divergence between fitted Gaussians {BATCH_LEVEL}"
_RIDGE = 1e-3


def _check_options(
    covariance: str,
    direction: str,
    ridge: float | None,
    conditional: bool,
    class_reduction: str,
    std_floor: float | None,
    num_classes: int | None = None,
) -> tuple[float, float | None]:
    """The checked ``(ridge, std_floor)``: ``ridge`` defaults to ``1e-3``, or to 0 with a
    ``std_floor`` (one regulariser at a time: the floor replaces the ridge)."""
    check_choice(covariance, "covariance", COVARIANCES)
    check_choice(direction, "direction", KL_DIRECTIONS)
    check_bool(conditional, "conditional")
    check_class_reduction(class_reduction, conditional, num_classes)
    if std_floor is None:
        return check_positive(_RIDGE if ridge is None else ridge, "ridge"), None
    std_floor = check_positive(std_floor, "std_floor")
    if covariance != "diag":
        raise ChoiceError(
            "std_floor: the floor on standard deviations applies to covariance='diag' (the "
            f"official KD2M code's form), got covariance={covariance!r}; use ridge= for full "
            "covariances"
        )
    if ridge is not None and ridge != 0:
        raise ChoiceError(
            f"ridge: expected 0 or None with std_floor={std_floor!r} (the floor replaces the "
            f"variance ridge; one regulariser at a time), got {ridge!r}"
        )
    return 0.0, std_floor


def _gaussian_kl_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    covariance: str,
    direction: str,
    ridge: float,
    conditional: bool,
    class_reduction: str = "mean",
    std_floor: float | None = None,
    num_classes: int | None = None,
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
    # the official floor is in the features' units: divided by c too
    floor = None if std_floor is None else (std_floor / scale.double()).to(work)
    groups = make_groups(scaled_s, scaled_t, labels, conditional, num_classes)
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
    if floor is not None:  # official KD2M (diag only): (std + floor)^2
        var_p = (_std(centred_p, counts) + floor).square()
        var_q = (_std(centred_q, counts) + floor).square()
        mahalanobis = (delta.square() / var_q).sum(dim=-1)
        rest = (var_p / var_q - 1 + var_q.log() - var_p.log()).sum(dim=-1)
    elif covariance == "diag":
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
        "mean": 0.5 * groups.reduce(mahalanobis.detach(), class_reduction),
        "covariance": 0.5 * groups.reduce(rest.detach(), class_reduction),
    }
    if conditional:
        diagnostics["classes"] = groups.number()
    return Terms({"gaussian_kl": groups.reduce(per_group, class_reduction)}, diagnostics)


def _std(centred: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-feature maximum-likelihood standard deviations ``(G, D)``; a zero one (a constant
    feature, a class seen once) gets a zero gradient instead of the square root's infinite
    one."""
    var = centred.square().sum(dim=-2) / counts[:, None]
    positive = var > 0
    safe = torch.where(positive, var, 1.0)
    return torch.where(positive, safe.sqrt(), 0.0)


def gaussian_kl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    covariance: str = "full",
    direction: str = "student_teacher",
    ridge: float | None = None,
    conditional: bool = False,
    class_reduction: str = "mean",
    std_floor: float | None = None,
    num_classes: int | None = None,
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
    ``class_reduction="sum"`` sums over the classes instead (the official KD2M code's
    reduction).

    ``std_floor=f`` (``covariance="diag"`` only; ``ridge`` then 0) reproduces the official KD2M
    code's diagonal Gaussians: each per-feature standard deviation (maximum likelihood, divided
    by ``B``) becomes ``sigma + f`` and the variance ``(sigma + f)^2``, instead of
    ``sigma^2 + ridge``. The official floor is ``1e-9``, which makes a constant feature (or a
    class seen once) cost about ``1e18`` times its squared gap; featkd's ridge is the default
    for that reason. A zero ``sigma`` gets a zero gradient (the square root's is infinite).

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices, for ``conditional``.
        covariance: ``"full"`` or ``"diag"``.
        direction: ``"student_teacher"`` (``KL(P_S || P_T)``) or ``"teacher_student"``.
        ridge: the absolute covariance regulariser ``S + ridge I``, ``> 0`` (default ``1e-3``;
            0 or None with ``std_floor``).
        conditional: average over the classes in ``labels``.
        class_reduction: ``"mean"`` (default) or ``"sum"`` (official KD2M) of the per-class
            divergences; ``"sum"`` needs ``conditional=True``.
        std_floor: diag only: ``sigma + std_floor`` instead of ``sigma^2 + ridge`` (official
            KD2M: ``1e-9``); None (default) uses ``ridge``.
        num_classes: the number of classes, for ``conditional``: static shapes and no host
            synchronisation (see docs/reliability.md).
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
    if eps is not None:  # an error names the argument the caller wrote
        check_positive(eps, "eps")
    ridge = renamed("gaussian_kl_loss", "eps", "ridge", eps, ridge)
    ridge, std_floor = _check_options(
        covariance, direction, ridge, conditional, class_reduction, std_floor, num_classes
    )
    check_reduction(reduction, batch_level=_BATCH_LEVEL)
    validate_pair(
        student, teacher, labels, conditional, batch_statistic=_COVARIANCE, num_classes=num_classes
    )
    loss, _ = evaluate(
        _gaussian_kl_terms,
        student,
        teacher,
        labels,
        covariance=covariance,
        direction=direction,
        ridge=ridge,
        conditional=conditional,
        class_reduction=class_reduction,
        std_floor=std_floor,
        num_classes=num_classes,
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
        ridge: the absolute covariance regulariser ``S + ridge I``, ``> 0`` (0 or None with
            ``std_floor``).
        conditional: mean over the classes in ``labels`` of the per-class divergence.
        class_reduction: ``"mean"`` or ``"sum"`` (official KD2M) over the classes.
        std_floor: diag only: ``sigma + std_floor`` instead of ``sigma^2 + ridge`` (official
            KD2M: ``1e-9``).
        num_classes: the number of classes, for ``conditional`` without a host sync.
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
        class_reduction: str = "mean",
        std_floor: float | None = None,
        num_classes: int | None = None,
        projector: torch.nn.Module | None = None,
        reduction: str = "mean",
        eps: float | None = None,
    ) -> None:
        super().__init__(projector)
        if eps is not None:  # an error names the argument the caller wrote
            check_positive(eps, "eps")
        ridge = renamed("GaussianKLLoss", "eps", "ridge", eps, ridge)
        self.ridge, self.std_floor = _check_options(
            covariance, direction, ridge, conditional, class_reduction, std_floor, num_classes
        )
        self.class_reduction = class_reduction
        self.num_classes = num_classes
        self.reduction = check_reduction(reduction, batch_level=_BATCH_LEVEL)
        self.covariance = covariance
        self.direction = direction
        self.conditional = conditional

    def _check(self, student, teacher, labels) -> int | None:
        return validate_pair(
            *(student, teacher, labels, self.conditional),
            batch_statistic=_COVARIANCE,
            num_classes=self.num_classes,
        )

    def _terms(self, student, teacher, labels) -> Terms:
        return _gaussian_kl_terms(
            student,
            teacher,
            labels,
            covariance=self.covariance,
            direction=self.direction,
            ridge=self.ridge,
            conditional=self.conditional,
            class_reduction=self.class_reduction,
            std_floor=self.std_floor,
            num_classes=self.num_classes,
        )

    def extra_repr(self) -> str:
        text = (
            f"covariance={self.covariance!r}, direction={self.direction!r}, ridge={self.ridge}, "
            f"conditional={self.conditional}"
        )
        if self.class_reduction != "mean":
            text += f", class_reduction={self.class_reduction!r}"
        if self.std_floor is not None:
            text += f", std_floor={self.std_floor}"
        if self.num_classes is not None:
            text += f", num_classes={self.num_classes}"
        return text
