"""The matrix exponential by scaling and squaring with a Taylor polynomial (unchecked maths).

``expm(M)`` (or some of its columns) for a dense square ``M``: the powers ``Y^1..Y^4`` of
``Y = M / rho`` (``rho = max(||M||_F, 1)``, so they cannot overflow) are formed once; the
Taylor polynomial of ``exp(Y rho / 2^s)`` is evaluated in Paterson-Stockmeyer form, then squared
``s`` times. Degree and number of squarings come from a rigorous bound on the Taylor remainder
built from the norms of the computed powers; reading that bound is one host synchronisation per
call, like :func:`torch.linalg.matrix_exp`; that adaptive plan runs on CPU only. Passing
``max_squarings``, or running on an accelerator or under ``torch.compile``, makes the evaluation
synchronisation-free (a fixed degree; every square up to the maximum is formed and the device
selects the one needed). Gradients come from autograd through the matrix products, and from a
hand-written backward through the squares.

:mod:`featkd.vkd._stiefel` uses it on the small companion core of the Stiefel exponential.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from featkd._sync import device_constant, device_eye, sync_free

__all__ = ["expm_columns"]

# Paterson-Stockmeyer block size: the powers X^1..X^4 are formed once, degrees are 4r.
_PS_BLOCK = 4
_MAX_BLOCKS = 6  # degree <= 24
# fixed, synchronisation-free choice: degree 16 (float32) / 24 (float64) and the squarings
# that bring the Frobenius-bound below theta_m
_FIXED_BLOCKS = {torch.float32: 4, torch.float64: 6}
# the squarings paid for on accelerators and under torch.compile when the caller fixes none:
# accurate while ||M|| <~ 2^13 (a trained orthogonal map's generator has ||M|| of a few units);
# each one costs three kernels (one product forward, two backward), needed or not
SYNC_FREE_SQUARINGS = 12


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


# Taylor terms j = 1.._MAX_TERM enter the remainder bounds; beyond that they are negligible
# whenever the bound is small enough to be accepted (the terms then decay geometrically).
_MAX_TERM = _PS_BLOCK * _MAX_BLOCKS + 40
_TERMS = np.arange(1, _MAX_TERM + 1)
_LOG_FACTORIALS = np.array([math.lgamma(j + 1) for j in _TERMS])
_SQUARINGS = np.arange(0, 64)


def _log_remainder_bounds(log_norms: list[float], log_rho: float) -> np.ndarray:
    """``log`` of bounds on ``||sum_{j > m} X^j / j!||_F`` for ``X = Y rho / 2^s``, for every
    ``s`` in ``_SQUARINGS`` (rows) and degree ``m = q r`` (columns ``r = 1.._MAX_BLOCKS``).

    ``log_norms[b] = log ||Y^b||`` (``b = 1..q``); ``||Y^j|| <= ||Y^q||^a ||Y^b||`` for
    ``j = a q + b`` and ``<= ||Y||^j`` (submultiplicativity). The ``phi``-type coefficients
    ``1/(j+1)!`` are smaller than ``1/j!``, so the bounds cover them too.
    """
    q = _PS_BLOCK
    norms = np.asarray(log_norms, dtype=np.float64)
    a, b = np.divmod(_TERMS, q)
    with np.errstate(invalid="ignore"):
        blocked = a * norms[q] + np.where(b > 0, norms[b], 0.0)
        log_power = np.minimum(blocked, _TERMS * norms[1])
        log_scale = log_rho - _SQUARINGS * math.log(2.0)
        terms = log_power - _LOG_FACTORIALS + _TERMS * log_scale[:, None]
        # suffix log-sum-exp: tails[:, j - 1] bounds the sum of the terms j.._MAX_TERM
        tails = np.logaddexp.accumulate(terms[:, ::-1], axis=1)[:, ::-1]
    degrees = q * np.arange(1, _MAX_BLOCKS + 1)
    return tails[:, degrees]  # the tail starting at j = degree + 1


def _plan(log_norms: list[float], log_rho: float, tol: float, cost) -> tuple[int, int]:
    """Cheapest ``(blocks r, squarings s)``, degree ``q r``, whose remainder bound for
    ``X = Y rho / 2^s`` is at most ``tol``; ``cost(r, s)`` (numpy-broadcastable) in
    dense-product units."""
    if not all(math.isfinite(v) or v == -math.inf for v in [*log_norms, log_rho]):
        raise FloatingPointError("matrix exponential: the generator has non-finite entries")
    feasible = _log_remainder_bounds(log_norms, log_rho) <= math.log(tol)
    if not feasible.any():
        raise FloatingPointError("matrix exponential: the generator's norm is too large")
    blocks = np.arange(1, _MAX_BLOCKS + 1)[None, :]
    costs = np.where(feasible, cost(blocks, _SQUARINGS[:, None]), np.inf)
    s, r = np.unravel_index(np.argmin(costs), costs.shape)
    return int(r) + 1, int(s)


def _squarings_on_device(
    log_norms: torch.Tensor, log_rho: torch.Tensor, degree: int, max_squarings: int, tol: float
) -> torch.Tensor:
    """Fewest squarings ``s <= max_squarings`` meeting the remainder bound of :func:`_plan` at
    a fixed degree, computed on the device (no host synchronisation)."""
    q = log_norms.shape[0] - 1
    rows = 20  # the terms j = degree + 1 .. degree + 20 q, as a (rows, q) grid
    grid = rows * q

    def make() -> torch.Tensor:
        # packed [a | j | log j! | j s log 2], built on the device once (no host-made tensor)
        j = torch.arange(
            degree + 1, degree + 1 + grid, dtype=torch.float64, device=log_norms.device
        )
        s = torch.arange(max_squarings + 1, dtype=torch.float64, device=j.device)
        parts = [
            j // q,
            j,
            torch.lgamma(j + 1),
            (s[:, None] * j * math.log(2.0)).flatten(),
        ]
        return torch.cat(parts).to(log_norms.dtype)

    table = device_constant(("expm bound", degree, q, max_squarings), log_norms, make)
    a, j, log_fact = (table[i * grid : (i + 1) * grid].view(rows, q) for i in range(3))
    j_s_log2 = table[3 * grid :].view(max_squarings + 1, grid)
    # degree is a multiple of q, so column c holds the terms j = a q + (c + 1) mod q:
    # ||Y^j|| <= ||Y^q||^a ||Y^b|| needs log_norms[1], .., log_norms[q - 1], log_norms[0]
    blocked = torch.addcmul(log_norms[:q].roll(-1), a, log_norms[q])
    power = torch.minimum(blocked, j * log_norms[1])
    per_term = torch.addcmul(power - log_fact, j, log_rho).view(1, grid)
    bounds = torch.logsumexp(per_term - j_s_log2, dim=1)  # X = Y rho / 2^s, row s
    return (bounds > math.log(tol)).sum().clamp(max=max_squarings).to(log_norms.dtype)


def unit_frobenius(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / ||x||_F`` and ``||x||_F``, safe where the plain norm under- or overflows: scaled by
    the largest entry first (a zero ``x`` gives zero and ``0``)."""
    tiny = torch.finfo(x.dtype).tiny
    peak = x.abs().amax().clamp_min(tiny)
    scaled = x / peak
    norm = scaled.norm()  # >= 1 unless x is zero
    return scaled / norm.clamp_min(tiny), norm * peak


