"""Covariance numerics for the Gaussian KD2M losses, on batch-sized matrices where possible.

Axis legend: ``G`` groups, ``n`` samples (zero-padded), ``D`` width.

A covariance fitted to ``n < D`` samples has rank ``n - 1``; forming and factorising the ``D x D``
matrix wastes ``O(D^3)`` work on a known null space. Two identities keep the work at
``min(n, D)``:

* Bures fidelity. With centred ``X_s, X_t`` (``n x D``) and ``S = X^T X / n``,
  ``tr((S_s^{1/2} S_t S_s^{1/2})^{1/2}) = ||X_s X_t^T||_* / n`` (the eigenvalues of
  ``S_s S_t`` are the squared singular values of ``X_s X_t^T / n``). For ``n > D``, QR factors
  ``X = Q R`` give the same nuclear norm from the ``D x D`` product ``R_s R_t^T``.
* Shrunk covariances ``S + eps I = F^T F + eps I`` (``F = X / sqrt(n)``): the Woodbury identity
  and the matrix determinant lemma move inverses and log-determinants onto the ``n x n`` matrix
  ``F F^T + eps I``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from featkd._matching import matmul_nt

__all__ = [
    "ShrunkCovariance",
    "centre",
    "cross_nuclear_norm",
    "masked_mean",
    "shrunk_covariance",
    "shrunk_logdet",
    "shrunk_mahalanobis",
    "shrunk_trace_inverse_product",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """Mean over the real rows of each group: ``(G, n, D) -> (G, D)`` (padded rows are zero)."""
    if mask is None:
        return x.mean(dim=-2)
    return x.sum(dim=-2) / counts[:, None]


def centre(
    x: torch.Tensor, mask: torch.Tensor | None, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The group means ``(G, D)`` and the centred rows ``(G, n, D)``, padded rows kept at zero."""
    mean = masked_mean(x, mask, counts)
    centred = x - mean[:, None, :]
    if mask is not None:
        centred = centred * mask[..., None].to(centred.dtype)
    return mean, centred


