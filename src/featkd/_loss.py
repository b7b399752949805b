"""The loss contract: one shape for every featkd loss.

Each loss is a public ``<name>_loss(student, teacher, ...)`` function that validates once and
calls an unchecked core, and a thin :class:`DistillationLoss` module that checks its options
when built, owns its parameters and calls the same core. The core returns :class:`Terms`: the
unweighted terms, per sample ``(B,)`` or batch-level scalars, in the order its docstring names
them, and diagnostics apart. :func:`evaluate` runs a core inside the one precision fence,
weighs and reduces the terms, and hands back the loss and its ``last_parts``:
``{"total": ..., <term>: ..., <diagnostic>: ...}``, detached.

The module also guards against the two silent failures a new user meets (see
:class:`StudentGradientWarning` and :class:`FrozenParametersWarning`); neither costs a host
synchronisation.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featkd._checks import ChoiceError, count_nonfinite
from featkd._options import check_choice
from featkd._precision import full_precision, result_dtype

__all__ = [
    "REDUCTIONS",
    "DistillationLoss",
    "FrozenParametersWarning",
    "StudentGradientWarning",
    "Terms",
    "check_reduction",
    "evaluate",
    "user_stacklevel",
]

REDUCTIONS = ("mean", "sum", "none")


class StudentGradientWarning(UserWarning):
    """The student argument of a loss cannot receive a gradient while grad mode is on.

    Silence it with ``warnings.filterwarnings("ignore", category=featkd.StudentGradientWarning)``.
    """


class FrozenParametersWarning(UserWarning):
    """A loss's own parameters keep receiving gradients but never change.

    Silence it with ``warnings.filterwarnings("ignore", category=featkd.FrozenParametersWarning)``.
    """


@dataclass
class Terms:
    """What a loss core returns.

    Attributes:
        values: the unweighted terms by name, in the docstring's order; each either one value
            per sample ``(B,)`` or a batch-level scalar (a property of the batch as a whole).
        diagnostics: detached extras for logging (a bandwidth, an iteration count).
    """

    values: dict[str, torch.Tensor]
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


def check_reduction(reduction: Any, batch_level: str | None = None) -> str:
    """``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``. ``batch_level`` is the reason a
    loss has no per-sample form; given, only ``"mean"`` is accepted and the error says why."""
    check_choice(reduction, "reduction", REDUCTIONS)
    if batch_level is not None and reduction != "mean":
        raise ChoiceError(
            f"reduction: expected 'mean', got {reduction!r}: {batch_level}, so it has no "
            "per-sample values to sum or return"
        )
    return reduction


def _reduce(value: torch.Tensor, reduction: str) -> torch.Tensor:
    if value.ndim == 0 or reduction == "none":  # a batch-level term is added once
        return value
    return value.mean() if reduction == "mean" else value.sum()


def _combine(
    terms: Terms, weights: Mapping[str, float] | None, reduction: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    reduced = {name: _reduce(value, reduction) for name, value in terms.values.items()}
    weighted = [
        value if weights is None else weights[name] * value for name, value in reduced.items()
    ]
    total = weighted[0]
    for value in weighted[1:]:
        total = total + value
    parts = {"total": total.detach()}
    parts.update((name, value.detach()) for name, value in reduced.items())
    parts.update((name, value.detach()) for name, value in terms.diagnostics.items())
    return total, parts


def evaluate(
    core: Callable[..., Terms],
    *args: Any,
    weights: Mapping[str, float] | None = None,
    reduction: str = "mean",
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``core(*args, **kwargs)`` inside the precision fence; the loss and ``last_parts``.

    Floating tensors among ``args`` and ``kwargs`` reach the core in the working dtype (float32,
    or float64 if any is float64) with autocast off; the first one is the student, whose dtype
    sets the dtype of the returned loss (:func:`featkd._precision.result_dtype`). ``weights``
    (by term name; ``None`` for a single term) weigh the reduced terms into ``"total"``. Where
    the finite-input check was deferred to the device (:func:`featkd.set_finite_check`), the
    parts end with ``"nonfinite_inputs"``, the count of NaN/Inf entries in the inputs.
    """
    floating = [
        a
        for a in (*args, *kwargs.values())
        if isinstance(a, torch.Tensor) and a.is_floating_point()
    ]
    with full_precision(*floating) as work:

        def cast(a: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.to(work)
            return a

        terms = core(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        total, parts = _combine(terms, weights, reduction)
    nonfinite = count_nonfinite(floating)
    if nonfinite is not None:  # the check was deferred to the device (set_finite_check)
        parts["nonfinite_inputs"] = nonfinite
    return total.to(result_dtype(floating[0].dtype)), parts


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside featkd and torch (its module call, its
    custom-op dispatch, ``load_state_dict``), however deep the call (KD2MLoss, GlobalBatch, a
    subclass...): the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(_PACKAGE) or name.startswith(_TORCH)):
            break
        frame, level = frame.f_back, level + 1
    return level


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class DistillationLoss(nn.Module):
    """Base of every featkd loss module: the common call, ``last_parts`` and the guards.

    A subclass stores its checked options in ``__init__`` and implements :meth:`_check`
    (validates the inputs, once) and :meth:`_terms` (the unchecked core, called in the working
    dtype with autocast off). ``weights`` (a dict by term name, or ``None`` for a single term)
    and ``reduction`` are plain attributes.

    Call: ``loss_fn(student, teacher, *, labels=None)``; the result is in float32 (float64 for
    float64 students). After each call ``last_parts`` holds ``"total"``, then each term, then
    the diagnostics, all detached.
    """

    #: Calls in a row after which parameters that hold a gradient but never change are reported.
    #: High enough for gradient accumulation over 15 micro-batches.
    frozen_parameter_calls: int = 16

    weights: dict[str, float] | None = None
    reduction: str = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.last_parts: dict[str, torch.Tensor] = {}
        self._warned_student = False
        self._warned_frozen = False
        self._versions: tuple[int, ...] | None = None
        self._stale_calls = 0

    def _check(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        raise NotImplementedError

    def _terms(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None
    ) -> Terms:
        raise NotImplementedError

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check(student, teacher, labels)
        return self._evaluate(self._terms, student, teacher, labels)

    def _evaluate(self, core: Callable[..., Terms], student: torch.Tensor, *args: Any, **kw: Any):
        """Guards, then :func:`evaluate` with this module's weights and reduction; stores
        ``last_parts``. For subclasses whose ``forward`` takes more inputs."""
        teacher = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self._guard(student, teacher)
        loss, self.last_parts = evaluate(
            core, student, *args, weights=self.weights, reduction=self.reduction, **kw
        )
        return loss

    def _guard(self, student: torch.Tensor, teacher: torch.Tensor | None) -> None:
        if not torch.is_grad_enabled() or _compiling():
            return
        if not self._warned_student and not student.requires_grad:
            self._warned_student = True
            name = type(self).__name__
            if teacher is not None and teacher.requires_grad:
                problem = (
                    f"{name}: the student argument has no gradient but the teacher argument "
                    f"does: were they swapped? The call is {name}(student, teacher)"
                )
            else:
                problem = (
                    f"{name}: neither the student nor the teacher argument requires a gradient, "
                    "so the student learns nothing from this loss. Pass the student's output "
                    "(not a detached copy) as the first argument, or evaluate under "
                    "torch.no_grad()"
                )
            warnings.warn(
                f"{problem}. (Silence: warnings.filterwarnings('ignore', "
                "category=featkd.StudentGradientWarning).)",
                StudentGradientWarning,
                stacklevel=user_stacklevel(),
            )
        if not self._warned_frozen and self.training:
            self._watch_parameters()

    def _watch_parameters(self) -> None:
        # an optimiser step changes a parameter in place, which bumps its version counter: a
        # host-side integer, so this needs no synchronisation
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return
        versions = tuple(p._version for p in params)
        holding = any(p.grad is not None for p in params)
        stale = holding and versions == self._versions
        self._stale_calls = self._stale_calls + 1 if stale else 0
        self._versions = versions
        if self._stale_calls >= self.frozen_parameter_calls:
            self._warned_frozen = True
            name = type(self).__name__
            warnings.warn(
                f"{name}: its own parameters have received gradients on "
                f"{self._stale_calls + 1} calls in a row but never changed: the optimiser "
                f"does not hold them, so they stay at their initial values. Add them: "
                f"torch.optim.AdamW([*student.parameters(), *loss_fn.parameters()]). "
                "(Silence: warnings.filterwarnings('ignore', "
                "category=featkd.FrozenParametersWarning).)",
                FrozenParametersWarning,
                stacklevel=user_stacklevel(),
            )
