"""Orthonormal columns from a skew generator: the Stiefel (low-rank) matrix exponential and
Cayley map (unchecked maths behind :class:`featkd.OrthogonalProjector`).

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

``phi1(M)`` comes from the exponential of the companion core (see :mod:`featkd.vkd._expm`: scaling
and squaring with a Taylor polynomial, one host synchronisation per call unless
``max_squarings`` fixes the squarings). ``M`` is first balanced by the exact similarity
``diag(I, r I)`` (``r ~ ||B||``), so its off-diagonal blocks have equal size and its norm is
that of ``A``. Gradients come from autograd through the matrix products.

The Cayley map ``(I - A/2)^{-1} (I + A/2) E_k`` reduces the same way, by Woodbury and a Schur
complement, to one ``k x k`` solve: ``K = I - S/2 + G/4``, ``P = [2 K^{-1} - I; B K^{-1}]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featkd._sync import device_eye, sync_free
from featkd.vkd import _expm

__all__ = [
    "skew_from_lower",
    "stiefel_blocks",
    "stiefel_cayley",
    "stiefel_expm",
    "stiefel_generator_matrix",
]


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
        k, left = self.k, self.left
        # [I; 0] is kept on the device: the block column is one kernel, not four
        return torch.cat([left, self.r * device_eye(2 * k, left, k)], dim=1)


class _Gram(torch.autograd.Function):
    """``B^T B`` whose backward is one tall product, ``B (dG + dG^T)``, instead of the two
    that autograd takes for ``B.mT @ B`` (the tall products dominate at VkD's shapes). The
    backward is itself differentiable."""

    generate_vmap_rule = True  # torch.func transforms work through it

    @staticmethod
    def forward(tall: torch.Tensor) -> torch.Tensor:
        return tall.mT @ tall

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (tall,) = ctx.saved_tensors
        return tall @ (grad + grad.mT)


def _balance_factor(gram: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """``r ~ sqrt(lambda_max(G))``, detached. Any ``r > 0`` gives the same exponential
    exactly; a good one keeps the balanced companion's norm close to ``||A||``.

    On CPU by power iteration (a tighter ``r`` saves squarings, which cost time there). On the
    synchronisation-free path every square is formed anyway, so ``r = ||G||_F^(1/2)`` (at
    most ``k^(1/4)`` times too large) does as well in three kernels instead of some twenty:
    float32 results were as close to float64 (1e-7 to 9e-6 over 24 draws up to 300 times
    the random init).
    """
    eps = torch.finfo(gram.dtype).eps
    if sync_free(gram):
        return gram.detach().norm().sqrt().clamp_min(eps)
    tiny = torch.finfo(gram.dtype).tiny
    # G / ||G||_F has its top eigenvalue in [1 / k, 1]: the steps need no normalisation;
    # they start from the ones vector, whose first step is a row sum
    g, scale = _expm.unit_frobenius(gram.detach())
    v = g.sum(dim=1, keepdim=True)
    for _ in range(iterations - 1):
        v = g @ v
    lam = (v.mT @ (g @ v)).squeeze() / v.square().sum().clamp_min(tiny) * scale
    return lam.clamp_min(eps**2).sqrt()


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
    # the block product saves half the flops on CPU; on an accelerator, at these sizes, its
    # four kernels (eight in the backward) cost more than one dense product's one (three)
    left_mult = None if sync_free(skew) else z.matmul
    cols, squarings = _expm.expm_columns(
        z.dense(), second, left_mult=left_mult, max_squarings=max_squarings
    )
    top, bottom = torch.split(cols, k)  # split: one cat in the backward, not two pads
    return top / r, bottom, squarings


# Scaling and squaring roughly doubles the rounding error per squaring; from this many
# squarings on (||A|| >~ 20), float32 results get one Newton-Schulz step (see stiefel_expm).
_POLAR_SQUARINGS = 4


def _polar_step(p: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step ``P (3 I - P^T P) / 2`` towards the orthonormal polar factor:
    squares the orthonormality error. ``P^T P`` is formed from ``P`` itself; a Gram built
    from the small factors would inherit their rounding when ``B^T B`` is ill-conditioned."""
    gram = p.mT @ p
    return torch.addmm(p, p, gram, beta=1.5, alpha=-0.5)  # one kernel for the scaled sum


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
) -> torch.Tensor:
    """``expm([[S, -B^T], [B, 0]])[:, :k]`` without forming an ``n x n`` matrix.

    Args:
        skew: ``S``, ``(k, k)`` skew-symmetric.
        tall: ``B``, ``(n - k, k)``.
        max_squarings: ``None`` chooses degree and squarings from the remainder bound (one host
            read) on CPU, and forms 12 squares, the device selecting the one needed, on
            accelerators and under ``torch.compile``; an int makes the evaluation
            synchronisation-free everywhere, accurate while ``||A|| <~ 2^max_squarings``.
        polar: finish with one Newton-Schulz step ``P <- P (3 I - P^T P) / 2`` (squares the
            orthonormality error; two tall-skinny products). ``None`` (default): in float32
            when 4 or more squarings were needed (``||A|| >~ 20``; always on the
            synchronisation-free path), never in float64.

    When ``n <= 1.5 k`` the dense ``n x n`` exponential is cheaper than the ``2k x 2k`` core and
    is used instead.

    Shape:
        - skew: ``(k, k)``; tall: ``(n - k, k)``
        - output: ``(n, k)``
    """
    k = skew.shape[0]
    n = k + tall.shape[0]
    if 2 * n <= 3 * k:
        full = stiefel_generator_matrix(skew, tall)
        p, squarings = _expm.expm_columns(full, slice(0, k), max_squarings=max_squarings)
    else:
        gram = _Gram.apply(tall)
        y1, y2, squarings = _companion_exp_columns(skew, gram, max_squarings=max_squarings)
        p = torch.cat([skew @ y1 + y2, tall @ y1], dim=0)
    return _polar_step(p) if _want_polar(polar, skew.dtype, squarings) else p


def stiefel_cayley(skew: torch.Tensor, tall: torch.Tensor) -> torch.Tensor:
    """``(I - A/2)^{-1} (I + A/2) E_k`` for ``A = [[S, -B^T], [B, 0]]`` with one ``k x k`` solve.

    Woodbury on ``I - U V^T / 2`` and the Schur complement of the companion core give
    ``K = I - S/2 + B^T B / 4`` (always invertible: its symmetric part is ``I + B^T B / 4``)
    and ``P = [2 K^{-1} - I; B K^{-1}]``. The rounding error grows with the condition number
    of ``K`` (up to ``||B||^2 / 4``), so float32 results get one Newton-Schulz step.

    Shape:
        - skew: ``(k, k)``; tall: ``(n - k, k)``
        - output: ``(n, k)``
    """
    k = skew.shape[0]
    eye = device_eye(k, skew)
    gram = _Gram.apply(tall)
    # K is never singular (symmetric part >= I), so the unchecked solve: no host sync on CUDA
    inverse = torch.linalg.solve_ex(eye - 0.5 * skew + 0.25 * gram, eye)[0]
    p = torch.cat([2.0 * inverse - eye, tall @ inverse], dim=0)
    return _polar_step(p) if _want_polar(None, skew.dtype, None) else p
