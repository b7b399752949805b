"""The empirical Wasserstein loss without its front door: the option checks and the unchecked
core shared by :func:`featkd.functional.wasserstein_loss` and ``WassersteinLoss``.

Axis legend: ``B`` batch, ``D`` width, ``G`` groups (classes), ``n`` samples per group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from featkd._checks import ChoiceError, FeatkdInputError
from featkd._loss import Terms
from featkd._options import check_bool, check_choice, check_int, check_number, check_positive
from featkd.kd2m._exact import exact_transport_costs
from featkd.kd2m._sets import (
    check_class_reduction,
    check_joint_inputs,
    make_groups,
    validate_pair,
)
from featkd.kd2m._transport import (
    entropic_transport,
    ground_cost,
    label_cost,
    sliced_wasserstein,
)

__all__ = [
    "FEATURE_COST_SCALES",
    "LABEL_COSTS",
    "SINKHORN_MAX_ITER",
    "SOLVERS",
    "check_inputs",
    "check_options",
    "wasserstein_terms",
]

SOLVERS = ("emd", "sinkhorn", "sliced")
# the last two are the official KD2M label costs (METHODS.md section 5), both on logits
LABEL_COSTS = ("sqeuclidean", "cross_entropy", "logits_sqeuclidean", "kl_student_teacher")
FEATURE_COST_SCALES = ("none", "max")
SINKHORN_MAX_ITER = 1000


def check_options(
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
    class_reduction: str = "mean",
    feature_cost_scale: str = "none",
    *,
    num_classes: int | None = None,
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
    check_class_reduction(class_reduction, conditional, num_classes)
    check_choice(feature_cost_scale, "feature_cost_scale", FEATURE_COST_SCALES)
    if feature_cost_scale != "none" and not label_weight > 0:
        raise ChoiceError(
            f"feature_cost_scale: {feature_cost_scale!r} scales the feature part of the joint "
            "feature-label cost, expected label_weight > 0 (or 'none'), got label_weight="
            f"{label_weight!r}"
        )
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


def check_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    student_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    conditional: bool,
    label_weight: float,
    label_cost: str,
    num_classes: int | None = None,
) -> int | None:
    """The features (and, for the joint cost, labels and logits), checked once; the bound the
    labels must respect (``num_classes``, the logits' width), ``None`` where none applies."""
    limit = validate_pair(student, teacher, labels, conditional, num_classes=num_classes)
    if label_weight > 0:
        classes = check_joint_inputs(student, labels, student_logits, teacher_logits, label_cost)
        return limit if classes is None else min(classes, limit or classes)
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if logits is not None:
            raise FeatkdInputError(
                f"{name}: only the joint feature-label cost uses logits, and label_weight is 0; "
                "pass label_weight > 0 (or JointWassersteinLoss) to use them, or drop them"
            )
    return limit


def wasserstein_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    *,
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
    on_unconverged: Callable[[float], None],
    class_reduction: str = "mean",
    feature_cost_scale: str = "none",
    num_classes: int | None = None,
) -> Terms:
    """Unchecked core (inputs in the working dtype): the batch-level ``"wasserstein"`` term and
    the solver's diagnostics. ``on_unconverged(error)`` is called when Sinkhorn stops at
    ``max_iter`` with the marginal error above ``tol``."""
    if labels is not None:  # one_hot and indexing want int64; any integer dtype is accepted
        labels = labels.long()
    target = teacher.detach()
    shift = target.mean(dim=0)  # a common shift keeps the Gram expansion of C accurate
    groups = make_groups(student - shift, target - shift, labels, conditional, num_classes)
    diagnostics: dict[str, torch.Tensor] = {}
    if solver == "sliced":
        per_group = sliced_wasserstein(
            *(groups.student, groups.teacher, groups.mask, groups.counts),
            p,
            n_projections,
            generator,
        )
    else:
        cost = ground_cost(groups.student, groups.teacher, p)
        if label_weight > 0:
            if feature_cost_scale == "max":  # official KD2M: C / sg(max C)
                top = cost.detach().amax(dim=(-2, -1), keepdim=True)
                cost = cost / torch.where(top > 0, top, 1.0)
            labels_part = label_cost(
                labels, student_logits, teacher_logits, label_cost_kind, student.dtype
            )
            diagnostics["feature_cost"] = cost.detach().mean()
            diagnostics["label_cost"] = labels_part.mean()
            cost = cost + label_weight * labels_part[None]
        if solver == "emd":
            per_group = exact_transport_costs(cost, groups.mask, groups.counts, max_iter)
        else:
            self_costs = None
            if debias:
                self_costs = (
                    ground_cost(groups.student, groups.student, p),
                    ground_cost(groups.teacher, groups.teacher, p),
                )
            per_group, entropic_parts, unconverged = entropic_transport(
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
            diagnostics.update(entropic_parts)
            if unconverged is not None:
                on_unconverged(unconverged)
    if conditional:
        diagnostics["classes"] = groups.number()
    if class_reduction == "sum":  # the entropic parts are means over the classes
        for key in ("transport", "entropy"):
            if key in diagnostics:
                diagnostics[key] = diagnostics[key] * groups.number()
    return Terms({"wasserstein": groups.reduce(per_group, class_reduction)}, diagnostics)