def _start_vectors(like: torch.Tensor, dim: int) -> torch.Tensor:
    """Four fixed, well-spread start vectors (golden-ratio sequence; no RNG use): ``(dim, 4)``."""
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    seeds = torch.arange(1, 4 * dim + 1, dtype=like.dtype, device=like.device) * golden
    return (seeds - seeds.floor() - 0.5).reshape(dim, 4)


def _log_power_norms(powers: list[torch.Tensor], iterations: int = 6) -> torch.Tensor:
    """``log`` of norm bounds for ``powers[j] = Y^j`` (``powers[0]`` is the identity: ``0``).

    Frobenius norms are rigorous 2-norm bounds but overestimate by up to ``sqrt(dim)``, which
    for ``Y^q`` (whose ``q``-th root sets the number of squarings) costs a squaring. So for
    ``Y^q`` the bound is ``min(||Y^q||_F, 1.1 * estimate)``, the estimate from a few steps of
    block power iteration on ``Y^{qT} Y^q`` (four fixed start vectors, no RNG use). On the
    synchronisation-free path every bound is the Frobenius norm.
    """
    if sync_free(powers[-1]):
        # a sharper bound only lowers the number of squares needed, and this path forms them
        # all anyway: the estimate's twenty-odd kernels buy nothing. ||Y^j||_F <= ||Y||_F^j <= 1:
        # no overflow, and an underflow to 0 only drops terms that are below tolerance
        norms = torch.linalg.vector_norm(torch.stack(powers[1:]).detach(), dim=(-2, -1))
        return F.pad(norms.log(), (1, 0))
    top, scale = unit_frobenius(powers[-1].detach())
    # with ||Y^q||_F = 1 the Gram's top eigenvalue lies in [1 / dim, 1]: the steps need no
    # normalisation of their own (dim^-iterations is far above float32's tiny)
    dim = top.shape[-1]
    v = device_constant(("power iteration start", dim), top, lambda: _start_vectors(top, dim))
    for _ in range(iterations):
        v = ((top @ v).mT @ top).mT  # Y^T Y v without transposing Y
    v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(top.dtype).tiny)
    estimate = (top @ v).norm(dim=0).max() * scale
    # ||Y^q||_F is scale, already measured without under- or overflow
    norms = [p.detach().norm() for p in powers[1:-1]]
    norms = torch.stack([*norms, torch.minimum(scale, 1.1 * estimate)])
    return torch.cat([norms.new_zeros(1), norms.log()])


