"""A population of past batches for the batch-level losses: a FIFO queue of features.

A batch-level loss compares the student's and the teacher's batches as distributions. At a
small batch its statistics are poor: a ``D``-dimensional covariance fitted to ``B < D`` samples
is rank-deficient, so a Gaussian W2 or KL sees at most ``B - 1`` directions of a 384-d teacher.
:class:`FeatureQueue` keeps the detached student and teacher features (and labels) of the last
``K`` batches and hands the wrapped loss the current batch followed by that population, so the
loss's statistics come from ``(K + 1) B`` samples while the gradient flows through the current
batch only (as MoCo's queue of keys; the queued student features come from earlier parameters).

Axis legend: ``B`` batch, ``D_s``/``D_t`` student/teacher width, ``Q`` queued rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from featkd._checks import (
    FeatkdInputError,
    ShapeError,
    check_labels,
    check_same_batch,
    describe_shape,
)
from featkd._options import check_int

__all__ = ["FeatureQueue"]

_QUEUES = ("student_queue", "teacher_queue", "label_queue")


class FeatureQueue(nn.Module):
    """Wrap a batch-level loss so that it sees the last ``batches`` batches too.

    Each call concatenates the current ``student`` (with its gradient) and ``teacher`` with
    the queued rows (detached) and calls ``loss_fn`` on that population, then pushes the
    current rows into the queue, dropping the oldest. The queue holds raw student features: a
    projector inside ``loss_fn`` maps the whole population with its current weights. Memory
    is fixed: ``batches`` times the first training batch's size rows, allocated then (the
    queue's buffers, saved in ``state_dict`` with the write position). While the queue fills,
    the population is the batches seen so far. Calls under ``torch.no_grad()`` or in eval mode
    read the queue without pushing (evaluation does not pollute it).

    Under ``torch.distributed``, put the queue inside :class:`~featkd.GlobalBatch`
    (``GlobalBatch(FeatureQueue(loss))``) so that it queues the global batch.

    Args:
        loss_fn: a loss ``loss_fn(student, teacher, *, labels=None)`` over the batch (a KD2M
            loss, MMD, ...). Its parameters are this module's.
        batches: the number of past batches ``K`` kept.

    Shape:
        - student: ``(B, D_s)``
        - teacher: ``(B, D_t)``
        - labels: ``(B,)`` integer, optional (kept in the queue with the features)
        - output: the wrapped loss's on ``(B + Q)`` rows

    ``last_parts``: the wrapped loss's, plus ``"population"`` (the rows it saw).

    Example:
        >>> import featkd
        >>> queue = FeatureQueue(featkd.GaussianWassersteinLoss(), batches=4)
        >>> for _ in range(6):
        ...     s = torch.randn(16, 8, requires_grad=True)
        ...     loss = queue(s, torch.randn(16, 8))
        >>> int(queue.last_parts["population"])  # the current batch and 4 queued ones
        80
        >>> loss.backward()
        >>> s.grad.shape
        torch.Size([16, 8])
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], *, batches: int) -> None:
        super().__init__()
        if not callable(loss_fn):
            raise FeatkdInputError(
                "loss_fn: expected a callable loss(student, teacher, *, labels=None), "
                f"got {type(loss_fn).__name__}"
            )
        self.loss_fn = loss_fn
        self.batches = check_int(batches, "batches", minimum=1)
        for name in _QUEUES:  # allocated on the first call, when the widths are known
            self.register_buffer(name, torch.zeros(0))
        self._pointer = 0  # where the next row goes (host ints: no device read per call)
        self._filled = 0
        self._last_parts: dict[str, torch.Tensor] = {}

    @property
    def last_parts(self) -> dict[str, torch.Tensor]:
        """The wrapped loss's ``last_parts`` on the population, and ``"population"``."""
        return self._last_parts

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check(student, teacher, labels)
        population_s, population_t, population_l = student, teacher.detach(), labels
        if self._filled > 0:
            rows = slice(0, self._filled)
            population_s = torch.cat([student, self.student_queue[rows]])
            population_t = torch.cat([population_t, self.teacher_queue[rows]])
            if labels is not None:
                population_l = torch.cat([labels, self.label_queue[rows].to(labels.dtype)])
        loss = self.loss_fn(population_s, population_t, labels=population_l)
        parts = dict(getattr(self.loss_fn, "last_parts", {}))
        parts["population"] = population_s.new_full((), float(population_s.shape[0])).detach()
        self._last_parts = parts
        if self.training and torch.is_grad_enabled():
            self._push(student, teacher, labels)
        return loss

    def _check(self, student: Any, teacher: Any, labels: Any) -> None:
        for name, x in (("student", student), ("teacher", teacher)):
            if not isinstance(x, torch.Tensor) or x.ndim != 2:
                shape = describe_shape(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ShapeError(f"{name}: expected (B, D) features for the queue, got {shape}")
        check_same_batch(student, teacher, "student", "teacher")
        if labels is not None:
            check_labels(labels, student.shape[0])
        if self.student_queue.numel() == 0:
            return
        for name, x, queued in (
            ("student", student, self.student_queue),
            ("teacher", teacher, self.teacher_queue),
        ):
            if x.shape[1] != queued.shape[1]:
                raise ShapeError(
                    f"{name}: expected width {queued.shape[1]} (the queued features'), got "
                    f"{x.shape[1]}"
                )
        if (labels is None) != (self.label_queue.numel() == 0):
            raise FeatkdInputError(
                "labels: the queue was started "
                + ("without labels, got labels" if labels is not None else "with labels, got None")
            )

    def _allocate(self, student: torch.Tensor, teacher: torch.Tensor, labels: Any) -> None:
        capacity = self.batches * student.shape[0]
        self.student_queue = student.new_zeros(capacity, student.shape[1])
        self.teacher_queue = teacher.new_zeros(capacity, teacher.shape[1])
        if labels is not None:
            self.label_queue = labels.new_zeros(capacity, dtype=torch.long)

    @torch.no_grad()
    def _push(self, student: torch.Tensor, teacher: torch.Tensor, labels: Any) -> None:
        if self.student_queue.numel() == 0:  # sized by the first training batch
            self._allocate(student, teacher, labels)
        capacity = self.student_queue.shape[0]
        count = min(student.shape[0], capacity)
        # the newest rows, written at the pointer and wrapping around the end
        index = (self._pointer + torch.arange(count, device=student.device)) % capacity
        self.student_queue[index] = student[-count:].detach().to(self.student_queue.dtype)
        self.teacher_queue[index] = teacher[-count:].detach().to(self.teacher_queue.dtype)
        if labels is not None:
            self.label_queue[index] = labels[-count:].long()
        self._pointer = (self._pointer + count) % capacity
        self._filled = min(self._filled + count, capacity)

    def get_extra_state(self) -> dict[str, int]:
        return {"pointer": self._pointer, "filled": self._filled}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._pointer, self._filled = int(state["pointer"]), int(state["filled"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a fresh queue holds empty buffers: take the saved shapes before loading into them
        for name in _QUEUES:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"batches={self.batches}, queued={self._filled}"
