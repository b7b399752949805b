"""The neighbourhood KL of CosPress: an autograd function that never keeps an ``(M, M)`` block
per temperature alive, and the checks of its options.

For a set of vectors ``X``, ``D = n(X) n(X)^T`` with the diagonal lowered by ``1e8`` (a finite
mask: ``-inf`` would give ``0 * inf = NaN`` in the KL). For each temperature ``tau``:
``p_{j|i} = softmax_j(D_ij / tau)`` from the reference, ``q_{j|i}`` from the candidate,
symmetrised ``P_ij = (p_{j|i} + p_{i|j}) / 2M`` (kept in log space), and the term is
``KL(P || Q)`` averaged over the temperatures (``style="half"``: the mean over rows of
``KL(p_{.|i} || q_{.|i})``, no symmetrisation).

Axis legend: ``S`` sets compared independently, ``M`` members of a set, ``T`` temperatures;
``s, t`` the sets and temperatures of one block of work.

Unchecked: callers validate, and run these in the working dtype with autocast off.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from featkd._checks import ChoiceError
from featkd._fused import fused_kernel_failed, fused_kernels_enabled
from featkd._options import check_number
from featkd._sync import device_values
from featkd.cospress._cosine import cosine_matrix

DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 11))
KL_STYLES = ("full", "half")

# Subtracted from the self-similarity before the softmax: far below any cosine / tau, yet finite.
_DIAGONAL_MASK = 1e8
# Accepted temperatures. Below 1e-6, float32 rounding of a cosine (6e-8) moves its logit by more
# than 0.06, and below 3e-31 the masked diagonal 1e8 / tau overflows float32 (NaN loss). Above
# 1e6 the mask lowers the self-similarity by less than 100 nats: it starts to count.
_TEMPERATURE_RANGE = (1e-6, 1e6)
# Floor of exp's argument on CPU (see _exp_).
_EXP_FLOOR = -80.0
# Bound on the elements of one (s, t, M, M) block; a block keeps about five such tensors alive.
# 2**24 float32 elements = 64 MiB; measured in benchmarks/cospress_vs_proteus.py.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# Longest set the fused kernels take (one program holds a row of the cosine matrix).
_MAX_FUSED_SET = 4096


def check_temperatures(temperatures: Sequence[float]) -> tuple[float, ...]:
    """A non-empty sequence (or one number, or a tensor) of temperatures in
    ``[1e-6, 1e6]``, as a tuple of floats."""
    if isinstance(temperatures, torch.Tensor):
        temperatures = temperatures.detach().cpu().flatten().tolist()
    if isinstance(temperatures, (int, float)) and not isinstance(temperatures, bool):
        temperatures = (temperatures,)
    try:
        # a string is a sequence, of characters
        values = None if isinstance(temperatures, (str, bytes)) else tuple(temperatures)
    except TypeError:
        values = None
    if not values:
        raise ChoiceError(
            f"temperatures: expected a non-empty sequence of numbers, got {temperatures!r}"
        )
    low, high = _TEMPERATURE_RANGE
    return tuple(
        check_number(t, f"temperatures[{i}]", minimum=low, maximum=high)
        for i, t in enumerate(values)
    )


def _scaled(sim: torch.Tensor, inv_tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``Z = (D - 1e8 I) / tau`` at every temperature and their row log-normalisers
    ``r_i = logsumexp_j Z_ij``: ``(s, M, M)``, ``(t,)`` -> ``(s, t, M, M)``, ``(s, t, M)``.

    ``log p_{j|i} = Z_ij - r_i``. The mask is finite, so masked entries give ``0 * finite`` in
    the KL, never ``0 * inf``.
    """
    z = sim.unsqueeze(1) * inv_tau.view(1, -1, 1, 1)
    z.diagonal(dim1=-2, dim2=-1).sub_(_DIAGONAL_MASK * inv_tau.view(1, -1, 1))
    # logsumexp written out, so that its exp gets the CPU underflow floor of _exp_
    row_max = z.amax(dim=-1, keepdim=True)
    r = _exp_(z - row_max).sum(dim=-1).log_().add_(row_max.squeeze(-1))
    return z, r


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """In-place ``exp``. On CPU, arguments below -80 are raised to -80 first: vectorised ``exp``
    falls back to a path about ten times slower for results that underflow. Raising a weight to
    ``e^-80`` (1.8e-35) changes a KL sum by that times the entry's log-ratio (a few hundred at
    most, about 1e3 on the masked diagonal in float32): nothing."""
    if x.device.type == "cpu":
        x.clamp_(min=_EXP_FLOOR)
    return x.exp_()


