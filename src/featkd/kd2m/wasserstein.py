"""Empirical Wasserstein distance between student and teacher feature batches (KD2M).

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.

Both batches are uniform empirical measures. The loss is the transport cost ``sum gamma * C``
with ``C_ij = ||s_i - t_j||^p``; the plan ``gamma`` is computed without gradient and the gradient
flows through the cost only (envelope theorem), so no solver step is ever differentiated.
"""

from __future__ import annotations

import warnings

import torch

from featkd._loss import check_reduction, evaluate, user_stacklevel
from featkd._options import renamed, seeded_generator
from featkd._seeded import GeneratorState
from featkd.kd2m._base import BATCH_LEVEL, MatchingLoss
from featkd.kd2m._wasserstein_terms import (
    SINKHORN_MAX_ITER,
    check_inputs,
    check_options,
    wasserstein_terms,
)

__all__ = ["SinkhornConvergenceWarning", "WassersteinLoss", "wasserstein_loss"]


class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` with the marginal error above ``tol``: the loss and its
    gradient are those of an approximate plan."""


def _warn_unconverged(error: float, max_iter: int | None, tol: float | None) -> None:
    warnings.warn(
        f"Sinkhorn stopped at max_iter={max_iter or SINKHORN_MAX_ITER} with a marginal error "
        f"of {error:.3g} above tol={tol:g}: the loss and its gradient come from an approximate "
        "plan. Raise reg (smoother plans converge faster) or max_iter, or loosen tol; a fixed "
        "budget (tol=None) never warns.",
        SinkhornConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


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
    seed: int | torch.Generator | None = None,
    conditional: bool = False,
    label_weight: float = 0.0,
    label_cost: str = "sqeuclidean",
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    class_reduction: str = "mean",
    num_classes: int | None = None,
    feature_cost_scale: str = "none",
    reduction: str = "mean",
    generator: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Empirical ``W_p^p`` between the student and teacher batches (KD2M, Montesuma 2025).

    Each batch is a uniform measure over its rows; the cost is ``C_ij = ||s_i - t_j||^p``. The
    power ``p`` is not undone: ``p=2`` returns the *squared* 2-Wasserstein distance, whose
    gradient is finite where the distance is zero.

    * ``solver="emd"``: the exact plan, float64, on the host (one device-to-host copy of the
      ``B x B`` cost per call). Between uniform measures on ``B`` points each an optimal plan
      is a permutation over ``B``, so featkd solves an assignment problem
      (``scipy.optimize.linear_sum_assignment``): the value of ``ot.emd``'s plan, 1.4x to 11x
      faster (``benchmarks/exact_ot.py``); where several plans are optimal it may pick another.
      ``max_iter`` runs POT's network simplex (``ot.emd``) with that cap instead.
    * ``solver="sinkhorn"``: entropic OT in torch, on the features' device, log-stabilised
      (each block of ``check_every`` iterations opens with an exact log-domain step, then runs
      cheap matrix-vector scaling steps on the current plan; batched over classes). Returns
      ``<gamma, C> + ε KL(gamma | a b^T)`` (the entropic objective, whose gradient is exactly
      the plan at convergence); ``last_parts["transport"]`` is ``<gamma, C>``, the value of
      POT's ``ot.sinkhorn2``. ``ε = reg * mean(C)`` by default (``reg=0.1``,
      ``relative_reg=True``), ``ε = reg`` otherwise. Stops when the L1 error of the row
      marginals is ``<= tol`` (``1e-3``), tested after each block (one host synchronisation
      per test, at most one per ``check_every`` iterations), or after ``max_iter`` (1000 if
      None) iterations (the defaults converge on standardised features, see docs/kd2m.md; the
      value is then within about ``tol * (max C - min C)`` of the converged one). A call that
      stops at ``max_iter`` above ``tol`` warns (:class:`SinkhornConvergenceWarning`; the
      module warns once per instance) and reports the error in
      ``last_parts["marginal_error"]``. ``tol=None`` runs exactly ``max_iter`` iterations,
      never synchronises and never warns. ``debias=True`` returns the Sinkhorn divergence
      ``OT(s,t) - OT(s,s)/2 - OT(t,t)/2``, zero for identical batches (solved together; the
      self-transport problems can need more iterations at small ``reg``).
    * ``solver="sliced"``: mean over ``n_projections`` random unit directions of the 1-D
      ``W_p^p`` of the projected batches (sorting); new directions on every call, drawn from
      ``seed`` when given (an integer seeds a fresh generator: the same directions on every
      call). About ``W_p^p / D`` in scale.

    The plan is held fixed and the gradient flows through the cost only. The teacher gets no
    gradient.

    Labels:
        * ``conditional=True``: the mean (``class_reduction="sum"``: the sum, as the official
          KD2M code) over the classes present in ``labels`` of the distance between that
          class's student and teacher rows (one host synchronisation to group). A class seen
          once contributes ``||s - t||^p``, the OT between its two points.
        * ``label_weight=beta > 0`` (emd, sinkhorn): the joint feature-label cost
          ``||s_i - t_j||^p + beta * l(y_i, y_j)``, student ``i`` against teacher ``j``; the
          label costs and ``feature_cost_scale`` are those of
          :func:`~featkd.kd2m.joint_wasserstein.joint_wasserstein_loss`.

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices, for ``conditional`` or the joint cost.
        solver: ``"emd"``, ``"sinkhorn"`` or ``"sliced"``.
        p: ground-cost power, ``>= 1``.
        reg: entropic regularisation (sinkhorn), relative to the mean cost by default.
        relative_reg: scale ``reg`` by the mean cost (per class when conditional).
        max_iter: iteration cap of the solver (emd: ``None`` solves the assignment problem,
            uncapped; an integer runs POT's network simplex with that cap, which may stop on a
            plan that is not optimal; sinkhorn: 1000).
        tol: sinkhorn's stopping tolerance on the row-marginal L1 error, or None (a fixed
            ``max_iter`` iterations).
        check_every: sinkhorn iterations between tolerance checks.
        debias: sinkhorn only: return the Sinkhorn divergence.
        n_projections: number of random directions (sliced).
        seed: the directions' randomness (sliced): an integer seed or a ``torch.Generator``,
            for reproducible draws; None draws from torch's global generator.
        conditional: average the distance over the classes in ``labels``.
        label_weight: weight ``beta`` of the label cost (joint feature-label OT); 0 disables it.
        label_cost: ``"sqeuclidean"``, ``"cross_entropy"``, ``"logits_sqeuclidean"`` or
            ``"kl_student_teacher"`` (the last two official KD2M).
        student_logits: the student's logits ``(B, K)`` for the joint cost (receive gradient).
        teacher_logits: the teacher's logits ``(B, K)`` for the joint cost.
        class_reduction: ``"mean"`` or ``"sum"`` (official KD2M) over the classes.
        num_classes: the number of classes, for ``conditional``: static shapes and no host
            synchronisation (see docs/reliability.md).
        feature_cost_scale: joint cost: ``"none"`` or ``"max"`` (official KD2M: the feature
            cost divided by its detached maximum).
        reduction: ``"mean"`` only (a batch-level distance, no per-sample values).
        generator: the former name of ``seed`` (deprecated; a ``FutureWarning``).

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
    seed = renamed("wasserstein_loss", "generator", "seed", generator, seed)
    check_options(
        *(solver, p, reg, relative_reg, max_iter, tol, check_every, n_projections),
        *(conditional, label_weight, label_cost, debias, class_reduction, feature_cost_scale),
        num_classes=num_classes,
    )
    check_reduction(reduction, batch_level=f"the Wasserstein distance {BATCH_LEVEL}")
    check_inputs(
        *(student, teacher, labels, student_logits, teacher_logits),
        *(conditional, label_weight, label_cost, num_classes),
    )
    loss, _ = evaluate(
        wasserstein_terms,
        student,
        teacher,
        labels,
        student_logits,
        teacher_logits,
        solver=solver,
        p=p,
        reg=reg,
        relative_reg=relative_reg,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        debias=debias,
        n_projections=n_projections,
        generator=seeded_generator(seed, "seed"),
        conditional=conditional,
        label_weight=label_weight,
        label_cost_kind=label_cost,
        on_unconverged=lambda error: _warn_unconverged(error, max_iter, tol),
        class_reduction=class_reduction,
        num_classes=num_classes,
        feature_cost_scale=feature_cost_scale,
    )
    return loss


class WassersteinLoss(GeneratorState, MatchingLoss):
    """Empirical Wasserstein distance between the feature batches (KD2M); see
    :func:`wasserstein_loss` for the maths, solvers and the class-conditional and joint
    variants.

    Note:
        With a ``projector`` (for example ``torch.nn.Linear(D_s, D_t)`` when the widths
        differ) the module owns parameters: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        solver: ``"emd"`` (exact, on the host), ``"sinkhorn"`` (entropic, torch) or ``"sliced"``.
        p: ground-cost power; the loss is ``W_p^p``.
        reg: entropic regularisation (sinkhorn), relative to the mean cost by default.
        relative_reg: scale ``reg`` by the mean cost.
        max_iter: solver iteration cap (None: solver default).
        tol: sinkhorn stopping tolerance (row-marginal L1 error), None for a fixed count;
            stopping at ``max_iter`` above it warns once per instance.
        check_every: sinkhorn iterations between tolerance checks.
        debias: sinkhorn only: the Sinkhorn divergence (zero for identical batches).
        n_projections: random directions (sliced).
        seed: sliced: an integer seeds the module's own CPU generator, a ``torch.Generator``
            is used as given, None draws from torch's global generator.
        conditional: mean over the classes in ``labels`` of the per-class distance.
        label_weight: weight of the label cost in the joint feature-label cost (0: off).
        label_cost: see :func:`wasserstein_loss`.
        class_reduction: ``"mean"`` or ``"sum"`` (official KD2M) over the classes.
        num_classes: the number of classes, for ``conditional`` without a host sync.
        feature_cost_scale: joint cost: ``"none"`` or ``"max"`` (official KD2M).
        projector: optional module applied to the student first (owned and trained).

    Shape:
        - student: ``(B, D_s)`` (``(B, D)`` without a projector)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    ``last_parts`` holds ``"total"``, ``"wasserstein"`` (equal: one term) and, by solver and
    variant, ``"transport"``, ``"entropy"``, ``"reg"`` (the ``ε`` used), ``"iterations"``,
    ``"marginal_error"`` (L1 error of the plan's marginals), ``"feature_cost"`` (after
    ``feature_cost_scale``), ``"label_cost"`` and ``"classes"``.

    Checkpoints: ``state_dict()`` holds the position of the module's own generator (``seed=``
    given), so a resumed run continues the sliced directions; with ``seed=None`` they come
    from torch's global generator, saved by ``torch.get_rng_state()`` as for dropout; a
    seeded module's state cannot load into a ``seed=None`` one (docs/kd2m.md).

    Example:
        >>> loss_fn = WassersteinLoss(solver="sinkhorn", conditional=True)
        >>> s, t = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16)
        >>> labels = torch.randint(0, 4, (32,))
        >>> loss_fn(s, t, labels=labels).backward()
        >>> {"classes", "entropy", "iterations"} <= set(loss_fn.last_parts)
        True
    """

    random_draws = "sliced directions"

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
        class_reduction: str = "mean",
        num_classes: int | None = None,
        feature_cost_scale: str = "none",
        projector: torch.nn.Module | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(projector)
        check_options(
            *(solver, p, reg, relative_reg, max_iter, tol, check_every, n_projections),
            *(conditional, label_weight, label_cost, debias, class_reduction, feature_cost_scale),
            num_classes=num_classes,
        )
        self.reduction = check_reduction(
            reduction, batch_level=f"the Wasserstein distance {BATCH_LEVEL}"
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
        self.class_reduction = class_reduction
        self.num_classes = num_classes
        self.feature_cost_scale = feature_cost_scale
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
        """``W_p^p`` between the (projected) student batch and the teacher batch; the
        arguments are those of :func:`wasserstein_loss` (teacher detached inside, labels for
        the conditional or joint variants, logits ``(B, K)`` for the joint cost)."""
        return self._match(
            student, teacher, labels, student_logits=student_logits, teacher_logits=teacher_logits
        )

    def _check(self, student, teacher, labels, student_logits=None, teacher_logits=None):
        return check_inputs(
            *(student, teacher, labels, student_logits, teacher_logits),
            *(self.conditional, self.label_weight, self.label_cost, self.num_classes),
        )

    def _terms(self, student, teacher, labels, student_logits=None, teacher_logits=None):
        return wasserstein_terms(
            student,
            teacher,
            labels,
            student_logits,
            teacher_logits,
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
            on_unconverged=self._unconverged,
            class_reduction=self.class_reduction,
            num_classes=self.num_classes,
            feature_cost_scale=self.feature_cost_scale,
        )

    def _unconverged(self, error: float) -> None:
        if not self._warned_unconverged:  # once per instance
            self._warned_unconverged = True
            _warn_unconverged(error, self.max_iter, self.tol)

    def extra_repr(self) -> str:
        text = f"solver={self.solver!r}, p={self.p}"
        if self.solver == "sinkhorn":
            text += f", reg={self.reg}, relative_reg={self.relative_reg}, debias={self.debias}"
        if self.solver == "sliced":
            text += f", n_projections={self.n_projections}, seed={self.seed}"
        if self.conditional:
            text += f", conditional=True, class_reduction={self.class_reduction!r}"
            if self.num_classes is not None:
                text += f", num_classes={self.num_classes}"
        if self.label_weight > 0:
            text += f", label_weight={self.label_weight}, label_cost={self.label_cost!r}"
        if self.feature_cost_scale != "none":
            text += f", feature_cost_scale={self.feature_cost_scale!r}"
        return text
