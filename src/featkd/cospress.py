"""CosPress: cosine-similarity-preserving compression (Mannix, Hodgkinson & Bondell).

A teacher head ``h`` (:class:`~featkd.TeacherCompressionHead`) compresses the teacher's features
into the student's width while keeping each vector's cosine-similarity neighbourhood; the student
then matches the compressed teacher directly with a cosine loss.

Axis legend:
    S  sets compared independently (the images of the batch for the local term, one set of
       CLS vectors for the global term)
    M  members of a set (tokens of one image, or the batch)
    T  temperatures        s, t  the sets and temperatures of one block of work

Head terms (train ``h`` only; the head sees ``sg(teacher)``): for a set of vectors ``X``,
``D = n(X) n(X)^T`` with ``n`` the L2 normalisation and the diagonal masked by subtracting
``1e8`` (a finite mask: ``-inf`` would give ``0 * inf = NaN`` in the KL). For each temperature
``tau``: ``p_{j|i} = softmax_j(D_ij / tau)`` from the teacher, ``q_{j|i}`` from ``h(teacher)``,
symmetrised ``P_ij = (p_{j|i} + p_{i|j}) / 2M`` (kept in log space), and the term
is ``KL(P || Q)`` averaged over the temperatures (``style="half"``: the mean over rows of
``KL(p_{.|i} || q_{.|i})``, no symmetrisation). The local term uses the tokens of each image and
averages over images; the global term uses the batch's CLS vectors.

Student terms (train the student only): ``1 - cos(vec(S_b), vec(sg(h(T_b))))`` with ``vec``
flattening all tokens of one image into one vector, averaged over the batch; and the same on the
CLS token alone.

The official code follows this, not a naive reading of the paper; the log-space symmetrisation,
the finite diagonal mask and the temperatures ``0.01, 0.02, ..., 0.10`` are from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from featkd._checks import (
    ChoiceError,
    ShapeError,
    check_feature_pair,
    check_min_batch,
    check_same_device,
    describe_shape,
    validate_features,
)
from featkd._options import check_choice, check_int, check_number, check_weights
from featkd._precision import result_dtype, work_dtype
from featkd.heads import TeacherCompressionHead
from featkd.pooling import pool

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_TEMPERATURES",
    "KL_STYLES",
    "CosPressLoss",
    "flat_cosine_loss",
    "neighbourhood_kl",
]

DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 11))
KL_STYLES = ("full", "half")

# Subtracted from the self-similarity before the softmax: far below any cosine / tau, yet finite.
_DIAGONAL_MASK = 1e8
# The gradient of a cosine in x is (I - u u^T) / ||x||: unbounded at a dead (all-zero) vector,
# where torch's cosine_similarity and normalize give grad / eps (eps 1e-8, 1e-12). _Normalize's
# backward divides by max(||x||, floor) instead, floor this fraction of the median non-zero norm
# of the vectors normalised together (the batch, or one set of the KL): a dead or very short
# vector's gradient is at most about 1 / 0.25 = 4 times a typical one's. Values stay exact.
_NORM_FLOOR = 0.25
# Accepted temperatures. Below 1e-6, float32 rounding of a cosine (6e-8) moves its logit by more
# than 0.06, and below 3e-31 the masked diagonal 1e8 / tau overflows float32 (NaN loss). Above
# 1e6 the mask lowers the self-similarity by less than 100 nats: it starts to count.
_TEMPERATURE_RANGE = (1e-6, 1e6)
# Floor of exp's argument on CPU (see _exp_).
_EXP_FLOOR = -80.0
# Bound on the elements of one (s, t, M, M) block; a block keeps about five such tensors alive.
# 2**24 float32 elements = 64 MiB; measured in benchmarks/cospress_vs_proteus.py.
DEFAULT_CHUNK_ELEMENTS = 1 << 24

_SETS = {2: "(M, D)", 3: "(S, M, D)"}
_FEATURES = {2: "(B, D)", 3: "(B, N, D)"}


def _check_temperatures(temperatures: Sequence[float]) -> tuple[float, ...]:
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


def _unit_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / ||x||`` over the last axis (a zero vector stays zero) and ``||x||`` (size-1 last
    axis). Scaled by the largest entry first: squaring 1e-30 underflows and 1e20 overflows in
    float32, where a plain norm gives 0 (and ``x / 0``) or inf."""
    peak = x.abs().amax(dim=-1, keepdim=True)
    scaled = x / torch.where(peak > 0, peak, 1.0)
    length = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)  # 0 or in [1, sqrt(D)]
    return scaled / torch.where(length > 0, length, 1.0), peak * length


