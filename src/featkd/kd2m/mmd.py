"""Maximum mean discrepancy between the student and teacher feature batches (KD2M).

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from featkd._checks import ChoiceError
from featkd._loss import Terms, check_reduction, evaluate
from featkd._options import check_bool, check_choice, check_int, check_positive
from featkd.kd2m._base import BATCH_LEVEL, MatchingLoss
from featkd.kd2m._kernels import (
    block_sums,
    estimate,
    group_mean_distances,
    pooled_pair_distances,
    rbf,
    squared_bandwidths,
)
from featkd.kd2m._sets import (
    check_class_reduction,
    make_groups,
    matmul_nt,
    validate_pair,
)
from featkd.kd2m._transport import squared_distances

__all__ = ["MMDLoss", "mmd_loss"]

KERNELS = ("rbf", "linear", "poly")
BANDWIDTH_RULES = ("median", "mean", "mean_distance")
ESTIMATORS = ("biased", "unbiased")
_BATCH_LEVEL = f"the discrepancy {BATCH_LEVEL}"


def _check_options(
    kernel: str,
    bandwidth: str | float | Sequence[float],
    multipliers: Sequence[float],
    estimator: str,
    degree: int,
    coef0: float,
    conditional: bool,
    class_reduction: str = "mean",
    num_classes: int | None = None,
) -> None:
    check_choice(kernel, "kernel", KERNELS)
    check_choice(estimator, "estimator", ESTIMATORS)
    if isinstance(bandwidth, str):
        check_choice(bandwidth, "bandwidth", BANDWIDTH_RULES)
    elif isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool):
        check_positive(bandwidth, "bandwidth")
    elif isinstance(bandwidth, Sequence) and len(bandwidth) > 0:
        for value in bandwidth:
            check_positive(value, "bandwidth")
    else:
        raise ChoiceError(
            "bandwidth: expected 'median', 'mean', 'mean_distance', a number > 0 or a non-empty "
            "list of numbers, "
            f"got {bandwidth!r}"
        )
    # a string is a Sequence too: "12" would pass as the multipliers ("1", "2") otherwise
    if isinstance(multipliers, str) or not isinstance(multipliers, Sequence) or not multipliers:
        raise ChoiceError(f"multipliers: expected a non-empty list of numbers, got {multipliers!r}")
    for value in multipliers:
        check_positive(value, "multipliers")
    check_int(degree, "degree", minimum=1)
    check_positive(coef0, "coef0", allow_zero=True)
    check_bool(conditional, "conditional")
    check_class_reduction(class_reduction, conditional, num_classes)


def _check_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    estimator: str,
    conditional: bool,
    num_classes: int | None,
) -> int | None:
    pairs = "the unbiased estimator needs pairs of distinct samples"
    return validate_pair(
        *(student, teacher, labels, conditional),
        batch_statistic=pairs if estimator == "unbiased" else None,
        num_classes=num_classes,
    )


def _mmd_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    kernel: str,
    bandwidth: str | float | Sequence[float],
    multipliers: Sequence[float],
    estimator: str,
    degree: int,
    coef0: float,
    conditional: bool,
    class_reduction: str = "mean",
    num_classes: int | None = None,
) -> Terms:
    """Unchecked core (inputs in the working dtype): the batch-level ``"mmd2"`` term."""
    # (x.y + c)^d is not translation invariant, so no shift can keep a large common offset from
    # cancelling between the three kernel blocks: poly sums them in float64 instead
    work = torch.float64 if kernel == "poly" else student.dtype
    diagnostics: dict[str, torch.Tensor] = {}
    scale = None
    source = student.to(work)
    target = teacher.detach().to(work)
    if kernel != "poly":  # rbf and linear MMD are translation invariant: shift for accuracy
        shift = target.mean(dim=0)
        source, target = source - shift, target - shift
    groups = make_groups(source, target, labels, conditional, num_classes)
    xs, xt, mask, counts = groups.student, groups.teacher, groups.mask, groups.counts
    if kernel == "linear":  # k(x, y) = x.y: closed forms in O(B D)
        total_s, total_t = xs.sum(dim=-2), xt.sum(dim=-2)
        sum_ss, sum_tt = total_s.square().sum(dim=-1), total_t.square().sum(dim=-1)
        sum_st = (total_s * total_t).sum(dim=-1)
        diag_ss = xs.square().sum(dim=(-2, -1))
        diag_tt = xt.square().sum(dim=(-2, -1))
    elif kernel == "poly":  # k(x, y) = (x.y + c)^d (NST)
        # divided by S >= |x.y + c| (Cauchy-Schwarz: S = max ||x||^2 + c) the kernel lies in
        # [-1, 1] and no sum overflows at a large degree; S^d goes back on at the end
        scale = torch.cat([source, target]).detach().square().sum(dim=-1).amax() + coef0
        scale = torch.where(scale > 0, scale, 1.0)
        kernels = [
            ((matmul_nt(a, b) + coef0) / scale).pow(degree)
            for a, b in ((xs, xs), (xt, xt), (xs, xt))
        ]
        sum_ss, sum_tt, sum_st, diag_ss, diag_tt = block_sums(*kernels, mask)
    else:  # mean over bandwidths of exp(-||x - y||^2 / (2 sigma^2))
        sq_s, sq_t = xs.square().sum(dim=-1), xt.square().sum(dim=-1)  # each norm once
        distances = [
            squared_distances(xs, xs, sq_s, sq_s),
            squared_distances(xt, xt, sq_t, sq_t),
            squared_distances(xs, xt, sq_s, sq_t),
        ]
        pairs = None
        if bandwidth == "mean_distance":  # official KD2M: one bandwidth per group
            with torch.no_grad():
                pairs = group_mean_distances(*distances, mask, counts)
        elif isinstance(bandwidth, str):  # one bandwidth from the whole batch
            with torch.no_grad():
                blocks = [d[0] for d in distances]
                if conditional:
                    blocks = [
                        squared_distances(a.detach(), b.detach())
                        for a, b in ((source, source), (target, target), (source, target))
                    ]
                pairs = pooled_pair_distances(*blocks)
        sigma2 = squared_bandwidths(bandwidth, multipliers, pairs, source)
        sigma = sigma2.sqrt()  # (K,) or, per group, (K, G, 1, 1)
        per_group_sigma = sigma.ndim == 4
        diagnostics["bandwidth"] = (
            groups.mean(sigma.mean(0).flatten()) if per_group_sigma else sigma.mean()
        )
        kernels = [rbf(d, sigma2) for d in distances]
        sum_ss, sum_tt, sum_st, diag_ss, diag_tt = block_sums(*kernels, mask)
    per_group = estimate(sum_ss, sum_tt, sum_st, diag_ss, diag_tt, counts, estimator)
    loss = groups.reduce(per_group, class_reduction)
    if scale is not None:
        # past the float64 range the factor saturates: 0 stays 0 (not 0 * inf = NaN)
        loss = loss * scale.pow(degree).clamp_max(torch.finfo(work).max)
    if conditional:
        diagnostics["classes"] = groups.number()
    return Terms({"mmd2": loss}, diagnostics)


def mmd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    kernel: str = "rbf",
    bandwidth: str | float | Sequence[float] = "median",
    multipliers: Sequence[float] = (1.0,),
    estimator: str = "biased",
    degree: int = 2,
    coef0: float = 0.0,
    conditional: bool = False,
    class_reduction: str = "mean",
    num_classes: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Squared maximum mean discrepancy ``MMD^2`` between the batches (KD2M, NST).

    ``MMD^2 = E k(s, s') + E k(t, t') - 2 E k(s, t)``, estimated from the batches:

    * ``estimator="biased"``: the V-statistic, all pairs, ``i = j`` included (``>= 0``: a
      rounding below 0 is clamped to 0);
    * ``estimator="unbiased"``: the U-statistic of Gretton et al. (2012, Lemma 6), within-set
      pairs ``i != j``, all cross pairs (can be slightly negative).

    Kernels:

    * ``"rbf"``: ``k = mean_k exp(-||x - y||^2 / (2 sigma_k^2))``. ``bandwidth="median"``
      (or ``"mean"``) sets ``sigma^2`` to the median (mean) squared distance between distinct
      points of the pooled ``2B`` rows, detached, times each ``multipliers`` value squared
      (``multipliers=(0.5, 1, 2)`` gives a multi-bandwidth kernel); a number or a list of
      numbers gives ``sigma`` directly. The median leaves out the pairs closer than
      ``sqrt(eps)`` times the mean squared distance (``eps`` of the compute dtype: ``3.5e-4``
      in float32, ``1.5e-8`` in float64), so duplicated rows (dead or collapsed features) cannot
      drive ``sigma`` to 0, where the gradient would be NaN: ``sigma^2`` is then the median of
      the pairs that are apart, never below that floor. If every point is the same, ``sigma =
      1`` (the kernel is 1 for every pair whatever ``sigma``). ``bandwidth="mean_distance"``
      is the official KD2M rule: ``sigma`` is the mean of the pairwise distances (not squared)
      over the three ``B x B`` blocks ``ss``, ``tt`` and ``st``, their zero diagonals
      included, i.e. their sum over ``3 B^2``; ``sigma^2`` then times each multiplier squared
      (detached, like the other rules). With ``conditional=True`` it is computed per class,
      from that class's blocks (the official code applies the whole distance to each class).
      The official runs pair it with the biased estimator (the default).
    * ``"linear"``: ``k = x.y``; the biased ``MMD^2`` is ``||mu_s - mu_t||^2``, computed in
      ``O(B D)``.
    * ``"poly"``: ``k = (x.y + coef0)^degree``, the polynomial kernel of NST (Huang and Wang,
      2017: ``degree=2``, ``coef0=0``, on L2-normalised samples; normalise the inputs to
      reproduce it). This kernel is not translation invariant, so unlike rbf and linear it
      cannot be computed on shifted features: a large common offset makes the three kernel
      sums nearly cancel, and they are computed in float64 whatever the input dtype (slow on
      GPUs with little float64 throughput). The kernel is divided by ``S^degree`` (``S = max
      ||x||^2 + coef0``, detached) while it is summed and the result multiplied back, so no sum
      overflows at a large degree; a result beyond the range of the returned dtype comes back as
      ``inf``.

    ``conditional=True`` averages ``MMD^2`` over the classes present in ``labels`` (one
    bandwidth from the whole batch, except ``"mean_distance"``: per class); with the unbiased
    estimator a class seen once contributes its biased value ``k(s,s) + k(t,t) - 2 k(s,t)``
    (it has no distinct pairs). ``class_reduction="sum"`` sums over the classes instead (the
    official KD2M reduction).

    Computed in float32 (float64 for float64 inputs, and always for ``"poly"``) with autocast
    off; returned in the student's dtype (float32 for half-precision students). The teacher gets
    no gradient.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices, for ``conditional``.
        kernel: ``"rbf"``, ``"linear"`` or ``"poly"``.
        bandwidth: rbf: ``"median"``, ``"mean"``, ``"mean_distance"`` (official KD2M), a
            ``sigma`` or a list of them.
        multipliers: rbf with a rule: factors applied to the heuristic ``sigma``.
        estimator: ``"biased"`` or ``"unbiased"``.
        degree: poly: the degree ``d``.
        coef0: poly: the constant ``c >= 0``.
        conditional: average over the classes in ``labels``.
        class_reduction: ``"mean"`` (default) or ``"sum"`` (official KD2M) of the per-class
            values; ``"sum"`` needs ``conditional=True``.
        num_classes: the number of classes, for ``conditional``: static shapes and no host
            synchronisation (see docs/reliability.md).
        reduction: ``"mean"`` only: the discrepancy is a property of the two batches, with no
            per-sample values.

    Shape:
        - student: ``(B, D)`` (``B >= 2`` for the unbiased estimator unless conditional)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer
        - output: scalar

    Example:
        >>> s, t = torch.randn(32, 8), torch.randn(32, 8) + 1
        >>> bool(mmd_loss(s, t) > mmd_loss(s, s))
        True
        >>> linear = mmd_loss(s, t, kernel="linear")
        >>> bool(torch.isclose(linear, (s.mean(0) - t.mean(0)).square().sum(), rtol=1e-4))
        True
    """
    _check_options(
        *(kernel, bandwidth, multipliers, estimator, degree, coef0),
        *(conditional, class_reduction, num_classes),
    )
    check_reduction(reduction, batch_level=_BATCH_LEVEL)
    _check_inputs(student, teacher, labels, estimator, conditional, num_classes)
    loss, _ = evaluate(
        _mmd_terms,
        student,
        teacher,
        labels,
        kernel=kernel,
        bandwidth=bandwidth,
        multipliers=multipliers,
        estimator=estimator,
        degree=degree,
        coef0=coef0,
        conditional=conditional,
        class_reduction=class_reduction,
        num_classes=num_classes,
    )
    return loss


