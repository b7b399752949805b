"""Covariance numerics for the Gaussian KD2M losses, on batch-sized matrices where possible.

Axis legend: ``G`` groups, ``n`` samples (zero-padded), ``D`` width.

A covariance fitted to ``n < D`` samples has rank ``n - 1``; forming and factorising the ``D x D``
matrix wastes ``O(D^3)`` work on a known null space. Two identities keep the work at
``min(n, D)``:

* Bures fidelity. With centred ``X_s, X_t`` (``n x D``) and ``S = X^T X / n``,
  ``tr((S_s^{1/2} S_t S_s^{1/2})^{1/2}) = ||X_s X_t^T||_* / n`` (the eigenvalues of
  ``S_s S_t`` are the squared singular values of ``X_s X_t^T / n``), and the Bures term is
  ``min_O ||X_s - O X_t||_F^2 / n`` over orthogonal ``O``. For ``n > D``, QR factors
  ``X = Q R`` give the same from the ``D x D`` factors ``R_s, R_t``.
* Shrunk covariances ``S + eps I = F^T F + eps I`` (``F = X / sqrt(n)``): the Woodbury identity
  and the matrix determinant lemma move inverses and log-determinants onto the ``n x n`` matrix
  ``F F^T + eps I``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from featkd._sync import device_eye, sync_free
from featkd.kd2m._sets import matmul_nt

__all__ = [
    "ShrunkCovariance",
    "bures_residual",
    "centre",
    "common_frame",
    "masked_mean",
    "shrunk_covariance",
    "shrunk_logdet",
    "shrunk_mahalanobis",
    "shrunk_trace_inverse_product",
]


def common_frame(
    student: torch.Tensor, teacher: torch.Tensor, *, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(student - m) / c``, ``(teacher - m) / c`` and ``c``: ``m`` the joint mean of the two
    ``(B, D)`` batches, ``c`` the power of two at or just above ``max(floor, largest |entry|)``
    of the shifted batches (``1`` when both are zero), both detached.

    The Gaussian losses depend on differences only and scale as known powers of ``c``, so they
    are computed on entries in ``[-1, 1]`` and rescaled: no overflow or underflow of squares at
    extreme scales, and with ``c`` a power of two the division and the rescaling are exact,
    so values equal the unscaled computation's. No host synchronisation.
    """
    shift = 0.5 * (student.detach().mean(dim=0) + teacher.detach().mean(dim=0))
    student, teacher = student - shift, teacher - shift
    largest = torch.maximum(student.detach().abs().amax(), teacher.detach().abs().amax())
    if floor > 0:
        largest = largest.clamp_min(floor)
    _, exponent = torch.frexp(largest)  # largest = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(largest), exponent)
    return student / scale, teacher / scale, scale


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


# The polar factor on accelerators, by matrix products only: odd polynomials of X, which keep
# its singular vectors and move each singular value s on its own.
# 1. Growth: s -> a s + b s^3 + c s^5 with (a, b, c) = (3.4445, -4.7750, 2.0315), the quintic of
#    the Muon optimiser (Jordan et al., 2024). It multiplies a small value by about 3.4 per step
#    (three kernels), where a Newton-Schulz step multiplies it by 1.5 (two kernels); it is
#    monotone below 0.55 and keeps every value it lifts above 0.2 within [0.65, 1.21].
# 2. Two Newton-Schulz steps s -> 1.5 s - 0.5 s^3: [0.65, 1.21] to within 4e-2 of 1.
# 3. Polishing s -> 2.5 s^3 - 1.5 s^5: 0 and 1 attract, 0.816 repels; it converges what is near 1
#    quadratically and sends the rest to 0.
# The growth is scaled so that a value at the tolerance ends step 1 at _CUT = 0.45 (in the
# monotone range), which step 2 takes to 0.816: values above the tolerance are kept, values
# below it sent to 0, as the SVD path's tolerance does. Zero singular values are unstable fixed
# points of steps 1 and 2 (rounding noise grows too) and the polishing sends that noise to 0.
_GROWTH = (3.4445, -4.7750, 2.0315)
_CUT = 0.45
_SETTLE_STEPS = 2
POLISH_STEPS = 6