def _typical_norm(norms: torch.Tensor) -> torch.Tensor:
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
        unit, norm = _unit_and_norm(x)
        typical = _typical_norm(norm)
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
        unit, norm = _unit_and_norm(x)
        # the Jacobian (I - u u^T) / ||x||, with 1 / ||x|| capped at 1 / floor
        tangent = grad - (grad * unit).sum(dim=-1, keepdim=True) * unit
        return tangent / torch.maximum(norm, floor), None


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """``n(x) n(x)^T`` per set, made exactly symmetric: ``(S, M, D) -> (S, M, M)``."""
    unit = _Normalize.apply(x, None)
    sims = unit @ unit.mT
    # a batched matmul need not round (i, j) and (j, i) alike; the KL below relies on symmetry
    return (sims + sims.mT) / 2


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
        sim_ref, sim_cand, inv_tau = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
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


def _neighbourhood_kl(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    temperatures: tuple[float, ...],
    style: str,
    chunk_elements: int,
) -> torch.Tensor:
    """Unchecked core: ``(S, M, D_r)``, ``(S, M, D_c)`` in the working dtype -> ``(S,)``."""
    sim_ref = _cosine_matrix(reference.detach())
    sim_cand = _cosine_matrix(candidate)
    inv_tau = 1.0 / torch.tensor(temperatures, dtype=sim_cand.dtype, device=sim_cand.device)
    return _NeighbourhoodKL.apply(sim_ref, sim_cand, inv_tau, style == "full", chunk_elements)


