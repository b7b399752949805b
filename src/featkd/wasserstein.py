"""Empirical Wasserstein distance between student and teacher feature batches (KD2M).

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.

Both batches are uniform empirical measures. The loss is the transport cost ``sum gamma * C``
with ``C_ij = ||s_i - t_j||^p``; the plan ``gamma`` is computed without gradient and the gradient
flows through the cost only (envelope theorem), so no solver step is ever differentiated.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

from featkd._checks import (
    ChoiceError,
    FeatkdInputError,
    ShapeError,
    check_same_device,
    describe_shape,
    validate_features,
)
from featkd._matching import (
    CONDITIONAL_NEEDS_LABELS,
    Groups,
    MatchingLoss,
    make_groups,
    validate_pair,
)
from featkd._options import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive,
    seeded_generator,
)
from featkd._ot import (
    emd_plans,
    ground_cost,
    label_cost,
    log_marginals,
    sinkhorn_log,
    sliced_wasserstein,
)
from featkd._precision import result_dtype, work_dtype

__all__ = ["SinkhornConvergenceWarning", "WassersteinLoss", "wasserstein_loss"]

SOLVERS = ("emd", "sinkhorn", "sliced")
LABEL_COSTS = ("sqeuclidean", "cross_entropy")
SINKHORN_MAX_ITER = 1000


class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` with the marginal error above ``tol``: the loss and its
    gradient are those of an approximate plan."""


def _check_options(
    solver: str,
    p: float,
    reg: float,
    relative_reg: bool,
    max_iter: int | None,
    tol: float | None,
    check_every: int,
    n_projections: int,
    conditional: bool,
    label_weight: float,
    label_cost_kind: str,
    debias: bool,
) -> None:
    check_choice(solver, "solver", SOLVERS)
    check_number(p, "p", minimum=1)  # W_p is a metric for p >= 1
    check_positive(reg, "reg")
    check_bool(relative_reg, "relative_reg")
    if max_iter is not None:
        check_int(max_iter, "max_iter", minimum=1)
    if tol is not None:
        check_positive(tol, "tol")
    check_int(check_every, "check_every", minimum=1)
    check_int(n_projections, "n_projections", minimum=1)
    check_bool(conditional, "conditional")
    check_positive(label_weight, "label_weight", allow_zero=True)
    check_choice(label_cost_kind, "label_cost", LABEL_COSTS)
    check_bool(debias, "debias")
    if label_weight > 0 and solver == "sliced":
        raise ChoiceError(
            "label_weight: the joint feature-label cost needs a cost matrix, so solver 'emd' or "
            f"'sinkhorn'; got label_weight={label_weight!r} with solver='sliced'"
        )
    if label_weight > 0 and conditional:
        raise ChoiceError(
            "label_weight: expected 0 with conditional=True (choose the joint cost or the "
            f"class-conditional distance, not both), got {label_weight!r}"
        )
    if debias and solver != "sinkhorn":
        raise ChoiceError(f"debias: only applies to solver='sinkhorn', got solver={solver!r}")


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_MODULE_CALL = os.path.join("torch", "nn", "modules", "module.py")


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside featkd and torch's module-call machinery,
    however deep the call (KD2MLoss, JointWassersteinLoss, GlobalBatch...): the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(_PACKAGE) or name.endswith(_MODULE_CALL)):
            break
        frame, level = frame.f_back, level + 1
    return level


def _warn_unconverged(error: float, max_iter: int, tol: float) -> None:
    warnings.warn(
        f"Sinkhorn stopped at max_iter={max_iter} with a marginal error of {error:.3g} above "
        f"tol={tol:g}: the loss and its gradient come from an approximate plan. Raise reg "
        "(smoother plans converge faster) or max_iter, or loosen tol; a fixed budget "
        "(tol=None) never warns.",
        SinkhornConvergenceWarning,
        stacklevel=_user_stacklevel(),
    )


def _check_logits(logits: torch.Tensor | None, name: str, student: torch.Tensor) -> None:
    if logits is None:
        return
    validate_features(logits, name, {2: "(B, K)"})
    if logits.shape[0] != student.shape[0]:
        raise ShapeError(
            f"{name}: expected batch size {student.shape[0]} (the batch of student), "
            f"got {logits.shape[0]} (shape {describe_shape(logits.shape)})"
        )
    check_same_device({"student": student, name: logits})


