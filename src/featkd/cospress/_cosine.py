"""Unit vectors with a bounded gradient, and the cosines CosPress builds from them.

The gradient of a cosine in ``x`` is ``(I - u u^T) / ||x||``: unbounded at a dead (all-zero)
vector, where torch's ``cosine_similarity`` and ``normalize`` give ``grad / eps`` (eps 1e-8,
1e-12). :class:`_Normalize` divides by ``max(||x||, floor)`` in its backward instead, ``floor``
a fraction of the median non-zero norm of the vectors normalised together (the batch, or one set
of the KL): a dead or very short vector's gradient is at most about ``1 / 0.25 = 4`` times a
typical one's. Values stay exact.

Unchecked: callers validate, and run these in the working dtype with autocast off.
"""

from __future__ import annotations

import math

import torch

# the fraction of the median non-zero norm below which the backward stops growing as 1 / ||x||
_NORM_FLOOR = 0.25


def unit_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / ||x||`` over the last axis (a zero vector stays zero) and ``||x||`` (size-1 last
    axis). Scaled by the largest entry first: squaring 1e-30 underflows and 1e20 overflows in
    float32, where a plain norm gives 0 (and ``x / 0``) or inf."""
    tiny = torch.finfo(x.dtype).tiny
    # clamped at tiny, not replaced where zero: one kernel each, and a zero vector gives 0 / tiny
    # = 0; a subnormal peak becomes tiny, so scaled entries are still at least ~1e-7 (float32)
    peak = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True).clamp_min(tiny)
    scaled = x / peak
    length = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)  # 0 or >= 1e-7
    return scaled / length.clamp_min(tiny), peak * length


def typical_norm(norms: torch.Tensor) -> torch.Tensor:
    """Median of the non-zero ``norms`` ``(..., M, 1)`` over the set axis ``M``: ``(..., 1, 1)``;
    NaN where every norm of the set is zero."""
    nonzero = norms.masked_fill(norms == 0, math.nan)
    # the median, not the mean: one outlier (a high-norm token) must not lift the floor
    return nonzero.nanmedian(dim=-2, keepdim=True).values


class _Normalize(torch.autograd.Function):
    """``x / ||x||`` over the last axis of ``(..., M, D)``, a zero vector staying zero: the exact
    value. The backward divides by ``max(||x||, floor)`` instead of ``||x||``, with ``floor``
    ``_NORM_FLOOR`` times the median non-zero norm of the ``M`` vectors of each set (``fallback``
    where all ``M`` are zero, if given): the exact gradient for a vector at least ``floor``
    long; for a shorter one the same direction scaled down to the size it has at length
    ``floor``; ``grad / floor`` at a zero vector, where no gradient exists to be exact about.
    """

    @staticmethod
    def forward(ctx, x, fallback):
        unit, norm = unit_and_norm(x)
        typical = typical_norm(norm)
        if fallback is not None:
            typical = torch.where(typical.isnan(), fallback, typical)
        # no scale at all (every vector zero): any positive floor avoids 0/0; the KL then has
        # zero gradient for these vectors
        floor = (typical.nan_to_num(nan=0.0) * _NORM_FLOOR).clamp_min(torch.finfo(x.dtype).tiny)
        ctx.save_for_backward(x, floor)
        return unit

    @staticmethod
    def backward(ctx, grad):
        x, floor = ctx.saved_tensors
        # recomputed with differentiable operations, so that a double backward works
        unit, norm = unit_and_norm(x)
        # the Jacobian (I - u u^T) / ||x||, with 1 / ||x|| capped at 1 / floor
        tangent = grad - (grad * unit).sum(dim=-1, keepdim=True) * unit
        return tangent / torch.maximum(norm, floor), None


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """``n(x) n(x)^T`` per set, made exactly symmetric: ``(S, M, D) -> (S, M, M)``."""
    if torch.is_grad_enabled() and x.requires_grad:
        unit = _Normalize.apply(x, None)
    else:  # the same values; the backward's norm floor (a median per set) is not needed
        unit = unit_and_norm(x)[0]
    sims = unit @ unit.mT
    # a batched matmul need not round (i, j) and (j, i) alike; the KL relies on symmetry
    return (sims + sims.mT) / 2


def flat_cosine_distance(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(vec(student_b), vec(sg(target_b)))`` per sample: ``(B, ...) -> (B,)``."""
    target_unit, target_norm = unit_and_norm(target.detach().flatten(1))
    # the batch is the set whose median norm sets the gradient floor; a batch of dead students
    # has no scale of its own, and the target's stands in
    unit = _Normalize.apply(student.flatten(1), typical_norm(target_norm))
    cos = (unit * target_unit).sum(dim=1)
    return 1 - cos