def neighbourhood_kl(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    style: str = "full",
    reduction: str = "mean",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """KL between the cosine-similarity neighbourhoods of ``reference`` and ``candidate``.

    The CosPress head loss for one or several sets of vectors. Within each set, with
    ``D = n(X) n(X)^T`` and the diagonal lowered by ``1e8``: ``p_{j|i} = softmax_j(D_ij / tau)``
    for the reference, ``q_{j|i}`` for the candidate, ``P_ij = (p_{j|i} + p_{i|j}) / 2M``
    (log space), and ``KL(P || Q)`` averaged over the temperatures. ``style="half"`` uses the
    mean over rows ``i`` of ``KL(p_{.|i} || q_{.|i})`` instead. The widths of the two sides may
    differ: only their similarity structures are compared.

    The reference is the target and receives no gradient. Computed in float32 (float64 for
    float64 inputs) with autocast off, chunked over the (set, temperature) items so no working
    tensor exceeds ``chunk_elements`` elements; returned in float32 (float64 for float64 input).

    A zero vector has cosine 0 with every vector. The candidate's gradient is exact, except for
    a vector shorter than a quarter of the median non-zero norm of its set: the cosine's
    gradient grows as ``1 / ||x||``, so such a vector gets its gradient's direction at the size
    it has at that length. A dead (all-zero) vector's gradient is thus finite and about the size
    of the others'.

    Args:
        reference: the target vectors (the teacher).
        candidate: the vectors whose neighbourhoods should match (the compressed teacher).
        temperatures: softmax temperatures to average over (CosPress: 0.01, 0.02, ..., 0.10),
            each in ``[1e-6, 1e6]``.
        style: ``"full"`` (symmetrised joint distribution, the default of the official code)
            or ``"half"`` (row-wise conditional KL).
        reduction: ``"mean"`` over the sets or ``"none"`` for one value per set.
        chunk_elements: memory bound on each ``(k, M, M)`` working tensor.

    Shape:
        - reference: ``(M, D_r)`` or ``(S, M, D_r)``, ``M >= 2``
        - candidate: ``(M, D_c)`` or ``(S, M, D_c)``
        - output: scalar, or ``(S,)`` with ``reduction="none"`` (scalar for 2-D inputs)

    Example:
        >>> teacher = torch.randn(4, 17, 64)                   # 4 images, 17 tokens each
        >>> compressed = teacher @ torch.randn(64, 16)
        >>> neighbourhood_kl(teacher, compressed, reduction="none").shape
        torch.Size([4])
        >>> float(neighbourhood_kl(teacher, teacher))
        0.0
    """
    validate_features(reference, "reference", _SETS)
    validate_features(candidate, "candidate", _SETS)
    if candidate.shape[:-1] != reference.shape[:-1]:
        layout = _SETS[reference.ndim].replace("D)", "D_c)")
        expected = describe_shape(reference.shape[:-1]).rstrip(")").rstrip(",")
        raise ShapeError(
            f"candidate: expected {layout} = {expected}, D_c) to match reference "
            f"{describe_shape(reference.shape)}, got {describe_shape(candidate.shape)}"
        )
    check_same_device({"reference": reference, "candidate": candidate})
    if reference.shape[-2] < 2:
        raise ShapeError(
            f"reference: expected at least 2 vectors per set (M >= 2) to form neighbourhoods, "
            f"got {describe_shape(reference.shape)}"
        )
    check_choice(style, "style", KL_STYLES)
    check_choice(reduction, "reduction", ("mean", "none"))
    temps = _check_temperatures(temperatures)
    chunk_elements = check_int(chunk_elements, "chunk_elements", 1)
    work = work_dtype(reference, candidate)
    with torch.autocast(candidate.device.type, enabled=False):
        ref = reference.to(work)
        cand = candidate.to(work)
        if ref.ndim == 2:
            per_set = _neighbourhood_kl(ref[None], cand[None], temps, style, chunk_elements)[0]
        else:
            per_set = _neighbourhood_kl(ref, cand, temps, style, chunk_elements)
        out = per_set.mean() if reduction == "mean" else per_set
    return out.to(result_dtype(candidate.dtype))


def _flat_cosine_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unchecked core of :func:`flat_cosine_loss`, in the inputs' dtype."""
    target_unit, target_norm = _unit_and_norm(target.detach().flatten(1))
    # the batch is the set whose median norm sets the gradient floor; a batch of dead students
    # has no scale of its own, and the target's stands in
    unit = _Normalize.apply(student.flatten(1), _typical_norm(target_norm))
    cos = (unit * target_unit).sum(dim=1)
    return (1 - cos).mean()


def flat_cosine_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(vec(student_b), vec(target_b)))``: one cosine per sample.

    ``vec`` flattens everything after the batch axis, so for tokens ``(B, N, D)`` this is one
    cosine between two ``N*D`` vectors per image (not a mean of per-token cosines): the
    student must reproduce the relative norms of its tokens as well as their directions. The
    CosPress student loss, with ``target = h(teacher)``. The target receives no gradient.
    Computed in float32 (float64 for float64 inputs) with autocast off; returned in float32
    (float64 for float64 inputs).

    A zero vector has cosine 0. The student's gradient is exact, except for a sample shorter
    than a quarter of the median non-zero norm of the batch's samples (of the targets', when
    every student sample is zero): it gets its gradient's direction at the size it has at that
    length, so a dead (all-zero) sample's gradient is finite and about the size of the others'.

    Shape:
        - student: ``(B, D)`` or ``(B, N, D)``
        - target: the same shape as ``student``
        - output: scalar

    Example:
        >>> s = torch.randn(8, 5, 16)
        >>> flat_cosine_loss(s, torch.randn(8, 5, 16)).shape
        torch.Size([])
        >>> same, opposite = flat_cosine_loss(s, 3 * s), flat_cosine_loss(s, -s)
        >>> abs(float(same)) < 1e-6, abs(float(opposite) - 2) < 1e-6
        (True, True)
    """
    validate_features(student, "student", _FEATURES)
    validate_features(target, "target", _FEATURES)
    if target.shape != student.shape:
        raise ShapeError(
            f"target: expected the shape of student {describe_shape(student.shape)}, "
            f"got {describe_shape(target.shape)}"
        )
    check_same_device({"student": student, "target": target})
    work = work_dtype(student, target)
    with torch.autocast(student.device.type, enabled=False):
        loss = _flat_cosine_loss(student.to(work), target.to(work))
    return loss.to(result_dtype(student.dtype))


def _global_vectors(x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """One vector per image: the CLS token (token 0), or the mean token when the model has no
    prefix token; pooled ``(B, D)`` inputs pass through."""
    return pool(x, "cls" if num_prefix_tokens >= 1 else "mean", num_prefix_tokens=num_prefix_tokens)


_TERMS = ("local", "global", "tokens", "cls")


class CosPressLoss(nn.Module):
    """CosPress feature distillation: a teacher compression head and the student loss.

    ``loss = w_local L_local + w_global L_global + w_tokens L_tokens + w_cls L_cls`` with

    - ``L_local``: :func:`neighbourhood_kl` between the tokens of each image of ``sg(teacher)``
      and of ``h(sg(teacher))``, averaged over images (token inputs only);
    - ``L_global``: the same over the batch, on the CLS vectors (the pooled vectors for
      ``(B, D)`` inputs);
    - ``L_tokens``: :func:`flat_cosine_loss` between the student tokens and
      ``sg(h(teacher))``, all tokens of an image flattened into one vector (token inputs only);
    - ``L_cls``: the same on the CLS token (on the pooled vectors for ``(B, D)`` inputs).

    The head ``h`` (``LayerNorm -> Linear``, :class:`~featkd.TeacherCompressionHead`) gets
    gradient from the two KL terms only; the student from the two cosine terms only; the
    teacher never. Follows the official code: symmetrised joint distributions (``style="full"``),
    temperatures 0.01 to 0.10, all weights 1; ``style="half"`` is the row-wise conditional KL.
    The KL maths runs in float32 or wider with autocast off; the loss comes back in float32
    (float64 for float64 students). A dead (all-zero) student sample or CLS token gets a finite
    gradient of the usual size (see :func:`flat_cosine_loss`). After each call ``last_parts``
    holds the detached terms that exist (``local``, ``global``, ``tokens``, ``cls``; the
    paper's ``L_local``, ``L_global``, ``L_fea``, ``L_token``).

    The global term is over the batch on this device; with data parallelism each device sees
    only its own share of the batch. Wrap the loss in ``featkd.GlobalBatch`` to compute it
    over the global batch of all processes.

    Note:
        Owns parameters (the head): add ``loss_fn.parameters()`` to the optimiser, or the head
        stays at its random initialisation and the student learns a random projection.

    Args:
        teacher_dim: teacher width ``D_t``.
        student_dim: student width ``D_s``.
        temperatures: softmax temperatures of the KL terms, each in ``[1e-6, 1e6]``.
        style: ``"full"`` or ``"half"`` (see :func:`neighbourhood_kl`).
        weights: weights of the terms ``(local, global, tokens, cls)``.
        num_prefix_tokens: leading non-patch tokens; token 0 is the CLS token. With 0, the
            mean token stands in for the CLS token.
        chunk_elements: memory bound of the KL working tensors (see :func:`neighbourhood_kl`).
        device: where to create the head.
        dtype: dtype of the head's parameters.

    Shape:
        - student: ``(B, N, D_s)`` tokens (CLS first) or ``(B, D_s)`` pooled, ``B >= 2``
        - teacher: ``(B, N, D_t)`` or ``(B, D_t)``, the same layout as ``student``
        - output: scalar

    Example:
        >>> loss_fn = CosPressLoss(teacher_dim=64, student_dim=32)
        >>> student = torch.randn(4, 17, 32, requires_grad=True)
        >>> loss = loss_fn(student, torch.randn(4, 17, 64))
        >>> loss.backward()
        >>> sorted(loss_fn.last_parts)
        ['cls', 'global', 'local', 'tokens']
        >>> loss_fn.compress(torch.randn(4, 17, 64)).shape
        torch.Size([4, 17, 32])
    """

    def __init__(
        self,
        teacher_dim: int,
        student_dim: int,
        *,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
        style: str = "full",
        weights: dict[str, float] | None = None,
        num_prefix_tokens: int = 1,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice(style, "style", KL_STYLES)
        self.temperatures = _check_temperatures(temperatures)
        self.style = style
        self.weights = tuple(
            check_weights(weights or {}, "weights", _TERMS, type(self).__name__).values()
        )
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.chunk_elements = check_int(chunk_elements, "chunk_elements", 1)
        self.head = TeacherCompressionHead(teacher_dim, student_dim, device=device, dtype=dtype)
        self.last_parts: dict[str, torch.Tensor] = {}

    @property
    def teacher_dim(self) -> int:
        return self.head.teacher_dim

    @property
    def student_dim(self) -> int:
        return self.head.student_dim

    def _apply_head(self, teacher: torch.Tensor) -> torch.Tensor:
        with torch.autocast(teacher.device.type, enabled=False):
            # the callers validated the teacher: no second finiteness check (host sync)
            return self.head(teacher.detach().to(self.head.weight.dtype), finite_check=False)

    def compress(self, teacher: torch.Tensor) -> torch.Tensor:
        """The head applied to (detached) teacher features: what the student is trained to
        match. For evaluation, or to precompute targets (call it under ``torch.no_grad()``).

        Shape:
            - teacher: ``(..., D_t)``
            - output: ``(..., D_s)``, in the teacher's dtype

        Example:
            >>> CosPressLoss(64, 32).compress(torch.randn(8, 64)).shape
            torch.Size([8, 32])
        """
        validate_features(
            teacher, "teacher", {1: "(D_t,)", **_FEATURES}, width=self.teacher_dim, symbol="D_t"
        )
        return self._apply_head(teacher).to(teacher.dtype)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the four-term loss; ``labels`` is accepted for a uniform call and unused."""
        check_feature_pair(
            student, teacher, student_dim=self.student_dim, teacher_dim=self.teacher_dim
        )
        check_min_batch(student, "student", 2, "the global term compares the samples of a batch")
        tokens = student.ndim == 3
        if tokens and student.shape[1] < 2:
            raise ShapeError(
                f"student: expected at least 2 tokens per image for the local term, "
                f"got {describe_shape(student.shape)}; pass pooled (B, D_s) features instead"
            )
        check_same_device({"student": student, "head": self.head.weight})
        work = work_dtype(student, teacher, self.head.weight)
        with torch.autocast(student.device.type, enabled=False):
            target = teacher.detach().to(work)
            compressed = self._apply_head(teacher).to(work)
            s = student.to(work)
            prefix = self.num_prefix_tokens
            t_global = _global_vectors(target, prefix)
            c_global = _global_vectors(compressed, prefix)
            kl_options = (self.temperatures, self.style, self.chunk_elements)
            parts = {
                # .mean() over the one set rather than [0]: a view of the autograd Function's
                # output trips aot_autograd's alias replay after a graph break (torch 2.13)
                "global": _neighbourhood_kl(t_global[None], c_global[None], *kl_options).mean(),
                "cls": _flat_cosine_loss(_global_vectors(s, prefix), c_global.detach()),
            }
            if tokens:
                parts["local"] = _neighbourhood_kl(target, compressed, *kl_options).mean()
                parts["tokens"] = _flat_cosine_loss(s, compressed.detach())
            weight = dict(zip(_TERMS, self.weights, strict=True))
            total = sum(weight[name] * value for name, value in parts.items())
        self.last_parts = {name: parts[name].detach() for name in _TERMS if name in parts}
        return total.to(result_dtype(student.dtype))

    def extra_repr(self) -> str:
        return (
            f"teacher_dim={self.teacher_dim}, student_dim={self.student_dim}, "
            f"temperatures={self.temperatures}, style={self.style!r}, weights={self.weights}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