def _polar_growth(size: int, dtype: torch.dtype) -> tuple[int, float]:
    """The number of growth steps for a ``size x size`` cross-Gram in ``dtype``, and the factor
    ``r`` in ``(1 / a, 1]`` on the start that sends the tolerance to ``_CUT`` exactly."""
    # Singular values below the tolerance (relative to the largest) are dropped, each costing
    # the value twice itself (the SVD path's value keeps every direction). Rounding moves the
    # singular values of a computed size x size cross-Gram by about sqrt(size) eps of the
    # largest (Weyl), so 8 sqrt(size) eps still leaves that noise out; the SVD path's size * eps
    # dropped enough to cost 1.2e-4 in float32 at B = D = 1024 with ill-conditioned features
    tolerance = min(size, 8 * math.sqrt(size)) * torch.finfo(dtype).eps
    a = _GROWTH[0]
    steps = max(0, math.ceil(math.log(_CUT / tolerance) / math.log(a)))
    return steps, min(1.0, _CUT / (tolerance * a**steps))


def _polar_newton_schulz(m: torch.Tensor) -> torch.Tensor:
    """The polar factor of ``m`` ``(..., k, k)`` over its singular values above about
    ``min(k, 8 sqrt(k)) eps`` of the largest (up to ``k^(1/8)`` times that: the start scale
    below), by matrix products only (no SVD, so no host synchronisation): from ``X_0 = m / s``,
    ``s >= sigma_max`` within a factor ``k^(1/8)`` (the 8th root of the sum of ``sigma^8``),
    the growth, Newton-Schulz and polishing steps above."""
    tiny = torch.finfo(m.dtype).tiny
    x = m / torch.linalg.matrix_norm(m).clamp_min(tiny)[..., None, None]  # sigma <= 1: no overflow
    gram = x.mT @ x
    x = x / torch.linalg.matrix_norm(gram @ gram).pow(0.25).clamp_min(tiny)[..., None, None]
    # one batch axis for baddbmm, which folds each step's scalings and sums into its products
    # (latency is what these steps cost on a GPU)
    x = x.reshape(-1, *x.shape[-2:])
    a, b, c = _GROWTH
    steps, r = _polar_growth(m.shape[-1], m.dtype)
    for step in range(steps):
        # the first step takes X_0 r: r folded into its scalars, no kernel of its own
        scale = r if step == 0 else 1.0
        gram = x.mT @ x
        inner = torch.baddbmm(gram, gram, gram, beta=b * scale**2, alpha=c * scale**4)
        x = torch.baddbmm(x, x, inner, beta=a * scale, alpha=scale)
    for _ in range(_SETTLE_STEPS):
        x = torch.baddbmm(x, x, x.mT @ x, beta=1.5, alpha=-0.5)
    for _ in range(POLISH_STEPS):
        gram = x.mT @ x
        x = x @ torch.baddbmm(gram, gram, gram, beta=2.5, alpha=-1.5)
    return x.reshape(m.shape)


