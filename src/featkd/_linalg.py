"""Numerics: the Stiefel (low-rank) matrix exponential and Cayley map, whitening maths.

Notation: ``n = d_t`` (tall side), ``k = d_s`` (number of orthonormal columns), ``E_k`` the
first ``k`` columns of the ``n x n`` identity.

The orthogonal projection ``P = expm(A) E_k`` needs only ``k`` columns of an ``n x n``
exponential. With the generator restricted to (every point of the Stiefel manifold is reached
this way)::

    A = [[S, -B^T],      S: k x k skew-symmetric
         [B,   0 ]]      B: (n - k) x k

``A`` has rank at most ``2k``: ``A = U V^T`` with ``U = [E_k S + C, E_k]``, ``V = [E_k, -C]``
and ``C = [0; B]``. Then ``expm(A) = I + U phi1(V^T U) V^T`` with ``phi1(z) = (e^z - 1) / z``,
``V^T E_k = [I; 0]`` and the ``2k x 2k`` core is the companion matrix::

    M = V^T U = [[S, I],
                 [-G, 0]]        G = B^T B   (k x k)

so ``P = [I + S X1 + X2; B X1]`` where ``[X1; X2]`` are the first ``k`` columns of
``phi1(M)``. Only two tall-skinny products (``B^T B`` and ``B X1``) touch the ``n`` side; the
rest is ``2k x 2k`` work, and multiplying by ``M`` costs half a dense product because of its
identity and zero blocks.

``phi1(M)`` is evaluated by scaling and squaring with a Taylor polynomial in
Paterson-Stockmeyer form. ``M`` is first balanced by the exact similarity ``diag(I, r I)``
(``r ~ ||B||``), so its off-diagonal blocks have equal size and its norm is that of ``A``.
Degree and number of squarings come from a rigorous bound on the Taylor remainder built from
the Frobenius norms of the computed powers ``||Z^j||_F``; reading that bound is one host
synchronisation per call, like :func:`torch.linalg.matrix_exp`. Passing ``max_squarings``
makes the evaluation synchronisation-free (a fixed degree, the squarings chosen on the device
and masked). Gradients come from autograd through the matrix products.

The Cayley map ``(I - A/2)^{-1} (I + A/2) E_k`` reduces the same way, by Woodbury and a Schur
complement, to one ``k x k`` solve: ``K = I - S/2 + G/4``, ``P = [2 K^{-1} - I; B K^{-1}]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "cholesky_whitener",
    "expm_taylor",
    "skew_from_lower",
    "stiefel_blocks",
    "stiefel_cayley",
    "stiefel_expm",
    "stiefel_generator_matrix",
    "zca_whitener",
]

# Paterson-Stockmeyer block size: the powers X^1..X^4 are formed once, degrees are 4r.
_PS_BLOCK = 4
_MAX_BLOCKS = 6  # degree <= 24
# fixed, synchronisation-free choice: degree 16 (float32) / 24 (float64) and the squarings
# that bring the Frobenius-bound below theta_m
_FIXED_BLOCKS = {torch.float32: 4, torch.float64: 6}


def skew_from_lower(x: torch.Tensor) -> torch.Tensor:
    """``L - L^T`` with ``L`` the strictly lower triangle of a square ``x``."""
    lower = x.tril(-1)
    return lower - lower.mT


def stiefel_blocks(generator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an ``(n, k)`` generator into the skew ``S`` (from its top ``k x k`` block's
    strictly lower triangle) and ``B`` (its last ``n - k`` rows)."""
    k = generator.shape[1]
    # split, not two slices: its backward concatenates instead of zero-filling twice
    top, tall = torch.split(generator, [k, generator.shape[0] - k])
    return skew_from_lower(top), tall


