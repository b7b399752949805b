"""The neighbourhood KL of CosPress as two fused Triton kernels: one program per row ``(s, i)``
of the cosine matrices, looping over the temperatures, with the value and the gradient for the
candidate computed in the same pass. Nothing of size ``(s, t, M, M)`` is ever written: the torch
path (``_neighbourhood.py``, the reference) makes about twenty passes over such blocks for the
forward and backward together, these kernels read each cosine row once per temperature.

Same formulas as :class:`featkd.cospress._neighbourhood._NeighbourhoodKL` (see its docstring):
with ``Z = (D - 1e8 I) / tau`` and ``r_i = logsumexp_j Z_ij``,

- full: ``KL_i = sum_j P_ij (Zp + cp - Zq - cq)_ij``, ``P = exp(Zp + cp - log 2M)``,
  ``G_ij = -exp(Zp + cp - cq - rq_i - log M)_ij``;
- half: ``KL_i = sum_j p_{j|i} (Zp - rp_i - Zq + rq_i)_ij / M``, ``G_ij = -p_{j|i} / M``;

and ``dKL/dD_ij = sum_t (G_ij - q_{j|i} sum_k G_ik) / tau_t``, averaged over the temperatures.

Imported only when a kernel runs (:mod:`featkd._fused` decides); computes in float32.
Unchecked: callers validate.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from featkd.cospress._neighbourhood import _DIAGONAL_MASK


@triton.jit
def _row_log_normalisers(
    sim_ptr, inv_tau_ptr, out_ptr, size, num_temps, mask_value, BLOCK: tl.constexpr
):
    """``out[s, t, i] = logsumexp_j Z_ij`` at every temperature, for the row ``(s, i)``."""
    row = tl.program_id(0).to(tl.int64)  # s * size + i; int64, so large batches index safely
    s = row // size
    i = row % size
    cols = tl.arange(0, BLOCK)
    valid = cols < size
    d = tl.load(sim_ptr + row * size + cols, mask=valid, other=0.0).to(tl.float32)
    on_diagonal = cols == i
    for t in range(num_temps):
        inv = tl.load(inv_tau_ptr + t)
        z = d * inv - tl.where(on_diagonal, mask_value * inv, 0.0)
        z = tl.where(valid, z, float("-inf"))
        peak = tl.max(z, axis=0)
        total = tl.sum(tl.exp(z - peak), axis=0)
        tl.store(out_ptr + (s * num_temps + t) * size + i, tl.log(total) + peak)


@triton.jit
def _pair_log_normaliser(r_i, r_cols):
    """``log(exp(-r_i) + exp(-r_j))``, stable."""
    return tl.log(1.0 + tl.exp(-tl.abs(r_i - r_cols))) - tl.minimum(r_i, r_cols)


@triton.jit
def _kl_rows(
    ref_ptr, cand_ptr, r_ref_ptr, r_cand_ptr, inv_tau_ptr, kl_ptr, grad_ptr,
    size, num_temps, mask_value, log_size,
    FULL: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``kl[s, i] = sum_t KL_i`` and ``grad[s, i, :] = mean_t dKL/dD_i.`` for the row ``(s, i)``."""
    row = tl.program_id(0).to(tl.int64)
    s = row // size
    i = row % size
    cols = tl.arange(0, BLOCK)
    valid = cols < size
    d_p = tl.load(ref_ptr + row * size + cols, mask=valid, other=0.0).to(tl.float32)
    d_q = tl.load(cand_ptr + row * size + cols, mask=valid, other=0.0).to(tl.float32)
    on_diagonal = cols == i
    kl = 0.0
    grad = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(num_temps):
        inv = tl.load(inv_tau_ptr + t)
        lowered = tl.where(on_diagonal, mask_value * inv, 0.0)
        z_p = d_p * inv - lowered
        z_q = d_q * inv - lowered
        base = (s * num_temps + t) * size
        r_p = tl.load(r_ref_ptr + base + i)
        r_q = tl.load(r_cand_ptr + base + i)
        if FULL:
            c_p = _pair_log_normaliser(r_p, tl.load(r_ref_ptr + base + cols, mask=valid, other=0.0))
            c_q = _pair_log_normaliser(
                r_q, tl.load(r_cand_ptr + base + cols, mask=valid, other=0.0)
            )
            log_ratio = z_p + c_p - z_q - c_q
            weight = tl.exp(z_p + c_p - log_size - 0.6931471805599453)  # P_ij; log 2M
        else:
            log_ratio = z_p - r_p - z_q + r_q
            weight = tl.exp(z_p - r_p - log_size)  # p_{j|i} / M
        kl += tl.sum(tl.where(valid, log_ratio * weight, 0.0), axis=0)
        if GRAD:
            if FULL:  # noqa: SIM108 (a constexpr branch: Triton prunes the other side)
                g = -tl.exp(z_p + c_p - c_q - r_q - log_size)
            else:
                g = -weight
            g = tl.where(valid, g, 0.0)
            q = tl.exp(z_q - r_q)
            grad += (g - q * tl.sum(g, axis=0)) * inv
    tl.store(kl_ptr + row, kl)
    if GRAD:
        tl.store(grad_ptr + row * size + cols, grad / num_temps, mask=valid)


def neighbourhood_kl(
    sim_ref: torch.Tensor, sim_cand: torch.Tensor, inv_tau: torch.Tensor, full: bool, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-set KL ``(S,)`` (averaged over the temperatures) and, if ``grad``, ``dKL/dD`` of the
    candidate ``(S, M, M)``: float32 ``(S, M, M)`` symmetric matrices, ``M <= 4096``."""
    num_sets, size, _ = sim_cand.shape
    num_temps = inv_tau.numel()
    ref, cand, inv = sim_ref.contiguous(), sim_cand.contiguous(), inv_tau.contiguous()
    block = triton.next_power_of_2(size)
    launch = {"BLOCK": block, "num_warps": 4 if block <= 1024 else 8}
    grid = (num_sets * size,)
    r_ref = ref.new_empty(num_sets, num_temps, size)
    r_cand = torch.empty_like(r_ref)
    mask_value = _DIAGONAL_MASK
    _row_log_normalisers[grid](ref, inv, r_ref, size, num_temps, mask_value, **launch)
    _row_log_normalisers[grid](cand, inv, r_cand, size, num_temps, mask_value, **launch)
    kl_rows = ref.new_empty(num_sets * size)
    grad_sim = torch.empty_like(cand) if grad else kl_rows  # unused pointer when not grad
    _kl_rows[grid](
        ref, cand, r_ref, r_cand, inv, kl_rows, grad_sim,
        size, num_temps, mask_value, math.log(size),
        FULL=full, GRAD=grad, **launch,
    )  # fmt: skip
    per_set = kl_rows.view(num_sets, size).sum(dim=1) / num_temps
    return per_set, grad_sim if grad else None
