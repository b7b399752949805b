"""The base of the KD2M loss modules: a batch-level loss with an optional owned projector."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featkd._checks import (
    FeatkdInputError,
    check_floating,
    check_rank,
    check_same_device,
    check_width,
    count_bad_labels,
)
from featkd._loss import DistillationLoss, evaluate
from featkd.kd2m._sets import FEATURES

__all__ = ["BATCH_LEVEL", "MatchingLoss"]

#: Why no KD2M loss has a per-sample form (the ``reduction`` error says it).
BATCH_LEVEL = "compares the two batches as distributions"


class MatchingLoss(DistillationLoss):
    """Base of the KD2M modules: the owned ``projector`` of the student and the common call.

    ``forward`` projects the student (outside the precision fence: the projector is the user's
    layer and follows autocast), checks the inputs once, then evaluates the core. A subclass's
    ``_check`` returns the bound class labels must respect (``None`` where none applies):
    where the value-check policy does not read the labels, ``last_parts`` ends with
    ``"labels_out_of_range"``, their device-side count beyond it.
    """

    def __init__(self, projector: nn.Module | None = None) -> None:
        super().__init__()
        if projector is not None and not isinstance(projector, nn.Module):
            raise FeatkdInputError(
                f"projector: expected a torch.nn.Module or None, got {type(projector).__name__}"
            )
        self.projector = projector

    def project(self, student: torch.Tensor) -> torch.Tensor:
        """Map the student into the teacher's width with the owned projector, if any.

        The projector runs in its parameters' dtype (a float32 projector takes float16
        features) and hands back the student's dtype. Its input width (``in_features``, when
        it has one) and device are checked here, so a mismatch is reported as the student's;
        finiteness is checked once, on the projected features.
        """
        if self.projector is None:
            return student
        check_rank(student, "student", FEATURES)
        check_floating(student, "student")
        width = getattr(self.projector, "in_features", None)
        if isinstance(width, int):
            check_width(student, "student", width, "D_s")
        param = next(self.projector.parameters(), None)
        if param is None or not param.is_floating_point():
            return self.projector(student)
        check_same_device({"projector": param, "student": student})
        return self.projector(student.to(param.dtype)).to(student.dtype)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._match(student, teacher, labels)

    def _match(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        **inputs: Any,
    ) -> torch.Tensor:
        self._guard(student, teacher)
        projected = self.project(student)
        limit = self._check(projected, teacher, labels, **inputs)
        loss, self.last_parts = evaluate(self._terms, projected, teacher, labels, **inputs)
        bad_labels = count_bad_labels(labels, limit)
        if bad_labels is not None:  # the range check was deferred to the device
            self.last_parts["labels_out_of_range"] = bad_labels
        return loss
