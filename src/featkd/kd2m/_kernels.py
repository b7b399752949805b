"""Kernel sums of the MMD estimators and the bandwidth heuristics of the Gaussian kernel.

Axis legend: ``G`` groups (classes), ``n`` samples per group (zero-padded), ``K`` bandwidths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from featkd._sync import device_constant, device_values

__all__ = [
    "block_sums",
    "estimate",
    "group_mean_distances",
    "pooled_pair_distances",
    "rbf",
    "squared_bandwidths",
]


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
        apart = torch.where(pairs > resolution, pairs, math.nan)
        value = apart.nanmedian()
    else:
        value = mean
    return torch.where(mean > 0, value, 1.0)


def pooled_pair_distances(
    d_ss: torch.Tensor, d_tt: torch.Tensor, d_st: torch.Tensor
) -> torch.Tensor:
    """The squared distances between distinct points of the pooled ``2B`` rows, from the three
    ``(B, B)`` blocks: the upper triangles of the within-set blocks and the whole cross block."""
    rows, cols = d_ss.shape
    i, j = device_constant(
        ("upper pairs", rows, cols),
        d_ss,
        lambda: torch.triu_indices(rows, cols, offset=1, device=d_ss.device),
    )
    return torch.cat([d_ss[i, j], d_tt[i, j], d_st.flatten()])


def group_mean_distances(
    d_ss: torch.Tensor,
    d_tt: torch.Tensor,
    d_st: torch.Tensor,
    mask: torch.Tensor | None,
    counts: torch.Tensor,
) -> torch.Tensor:
    """The official KD2M bandwidth ``sigma`` of each group ``(G, 1, 1)`` from the squared
    distance blocks ``(G, n, n)``: the mean of the distances (not squared) over the three
    blocks, the zero diagonals of ``ss`` and ``tt`` included, i.e. their sum over
    ``3 n^2`` real pairs. The diagonals are set to exactly 0 (the Gram expansion leaves a
    rounding there, whose square root would not be negligible)."""
    n = d_ss.shape[-1]
    off = device_constant(
        ("off the diagonal", n), d_ss, lambda: ~torch.eye(n, dtype=torch.bool, device=d_ss.device)
    )
    blocks = [d_ss * off, d_tt * off, d_st]
    if mask is not None:
        pair = mask[:, :, None] & mask[:, None, :]
        blocks = [b * pair for b in blocks]
    total = sum(b.sqrt().sum(dim=(-2, -1)) for b in blocks)
    return (total / (3 * counts.square()))[:, None, None]


def squared_bandwidths(
    bandwidth: str | float | Sequence[float],
    multipliers: Sequence[float],
    pairs: torch.Tensor | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """``sigma_k^2`` ``(K,)``: given, or a statistic of the pooled squared pairwise distances
    ``pairs`` (detached, see :func:`_pair_statistic`) times each multiplier squared."""
    if not isinstance(bandwidth, str):
        values = [bandwidth] if isinstance(bandwidth, (int, float)) else list(bandwidth)
        return device_values(values, like).square()
    scale = device_values(multipliers, like).square()
    if bandwidth == "mean_distance":  # pairs: the per-group sigma (G, 1, 1); all 0 -> 1
        sigma = pairs.detach()
        base = torch.where(sigma > 0, sigma.square(), 1.0)
        # (K, G, 1, 1): each bandwidth broadcasts over its group's (n, n) block
        return (scale[:, None, None, None] * base).clamp_min(torch.finfo(like.dtype).tiny)
    base = _pair_statistic(pairs.detach(), bandwidth)
    return (base * scale).clamp_min(torch.finfo(like.dtype).tiny)


def rbf(squared: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``mean_k exp(-d / (2 sigma_k^2))`` of squared distances ``d``."""
    factors = (-0.5 / sigma2).unbind()
    kernel = torch.exp(squared * factors[0])
    for factor in factors[1:]:
        kernel = kernel + torch.exp(squared * factor)
    return kernel / len(factors) if len(factors) > 1 else kernel


def block_sums(
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


def estimate(
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
    distinct = torch.where(several, counts * (counts - 1), 1.0)
    unbiased = (sum_ss - diag_ss + sum_tt - diag_tt) / distinct - 2 * sum_st / pairs
    return torch.where(several, unbiased, biased)