class MMDLoss(MatchingLoss):
    """Squared maximum mean discrepancy between the feature batches; see :func:`mmd_loss`.

    Note:
        With a ``projector`` (for example ``torch.nn.Linear(D_s, D_t)`` when the widths
        differ) the module owns parameters: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        kernel: ``"rbf"``, ``"linear"`` or ``"poly"``.
        bandwidth: rbf: ``"median"``, ``"mean"``, ``"mean_distance"`` (official KD2M), a
            ``sigma`` or a list of them.
        multipliers: rbf with a rule: factors applied to the heuristic ``sigma``.
        estimator: ``"biased"`` or ``"unbiased"``.
        degree: poly: the degree.
        coef0: poly: the constant.
        conditional: mean over the classes in ``labels`` of the per-class ``MMD^2``.
        class_reduction: ``"mean"`` or ``"sum"`` (official KD2M) over the classes.
        num_classes: the number of classes, for ``conditional`` without a host sync.
        projector: optional module applied to the student first (owned and trained).
        reduction: ``"mean"`` only (a batch-level discrepancy).

    Shape:
        - student: ``(B, D_s)`` (``(B, D)`` without a projector)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    ``last_parts``: ``"total"``, ``"mmd2"`` (equal: one term), for rbf ``"bandwidth"`` (the mean ``sigma``) and, when
    conditional, ``"classes"``.

    Example:
        >>> loss_fn = MMDLoss(kernel="rbf", multipliers=(0.5, 1.0, 2.0), estimator="unbiased")
        >>> s, t = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        >>> loss_fn(s, t).backward()
        >>> list(loss_fn.last_parts)
        ['total', 'mmd2', 'bandwidth']
    """

    def __init__(
        self,
        kernel: str = "rbf",
        *,
        bandwidth: str | float | Sequence[float] = "median",
        multipliers: Sequence[float] = (1.0,),
        estimator: str = "biased",
        degree: int = 2,
        coef0: float = 0.0,
        conditional: bool = False,
        class_reduction: str = "mean",
        num_classes: int | None = None,
        projector: torch.nn.Module | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(projector)
        _check_options(
            *(kernel, bandwidth, multipliers, estimator, degree, coef0),
            *(conditional, class_reduction, num_classes),
        )
        self.reduction = check_reduction(reduction, batch_level=_BATCH_LEVEL)
        self.kernel = kernel
        self.bandwidth = bandwidth if isinstance(bandwidth, (str, int, float)) else tuple(bandwidth)
        self.multipliers = tuple(float(m) for m in multipliers)
        self.estimator = estimator
        self.degree = degree
        self.coef0 = float(coef0)
        self.conditional = conditional
        self.class_reduction = class_reduction
        self.num_classes = num_classes

    def _check(self, student, teacher, labels) -> int | None:
        return _check_inputs(
            student, teacher, labels, self.estimator, self.conditional, self.num_classes
        )

    def _terms(self, student, teacher, labels) -> Terms:
        return _mmd_terms(
            student,
            teacher,
            labels,
            kernel=self.kernel,
            bandwidth=self.bandwidth,
            multipliers=self.multipliers,
            estimator=self.estimator,
            degree=self.degree,
            coef0=self.coef0,
            conditional=self.conditional,
            class_reduction=self.class_reduction,
            num_classes=self.num_classes,
        )

    def extra_repr(self) -> str:
        text = f"kernel={self.kernel!r}, estimator={self.estimator!r}"
        if self.kernel == "rbf":
            text += f", bandwidth={self.bandwidth!r}, multipliers={self.multipliers}"
        if self.kernel == "poly":
            text += f", degree={self.degree}, coef0={self.coef0}"
        if self.conditional:
            text += ", conditional=True"
        if self.class_reduction != "mean":
            text += f", class_reduction={self.class_reduction!r}"
        if self.num_classes is not None:
            text += f", num_classes={self.num_classes}"
        return text
