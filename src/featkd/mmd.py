"""Maximum mean discrepancy between the student and teacher feature batches (KD2M).

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from featkd._checks import ChoiceError
from featkd._matching import (
    CONDITIONAL_NEEDS_LABELS,
    MatchingLoss,
    make_groups,
    matmul_nt,
    validate_pair,
)
from featkd._options import check_bool, check_choice, check_int, check_positive
from featkd._ot import squared_distances
from featkd._precision import result_dtype, work_dtype

__all__ = ["MMDLoss", "mmd_loss"]

KERNELS = ("rbf", "linear", "poly")
BANDWIDTH_RULES = ("median", "mean")
ESTIMATORS = ("biased", "unbiased")


def _check_options(
    kernel: str,
    bandwidth: str | float | Sequence[float],
    multipliers: Sequence[float],
    estimator: str,
    degree: int,
    coef0: float,
    conditional: bool,
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
            "bandwidth: expected 'median', 'mean', a number > 0 or a non-empty list of numbers, "
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


def _pair_statistic(pairs: torch.Tensor, rule: str) -> torch.Tensor:
    """``sigma^2`` before the multipliers: the median or the mean of the pooled squared
    distances ``pairs`` (no gradient).

    The median leaves out the pairs closer than ``sqrt(eps)`` times the mean (duplicated rows,
    collapsed or dead features, the Gram expansion's rounding of a zero distance): they say
    nothing about the scale of the data, and when they are the majority the plain median is 0
    and ``1 / sigma^2`` overflows the gradient to NaN. What is left is never empty: its largest
    pair is at least the mean. When every distance is 0 (all points equal) the kernel is 1 for
    every pair whatever ``sigma``, and ``sigma^2 = 1`` keeps it and its gradient finite.
    """
    mean = pairs.mean()
    if rule == "median":
        resolution = mean * torch.finfo(pairs.dtype).eps ** 0.5
        # NaN marks the left-out pairs for nanmedian: a mask, not a data-dependent shape
        apart = torch.where(pairs > resolution, pairs, torch.full_like(pairs, torch.nan))
        value = apart.nanmedian()
    else:
        value = mean
    return torch.where(mean > 0, value, torch.ones_like(value))


def _pooled_pair_distances(
    d_ss: torch.Tensor, d_tt: torch.Tensor, d_st: torch.Tensor
) -> torch.Tensor:
    """The squared distances between distinct points of the pooled ``2B`` rows, from the three
    ``(B, B)`` blocks: the upper triangles of the within-set blocks and the whole cross block."""
    i, j = torch.triu_indices(*d_ss.shape, offset=1, device=d_ss.device)
    return torch.cat([d_ss[i, j], d_tt[i, j], d_st.flatten()])


def _squared_bandwidths(
    bandwidth: str | float | Sequence[float],
    multipliers: Sequence[float],
    pairs: torch.Tensor | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """``sigma_k^2`` ``(K,)``: given, or a statistic of the pooled squared pairwise distances
    ``pairs`` (detached, see :func:`_pair_statistic`) times each multiplier squared."""
    if not isinstance(bandwidth, str):
        values = [bandwidth] if isinstance(bandwidth, (int, float)) else list(bandwidth)
        return torch.tensor(values, dtype=like.dtype, device=like.device).square()
    base = _pair_statistic(pairs.detach(), bandwidth)
    scale = torch.tensor(multipliers, dtype=like.dtype, device=like.device).square()
    return (base * scale).clamp_min(torch.finfo(like.dtype).tiny)


def _rbf(squared: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``mean_k exp(-d / (2 sigma_k^2))`` of squared distances ``d``."""
    factors = (-0.5 / sigma2).unbind()
    kernel = torch.exp(squared * factors[0])
    for factor in factors[1:]:
        kernel = kernel + torch.exp(squared * factor)
    return kernel / len(factors) if len(factors) > 1 else kernel


def _block_sums(
    kernel_ss: torch.Tensor,
    kernel_tt: torch.Tensor,
    kernel_st: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Sums of each kernel block over real pairs, and of the two diagonals ``(G,)`` each."""
    if mask is not None:
        pair = (mask[:, :, None] & mask[:, None, :]).to(kernel_ss.dtype)
        kernel_ss, kernel_tt, kernel_st = kernel_ss * pair, kernel_tt * pair, kernel_st * pair
    total = [k.sum(dim=(-2, -1)) for k in (kernel_ss, kernel_tt, kernel_st)]
    diagonals = [k.diagonal(dim1=-2, dim2=-1).sum(dim=-1) for k in (kernel_ss, kernel_tt)]
    return (*total, *diagonals)


def _estimate(
    sum_ss: torch.Tensor,
    sum_tt: torch.Tensor,
    sum_st: torch.Tensor,
    diag_ss: torch.Tensor,
    diag_tt: torch.Tensor,
    counts: torch.Tensor,
    estimator: str,
) -> torch.Tensor:
    """Biased (V-statistic) or unbiased (U-statistic, Gretton et al. 2012, Lemma 6) MMD^2.

    The unbiased within-set terms drop the ``i = j`` pairs; a group of one sample has none,
    so it falls back to its biased value.

    The biased value is ``||mean phi(s) - mean phi(t)||^2 >= 0`` for a positive semi-definite
    kernel; the difference of sums that computes it can round below 0 (the polynomial kernel
    far from the origin), so it is clamped there.
    """
    pairs = counts.square()
    biased = ((sum_ss + sum_tt - 2 * sum_st) / pairs).clamp_min(0)
    if estimator == "biased":
        return biased
    several = counts > 1
    distinct = torch.where(several, counts * (counts - 1), torch.ones_like(counts))
    unbiased = (sum_ss - diag_ss + sum_tt - diag_tt) / distinct - 2 * sum_st / pairs
    return torch.where(several, unbiased, biased)


def _mmd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    kernel: str,
    bandwidth: str | float | Sequence[float],
    multipliers: Sequence[float],
    estimator: str,
    degree: int,
    coef0: float,
    conditional: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    _check_options(kernel, bandwidth, multipliers, estimator, degree, coef0, conditional)
    unbiased_needs_two = estimator == "unbiased" and not conditional
    validate_pair(
        student,
        teacher,
        labels,
        labels_needed_for=CONDITIONAL_NEEDS_LABELS if conditional else None,
        min_batch=2 if unbiased_needs_two else 1,
        min_batch_why="the unbiased estimator needs pairs of distinct samples",
    )
    # (x.y + c)^d is not translation invariant, so no shift can keep a large common offset from
    # cancelling between the three kernel blocks: poly sums them in float64 instead
    work = torch.float64 if kernel == "poly" else work_dtype(student, teacher)
    parts: dict[str, torch.Tensor] = {}
    scale = None
    with torch.autocast(student.device.type, enabled=False):
        source = student.to(work)
        target = teacher.detach().to(work)
        if kernel != "poly":  # rbf and linear MMD are translation invariant: shift for accuracy
            shift = target.mean(dim=0)
            source, target = source - shift, target - shift
        groups = make_groups(source, target, labels, conditional)
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
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            kernels = [
                ((matmul_nt(a, b) + coef0) / scale).pow(degree)
                for a, b in ((xs, xs), (xt, xt), (xs, xt))
            ]
            sum_ss, sum_tt, sum_st, diag_ss, diag_tt = _block_sums(*kernels, mask)
        else:  # mean over bandwidths of exp(-||x - y||^2 / (2 sigma^2))
            distances = [squared_distances(a, b) for a, b in ((xs, xs), (xt, xt), (xs, xt))]
            pairs = None
            if isinstance(bandwidth, str):  # one bandwidth from the whole batch
                with torch.no_grad():
                    blocks = [d[0] for d in distances]
                    if conditional:
                        blocks = [
                            squared_distances(a.detach(), b.detach())
                            for a, b in ((source, source), (target, target), (source, target))
                        ]
                    pairs = _pooled_pair_distances(*blocks)
            sigma2 = _squared_bandwidths(bandwidth, multipliers, pairs, source)
            parts["bandwidth"] = sigma2.sqrt().mean()
            kernels = [_rbf(d, sigma2) for d in distances]
            sum_ss, sum_tt, sum_st, diag_ss, diag_tt = _block_sums(*kernels, mask)
        per_group = _estimate(sum_ss, sum_tt, sum_st, diag_ss, diag_tt, counts, estimator)
        loss = per_group.mean()
        if scale is not None:
            # past the float64 range the factor saturates: 0 stays 0 (not 0 * inf = NaN)
            loss = loss * scale.pow(degree).clamp_max(torch.finfo(work).max)
        loss = loss.to(result_dtype(student.dtype))
    parts = {"mmd2": loss.detach(), **parts}
    if conditional:
        parts["classes"] = torch.tensor(float(len(groups.sizes)))
    return loss, parts


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
      1`` (the kernel is 1 for every pair whatever ``sigma``).
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
    bandwidth from the whole batch); with the unbiased estimator a class seen once contributes
    its biased value ``k(s,s) + k(t,t) - 2 k(s,t)`` (it has no distinct pairs).

    Computed in float32 (float64 for float64 inputs, and always for ``"poly"``) with autocast
    off; returned in the student's dtype (float32 for half-precision students). The teacher gets
    no gradient.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices, for ``conditional``.
        kernel: ``"rbf"``, ``"linear"`` or ``"poly"``.
        bandwidth: rbf: ``"median"``, ``"mean"``, a ``sigma`` or a list of them.
        multipliers: rbf with a rule: factors applied to the heuristic ``sigma``.
        estimator: ``"biased"`` or ``"unbiased"``.
        degree: poly: the degree ``d``.
        coef0: poly: the constant ``c >= 0``.
        conditional: average over the classes in ``labels``.

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
    loss, _ = _mmd(
        student,
        teacher,
        labels=labels,
        kernel=kernel,
        bandwidth=bandwidth,
        multipliers=multipliers,
        estimator=estimator,
        degree=degree,
        coef0=coef0,
        conditional=conditional,
    )
    return loss


class MMDLoss(MatchingLoss):
    """Squared maximum mean discrepancy between the feature batches; see :func:`mmd_loss`.

    Note:
        With a ``projector`` (for example ``torch.nn.Linear(D_s, D_t)`` when the widths
        differ) the module owns parameters: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        kernel: ``"rbf"``, ``"linear"`` or ``"poly"``.
        bandwidth: rbf: ``"median"``, ``"mean"``, a ``sigma`` or a list of them.
        multipliers: rbf with a rule: factors applied to the heuristic ``sigma``.
        estimator: ``"biased"`` or ``"unbiased"``.
        degree: poly: the degree.
        coef0: poly: the constant.
        conditional: mean over the classes in ``labels`` of the per-class ``MMD^2``.
        projector: optional module applied to the student first (owned and trained).

    Shape:
        - student: ``(B, D_s)`` (``(B, D)`` without a projector)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    ``last_parts``: ``"mmd2"``, for rbf ``"bandwidth"`` (the mean ``sigma``) and, when
    conditional, ``"classes"``.

    Example:
        >>> loss_fn = MMDLoss(kernel="rbf", multipliers=(0.5, 1.0, 2.0), estimator="unbiased")
        >>> s, t = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        >>> loss_fn(s, t).backward()
        >>> sorted(loss_fn.last_parts)
        ['bandwidth', 'mmd2']
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
        projector: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(projector)
        _check_options(kernel, bandwidth, multipliers, estimator, degree, coef0, conditional)
        self.kernel = kernel
        self.bandwidth = bandwidth if isinstance(bandwidth, (str, int, float)) else tuple(bandwidth)
        self.multipliers = tuple(float(m) for m in multipliers)
        self.estimator = estimator
        self.degree = degree
        self.coef0 = float(coef0)
        self.conditional = conditional

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``MMD^2`` between the (projected) student batch and the teacher batch.

        Args:
            student: student features.
            teacher: teacher features (detached inside).
            labels: class indices (for ``conditional``).
        """
        loss, parts = _mmd(
            self.project(student),
            teacher,
            labels=labels,
            kernel=self.kernel,
            bandwidth=self.bandwidth,
            multipliers=self.multipliers,
            estimator=self.estimator,
            degree=self.degree,
            coef0=self.coef0,
            conditional=self.conditional,
        )
        self.last_parts = parts
        return loss

    def extra_repr(self) -> str:
        text = f"kernel={self.kernel!r}, estimator={self.estimator!r}"
        if self.kernel == "rbf":
            text += f", bandwidth={self.bandwidth!r}, multipliers={self.multipliers}"
        if self.kernel == "poly":
            text += f", degree={self.degree}, coef0={self.coef0}"
        if self.conditional:
            text += ", conditional=True"
        return text