def _ps_polynomial(
    stacked: torch.Tensor,
    block_coeffs: torch.Tensor,
    top_coeff: float,
    top_power: torch.Tensor,
    power_q: torch.Tensor,
) -> torch.Tensor:
    """Paterson-Stockmeyer evaluation of ``sum_i (X^q)^i B_i``, ``B_i = sum_j C[i, j] X^j``.

    ``stacked[j] = X^j`` for ``j < q`` (or the same columns of each), ``block_coeffs`` the
    ``(r, q)`` matrix ``C``, ``top_coeff * top_power`` the degree-``q r`` term (``top_power``
    is ``power_q = X^q`` or its columns). All blocks come from one contraction; Horner in
    ``X^q`` then takes ``r - 1`` fused multiply-adds.
    """
    q, m, c = stacked.shape
    contracted = block_coeffs.to(stacked.dtype) @ stacked.reshape(q, m * c)
    # unbind, not indexing: its backward is one stack instead of a zero-filled copy per block
    *blocks, last = contracted.reshape(-1, m, c).unbind(0)
    acc = torch.add(last, top_power, alpha=top_coeff)
    for block in reversed(blocks):
        acc = torch.addmm(block, power_q, acc)
    return acc


def _taylor_coefficients(
    degree: int, shift: int, scale: float | torch.Tensor, q: int, like: torch.Tensor
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """``C[i, j] = scale^j / (i q + j + shift)!`` (``(r, q)``) and the top coefficient
    ``1 / (degree + shift)!``: the Taylor coefficients of ``exp`` (``shift = 0``) or ``phi1``
    (``shift = 1``) with ``scale^j`` folded into the block coefficients."""
    blocks = degree // q

    def make() -> torch.Tensor:
        # built on the device, not copied from the host: k! by a running product, which for
        # k <= 27 (degrees here stop at 25) gives exactly the floats 1 / math.factorial(k) gives
        k = torch.arange(degree + shift, dtype=torch.float64, device=like.device)
        inverse_factorials = 1.0 / k.clamp_min(1).cumprod(0)
        index = torch.arange(blocks * q, device=like.device) + shift
        exponents = torch.arange(q, dtype=torch.float64, device=like.device)
        return torch.cat([inverse_factorials[index], exponents])

    # a tensor scale (the synchronisation-free path) stays in the matrix's dtype, two kernels
    # fewer than a float64 detour; a float one (CPU) rounds each coefficient once, at the end
    dtype = like.dtype if isinstance(scale, torch.Tensor) else torch.float64
    table = device_constant(("taylor", degree, shift, q, dtype), like, lambda: make().to(dtype))
    exponents = table[blocks * q :]
    powers = torch.pow(scale, exponents)
    top = 1.0 / math.factorial(degree + shift)
    return table[: blocks * q].view(blocks, q) * powers, top


def expm_columns(
    matrix: torch.Tensor,
    columns: slice,
    *,
    left_mult=None,
    max_squarings: int | None = None,
) -> tuple[torch.Tensor, int | None]:
    """``expm(matrix)[:, columns]`` and the number of squarings (``None`` when counted on the
    device), by scaling and squaring with a Taylor polynomial in
    Paterson-Stockmeyer form, differentiated by autograd through the products.

    The powers are formed for ``Y = matrix / rho`` with ``rho = max(||matrix||_F, 1)``
    (detached) so they cannot overflow; then ``X = Y rho / 2^s``. ``left_mult(V) = matrix @ V``
    may exploit structure (it is used for the powers). Degree and squarings come from the
    remainder bound on ``||Y^j||_F``, read on the host (one synchronisation), or, with
    ``max_squarings``, from a fixed degree with the squarings counted and selected on the device.
    ``max_squarings=None`` reads the bound on CPU only: on accelerators and under
    ``torch.compile`` it means ``SYNC_FREE_SQUARINGS``.
    """
    if max_squarings is None and sync_free(matrix):
        max_squarings = SYNC_FREE_SQUARINGS
    n = matrix.shape[0]
    dtype, device = matrix.dtype, matrix.device
    q = _PS_BLOCK
    rho = matrix.detach().norm().clamp_min(1.0)
    eye = device_eye(n, matrix)
    unit = matrix / rho
    powers = [eye, unit]
    for _ in range(2, q + 1):
        # a structured product needs its own scaling; the dense one multiplies by Y itself
        powers.append(left_mult(powers[-1]) / rho if left_mult else unit @ powers[-1])
    log_norms_dev = _log_power_norms(powers)
    log_rho_dev = rho.log()
    tol = _unit_roundoff(dtype)
    stacked = torch.stack(powers[:q])
    fraction = len(range(n)[columns]) / n

    if max_squarings is None:
        *log_norms, log_rho = torch.cat([log_norms_dev, log_rho_dev[None]]).tolist()  # sync

        def cost(blocks, s):
            # in dense n x n products, the powers already paid for; s = 0 needs the columns only
            return np.where(s == 0, fraction * (blocks - 1), (blocks - 1) + (s - 1) + fraction)

        blocks, squarings = _plan(log_norms, log_rho, tol, cost)
        scale = math.exp(log_rho) * 2.0**-squarings
        coeffs, top = _taylor_coefficients(q * blocks, 0, scale, q, matrix)
        x_q = powers[q] * scale**q
        if squarings == 0:
            cols = stacked[:, :, columns]
            return _ps_polynomial(cols, coeffs, top, x_q[:, columns], x_q), 0
        expo = _ps_polynomial(stacked, coeffs, top, x_q, x_q)
        for _ in range(squarings - 1):
            expo = expo @ expo
        return expo @ expo[:, columns], squarings

    degree = q * _FIXED_BLOCKS[dtype]
    needed = _squarings_on_device(log_norms_dev, log_rho_dev, degree, max_squarings, tol)
    scale_dev = rho * torch.exp2(-needed)
    coeffs, top = _taylor_coefficients(degree, 0, scale_dev, q, matrix)
    x_q = powers[q] * scale_dev**q
    expo = _ps_polynomial(stacked, coeffs, top, x_q, x_q)
    if max_squarings == 0:
        return expo[:, columns], None
    steps = device_constant(
        ("squaring steps", max_squarings),
        matrix,
        lambda: torch.arange(max_squarings + 1, dtype=dtype, device=device),
    )
    chosen = (steps == needed).to(dtype)  # one-hot: which of E, E^2, E^4, .. is the result
    if torch._C._are_functorch_transforms_active():  # vmap, jacrev: autograd.Function-free
        return _selected_square(expo, chosen, columns), None
    return _SelectedSquare.apply(expo, chosen, columns), None


def _squares(expo: torch.Tensor, count: int) -> torch.Tensor:
    """``E, E^2, E^4, .., E^(2^(count - 1))`` stacked: ``(count, n, n)``, one product each."""
    chain = [expo]
    for _ in range(count - 1):
        chain.append(chain[-1] @ chain[-1])
    return torch.stack(chain)


def _select(chosen: torch.Tensor, squares: torch.Tensor, columns: slice) -> torch.Tensor:
    """``sum_i chosen[i] squares[i]`` on ``columns``: with a one-hot ``chosen``, ``E`` squared
    as many times as the device found needed. The unneeded squares stay out of the sum (they
    are finite: the exponential of a skew generator's core stays bounded)."""
    return torch.tensordot(chosen, squares, 1)[:, columns]


def _selected_square(expo: torch.Tensor, chosen: torch.Tensor, columns: slice) -> torch.Tensor:
    """:func:`_select` of :func:`_squares` (no masking: one kernel per square)."""
    return _select(chosen, _squares(expo, chosen.shape[0]), columns)


class _SelectedSquare(torch.autograd.Function):
    """:func:`_selected_square` with its own backward, two fused multiply-adds per step:
    ``G_i = E_i^T G_{i+1} + G_{i+1} E_i^T + chosen[i] G_out``. Under ``create_graph`` the
    backward runs the steps again with autograd, so that second derivatives are exact."""

    @staticmethod
    def forward(ctx, expo: torch.Tensor, chosen: torch.Tensor, columns: slice) -> torch.Tensor:
        squares = _squares(expo, chosen.shape[0])
        ctx.save_for_backward(expo, chosen, squares)
        ctx.columns = columns
        return _select(chosen, squares, columns)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        expo, chosen, squares = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            out = _selected_square(expo, chosen, ctx.columns)
            return torch.autograd.grad(out, expo, grad, create_graph=True)[0], None, None
        n = squares.shape[-1]
        start, stop, _ = ctx.columns.indices(n)
        if (start, stop) != (0, n):
            grad = F.pad(grad, (start, n - stop))
        shares = chosen[:, None, None] * grad  # the output's gradient, at the chosen square
        g = shares[-1]
        for i in range(chosen.shape[0] - 2, -1, -1):
            e = squares[i]
            g = torch.addmm(torch.addmm(shares[i], e.mT, g), g, e.mT)
        return g, None, None
