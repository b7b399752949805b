"""Checks of FCFD's inputs: the two lists of stage outputs of one batch (and the bridges they
meet), validated once per call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from featkd._checks import (
    FeatkdInputError,
    ShapeError,
    check_finite,
    check_floating,
    check_same_device,
    deferred_value_checks,
    describe_shape,
)

__all__ = ["check_feature_list", "check_stage_outputs"]


def check_feature_list(
    feats: Any, name: str, count: int, expected: Sequence[tuple[int, ...]] | None = None
) -> None:
    """``feats`` is a list of ``count`` floating ``(B, ...)`` tensors of one batch size, each of
    the shape ``expected[i]`` (without the batch axis) when given."""
    if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)):
        raise FeatkdInputError(
            f"{name}: expected a list of {count} stage outputs (the last the logits), "
            f"got {type(feats).__name__}"
        )
    if len(feats) != count:
        raise ShapeError(
            f"{name}: expected {count} stage outputs (one per stage, the last the "
            f"logits), got {len(feats)}"
        )
    for i, x in enumerate(feats):
        item = f"{name}[{i}]"
        if not isinstance(x, torch.Tensor):
            raise FeatkdInputError(f"{item}: expected a torch.Tensor, got {type(x).__name__}")
        check_floating(x, item)
        if x.ndim < 2 or x.numel() == 0:
            raise ShapeError(
                f"{item}: expected a batched stage output (B, ...), got {describe_shape(x.shape)}"
            )
        if expected is not None and tuple(x.shape[1:]) != tuple(expected[i]):
            want = "(B, " + ", ".join(str(d) for d in expected[i]) + ")"
            raise ShapeError(
                f"{item}: expected {want} (the shape probed at construction), "
                f"got {describe_shape(x.shape)}"
            )
    batch = feats[0].shape[0]
    for i, x in enumerate(feats):
        if x.shape[0] != batch:
            raise ShapeError(
                f"{name}[{i}]: expected batch size {batch} (the batch of {name}[0]), "
                f"got {x.shape[0]} (shape {describe_shape(x.shape)})"
            )


def check_stage_outputs(
    student: Any,
    teacher: Any,
    count: int,
    bridge_param: torch.Tensor | None,
    expected: tuple[Sequence[tuple[int, ...]], Sequence[tuple[int, ...]]] | None = None,
) -> None:
    """Both lists (see :func:`check_feature_list`), one batch size, logits ``(B, K)`` of one
    width, one device (the bridges' too), finite values (one host synchronisation)."""
    check_feature_list(student, "student", count, None if expected is None else expected[0])
    check_feature_list(teacher, "teacher", count, None if expected is None else expected[1])
    if teacher[0].shape[0] != student[0].shape[0]:
        raise ShapeError(
            f"teacher: expected batch size {student[0].shape[0]} (the batch of student), "
            f"got {teacher[0].shape[0]}"
        )
    if expected is None:
        for name, logits in (("student", student[-1]), ("teacher", teacher[-1])):
            if logits.ndim != 2:
                raise ShapeError(
                    f"{name}[{count - 1}]: expected logits (B, num_classes), "
                    f"got {describe_shape(logits.shape)}"
                )
        if teacher[-1].shape[1] != student[-1].shape[1]:
            raise ShapeError(
                f"teacher[{count - 1}]: expected logits of width {student[-1].shape[1]} (the "
                f"student's), got {describe_shape(teacher[-1].shape)}"
            )
    tensors = {} if bridge_param is None else {"bridges (fcfd.parameters())": bridge_param}
    tensors.update({f"student[{i}]": x for i, x in enumerate(student)})
    tensors.update({f"teacher[{i}]": x for i, x in enumerate(teacher)})
    check_same_device(tensors)
    if not deferred_value_checks(student[0]):
        # one host synchronisation for all 2K tensors; locate the culprit only on failure
        flags = torch.stack([torch.isfinite(x.detach()).all() for x in (*student, *teacher)])
        if not bool(flags.all()):
            for i, x in enumerate(student):
                check_finite(x, f"student[{i}]")
            for i, x in enumerate(teacher):
                check_finite(x, f"teacher[{i}]")
