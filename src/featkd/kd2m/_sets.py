"""The two batches as sets: the input checks and the class groups of every KD2M loss.

Every KD2M loss compares two *sets* of feature vectors. The maths works on groups: a tensor
``(G, n, D)`` of ``G`` sets of at most ``n`` vectors, zero-padded, with a boolean ``mask``
``(G, n)`` marking the real rows and the true sizes ``counts`` ``(G,)``. The whole batch is one
group; the class-conditional variants put one class per group, so every class is handled by the
same batched code instead of a Python loop.

Axis legend: ``G`` groups (classes), ``n`` samples per group (padded), ``D`` feature width.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from featkd._checks import (
    ChoiceError,
    FeatkdInputError,
    ShapeError,
    check_label_range,
    check_labels,
    check_min_batch,
    check_same_batch,
    check_same_device,
    check_width,
    describe_shape,
    labels_outside,
    validate_features,
)
from featkd._options import check_choice, check_int
from featkd._sync import device_constant

__all__ = [
    "CLASS_REDUCTIONS",
    "FEATURES",
    "Groups",
    "check_class_reduction",
    "check_joint_inputs",
    "make_groups",
    "matmul_nt",
    "validate_pair",
]

FEATURES = {2: "(B, D)"}
#: How the class-conditional losses combine the per-class values: featkd's mean, or the
#: official KD2M code's sum over the classes present (METHODS.md section 5).
CLASS_REDUCTIONS = ("mean", "sum")


def check_class_reduction(
    class_reduction: str, conditional: bool, num_classes: int | None = None
) -> None:
    """``class_reduction`` is ``"mean"`` or ``"sum"``, and ``"sum"`` only with ``conditional``
    (without classes there is one group, and a sum that changed nothing would hide the
    missing ``conditional=True``); ``num_classes`` is None or a positive int, given only with
    ``conditional`` too."""
    check_choice(class_reduction, "class_reduction", CLASS_REDUCTIONS)
    if num_classes is not None:
        check_int(num_classes, "num_classes", minimum=1)
        if not conditional:
            raise ChoiceError(
                f"num_classes: {num_classes} sizes the class groups of conditional=True, got "
                "it with conditional=False; pass conditional=True (and labels=) or leave "
                "num_classes=None"
            )
    if class_reduction != "mean" and not conditional:
        raise ChoiceError(
            f"class_reduction: {class_reduction!r} combines the per-class values of "
            "conditional=True, got it with conditional=False; pass conditional=True (and "
            "labels=) or leave class_reduction='mean'"
        )


def validate_pair(
    student: Any,
    teacher: Any,
    labels: Any,
    conditional: bool,
    *,
    batch_statistic: str | None = None,
    num_classes: int | None = None,
) -> int | None:
    """The front door of every KD2M loss: two finite float ``(B, D)`` tensors of one batch size,
    width and device, and integer labels ``(B,)`` when given (needed with ``conditional``),
    below ``num_classes`` when given. ``batch_statistic`` says why the loss needs two
    samples: then ``B >= 2`` unless ``conditional`` (a class seen once has its own closed
    form). Returns the bound the labels must respect (``num_classes``), ``None`` without labels
    or bound: for :func:`featkd._checks.count_bad_labels` where the range is not read."""
    validate_features(student, "student", FEATURES)
    validate_features(teacher, "teacher", FEATURES)
    check_same_batch(student, teacher, "student", "teacher")
    check_width(
        teacher,
        "teacher",
        student.shape[1],
        hint="D is the student's width: when the widths differ, give the module a "
        "projector=, e.g. torch.nn.Linear(D_s, D_t)",
    )
    check_same_device({"student": student, "teacher": teacher})
    batch = student.shape[0]
    if batch_statistic is not None and not conditional:
        check_min_batch(student, "student", 2, batch_statistic)
    if labels is None:
        if conditional:
            raise FeatkdInputError(
                f"labels: expected class indices of shape ({batch},) because "
                "conditional=True matches the classes one by one, got None"
            )
        return None
    check_labels(labels, batch)
    check_same_device({"student": student, "labels": labels})
    if num_classes is not None:
        check_label_range(labels, num_classes, "num_classes")
    return num_classes


def matmul_nt(
    a: torch.Tensor, b: torch.Tensor, *, add: torch.Tensor | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """``a @ b^T`` over the last two axes, or ``add + alpha a @ b^T`` in one kernel; a single
    group goes through a plain 2-D product, which avoids the batched-GEMM overhead of the
    common unconditional case on CPU."""
    if a.ndim == 3 and a.shape[0] == 1 and b.shape[0] == 1:
        return matmul_nt(a[0], b[0], add=None if add is None else add[0], alpha=alpha)[None]
    if add is None:
        return a @ b.mT
    if a.ndim == 2:
        return torch.addmm(add, a, b.mT, alpha=alpha)
    return torch.baddbmm(add, a, b.mT, alpha=alpha)


class Groups(NamedTuple):
    """Student and teacher sets, zero-padded to ``(G, n, D)``."""

    student: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor | None  # (G, n) bool; None when every row is real
    counts: torch.Tensor  # (G,) in the working dtype, >= 1
    # (G,) 1.0 for a class in the batch, 0.0 for a spare group of a static grouping (its one
    # row is the zero vector on both sides, so its distance is zero); None when all are real
    present: torch.Tensor | None = None

    def number(self) -> torch.Tensor:
        """The number of real groups, a float tensor on the device (no host read)."""
        if self.present is None:
            return self.counts.new_full((), float(self.counts.shape[0]))
        return self.present.sum()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of per-group values ``(G,)`` over the real groups."""
        if self.present is None:
            return values.mean()
        return (values * self.present).sum() / self.present.sum().clamp_min(1)

    def reduce(self, values: torch.Tensor, class_reduction: str) -> torch.Tensor:
        """The per-group values ``(G,)`` combined: their mean (featkd) or sum (official KD2M)
        over the real groups."""
        if class_reduction == "sum":
            return values.sum() if self.present is None else (values * self.present).sum()
        return self.mean(values)