def stiefel_generator_matrix(skew: torch.Tensor, tall: torch.Tensor) -> torch.Tensor:
    """The full ``n x n`` skew generator ``[[S, -B^T], [B, 0]]`` (tests and diagnostics)."""
    n_minus_k = tall.shape[0]
    zeros = tall.new_zeros(n_minus_k, n_minus_k)
    top = torch.cat([skew, -tall.mT], dim=1)
    bottom = torch.cat([tall, zeros], dim=1)
    return torch.cat([top, bottom], dim=0)


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
    dtype, device = log_norms.dtype, log_norms.device
    js = list(range(degree + 1, degree + 80))
    a = torch.tensor([j // q for j in js], dtype=dtype, device=device)
    log_nb = torch.stack([log_norms[j % q] if j % q else log_norms.new_zeros(()) for j in js])
    blocked = a * log_norms[q] + log_nb
    j_t = torch.tensor(js, dtype=dtype, device=device)
    power = torch.minimum(blocked, j_t * log_norms[1])
    log_fact = torch.tensor([math.lgamma(j + 1) for j in js], dtype=dtype, device=device)
    s = torch.arange(max_squarings + 1, dtype=dtype, device=device)
    log_scale = log_rho - s * math.log(2.0)
    bounds = torch.logsumexp(power - log_fact + j_t * log_scale[:, None], dim=1)
    return (bounds > math.log(tol)).sum().clamp(max=max_squarings).to(dtype)


def _log_power_norms(powers: list[torch.Tensor], iterations: int = 6) -> torch.Tensor:
    """``log`` of norm bounds for ``powers[j] = Y^j`` (``powers[0]`` is the identity: ``0``).

    Frobenius norms are rigorous 2-norm bounds but overestimate by up to ``sqrt(dim)``, which
    for ``Y^q`` (whose ``q``-th root sets the number of squarings) costs a squaring. So for
    ``Y^q`` the bound is ``min(||Y^q||_F, 1.1 * estimate)``, the estimate from a few steps of
    block power iteration on ``Y^{qT} Y^q`` (four fixed start vectors, no RNG use).
    """
    top = powers[-1].detach()
    dim = top.shape[-1]
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    seeds = torch.arange(1, 4 * dim + 1, dtype=top.dtype, device=top.device) * golden
    v = (seeds - seeds.floor() - 0.5).reshape(dim, 4)
    for _ in range(iterations):
        v = ((top @ v).mT @ top).mT  # Y^T Y v without transposing Y
        v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(top.dtype).tiny)
    estimate = (top @ v).norm(dim=0).max()
    norms = torch.stack([p.detach().norm() for p in powers[1:]])
    norms = torch.cat([norms[:-1], torch.minimum(norms[-1], 1.1 * estimate)[None]])
    return torch.cat([norms.new_zeros(1), norms.log()])


def _ps_polynomial(
    stacked: torch.Tensor,
    block_coeffs: torch.Tensor,
    top_coeff: float | torch.Tensor,
    top_power: torch.Tensor,
    left_mult_power,
) -> torch.Tensor:
    """Paterson-Stockmeyer evaluation of ``sum_i (X^q)^i B_i``, ``B_i = sum_j C[i, j] X^j``.

    ``stacked[j] = X^j`` for ``j < q`` (or the same columns of each), ``block_coeffs`` the
    ``(r, q)`` matrix ``C``, ``top_coeff * top_power`` the degree-``q r`` term (``top_power``
    is ``X^q`` or its columns) and ``left_mult_power(Y) = X^q @ Y``. All blocks come from one
    contraction; Horner in ``X^q`` then takes ``r - 1`` products.
    """
    q, m, c = stacked.shape
    blocks = (block_coeffs.to(stacked.dtype) @ stacked.reshape(q, m * c)).reshape(-1, m, c)
    acc = top_coeff * top_power + blocks[-1]
    for i in range(blocks.shape[0] - 2, -1, -1):
        acc = left_mult_power(acc) + blocks[i]
    return acc


def _taylor_coefficients(
    degree: int, shift: int, scale: float | torch.Tensor, q: int, like: torch.Tensor
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """``C[i, j] = scale^j / (i q + j + shift)!`` (``(r, q)``) and the top coefficient
    ``1 / (degree + shift)!``: the Taylor coefficients of ``exp`` (``shift = 0``) or ``phi1``
    (``shift = 1``) with ``scale^j`` folded into the block coefficients."""
    blocks = degree // q
    inv_fact = torch.tensor(
        [[1.0 / math.factorial(i * q + j + shift) for j in range(q)] for i in range(blocks)],
        dtype=torch.float64,
        device=like.device,
    )
    if isinstance(scale, torch.Tensor):
        powers = scale.to(torch.float64) ** torch.arange(q, device=like.device)
    else:
        powers = torch.tensor([scale**j for j in range(q)], dtype=torch.float64, device=like.device)
    return inv_fact * powers, 1.0 / math.factorial(degree + shift)


def _expm_columns(
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
    ``max_squarings``, from a fixed degree with the squarings counted and masked on the device.
    """
    n = matrix.shape[0]
    dtype, device = matrix.dtype, matrix.device
    left_mult = left_mult or (lambda v: matrix @ v)
    q = _PS_BLOCK
    rho = matrix.detach().norm().clamp_min(1.0)
    eye = torch.eye(n, dtype=dtype, device=device)
    powers = [eye, matrix / rho]
    for _ in range(2, q + 1):
        powers.append(left_mult(powers[-1]) / rho)
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
            return _ps_polynomial(cols, coeffs, top, x_q[:, columns], lambda v: x_q @ v), 0
        expo = _ps_polynomial(stacked, coeffs, top, x_q, lambda v: x_q @ v)
        for _ in range(squarings - 1):
            expo = expo @ expo
        return expo @ expo[:, columns], squarings

    degree = q * _FIXED_BLOCKS[dtype]
    needed = _squarings_on_device(log_norms_dev, log_rho_dev, degree, max_squarings, tol)
    scale_dev = rho * torch.exp2(-needed)
    coeffs, top = _taylor_coefficients(degree, 0, scale_dev, q, matrix)
    x_q = powers[q] * scale_dev**q
    expo = _ps_polynomial(stacked, coeffs, top, x_q, lambda v: x_q @ v)
    if max_squarings == 0:
        return expo[:, columns], None
    for step in range(max_squarings - 1):
        expo = torch.where(needed > step, expo @ expo, expo)
    last = torch.where(needed > max_squarings - 1, expo @ expo[:, columns], expo[:, columns])
    return last, None


def expm_taylor(
    matrix: torch.Tensor, *, columns: int | None = None, max_squarings: int | None = None
) -> torch.Tensor:
    """``expm(matrix)[:, :columns]`` (all columns by default) for a dense square matrix.

    Scaling and squaring with a Taylor polynomial whose degree and squarings come from a
    rigorous remainder bound (see :func:`_expm_columns`); autograd through matrix products.

    Shape:
        - matrix: ``(n, n)``
        - output: ``(n, columns)``
    """
    k = matrix.shape[0] if columns is None else columns
    return _expm_columns(matrix, slice(0, k), max_squarings=max_squarings)[0]


class _Companion:
    """The balanced companion matrix ``Z = [[S, r I], [-G/r, 0]]``.

    Stored by its blocks; ``matmul(V)`` costs one ``2k x k`` by ``k x c`` product instead of
    a dense ``2k x 2k`` one.
    """

    def __init__(self, skew: torch.Tensor, gram: torch.Tensor, r: torch.Tensor) -> None:
        self.k = skew.shape[0]
        self.r = r
        self.left = torch.cat([skew, -gram / r], dim=0)  # (2k, k): the first block column

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        k = self.k
        return self.left @ v[:k] + F.pad(self.r * v[k:], (0, 0, 0, k))

    def dense(self) -> torch.Tensor:
        k = self.k
        eye = torch.eye(k, dtype=self.left.dtype, device=self.left.device)
        right = torch.cat([self.r * eye, torch.zeros_like(eye)], dim=0)
        return torch.cat([self.left, right], dim=1)


class _Gram(torch.autograd.Function):
    """``B^T B`` whose backward is one tall product, ``B (dG + dG^T)``, instead of the two
    that autograd takes for ``B.mT @ B`` (the tall products dominate at VkD's shapes). The
    backward is itself differentiable."""

    @staticmethod
    def forward(ctx, tall: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tall)
        return tall.mT @ tall

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (tall,) = ctx.saved_tensors
        return tall @ (grad + grad.mT)


def _balance_factor(gram: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """``r ~ sqrt(lambda_max(G))`` by power iteration, detached. Any ``r > 0`` gives the same
    exponential exactly; a good one keeps the balanced companion's norm close to ``||A||``."""
    g = gram.detach()
    v = torch.ones(g.shape[0], 1, dtype=g.dtype, device=g.device) / math.sqrt(g.shape[0])
    for _ in range(iterations):
        v = g @ v
        v = v / v.norm().clamp_min(torch.finfo(g.dtype).tiny)
    lam = (v.mT @ g @ v).squeeze()
    return lam.clamp_min(torch.finfo(g.dtype).eps ** 2).sqrt()


def _companion_exp_columns(
    skew: torch.Tensor, gram: torch.Tensor, *, max_squarings: int | None
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``Y1, Y2`` (``k x k``), the second block column of ``expm([[S, I], [-G, 0]])``,
    computed on the balanced ``Z = D^{-1} M D``, ``D = diag(I, r I)``:
    ``expm(M)[:, k:] = D expm(Z)[:, k:] / r``."""
    k = skew.shape[0]
    r = _balance_factor(gram)
    z = _Companion(skew, gram, r)
    second = slice(k, 2 * k)
    cols, squarings = _expm_columns(
        z.dense(), second, left_mult=z.matmul, max_squarings=max_squarings
    )
    return cols[:k] / r, cols[k:], squarings


# Scaling and squaring roughly doubles the rounding error per squaring; from this many
# squarings on (||A|| >~ 20), float32 results get one Newton-Schulz step (see stiefel_expm).
_POLAR_SQUARINGS = 4


def _polar_step(p: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step ``P (3 I - P^T P) / 2`` towards the orthonormal polar factor:
    squares the orthonormality error. ``P^T P`` is formed from ``P`` itself; a Gram built
    from the small factors would inherit their rounding when ``B^T B`` is ill-conditioned."""
    gram = p.mT @ p
    return 1.5 * p - 0.5 * (p @ gram)


def _want_polar(polar: bool | None, dtype: torch.dtype, squarings: int | None) -> bool:
    if polar is not None:
        return polar
    if dtype == torch.float64:
        return False
    return squarings is None or squarings >= _POLAR_SQUARINGS


def stiefel_expm(
    skew: torch.Tensor,
    tall: torch.Tensor,
    *,
    max_squarings: int | None = None,
    polar: bool | None = None,
    core_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``expm([[S, -B^T], [B, 0]])[:, :k]`` without forming an ``n x n`` matrix.

    Args:
        skew: ``S``, ``(k, k)`` skew-symmetric.
        tall: ``B``, ``(n - k, k)``.
        max_squarings: ``None`` chooses degree and squarings from the remainder bound (one host
            read); an int makes the evaluation synchronisation-free, accurate while
            ``||A|| <~ 2^max_squarings``.
        polar: finish with one Newton-Schulz step ``P <- P (3 I - P^T P) / 2`` (squares the
            orthonormality error; two tall-skinny products). ``None`` (default): in float32
            when 4 or more squarings were needed (``||A|| >~ 20``; always on the
            synchronisation-free path), never in float64.
        core_dtype: dtype of the small matrix function (default: the input dtype).

    When ``n <= 1.5 k`` the dense ``n x n`` exponential is cheaper than the ``2k x 2k`` core and
    is used instead.

    Shape:
        - skew: ``(k, k)``; tall: ``(n - k, k)``
        - output: ``(n, k)``
    """
    k = skew.shape[0]
    n = k + tall.shape[0]
    dtype = skew.dtype
    work = core_dtype or dtype
    if 2 * n <= 3 * k:
        full = stiefel_generator_matrix(skew.to(work), tall.to(work))
        p, squarings = _expm_columns(full, slice(0, k), max_squarings=max_squarings)
        p = p.to(dtype)
    else:
        gram = _Gram.apply(tall).to(work)
        y1, y2, squarings = _companion_exp_columns(skew.to(work), gram, max_squarings=max_squarings)
        top = skew.to(work) @ y1 + y2
        p = torch.cat([top.to(dtype), tall @ y1.to(dtype)], dim=0)
    return _polar_step(p) if _want_polar(polar, dtype, squarings) else p


def stiefel_cayley(
    skew: torch.Tensor, tall: torch.Tensor, *, polar: bool | None = None
) -> torch.Tensor:
    """``(I - A/2)^{-1} (I + A/2) E_k`` for ``A = [[S, -B^T], [B, 0]]`` with one ``k x k`` solve.

    Woodbury on ``I - U V^T / 2`` and the Schur complement of the companion core give
    ``K = I - S/2 + B^T B / 4`` (always invertible: its symmetric part is ``I + B^T B / 4``)
    and ``P = [2 K^{-1} - I; B K^{-1}]``. The rounding error grows with the condition number
    of ``K`` (up to ``||B||^2 / 4``), so float32 results get one Newton-Schulz step
    (``polar=None``, the default; ``True``/``False`` force it on or off).

    Shape:
        - skew: ``(k, k)``; tall: ``(n - k, k)``
        - output: ``(n, k)``
    """
    k = skew.shape[0]
    eye = torch.eye(k, dtype=skew.dtype, device=skew.device)
    gram = _Gram.apply(tall)
    inverse = torch.linalg.solve(eye - 0.5 * skew + 0.25 * gram, eye)
    p = torch.cat([2.0 * inverse - eye, tall @ inverse], dim=0)
    return _polar_step(p) if _want_polar(polar, skew.dtype, None) else p


def cholesky_whitener(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """``W`` with ``W^T (cov + eps I) W = I`` from ``cov + eps I = L L^T``: ``W = L^{-T}``.

    Whitening is ``(x - mu) W``; returns the upper-triangular ``L^{-T}``.
    """
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    lower = torch.linalg.cholesky(cov + eps * eye)
    # L^{-1} by a triangular solve, then transpose
    return torch.linalg.solve_triangular(lower, eye, upper=False).mT


class _InverseSqrtPSD(torch.autograd.Function):
    """``M^{-1/2}`` of a symmetric positive definite ``M`` by an eigendecomposition, with the
    Daleckii-Krein backward written out.

    ``torch.linalg.eigh``'s own backward divides by eigenvalue gaps and returns NaN when two
    eigenvalues coincide (constant features give ``M = eps I``), although ``M^{-1/2}`` is smooth
    there. With ``r = sqrt(eigenvalues)`` the divided difference of ``x^{-1/2}`` is
    ``-1 / (r_i r_j (r_i + r_j))``, finite and exact also for ``r_i = r_j``.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        evals, evecs = torch.linalg.eigh(matrix)
        roots = evals.clamp_min(torch.finfo(evals.dtype).tiny).sqrt()
        ctx.save_for_backward(evecs, roots)
        return (evecs / roots) @ evecs.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        evecs, roots = ctx.saved_tensors
        outer = roots[..., :, None] * roots[..., None, :]
        divided = -1.0 / (outer * (roots[..., :, None] + roots[..., None, :]))
        sym = 0.5 * (grad + grad.mT)
        return evecs @ (divided * (evecs.mT @ sym @ evecs)) @ evecs.mT


def zca_whitener(cov: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``(cov + eps I)^{-1/2}`` (symmetric, the ZCA whitening matrix) by an eigendecomposition;
    its gradient stays finite when eigenvalues coincide (see :class:`_InverseSqrtPSD`)."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return _InverseSqrtPSD.apply(cov + eps * eye)