class _BuresResidual(torch.autograd.Function):
    """``min_O ||a - O b||_F^2`` over orthogonal ``O``, for ``a, b`` of shape ``(..., n, D)``.

    The value is the squared residual at the optimal ``O``, the full polar factor of ``a b^T``
    (null directions included: any orthogonal completion attains the minimum). The gradient is
    ``2 (a - P b)`` with ``P`` the polar factor over the non-zero singular values only.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = a.shape[-2], a.shape[-1]
        ctx.batch_route = n <= d
        if n <= d:  # (n x n) cross-Gram
            left, right = a, b
        else:  # a = Q_a R_a: the Gram a^T a = R_a^T R_a, so the R factors stand in for a and b
            q_a, left = torch.linalg.qr(a) if need_a else (None, torch.linalg.qr(a, mode="r")[1])
            q_b, right = torch.linalg.qr(b) if need_b else (None, torch.linalg.qr(b, mode="r")[1])
            ctx.q_a, ctx.q_b = q_a, q_b
        cross = matmul_nt(left, right)
        if sync_free(cross):
            # P over the non-zero singular values; with P^T P a projector,
            # ||a - O b||^2 = ||a - P b||^2 + ||b - P^T P b||^2, still a sum of squares
            polar = _polar_newton_schulz(cross)
            moved = polar @ right
            value = (left - moved).square().sum(dim=(-2, -1))
            value = value + (right - polar.mT @ moved).square().sum(dim=(-2, -1))
        else:
            u, s, vh = torch.linalg.svd(cross, full_matrices=False)
            # a sum of squares, not ||a||^2 + ||b||^2 - 2 ||a b^T||_*: no cancellation, so
            # equal inputs give zero to squared rounding and nearly equal ones keep their digits
            value = (left - (u @ vh) @ right).square().sum(dim=(-2, -1))
            polar = _polar_factor(u, s, vh) if need_a or need_b else None
        if need_a or need_b:
            ctx.save_for_backward(polar, left, right)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        polar, left, right = ctx.saved_tensors
        g = 2 * grad[..., None, None]
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = g * (left - polar @ right)
            if not ctx.batch_route:  # a - Q_a P R_b = Q_a (R_a - P R_b)
                grad_a = ctx.q_a @ grad_a
        if ctx.needs_input_grad[1]:
            grad_b = g * (right - polar.mT @ left)
            if not ctx.batch_route:
                grad_b = ctx.q_b @ grad_b
        return grad_a, grad_b


def bures_residual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a||^2 + ||b||^2 - 2 ||a b^T||_*`` of ``a, b`` ``(..., n, D)``, on ``min(n, D)``-sized
    matrices: ``n`` times the squared Bures distance between ``a^T a / n`` and ``b^T b / n``.

    It is evaluated as the residual ``||a - O b||_F^2`` at the optimal orthogonal ``O`` (the
    polar factor of ``a b^T``), a sum of squares: never negative, zero to squared rounding for
    equal inputs. The gradient is ``2 (a - P b)`` with ``P`` the polar factor restricted to the
    non-zero singular values, finite when they repeat or vanish (identical inputs, constant
    features, fewer samples than dimensions). Runs in the dtype of ``a``; batched over leading
    axes.
    """
    return _BuresResidual.apply(a, b)


class ShrunkCovariance(NamedTuple):
    """``S + eps I`` of a group of centred rows, held as ``F`` and a triangular factor.

    ``factor`` is ``F = X / sqrt(count)`` ``(G, n, D)``. When ``n < D`` (``small``) ``upper`` is
    ``R`` with ``R^T R = F F^T + eps I_n`` (``(G, n, n)``) and, when asked for, ``basis`` is the
    top ``D`` rows ``F^T R^{-1}`` of the orthonormal factor of ``[F^T; sqrt(eps) I_n]``
    (``(G, D, n)``); otherwise ``R^T R = F^T F + eps I_D`` (``(G, D, D)``). ``eps`` is a number
    or a 0-d tensor.
    """

    factor: torch.Tensor
    upper: torch.Tensor
    eps: float | torch.Tensor
    small: bool
    basis: torch.Tensor | None = None


def _log(eps: float | torch.Tensor) -> torch.Tensor | float:
    return eps.log() if isinstance(eps, torch.Tensor) else math.log(eps)


def shrunk_covariance(
    centred: torch.Tensor,
    counts: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    invertible: bool = False,
) -> ShrunkCovariance:
    """Factor ``X^T X / count + eps I`` without forming a ``D x D`` matrix when ``n < D``.

    The triangular factor comes from a QR decomposition of ``F`` stacked on ``sqrt(eps) I``
    rather than a Cholesky of the Gram: it cannot fail on a numerically indefinite Gram (large
    features, tiny ``eps``) and keeps twice the significant digits. ``invertible=True`` keeps
    the orthonormal ``basis`` that :func:`shrunk_mahalanobis` and
    :func:`shrunk_trace_inverse_product` need to invert a small covariance.
    """
    factor = centred / counts.sqrt()[:, None, None]
    n, d = factor.shape[-2], factor.shape[-1]
    small = n < d
    top = factor.mT if small else factor
    size = n if small else d
    eye = device_eye(size, factor) * eps**0.5
    stacked = torch.cat([top, eye.expand(*top.shape[:-2], size, size)], dim=-2)
    basis = None
    if small and invertible:
        orthonormal, upper = torch.linalg.qr(stacked)
        basis = orthonormal[..., :d, :]
    elif stacked.requires_grad:
        upper = torch.linalg.qr(stacked).R
    else:
        upper = torch.linalg.qr(stacked, mode="r").R
    return ShrunkCovariance(factor, upper, eps, small, basis)