def _sorted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows sorted by label ``order``, each sorted row's label, its dense class number
    ``group`` (0, 1, ... in label order) and its ``position`` in its class; all on the
    device."""
    order = torch.argsort(labels, stable=True)
    ordered = labels[order]
    first = torch.cat([ordered.new_ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
    group = torch.cumsum(first.long(), 0) - 1
    rows = torch.arange(labels.shape[0], device=labels.device)
    start = torch.cummax(torch.where(first, rows, 0), 0).values
    return order, ordered, group, rows - start


def make_groups(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    conditional: bool,
    num_classes: int | None = None,
) -> Groups:
    """One group for the whole batch, or one group per class present in ``labels``.

    Without ``num_classes`` the shapes are the true ones (``G`` classes present, ``n`` the
    largest class), which costs one host synchronisation per call. With it the shapes are
    static, ``G = min(num_classes, B)`` and ``n = B``: no synchronisation, and the groups of
    absent classes are spare (``present`` 0). Student row ``i`` and teacher row ``i`` share
    label ``i``, so a class has the same number of samples on both sides.
    """
    batch = student.shape[0]
    if not conditional:
        counts = device_constant(
            ("batch count", batch),
            student,
            lambda: torch.full((1,), float(batch), dtype=student.dtype, device=student.device),
        )
        return Groups(student[None], teacher[None], None, counts)
    labels = labels.long()  # one dtype for the keys below (no copy for int64 labels)
    if num_classes is not None:
        # a label out of range (counted, not read, on accelerators) is keyed past every class:
        # it sorts last, and its rows go to the discarded slot instead of taking a class's
        labels = torch.where(labels_outside(labels, num_classes), num_classes, labels)
    order, ordered, group, position = _sorted_positions(labels)
    if num_classes is None:
        n_groups, longest = torch.stack([group[-1] + 1, position.max() + 1]).tolist()
    else:  # at most min(num_classes, B) classes in range: the slot n_groups is the discard
        n_groups, longest = min(num_classes, batch), batch
        group = torch.where(ordered == num_classes, n_groups, group)
    index = torch.zeros(n_groups + 1, longest, dtype=torch.long, device=labels.device)
    mask = torch.zeros(n_groups + 1, longest, dtype=torch.bool, device=labels.device)
    index[group, position] = order
    mask[group, position] = torch.ones_like(group, dtype=torch.bool)  # not True: a host tensor
    index, mask = index[:n_groups], mask[:n_groups]
    keep = mask[..., None].to(student.dtype)
    sets = (student[index] * keep, teacher[index] * keep)
    counts = mask.sum(dim=-1).to(student.dtype)
    if num_classes is None:
        return Groups(*sets, mask, counts)
    present = (counts > 0).to(student.dtype)
    # a spare group holds one zero row on each side: finite statistics, zero distance, and
    # no gradient to any input (the row is the gathered row 0 times zero)
    mask = mask.index_fill(-1, torch.zeros(1, dtype=torch.long, device=mask.device), True)
    return Groups(*sets, mask, counts.clamp_min(1), present)


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


def check_joint_inputs(
    student: torch.Tensor,
    labels: torch.Tensor | None,
    student_logits: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    kind: str,
) -> int | None:
    """The inputs of the joint feature-label cost: logits ``(B, K)`` of one width, and
    ``labels`` for any side without logits (class indices below ``K``). Returns ``K`` when
    the labels must be below it (one side one-hot, the other logits), else ``None``."""
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
    if kind in ("logits_sqeuclidean", "kl_student_teacher"):
        for name, logits in (
            ("student_logits", student_logits),
            ("teacher_logits", teacher_logits),
        ):
            if logits is None:
                raise FeatkdInputError(
                    f"{name}: label_cost={kind!r} compares the student's and the teacher's "
                    f"logits, expected a ({student.shape[0]}, K) tensor, got None"
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
        check_label_range(labels, classes, "the width of the logits")
        return classes
    return None
