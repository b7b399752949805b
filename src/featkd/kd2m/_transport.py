"""Optimal-transport numerics for the KD2M losses: costs, entropic plans, slicing (exact plans
are in :mod:`featkd.kd2m._exact`).

Axis legend: ``G`` groups (classes), ``n`` samples per group (zero-padded), ``D`` width,
``L`` random projections. Masses are uniform over the real rows of each group.

The solvers return a *plan* without gradient; the losses take the gradient
through the cost only (envelope theorem), so no solver iteration is ever differentiated.
"""

from __future__ import annotations

import math

import torch

from featkd._sync import device_constant
from featkd.kd2m._sets import Groups, matmul_nt

__all__ = [
    "entropic_transport",
    "ground_cost",
    "label_cost",
    "log_marginals",
    "sinkhorn_log",
    "sliced_wasserstein",
    "squared_distances",
]


def squared_distances(
    x: torch.Tensor,
    y: torch.Tensor,
    x_sq: torch.Tensor | None = None,
    y_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||x_i - y_j||^2`` ``(..., n, m)`` by the Gram expansion, clipped at zero; ``x_sq``,
    ``y_sq`` are the squared norms ``(..., n)``, ``(..., m)`` when the caller has them.

    Callers shift both sets by a common constant first (the detached teacher mean) so the
    expansion does not cancel large shared offsets.
    """
    x_sq = x.square().sum(dim=-1) if x_sq is None else x_sq
    if y_sq is None:
        y_sq = x_sq if y is x else y.square().sum(dim=-1)
    outer = x_sq[..., :, None] + y_sq[..., None, :]
    return matmul_nt(x, y, add=outer, alpha=-2).clamp_min(0)


def ground_cost(x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    """``||x_i - y_j||^p`` with a finite gradient where a distance is zero."""
    squared = squared_distances(x, y)
    if p == 2:
        return squared
    positive = squared > 0
    safe = torch.where(positive, squared, 1.0)
    return torch.where(positive, safe.pow(p / 2), 0.0)


def log_marginals(mask: torch.Tensor | None, counts: torch.Tensor, n: int) -> torch.Tensor:
    """Log of the uniform masses ``1/count`` ``(G, n)``; ``-inf`` on padded rows."""
    log_mass = -counts.log()[:, None].expand(counts.shape[0], n)
    if mask is None:
        return log_mass.clone()
    return torch.where(mask, log_mass, -math.inf)


def _kernel_times(kernel: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``K y`` per group, ``(G, n, n) x (G, n) -> (G, n)`` (a plain matrix-vector product when
    there is one group)."""
    if kernel.shape[0] == 1:
        return (kernel[0] @ vector[0])[None]
    return (kernel @ vector[..., None])[..., 0]


def _vector_times(vector: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x^T K`` per group, ``(G, n) x (G, n, n) -> (G, n)``."""
    if kernel.shape[0] == 1:
        return (vector[0] @ kernel[0])[None]
    return (vector[:, None, :] @ kernel)[:, 0, :]


def sinkhorn_log(
    scaled_cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None,
    check_every: int,
    padded: bool = False,
    exact_every: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, int, float | None]:
    """Entropic OT, log-stabilised, batched over groups; returns the scaled log-potentials.

    ``scaled_cost`` is ``C / eps`` ``(G, n, n)``, ``log_a``/``log_b`` the log masses ``(G, n)``
    (``-inf`` on padding, then ``padded=True``); the plan is ``exp(u_i + v_j - C_ij / eps)``.

    The iterations run in blocks of ``check_every``. A block forms the kernel of the current
    plan, ``K = exp(u_i + v_j - C_ij / eps)``, runs Sinkhorn's scaling updates on it (two
    matrix-vector products per iteration instead of two log-sum-exps over ``n x n`` entries)
    and absorbs the scalings into ``u, v`` (Schmitzer's log-stabilisation). The first block,
    and every ``exact_every``-th, opens with an exact log-domain iteration
    (``u = log a - LSE_j(v_j - C_ij / eps)``, then ``v``), safe from any starting point.

    Why the scalings stay finite: after any Sinkhorn half-step one side's marginals are exact
    and every mass on the other side is at least ``1/n`` of its target (a column's mass is at
    most 1), so one scaling update changes a scaling by at most a factor ``n``; a block of
    ``check_every`` updates stays far inside the float32 range for any practical batch. A group
    whose scalings still under- or overflowed keeps its previous iterate (a ``torch.where``, no
    synchronisation) until the next exact step.

    Convergence: after each ``v`` update the column marginals are exact; the L1 error of the
    row marginals (the row sums of the block's kernel), worst group, is compared with ``tol``
    after every block of scaling updates and once more when ``max_iter`` is reached, so the
    verdict is about the returned potentials. Each test is one host synchronisation, at most
    one per ``check_every`` iterations (a call of fewer iterations tests once). Returns the
    last tested error, above ``tol`` when the call stopped unconverged; ``tol=None`` runs
    exactly ``max_iter`` iterations, never synchronises and returns ``None`` for it.
    """
    mass_a, mass_b = log_a.exp(), log_b.exp()
    real_a, real_b = mass_a > 0, mass_b > 0
    negative_cost = -scaled_cost
    v = log_b.clone()
    u = torch.zeros_like(log_a)
    iterations = blocks = 0
    error = None
    while True:
        if blocks % exact_every == 0 and iterations < max_iter:
            u = log_a - torch.logsumexp(v[:, None, :] + negative_cost, dim=-1)
            v = log_b - torch.logsumexp(u[:, :, None] + negative_cost, dim=-2)
            iterations += 1
        done = iterations >= max_iter
        if done and tol is None:
            break
        kernel = (negative_cost + v[:, None, :]).add_(u[:, :, None]).exp_()
        # not right after the opening exact step: a test per block of scaling updates suffices
        if tol is not None and (blocks > 0 or done):
            row_error = (kernel.sum(dim=-1) - mass_a).abs().sum(dim=-1).max()
            error = float(row_error)  # the block's one host synchronisation
            if error <= tol or done:
                break
        blocks += 1
        steps = min(check_every, max_iter - iterations)
        scale_b = torch.ones_like(mass_b)
        for _ in range(steps):
            scale_a = mass_a / _kernel_times(kernel, scale_b)
            if padded:  # 0 / 0 on padded rows, zeroed before the NaN reaches every column
                scale_a = torch.where(real_a, scale_a, 0.0)
            scale_b = mass_b / _vector_times(scale_a, kernel)
            if padded:
                scale_b = torch.where(real_b, scale_b, 0.0)
        log_scale_a, log_scale_b = scale_a.log(), scale_b.log()
        # a group is kept when every real scaling is positive and finite, i.e. its log finite:
        # the logs are at most ~89 in float32, so their sum over a group is finite exactly then
        # (padding's scalings are 0 by the where above, their logs -inf, left out of the sum)
        if padded:
            checked_a = torch.where(real_a, log_scale_a, 0.0)
            checked_b = torch.where(real_b, log_scale_b, 0.0)
        else:
            checked_a, checked_b = log_scale_a, log_scale_b
        total = checked_a.sum(dim=-1) + checked_b.sum(dim=-1)
        valid = total.mul(0).eq(0)[:, None]  # x * 0 == 0 exactly when x is finite
        u = torch.where(valid, u + log_scale_a, u)
        v = torch.where(valid, v + log_scale_b, v)
        iterations += steps
    return u, v, iterations, error


def sliced_wasserstein(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    counts: torch.Tensor,
    p: float,
    n_projections: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Mean over random unit directions of the 1-D ``W_p^p`` between the projected sets ``(G,)``.

    In one dimension the optimal plan between equal-size uniform sets pairs the sorted values.
    Padded rows are given the same huge value on both sides so they sort last and pair with
    each other at zero cost.
    """
    width = student.shape[-1]
    device = generator.device if generator is not None else student.device
    directions = torch.randn(
        width, n_projections, generator=generator, device=device, dtype=student.dtype
    ).to(student.device)
    directions = directions / directions.norm(dim=0, keepdim=True).clamp_min(1e-30)
    projected_s = student @ directions  # (G, n, L)
    projected_t = teacher @ directions
    if mask is not None:
        padding = torch.finfo(student.dtype).max
        real = mask[..., None]
        projected_s = projected_s.masked_fill(~real, padding)
        projected_t = projected_t.masked_fill(~real, padding)
    sorted_s = projected_s.sort(dim=-2).values
    sorted_t = projected_t.sort(dim=-2).values
    gaps = (sorted_s - sorted_t).abs()
    per_direction = (gaps.square() if p == 2 else gaps.pow(p)).sum(dim=-2) / counts[:, None]
    return per_direction.mean(dim=-1)


def _one_hot(labels: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    # a comparison rather than F.one_hot: on an accelerator the label range is counted, not
    # read (featkd.set_finite_check), and a label out of range gives a zero row where
    # one_hot's scatter would stop the device with an assert
    indices = device_constant(
        ("class indices", classes), labels, lambda: torch.arange(classes, device=labels.device)
    )
    return (labels[:, None] == indices).to(dtype)


def label_cost(
    labels: torch.Tensor | None,
    student_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    kind: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The label part ``l(y_i, y_j)`` ``(B, B)`` of the joint cost, student ``i`` to teacher ``j``.

    A side's label is the softmax of its logits when given, else the one-hot of ``labels``.
    ``"sqeuclidean"`` is ``||y_i - y_j||^2`` (``2 [y_i != y_j]`` between one-hots);
    ``"cross_entropy"`` is ``-sum_k y_jk log softmax(student_logits_i)_k``. The official KD2M
    ones take both logits (``z``) as given: ``"logits_sqeuclidean"`` is ``||z_s,i - z_t,j||^2``
    on the raw logits, ``"kl_student_teacher"`` is ``KL(p_s,i || p_t,j)`` of their softmaxes.
    Gradient flows into the student logits only.
    """
    if kind == "logits_sqeuclidean":
        target = teacher_logits.detach().to(dtype)
        shift = target.mean(dim=0)  # a common shift keeps the Gram expansion accurate
        return squared_distances(student_logits.to(dtype) - shift, target - shift)
    if kind == "kl_student_teacher":
        log_p = torch.log_softmax(student_logits.to(dtype), dim=1)
        log_q = torch.log_softmax(teacher_logits.detach().to(dtype), dim=1)
        p = log_p.exp()
        return (p * log_p).sum(dim=1, keepdim=True) - p @ log_q.mT
    if student_logits is None and teacher_logits is None:
        # one-hot on both sides (the caller requires student_logits for cross_entropy)
        return 2 * (labels[:, None] != labels[None, :]).to(dtype)
    classes = (student_logits if student_logits is not None else teacher_logits).shape[1]
    if teacher_logits is not None:
        teacher_y = torch.softmax(teacher_logits.detach().to(dtype), dim=1)
    else:
        teacher_y = _one_hot(labels, classes, dtype)
    if kind == "cross_entropy":
        log_p = torch.log_softmax(student_logits.to(dtype), dim=1)
        return -(log_p @ teacher_y.mT)
    if student_logits is not None:
        student_y = torch.softmax(student_logits.to(dtype), dim=1)
    else:
        student_y = _one_hot(labels, classes, dtype)
    return squared_distances(student_y, teacher_y)


def entropic_transport(
    cost: torch.Tensor,
    groups: Groups,
    reg: float,
    relative_reg: bool,
    max_iter: int,
    tol: float | None,
    check_every: int,
    debias: bool,
    self_costs: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float | None]:
    """Entropic OT ``<gamma, C> + eps KL(gamma | a b^T)`` per group, gradient ``gamma`` (exact
    at convergence by the envelope theorem, including through ``eps`` when it is relative).
    Also returns the marginal error when the solver stopped above ``tol`` (else None)."""
    mask, counts = groups.mask, groups.counts
    n = cost.shape[-1]
    pair_mask = None if mask is None else (mask[:, :, None] & mask[:, None, :])
    if relative_reg:
        real_cost = cost if pair_mask is None else cost * pair_mask
        eps = reg * real_cost.sum(dim=(-2, -1)) / counts.square()
        # a zero mean cost (identical single points, constant features) needs no smoothing
        eps = eps.clamp_min(torch.finfo(cost.dtype).tiny)
    else:
        eps = torch.full_like(counts, reg)
    costs = [cost] if not debias else [cost, *self_costs]
    stacked = torch.cat(costs, dim=0)
    copies = len(costs)
    eps_all = eps.detach().repeat(copies)
    log_mass = log_marginals(mask, counts, n).repeat(copies, 1)
    scaled = stacked.detach() / eps_all[:, None, None]
    if pair_mask is not None:
        scaled = scaled.masked_fill(~pair_mask.repeat(copies, 1, 1), 0.0)
    u, v, iterations, error = sinkhorn_log(
        scaled,
        log_mass,
        log_mass,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        padded=mask is not None,
    )
    with torch.no_grad():
        log_plan = u[:, :, None] + v[:, None, :] - scaled
        plan = log_plan.exp()
        log_ratio = log_plan - log_mass[:, :, None] - log_mass[:, None, :]
        kl = torch.where(plan > 0, plan * log_ratio, 0.0).sum(dim=(-2, -1))
        mass = log_mass.exp()
        row_error = (plan.sum(dim=-1) - mass).abs().sum(dim=-1)
        column_error = (plan.sum(dim=-2) - mass).abs().sum(dim=-1)
        marginal_error = torch.maximum(row_error, column_error).max()
    transport = (plan * stacked).sum(dim=(-2, -1))
    value = transport + eps.repeat(copies) * kl  # (copies * G,)
    per_copy = value.view(copies, -1)
    result = per_copy[0]
    if debias:  # Sinkhorn divergence: OT(s,t) - OT(s,s)/2 - OT(t,t)/2
        result = result - 0.5 * per_copy[1] - 0.5 * per_copy[2]
    parts = {
        "transport": groups.mean(transport.view(copies, -1)[0].detach()),
        "entropy": groups.mean(eps.detach() * kl.view(copies, -1)[0]),
        "reg": groups.mean(eps.detach()),
        "iterations": eps.new_full((), float(iterations)),
        "marginal_error": marginal_error,
    }
    unconverged = error if tol is not None and not error <= tol else None
    return result, parts, unconverged