def _check_label_inputs(
    student: torch.Tensor,
    labels: torch.Tensor | None,
    student_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    kind: str,
) -> None:
    _check_logits(student_logits, "student_logits", student)
    _check_logits(teacher_logits, "teacher_logits", student)
    if (
        student_logits is not None
        and teacher_logits is not None
        and student_logits.shape[1] != teacher_logits.shape[1]
    ):
        raise ShapeError(
            f"teacher_logits: expected {student_logits.shape[1]} classes (the width of "
            f"student_logits), got shape {describe_shape(teacher_logits.shape)}"
        )
    if kind == "cross_entropy" and student_logits is None:
        raise FeatkdInputError(
            "student_logits: label_cost='cross_entropy' compares the student's predictions "
            f"with the teacher's labels, expected a ({student.shape[0]}, K) tensor, got None"
        )
    missing_side = student_logits is None or teacher_logits is None
    if missing_side and labels is None:
        raise FeatkdInputError(
            f"labels: expected class indices of shape ({student.shape[0]},) for the joint "
            "feature-label cost (or both student_logits and teacher_logits), got None"
        )
    if missing_side and (student_logits is not None or teacher_logits is not None):
        classes = (student_logits if student_logits is not None else teacher_logits).shape[1]
        if bool((labels >= classes).any()):
            raise ChoiceError(
                f"labels: expected class indices < {classes} (the width of the logits), "
                f"got a maximum of {int(labels.max())}"
            )


def _exact(cost: torch.Tensor, groups: Groups, max_iter: int | None) -> torch.Tensor:
    plan = emd_plans(cost, groups.sizes, max_iter)
    return (plan * cost).sum(dim=(-2, -1))


def _entropic(
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
        kl = torch.where(plan > 0, plan * log_ratio, torch.zeros_like(plan)).sum(dim=(-2, -1))
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
        "transport": transport.view(copies, -1)[0].detach().mean(),
        "entropy": (eps.detach() * kl.view(copies, -1)[0]).mean(),
        "reg": eps.detach().mean(),
        "iterations": torch.tensor(float(iterations)),
        "marginal_error": marginal_error,
    }
    unconverged = error if tol is not None and not error <= tol else None
    return result, parts, unconverged


