"""Joint feature-label Wasserstein distance (KD2M eq. 4): OT on (feature, label) pairs.

The cost between student pair ``(s_i, y_i)`` and teacher pair ``(t_j, y_j)`` is
``||s_i - t_j||^p + beta * l(y_i, y_j)``: student against teacher on both parts (the official
KD2M code compares the student's features with themselves here, which is a bug).
"""

from __future__ import annotations

from typing import Any

import torch

from featkd._checks import ChoiceError
from featkd._options import check_positive
from featkd.kd2m.wasserstein import WassersteinLoss, wasserstein_loss

__all__ = ["JointWassersteinLoss", "joint_wasserstein_loss"]


def joint_wasserstein_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    label_weight: float = 1.0,
    label_cost: str = "sqeuclidean",
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    feature_cost_scale: str = "none",
    solver: str = "emd",
    reduction: str = "mean",
    **options: Any,
) -> torch.Tensor:
    """OT between the joint (feature, label) distributions of student and teacher.

    The same loss as :func:`featkd.functional.wasserstein_loss` with ``label_weight > 0``:
    cost ``C_ij = ||s_i - t_j||^p + beta * l(y_i, y_j)``, plan by ``solver`` (``"emd"`` or
    ``"sinkhorn"``) held fixed, gradient through the cost (into the student features and,
    when given, the student logits). A side's label ``y`` is the softmax of its logits when
    given, else the one-hot of ``labels``, so the usual call is ``labels`` alone (the same
    labels on both sides: cost ``||s_i - t_j||^2 + 2 beta [y_i != y_j]``) or
    ``student_logits``/``teacher_logits`` to match predictions too.

    The official KD2M cost (METHODS.md section 5) is ``label_cost="logits_sqeuclidean"``
    (``||z_s,i - z_t,j||^2`` between the raw logits ``z``) or ``"kl_student_teacher"``
    (``KL(p_s,i || p_t,j)`` of the softmaxes; ``"cross_entropy"`` is the other direction,
    ``KL(y_j || p_s,i)`` plus the teacher's entropy), both needing the two logits, with
    ``feature_cost_scale="max"``: the feature part divided by its own detached maximum (1 when
    that maximum is 0).

    Args:
        student: student features.
        teacher: teacher features (detached inside).
        labels: class indices (needed unless both logits are given).
        label_weight: ``beta > 0``, the weight of the label cost.
        label_cost: ``"sqeuclidean"`` (``||y_i - y_j||^2``), ``"cross_entropy"``
            (``-sum_k y_jk log softmax(student_logits_i)_k``; needs ``student_logits``),
            ``"logits_sqeuclidean"`` or ``"kl_student_teacher"`` (official KD2M; both need
            both logits).
        student_logits: the student's logits (receive gradient).
        teacher_logits: the teacher's logits (detached).
        feature_cost_scale: ``"none"`` (default) or ``"max"`` (official KD2M: the feature
            cost divided by its detached maximum).
        solver: ``"emd"`` or ``"sinkhorn"``.
        reduction: ``"mean"`` only (a batch-level distance).
        **options: further options of :func:`featkd.functional.wasserstein_loss` (``p``,
            ``reg``, ``tol``, ...).

    Shape:
        - student: ``(B, D)``
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer
        - student_logits, teacher_logits: ``(B, K)``
        - output: scalar

    Example:
        >>> s, t = torch.randn(16, 8), torch.randn(16, 8)
        >>> labels = torch.randint(0, 3, (16,))
        >>> joint = joint_wasserstein_loss(s, t, labels=labels, label_weight=10.0)
        >>> bool(joint >= wasserstein_loss(s, t))
        True
    """
    check_positive(label_weight, "label_weight")
    return wasserstein_loss(
        student,
        teacher,
        labels=labels,
        solver=solver,
        label_weight=label_weight,
        label_cost=label_cost,
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        feature_cost_scale=feature_cost_scale,
        reduction=reduction,
        **options,
    )


class JointWassersteinLoss(WassersteinLoss):
    """Joint feature-label Wasserstein loss; see :func:`joint_wasserstein_loss`.

    A :class:`WassersteinLoss` whose ``label_weight`` must be positive. Call it with
    ``labels=`` and optionally ``student_logits=``/``teacher_logits=``.

    Note:
        With a ``projector`` the module owns parameters: add ``loss_fn.parameters()`` to the
        optimiser.

    Args:
        label_weight: ``beta > 0``, the weight of the label cost.
        label_cost: ``"sqeuclidean"``, ``"cross_entropy"``, ``"logits_sqeuclidean"`` or
            ``"kl_student_teacher"`` (see :func:`joint_wasserstein_loss`).
        feature_cost_scale: ``"none"`` or ``"max"`` (official KD2M).
        solver: ``"emd"`` or ``"sinkhorn"``.
        **options: further options of :class:`WassersteinLoss` (``p``, ``reg``, ``projector``,
            ...).

    Shape:
        - student: ``(B, D_s)``
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer
        - output: scalar

    Example:
        >>> loss_fn = JointWassersteinLoss(label_weight=1.0)
        >>> s, t = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        >>> loss_fn(s, t, labels=torch.randint(0, 3, (16,))).backward()
        >>> list(loss_fn.last_parts)
        ['total', 'wasserstein', 'feature_cost', 'label_cost']
    """

    def __init__(
        self,
        label_weight: float = 1.0,
        *,
        label_cost: str = "sqeuclidean",
        feature_cost_scale: str = "none",
        solver: str = "emd",
        **options: Any,
    ) -> None:
        check_positive(label_weight, "label_weight")
        if solver == "sliced":
            raise ChoiceError(
                "solver: the joint feature-label cost needs a cost matrix, expected 'emd' or "
                "'sinkhorn', got 'sliced'"
            )
        super().__init__(
            solver,
            label_weight=label_weight,
            label_cost=label_cost,
            feature_cost_scale=feature_cost_scale,
            **options,
        )