def shrunk_logdet(cov: ShrunkCovariance) -> torch.Tensor:
    """``log det(S + eps I)`` ``(G,)`` (matrix determinant lemma on the small side)."""
    logdet = 2 * cov.upper.diagonal(dim1=-2, dim2=-1).abs().log().sum(dim=-1)
    if cov.small:
        n, d = cov.factor.shape[-2], cov.factor.shape[-1]
        logdet = logdet + (d - n) * _log(cov.eps)
    return logdet


def _solve_upper_transposed(upper: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``R^{-T} rhs``."""
    return torch.linalg.solve_triangular(upper.mT, rhs, upper=False)


def _inverse_quadratic(cov: ShrunkCovariance, columns: torch.Tensor) -> torch.Tensor:
    """``sum_j v_j^T (S + eps I)^{-1} v_j`` over the columns ``v_j`` of ``columns`` ``(G, D, k)``,
    for a small covariance.

    Woodbury gives ``eps v^T (S + eps I)^{-1} v = |v|^2 - |B^T v|^2`` (``B`` the ``basis``), a
    difference that loses every digit when ``|v|^2 / eps`` is large (features far above
    ``sqrt(eps)``) and ``v`` lies near the span of the rows. ``B`` is the top of an orthonormal
    ``Q = [B; sqrt(eps) R^{-1}]``, so the same quantity is the sum of squares
    ``|v - B B^T v|^2 + eps |R^{-1} B^T v|^2``: no cancellation.
    """
    if cov.basis is None:
        raise RuntimeError("shrunk_covariance(..., invertible=True) is needed to invert")
    coefficients = cov.basis.mT @ columns
    outside = (columns - cov.basis @ coefficients).square().sum(dim=(-2, -1))
    inside = torch.linalg.solve_triangular(cov.upper, coefficients, upper=True)
    return outside / cov.eps + inside.square().sum(dim=(-2, -1))


def shrunk_mahalanobis(cov: ShrunkCovariance, delta: torch.Tensor) -> torch.Tensor:
    """``delta^T (S + eps I)^{-1} delta`` for ``delta`` ``(G, D)``; on ``n x n`` matrices when
    small (needs ``invertible=True``)."""
    column = delta[..., None]
    if not cov.small:
        return _solve_upper_transposed(cov.upper, column).square().sum(dim=(-2, -1))
    return _inverse_quadratic(cov, column)


def shrunk_trace_inverse_product(
    inverted: ShrunkCovariance, other: ShrunkCovariance
) -> torch.Tensor:
    """``tr((S_q + eps I)^{-1} (S_p + eps I))`` ``(G,)``; ``inverted`` is ``q``, ``other`` ``p``.

    Small case (``inverted`` needs ``invertible=True``): ``tr(S_q^-1 F_p^T F_p)`` is the sum of
    the quadratic forms of the rows of ``F_p`` (cancellation-free, see
    :func:`_inverse_quadratic`), and ``eps tr((S_q + eps I)^{-1}) = D - n + eps tr(C_q^{-1})``
    with ``C_q = F_q F_q^T + eps I = R^T R``.
    """
    if not inverted.small:
        ratio = torch.linalg.solve_triangular(inverted.upper, other.upper, upper=True, left=False)
        return ratio.square().sum(dim=(-2, -1))
    n, d = inverted.factor.shape[-2], inverted.factor.shape[-1]
    eps = inverted.eps
    rows = _inverse_quadratic(inverted, other.factor.mT)
    inverse_upper = torch.linalg.solve_triangular(
        inverted.upper, device_eye(n, inverted.upper), upper=True
    )
    scaled_trace = (d - n) + eps * inverse_upper.square().sum(dim=(-2, -1))
    # tr(Sq^-1 Sp) = tr(Sq^-1 F_p^T F_p) + (eps_p / eps) eps tr(Sq^-1)
    return rows + (other.eps / eps) * scaled_trace