def _pair_log_normaliser(r: torch.Tensor) -> torch.Tensor:
    """``c_ij = log(exp(-r_i) + exp(-r_j)) = -min(r_i, r_j) + log1p(exp(-|r_i - r_j|))``:
    ``(s, t, M) -> (s, t, M, M)``.

    With ``Z`` symmetric, ``log p_{i|j} = Z_ji - r_j = Z_ij - r_j``, so the symmetrised
    ``log P_ij = log((p_{j|i} + p_{i|j}) / 2M) = Z_ij + c_ij - log 2M``: log space throughout,
    and no transposed (strided) pass over the ``M x M`` blocks. Written out rather than with
    ``torch.logaddexp``, which is about ten times slower on CPU.
    """
    rows, cols = r.unsqueeze(-1), r.unsqueeze(-2)
    c = _exp_((rows - cols).abs_().neg_()).log1p_()
    return c.sub_(torch.minimum(rows, cols))


def _blocks(num_sets: int, num_temps: int, size: int, chunk_elements: int):
    """Split the (set, temperature) grid into rectangular blocks of at most ``chunk_elements``
    similarity entries: whole sets with all their temperatures when one set fits, else one set
    and as many temperatures as fit. Yields ``(set_slice, temp_slice)``."""
    per_matrix = size * size
    if num_temps * per_matrix <= chunk_elements:
        step = chunk_elements // (num_temps * per_matrix)
        for start in range(0, num_sets, step):
            yield slice(start, min(start + step, num_sets)), slice(0, num_temps)
        return
    step = max(1, chunk_elements // per_matrix)
    for index in range(num_sets):
        for start in range(0, num_temps, step):
            yield slice(index, index + 1), slice(start, min(start + step, num_temps))


class _NeighbourhoodKL(torch.autograd.Function):
    """Per-set KL between the neighbourhood distributions of two symmetric cosine matrices,
    averaged over the temperatures; gradient for the candidate only. Nothing of size
    ``(s, t, M, M)`` is kept for the backward pass: it recomputes each block and applies the
    closed-form gradient.

    With ``Z = (D - 1e8 I) / tau``, ``r_i = logsumexp_j Z_ij``, ``c`` from
    :func:`_pair_log_normaliser` (``p`` for the reference, ``q`` for the candidate):

    - full: ``KL = sum_ij P_ij (Zp_ij + cp_ij - Zq_ij - cq_ij)``, ``log P = Zp + cp - log 2M``;
      ``G_ij = dKL/d log q_{j|i} = -2 P_ij q_{j|i} / (2M Q_ij)
      = -exp(Zp_ij + cp_ij - cq_ij - rq_i - log M)``;
    - half: ``KL = mean_i sum_j p_{j|i} (log p_{j|i} - log q_{j|i})``;
      ``G_ij = dKL/d log q_{j|i} = -p_{j|i} / M``;

    then through the row log-softmax ``dKL/dZ_ij = G_ij - q_{j|i} sum_k G_ik`` and
    ``dZ/dD = 1 / tau``. The returned gradient treats the entries of ``D`` as independent; its
    symmetric part (all that reaches ``D = n(X) n(X)^T``) is exact.
    """

    @staticmethod
    def forward(ctx, sim_ref, sim_cand, inv_tau, full, chunk_elements):
        num_sets, size, _ = sim_cand.shape
        ctx.fused = _fused_kl(sim_cand)
        if ctx.fused:
            try:
                kl_triton = importlib.import_module("featkd.cospress._kl_triton")
                per_set, grad_sim = kl_triton.neighbourhood_kl(
                    sim_ref, sim_cand, inv_tau, full, ctx.needs_input_grad[1]
                )
            except Exception as error:  # any failure of Triton here: the torch path instead
                fused_kernel_failed("neighbourhood_kl", error)
                ctx.fused = False
            else:
                # the gradient came with the value: the backward only scales it
                ctx.save_for_backward(grad_sim)
                return per_set
        num_temps = inv_tau.numel()
        per_set = sim_cand.new_zeros(num_sets)
        for sets, temps in _blocks(num_sets, num_temps, size, chunk_elements):
            z_p, r_p = _scaled(sim_ref[sets], inv_tau[temps])
            z_q, r_q = _scaled(sim_cand[sets], inv_tau[temps])
            log_ratio = z_p - z_q
            del z_q
            if full:
                c_p = _pair_log_normaliser(r_p)
                log_ratio.add_(c_p).sub_(_pair_log_normaliser(r_q))
                weight = _exp_(z_p.add_(c_p).sub_(math.log(2 * size)))  # P_ij
                del c_p
            else:
                log_ratio.sub_((r_p - r_q).unsqueeze(-1))
                weight = _exp_(z_p.sub_(r_p.unsqueeze(-1))).div_(size)  # p_{j|i} / M
            per_set[sets] += log_ratio.mul_(weight).sum(dim=(-3, -2, -1))
        ctx.save_for_backward(sim_ref, sim_cand, inv_tau)
        ctx.full = full
        ctx.chunk_elements = chunk_elements
        return per_set / num_temps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_set):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        if ctx.fused:
            (grad_sim,) = ctx.saved_tensors
            return None, grad_per_set.view(-1, 1, 1) * grad_sim, None, None, None
        sim_ref, sim_cand, inv_tau = ctx.saved_tensors
        num_sets, size, _ = sim_cand.shape
        num_temps = inv_tau.numel()
        grad_sim = torch.zeros_like(sim_cand)
        for sets, temps in _blocks(num_sets, num_temps, size, ctx.chunk_elements):
            z_p, r_p = _scaled(sim_ref[sets], inv_tau[temps])
            z_q, r_q = _scaled(sim_cand[sets], inv_tau[temps])
            # G = dKL / d log q_{j|i}, built in the buffer of z_p
            if ctx.full:
                grad_log_q = z_p.add_(_pair_log_normaliser(r_p))
                grad_log_q.sub_(_pair_log_normaliser(r_q)).sub_(r_q.unsqueeze(-1))
                _exp_(grad_log_q.sub_(math.log(size))).neg_()
            else:
                grad_log_q = _exp_(z_p.sub_(r_p.unsqueeze(-1))).neg_().div_(size)
            row_sums = grad_log_q.sum(dim=-1, keepdim=True)
            q = _exp_(z_q.sub_(r_q.unsqueeze(-1)))
            grad_z = grad_log_q.sub_(q.mul_(row_sums))
            del q, z_q
            # dZ/dD = 1 / tau; the temperature mean and the upstream gradient per set
            scale = grad_per_set[sets].view(-1, 1) * inv_tau[temps].view(1, -1) / num_temps
            grad_sim[sets] += torch.einsum("stij,st->sij", grad_z, scale)
        return None, grad_sim, None, None, None


def _fused_kl(sim: torch.Tensor) -> bool:
    """Whether the fused Triton kernels compute this KL: float32, sets of at most 4096."""
    return (
        sim.dtype == torch.float32
        and sim.shape[-1] <= _MAX_FUSED_SET
        and fused_kernels_enabled(sim)
    )


def neighbourhood_kl_per_set(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    temperatures: tuple[float, ...],
    style: str,
    chunk_elements: int,
) -> torch.Tensor:
    """Unchecked core: ``(S, M, D_r)``, ``(S, M, D_c)`` in the working dtype -> ``(S,)``."""
    sim_ref = cosine_matrix(reference.detach())
    sim_cand = cosine_matrix(candidate)
    inv_tau = 1.0 / device_values(temperatures, sim_cand)
    return _NeighbourhoodKL.apply(sim_ref, sim_cand, inv_tau, style == "full", chunk_elements)