def _polar_factor(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``U V^T`` over the numerically non-zero singular values: the minimum-norm gradient of the
    nuclear norm. Zero singular values carry no direction, so they are left out, which keeps
    the gradient finite and deterministic at repeated or vanishing singular values."""
    size = max(u.shape[-2], vh.shape[-1])
    tolerance = s[..., :1] * (size * torch.finfo(s.dtype).eps)
    keep = (s > tolerance).to(u.dtype)
    return (u * keep[..., None, :]) @ vh


class _CrossNuclearNorm(torch.autograd.Function):
    """``||a b^T||_*`` for ``a, b`` of shape ``(..., n, D)`` with the polar-factor gradient."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = a.shape[-2], a.shape[-1]
        ctx.batch_route = n <= d
        if n <= d:  # (n x n) cross-Gram
            cross = matmul_nt(a, b)
            if not (need_a or need_b):
                return torch.linalg.svdvals(cross).sum(dim=-1)
            u, s, vh = torch.linalg.svd(cross, full_matrices=False)
            ctx.save_for_backward(_polar_factor(u, s, vh), a, b)
            return s.sum(dim=-1)
        # (D x D) product of QR factors: a b^T = Q_a (R_a R_b^T) Q_b^T
        q_a, r_a = torch.linalg.qr(a) if need_a else (None, torch.linalg.qr(a, mode="r")[1])
        q_b, r_b = torch.linalg.qr(b) if need_b else (None, torch.linalg.qr(b, mode="r")[1])
        product = r_a @ r_b.mT
        if not (need_a or need_b):
            return torch.linalg.svdvals(product).sum(dim=-1)
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
        ctx.q_a, ctx.q_b = q_a, q_b
        ctx.save_for_backward(_polar_factor(u, s, vh), r_a, r_b)
        return s.sum(dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        polar, first, second = ctx.saved_tensors
        g = grad[..., None, None]
        grad_a = grad_b = None
        if ctx.batch_route:  # d/da = polar b, d/db = polar^T a
            if ctx.needs_input_grad[0]:
                grad_a = g * (polar @ second)
            if ctx.needs_input_grad[1]:
                grad_b = g * (polar.mT @ first)
            return grad_a, grad_b
        r_a, r_b = first, second  # polar of a b^T is Q_a P Q_b^T; Q_b^T b = R_b
        if ctx.needs_input_grad[0]:
            grad_a = g * (ctx.q_a @ (polar @ r_b))
        if ctx.needs_input_grad[1]:
            grad_b = g * (ctx.q_b @ (polar.mT @ r_a))
        return grad_a, grad_b


def cross_nuclear_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Nuclear norm ``||a b^T||_*`` of ``a, b`` ``(..., n, D)``, on ``min(n, D)``-sized matrices.

    The gradient is the polar factor of ``a b^T`` restricted to its non-zero singular values, so
    it stays finite when singular values repeat or vanish (identical inputs, constant features,
    fewer samples than dimensions). Runs in the dtype of ``a``; batched over leading axes.
    """
    return _CrossNuclearNorm.apply(a, b)


class ShrunkCovariance(NamedTuple):
    """``S + eps I`` of a group of centred rows, held as ``F`` and a triangular factor.

    ``factor`` is ``F = X / sqrt(count)`` ``(G, n, D)``. When ``n < D`` (``small``) ``upper`` is
    ``R`` with ``R^T R = F F^T + eps I_n`` (``(G, n, n)``); otherwise ``R^T R = F^T F + eps I_D``
    (``(G, D, D)``).
    """

    factor: torch.Tensor
    upper: torch.Tensor
    eps: float
    small: bool


def shrunk_covariance(centred: torch.Tensor, counts: torch.Tensor, eps: float) -> ShrunkCovariance:
    """Factor ``X^T X / count + eps I`` without forming a ``D x D`` matrix when ``n < D``.

    The triangular factor comes from a QR decomposition of ``F`` stacked on ``sqrt(eps) I``
    rather than a Cholesky of the Gram: it cannot fail on a numerically indefinite Gram (large
    features, tiny ``eps``) and keeps twice the significant digits.
    """
    factor = centred / counts.sqrt()[:, None, None]
    n, d = factor.shape[-2], factor.shape[-1]
    small = n < d
    top = factor.mT if small else factor
    size = n if small else d
    eye = torch.eye(size, dtype=factor.dtype, device=factor.device) * math.sqrt(eps)
    stacked = torch.cat([top, eye.expand(*top.shape[:-2], size, size)], dim=-2)
    if stacked.requires_grad:
        upper = torch.linalg.qr(stacked).R
    else:
        upper = torch.linalg.qr(stacked, mode="r").R
    return ShrunkCovariance(factor, upper, float(eps), small)


def shrunk_logdet(cov: ShrunkCovariance) -> torch.Tensor:
    """``log det(S + eps I)`` ``(G,)`` (matrix determinant lemma on the small side)."""
    logdet = 2 * cov.upper.diagonal(dim1=-2, dim2=-1).abs().log().sum(dim=-1)
    if cov.small:
        n, d = cov.factor.shape[-2], cov.factor.shape[-1]
        logdet = logdet + (d - n) * math.log(cov.eps)
    return logdet


def _solve_upper_transposed(upper: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``R^{-T} rhs``."""
    return torch.linalg.solve_triangular(upper.mT, rhs, upper=False)


def shrunk_mahalanobis(cov: ShrunkCovariance, delta: torch.Tensor) -> torch.Tensor:
    """``delta^T (S + eps I)^{-1} delta`` for ``delta`` ``(G, D)``; Woodbury when small."""
    column = delta[..., None]
    if not cov.small:
        return _solve_upper_transposed(cov.upper, column).square().sum(dim=(-2, -1))
    projected = _solve_upper_transposed(cov.upper, cov.factor @ column)
    return (column.square().sum(dim=(-2, -1)) - projected.square().sum(dim=(-2, -1))) / cov.eps


def shrunk_trace_inverse_product(
    inverted: ShrunkCovariance, other: ShrunkCovariance
) -> torch.Tensor:
    """``tr((S_q + eps I)^{-1} (S_p + eps I))`` ``(G,)``; ``inverted`` is ``q``, ``other`` ``p``.

    Small case: ``(S_q + eps I)^{-1} = (I - F_q^T C_q^{-1} F_q) / eps`` with
    ``C_q = F_q F_q^T + eps I``, and ``eps tr((S_q + eps I)^{-1}) = D - n + eps tr(C_q^{-1})``.
    """
    if not inverted.small:
        ratio = torch.linalg.solve_triangular(inverted.upper, other.upper, upper=True, left=False)
        return ratio.square().sum(dim=(-2, -1))
    n, d = inverted.factor.shape[-2], inverted.factor.shape[-1]
    eps = inverted.eps
    cross = _solve_upper_transposed(inverted.upper, inverted.factor @ other.factor.mT)
    in_span = cross.square().sum(dim=(-2, -1))
    other_energy = other.factor.square().sum(dim=(-2, -1))
    eye = torch.eye(n, dtype=inverted.upper.dtype, device=inverted.upper.device)
    inverse_upper = torch.linalg.solve_triangular(inverted.upper, eye, upper=True)
    scaled_trace = (d - n) + eps * inverse_upper.square().sum(dim=(-2, -1))
    # tr(Sq^-1 Sp) = tr(Sq^-1 F_p^T F_p) + (eps_p / eps) eps tr(Sq^-1)
    return (other_energy - in_span) / eps + (other.eps / eps) * scaled_trace