def _wasserstein(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    solver: str,
    p: float,
    reg: float,
    relative_reg: bool,
    max_iter: int | None,
    tol: float | None,
    check_every: int,
    debias: bool,
    n_projections: int,
    generator: torch.Generator | None,
    conditional: bool,
    label_weight: float,
    label_cost_kind: str,
    student_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float | None]:
    """The loss, its detached parts, and Sinkhorn's marginal error when it stopped above
    ``tol`` (None otherwise, and for the other solvers)."""
    _check_options(
        solver,
        p,
        reg,
        relative_reg,
        max_iter,
        tol,
        check_every,
        n_projections,
        conditional,
        label_weight,
        label_cost_kind,
        debias,
    )
    validate_pair(
        student,
        teacher,
        labels,
        labels_needed_for=CONDITIONAL_NEEDS_LABELS if conditional else None,
    )
    if labels is not None:  # one_hot and indexing want int64; any integer dtype is accepted
        labels = labels.long()
    joint = label_weight > 0
    unconverged = None
    if joint:
        _check_label_inputs(student, labels, student_logits, teacher_logits, label_cost_kind)
    work = work_dtype(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        target = teacher.detach().to(work)
        shift = target.mean(dim=0)  # a common shift keeps the Gram expansion of C accurate
        groups = make_groups(student.to(work) - shift, target - shift, labels, conditional)
        if solver == "sliced":
            per_group = sliced_wasserstein(
                *(groups.student, groups.teacher, groups.mask, groups.counts),
                p,
                n_projections,
                generator,
            )
            parts: dict[str, torch.Tensor] = {}
        else:
            cost = ground_cost(groups.student, groups.teacher, p)
            if joint:
                labels_part = label_cost(
                    labels, student_logits, teacher_logits, label_cost_kind, work
                )
                parts = {"feature_cost": cost.detach().mean(), "label_cost": labels_part.mean()}
                cost = cost + label_weight * labels_part[None]
            else:
                parts = {}
            if solver == "emd":
                per_group = _exact(cost, groups, max_iter)
            else:
                self_costs = None
                if debias:
                    self_costs = (
                        ground_cost(groups.student, groups.student, p),
                        ground_cost(groups.teacher, groups.teacher, p),
                    )
                per_group, entropic_parts, unconverged = _entropic(
                    cost,
                    groups,
                    reg,
                    relative_reg,
                    SINKHORN_MAX_ITER if max_iter is None else max_iter,
                    tol,
                    check_every,
                    debias,
                    self_costs,
                )
                parts.update(entropic_parts)
        loss = per_group.mean()
    parts = {"wasserstein": loss.detach(), **parts}
    if conditional:
        parts["classes"] = torch.tensor(float(len(groups.sizes)))
    return loss.to(result_dtype(student.dtype)), parts, unconverged


def wasserstein_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    solver: str = "emd",
    p: float = 2.0,
    reg: float = 0.1,
    relative_reg: bool = True,
    max_iter: int | None = None,
    tol: float | None = 1e-3,
    check_every: int = 10,
    debias: bool = False,
    n_projections: int = 128,
    generator: int | torch.Generator | None = None,
    conditional: bool = False,
    label_weight: float = 0.0,
    label_cost: str = "sqeuclidean",
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Empirical ``W_p^p`` between the student and teacher batches (KD2M, Montesuma 2025).

    Each batch is a uniform measure over its rows; the cost is ``C_ij = ||s_i - t_j||^p``. The
    power ``p`` is not undone: ``p=2`` returns the *squared* 2-Wasserstein distance, whose
    gradient is finite where the distance is zero.

    * ``solver="emd"``: the exact plan by POT's network simplex (``ot.emd``, float64, on the
      host: one device-to-host copy of the ``B x B`` cost per call).
    * ``solver="sinkhorn"``: entropic OT in torch, on the features' device, log-stabilised
      (each block of ``check_every`` iterations opens with an exact log-domain step, then runs
      cheap matrix-vector scaling steps on the current plan; batched over classes). Returns
      ``<gamma, C> + eps KL(gamma | a b^T)`` (the entropic objective, whose gradient is exactly
      the plan at convergence); ``last_parts["transport"]`` is ``<gamma, C>``, the value of
      POT's ``ot.sinkhorn2``. ``eps = reg * mean(C)`` by default (``reg=0.1``,
      ``relative_reg=True``), ``eps = reg`` otherwise. Stops when the L1 error of the row
      marginals is ``<= tol`` (``1e-3``), tested after each block (one host synchronisation
      per test, at most one per ``check_every`` iterations), or after ``max_iter`` (1000 if
      None) iterations. The defaults converge on standardised features: at ``B = 32`` within
      about 150 iterations (``reg=0.05, tol=1e-4`` could need over 2,000); the value is then
      within about ``tol * (max C - min C)`` of the converged one. A call that stops at
      ``max_iter`` above ``tol`` warns (:class:`SinkhornConvergenceWarning`; the module warns
      once per instance) and reports the error in ``last_parts["marginal_error"]``.
      ``tol=None`` runs exactly ``max_iter`` iterations, never synchronises and never warns.
      ``debias=True`` returns the Sinkhorn divergence
      ``OT(s,t) - OT(s,s)/2 - OT(t,t)/2``, zero for identical batches (the three problems are
      solved together; the self-transport ones can need more iterations at small ``reg``).
    * ``solver="sliced"``: mean over ``n_projections`` random unit directions of the 1-D
      ``W_p^p`` of the projected batches (sorting); new directions on every call, drawn from
      ``generator`` when given (an integer seeds a fresh generator: the same directions on
      every call). About ``W_p^p / D`` in scale.

    The plan is held fixed and the gradient flows through the cost only. The teacher gets no
    gradient.

    Labels:
        * ``conditional=True``: the mean over the classes present in ``labels`` of the distance
          between that class's student and teacher rows (one host synchronisation to group).
          A class seen once contributes the cost between its two points
          (``||s - t||^p``, the OT between single points).
        * ``label_weight=beta > 0`` (emd, sinkhorn): the joint feature-label cost
          ``||s_i - t_j||^p + beta * l(y_i, y_j)``, student ``i`` against teacher ``j``. A
          side's label ``y`` is the softmax of its logits when given, else the one-hot of
          ``labels``; ``label_cost`` ``"sqeuclidean"`` is ``||y_i - y_j||^2``,
          ``"cross_entropy"`` is ``-sum_k y_jk log softmax(student_logits_i)_k``.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices, for ``conditional`` or the joint cost.
        solver: ``"emd"``, ``"sinkhorn"`` or ``"sliced"``.
        p: ground-cost power, ``>= 1``.
        reg: entropic regularisation (sinkhorn), relative to the mean cost by default.
        relative_reg: scale ``reg`` by the mean cost (per class when conditional).
        max_iter: iteration cap of the solver (emd: ``max(1e5, 20 B^2)``; sinkhorn: 1000).
        tol: sinkhorn's stopping tolerance on the row-marginal L1 error, or None (a fixed
            ``max_iter`` iterations).
        check_every: sinkhorn iterations between tolerance checks.
        debias: sinkhorn only: return the Sinkhorn divergence.
        n_projections: number of random directions (sliced).
        generator: random generator of the directions (sliced), or an integer seed, for
            reproducible draws; None draws from torch's global generator.
        conditional: average the distance over the classes in ``labels``.
        label_weight: weight ``beta`` of the label cost (joint feature-label OT); 0 disables it.
        label_cost: ``"sqeuclidean"`` or ``"cross_entropy"``.
        student_logits: the student's logits ``(B, K)`` for the joint cost (receive gradient).
        teacher_logits: the teacher's logits ``(B, K)`` for the joint cost.

    Shape:
        - student: ``(B, D)``
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer
        - student_logits, teacher_logits: ``(B, K)``
        - output: scalar

    Example:
        >>> s = torch.randn(16, 8, requires_grad=True)
        >>> t = torch.randn(16, 8)
        >>> wasserstein_loss(s, t).shape
        torch.Size([])
        >>> bool(wasserstein_loss(t, t) < 1e-5)  # zero up to rounding
        True
        >>> loss = wasserstein_loss(s, t, solver="sinkhorn")
        >>> loss.backward()
        >>> s.grad.shape
        torch.Size([16, 8])
    """
    loss, _, unconverged = _wasserstein(
        student,
        teacher,
        labels=labels,
        solver=solver,
        p=p,
        reg=reg,
        relative_reg=relative_reg,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        debias=debias,
        n_projections=n_projections,
        generator=seeded_generator(generator, "generator"),
        conditional=conditional,
        label_weight=label_weight,
        label_cost_kind=label_cost,
        student_logits=student_logits,
        teacher_logits=teacher_logits,
    )
    if unconverged is not None:
        _warn_unconverged(unconverged, max_iter or SINKHORN_MAX_ITER, tol)
    return loss


class WassersteinLoss(MatchingLoss):
    """Empirical Wasserstein distance between the feature batches (KD2M); see
    :func:`wasserstein_loss` for the maths, solvers and the class-conditional and joint
    variants.

    Note:
        With a ``projector`` (for example ``torch.nn.Linear(D_s, D_t)`` when the widths
        differ) the module owns parameters: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        solver: ``"emd"`` (exact, POT), ``"sinkhorn"`` (entropic, torch) or ``"sliced"``.
        p: ground-cost power; the loss is ``W_p^p``.
        reg: entropic regularisation (sinkhorn), relative to the mean cost by default.
        relative_reg: scale ``reg`` by the mean cost.
        max_iter: solver iteration cap (None: solver default).
        tol: sinkhorn stopping tolerance (row-marginal L1 error), None for a fixed count.
            A call that stops at ``max_iter`` above it warns, once per instance
            (:class:`SinkhornConvergenceWarning`).
        check_every: sinkhorn iterations between tolerance checks.
        debias: sinkhorn only: the Sinkhorn divergence (zero for identical batches).
        n_projections: random directions (sliced).
        seed: the sliced directions' randomness: an integer seeds the module's own CPU
            generator, a ``torch.Generator`` is used as given, None draws from torch's global
            generator. The draws differ between calls but repeat across runs.
        conditional: mean over the classes in ``labels`` of the per-class distance.
        label_weight: weight of the label cost in the joint feature-label cost (0: off).
        label_cost: ``"sqeuclidean"`` or ``"cross_entropy"``.
        projector: optional module applied to the student first (owned and trained).

    Shape:
        - student: ``(B, D_s)`` (``(B, D)`` without a projector)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    ``last_parts`` holds ``"wasserstein"`` and, by solver and variant, ``"transport"``,
    ``"entropy"``, ``"reg"`` (the ``eps`` used), ``"iterations"``, ``"marginal_error"`` (L1
    error of the plan's marginals), ``"feature_cost"``, ``"label_cost"`` and ``"classes"``.

    Checkpoints: ``state_dict()`` holds the state of the module's own generator (``seed=``
    given), so a module rebuilt with the same options and loaded with it continues the
    sequence of sliced directions where the saved one stopped. With ``seed=None`` there is no
    generator of its own to save: the directions come from torch's global generator, which a
    training checkpoint saves with ``torch.get_rng_state()`` (and
    ``torch.cuda.get_rng_state()``) as for dropout. Loading a seeded module's state into a
    ``seed=None`` one raises an error (its sequence could not be resumed); loading a
    ``seed=None`` state into a seeded module leaves that module's generator as it is.

    Example:
        >>> loss_fn = WassersteinLoss(solver="sinkhorn", conditional=True)
        >>> s, t = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16)
        >>> labels = torch.randint(0, 4, (32,))
        >>> loss_fn(s, t, labels=labels).backward()
        >>> {"classes", "entropy", "iterations"} <= set(loss_fn.last_parts)
        True
    """

    def __init__(
        self,
        solver: str = "emd",
        *,
        p: float = 2.0,
        reg: float = 0.1,
        relative_reg: bool = True,
        max_iter: int | None = None,
        tol: float | None = 1e-3,
        check_every: int = 10,
        debias: bool = False,
        n_projections: int = 128,
        seed: int | torch.Generator | None = None,
        conditional: bool = False,
        label_weight: float = 0.0,
        label_cost: str = "sqeuclidean",
        projector: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(projector)
        _check_options(
            solver,
            p,
            reg,
            relative_reg,
            max_iter,
            tol,
            check_every,
            n_projections,
            conditional,
            label_weight,
            label_cost,
            debias,
        )
        self.solver = solver
        self.p = float(p)
        self.reg = float(reg)
        self.relative_reg = relative_reg
        self.max_iter = max_iter
        self.tol = None if tol is None else float(tol)
        self.check_every = check_every
        self.debias = debias
        self.n_projections = n_projections
        self.seed = seed
        self.generator = seeded_generator(seed, "seed")
        self.conditional = conditional
        self.label_weight = float(label_weight)
        self.label_cost = label_cost
        self._warned_unconverged = False

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``W_p^p`` between the (projected) student batch and the teacher batch.

        Args:
            student: student features.
            teacher: teacher features (detached inside).
            labels: class indices (conditional or joint variants).
            student_logits: student logits ``(B, K)`` for the joint cost.
            teacher_logits: teacher logits ``(B, K)`` for the joint cost.
        """
        loss, parts, unconverged = _wasserstein(
            self.project(student),
            teacher,
            labels=labels,
            solver=self.solver,
            p=self.p,
            reg=self.reg,
            relative_reg=self.relative_reg,
            max_iter=self.max_iter,
            tol=self.tol,
            check_every=self.check_every,
            debias=self.debias,
            n_projections=self.n_projections,
            generator=self.generator,
            conditional=self.conditional,
            label_weight=self.label_weight,
            label_cost_kind=self.label_cost,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
        )
        self.last_parts = parts
        if unconverged is not None and not self._warned_unconverged:
            self._warned_unconverged = True
            max_iter = self.max_iter or SINKHORN_MAX_ITER
            _warn_unconverged(unconverged, max_iter, self.tol)
        return loss

    def get_extra_state(self) -> dict[str, Any]:
        """The position of the module's own generator (None with ``seed=None``), saved in
        ``state_dict()`` so that a resumed run continues the sliced directions."""
        if self.generator is None:
            return {"generator_state": None}
        return {
            "generator_state": self.generator.get_state(),
            "generator_device": self.generator.device.type,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint saved before the generator state was kept has no such key: load it as
        # one saved with seed=None (the generator keeps its position) instead of failing
        state_dict.setdefault(prefix + "_extra_state", {"generator_state": None})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Any) -> None:
        """Restore the generator saved by :meth:`get_extra_state` (see the class notes)."""
        saved = state.get("generator_state") if isinstance(state, dict) else None
        if saved is None:
            return  # saved with seed=None: no sequence of its own to resume
        if self.generator is None:
            raise FeatkdInputError(
                "state_dict: expected no generator state (this module has seed=None and draws "
                "from torch's global generator), got the state of a seeded module's generator; "
                "build the module with seed= to resume its sequence of sliced directions"
            )
        device = state.get("generator_device", "cpu")
        if device != self.generator.device.type:
            raise FeatkdInputError(
                f"state_dict: expected the state of a {self.generator.device.type} generator "
                f"(this module's seed), got that of a {device} generator"
            )
        self.generator.set_state(saved.cpu())

    def extra_repr(self) -> str:
        text = f"solver={self.solver!r}, p={self.p}"
        if self.solver == "sinkhorn":
            text += f", reg={self.reg}, relative_reg={self.relative_reg}, debias={self.debias}"
        if self.solver == "sliced":
            text += f", n_projections={self.n_projections}, seed={self.seed}"
        if self.conditional:
            text += ", conditional=True"
        if self.label_weight > 0:
            text += f", label_weight={self.label_weight}, label_cost={self.label_cost!r}"
        return text
