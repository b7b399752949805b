"""Distillation from several teachers at once: a head, a standardiser and a term per teacher.

The recipe of the agglomerative students (AM-RADIO, UNIC, Theia): the student's features go
through one head per teacher (to that teacher's width), each teacher's features are
standardised (running per-channel statistics, or PHI-S), and a cosine and/or smooth-L1 term
matches them, on the summary token and/or the patch tokens; teachers can be dropped per sample.

Axis legend: ``B`` batch, ``P`` prefix (summary) tokens, ``N`` tokens, ``D_s`` student width,
``D_t`` a teacher's width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featkd._checks import FeatkdInputError, ShapeError, check_same_device, validate_features
from featkd._loss import DistillationLoss, check_reduction, evaluate
from featkd._options import (
    check_choice,
    check_int,
    check_number,
    check_positive,
    check_seed,
    seeded_generator,
)
from featkd._seeded import GeneratorState
from featkd.multiteacher._terms import TERMS, terms_core
from featkd.multiteacher.parts import TeacherParts, draw_keep, sections

__all__ = ["MultiTeacherLoss", "Teacher", "multi_teacher_loss"]

_FEATURES = {2: "(B, D)", 3: "(B, N, D)"}
TOKENS = ("summary", "patches", "both")


def _check_mix(mix: Any) -> tuple[float, float]:
    if not isinstance(mix, Sequence) or isinstance(mix, str) or len(mix) != 2:
        raise FeatkdInputError(f"mix: expected (cosine weight, smooth-L1 weight), got {mix!r}")
    return (check_positive(mix[0], "mix[0]", allow_zero=True),
            check_positive(mix[1], "mix[1]", allow_zero=True))  # fmt: skip


def multi_teacher_loss(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    *,
    labels: torch.Tensor | None = None,
    terms: str | Mapping[str, str] = "cosine",
    weights: Mapping[str, float] | None = None,
    keep: Mapping[str, torch.Tensor] | None = None,
    mix: tuple[float, float] = (0.9, 0.1),
    reduction: str = "mean",
) -> torch.Tensor:
    """The weighted sum over teachers of a matching term between each teacher's features and
    the student's prediction of them (the student's features through that teacher's head).

    Per sample ``b``: ``sum_k w_k keep_kb term_k(pred_kb, teacher_kb)``, each term averaged
    over the tokens; the mean over the batch by default. Terms: ``"cosine"`` (``1 - cos``),
    ``"smooth_l1"`` (``beta = 1``, mean over channels), ``"mse"`` (mean over channels) and
    ``"cosine_smooth_l1"`` (``mix[0] * cosine + mix[1] * smooth_l1``, the AM-RADIO-style mix;
    the weights ``(0.9, 0.1)`` are featkd's default, not a value from a paper). A dropped
    sample (``keep`` 0) adds nothing for that teacher. The teachers get no gradient.

    Args:
        student: the student's prediction of each teacher (its features through that
            teacher's head), by teacher name.
        teacher: each teacher's (standardised) features, by the same names (detached inside).
        labels: accepted for the common call and unused.
        terms: one term for all, or one per name.
        weights: per name (default 1).
        keep: per name, a ``(B,)`` mask of the samples that see this teacher (default all).
        mix: the weights of ``"cosine_smooth_l1"``.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"``.

    Shape:
        - student[name], teacher[name]: ``(B, D_t)`` or ``(B, N, D_t)``, equal shapes
        - keep[name]: ``(B,)``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> s = {"dino": torch.randn(4, 8, requires_grad=True), "clip": torch.randn(4, 6)}
        >>> t = {"dino": torch.randn(4, 8), "clip": torch.randn(4, 6)}
        >>> multi_teacher_loss(s, t, terms={"dino": "cosine", "clip": "mse"}).shape
        torch.Size([])
        >>> bool(multi_teacher_loss(t, t) < 1e-6)  # 1 - cos(t, t), to rounding
        True
    """
    if not isinstance(student, Mapping) or not isinstance(teacher, Mapping):
        raise FeatkdInputError(
            "student, teacher: expected two mappings from teacher names to tensors, got "
            f"{type(student).__name__} and {type(teacher).__name__}"
        )
    names = list(teacher)
    if set(student) != set(names) or not names:
        raise FeatkdInputError(
            f"student: expected one tensor per teacher {sorted(names)}, got {sorted(student)}"
        )
    for option, given in (("terms", terms), ("weights", weights), ("keep", keep)):
        unknown = sorted(set(given) - set(names)) if isinstance(given, Mapping) else []
        if unknown:  # a misspelt name would silently keep the default
            raise FeatkdInputError(
                f"{option}: expected keys among the teachers {sorted(names)}, got {unknown}"
            )
    kinds = {n: terms for n in names} if isinstance(terms, str) else dict(terms)
    for name in names:
        check_choice(kinds.get(name), f"terms[{name!r}]", TERMS)
    weights = {n: 1.0 for n in names} | dict(weights or {})
    for name in weights:
        check_number(weights[name], f"weights[{name!r}]", minimum=0)
    mix = _check_mix(mix)
    reduction = check_reduction(reduction)
    keep = dict(keep or {})
    tensors: list[torch.Tensor] = []
    for name in names:
        prediction, target = student[name], teacher[name]
        validate_features(prediction, f"student[{name!r}]", _FEATURES)
        validate_features(target, f"teacher[{name!r}]", _FEATURES)
        if prediction.shape != target.shape:
            raise ShapeError(
                f"student[{name!r}]: expected the shape of teacher[{name!r}] "
                f"{tuple(target.shape)}, got {tuple(prediction.shape)}"
            )
        check_same_device({f"student[{name!r}]": prediction, f"teacher[{name!r}]": target})
        tensors += [prediction, target.detach()]
        if name in keep:
            mask = keep[name]
            if not isinstance(mask, torch.Tensor) or mask.shape != (prediction.shape[0],):
                raise ShapeError(
                    f"keep[{name!r}]: expected a ({prediction.shape[0]},) tensor, got "
                    f"{getattr(mask, 'shape', type(mask).__name__)}"
                )
            tensors.append(mask.to(prediction.dtype))
    loss, _ = evaluate(
        terms_core,
        *tensors,
        names=names,
        kinds=[kinds[n] for n in names],
        masked=[n in keep for n in names],
        mix=mix,
        weights=weights,
        reduction=reduction,
    )
    return loss


@dataclass(frozen=True)
class Teacher:
    """One teacher of :class:`MultiTeacherLoss`: its width and how the student matches it.

    Attributes:
        dim: the teacher's feature width ``D_t``.
        head: the student-to-teacher head, ``"linear"`` (``nn.Linear(D_s, D_t)``),
            ``"orthogonal"`` (:class:`~featkd.OrthogonalProjector`), ``"identity"`` (needs
            ``D_s == D_t``, or a term that owns its head) or any module ``(..., D_s) ->
            (..., D_t)``.
        normalize: the teacher-side standardiser, ``"none"``, ``"layer_norm"`` (no affine),
            ``"running"`` (:class:`~featkd.RunningStandardize`), ``"phi_s"``
            (:class:`~featkd.PHIStandardize`); the summary and the patch tokens get separate
            statistics.
        term: a built-in term name (see :func:`multi_teacher_loss`) or a featkd loss module
            called as ``term(head_output, teacher_features)``; with ``reduction="none"`` it can
            be dropped per sample, a batch-level loss (a distribution distance, CosPress's
            global term) is added once per batch. ``term=CosPressLoss(student_dim=D_s,
            teacher_dim=D_t)`` with ``head="identity"`` is CosPress compression of this teacher.
        weight: the teacher's weight.
        tokens: ``"summary"`` (the summary token, or the pooled vector), ``"patches"`` or
            ``"both"`` (token inputs only for the last two).
        patch_weight: the weight of the patch term relative to the summary term.
        summary_tokens: the teacher's prefix tokens ``P_t`` before its patches.
        student_token: which student prefix token predicts this teacher's summary (a separate
            summary token per teacher, as in AM-RADIO, or 0 for a shared one).
    """

    dim: int
    head: str | nn.Module = "linear"
    normalize: str = "none"
    term: str | nn.Module = "cosine"
    weight: float = 1.0
    tokens: str = "summary"
    patch_weight: float = 1.0
    summary_tokens: int = 1
    student_token: int = 0

    def __post_init__(self) -> None:
        check_int(self.dim, "dim", minimum=1)
        check_choice(self.tokens, "tokens", TOKENS)
        check_number(self.weight, "weight", minimum=0)
        check_number(self.patch_weight, "patch_weight", minimum=0)
        check_int(self.summary_tokens, "summary_tokens", minimum=0)
        check_int(self.student_token, "student_token", minimum=0)
        if isinstance(self.term, str):
            check_choice(self.term, "term", TERMS)
        elif not isinstance(self.term, nn.Module):
            raise FeatkdInputError(
                f"term: expected one of {TERMS} or a loss module, got {self.term!r}"
            )


class MultiTeacherLoss(GeneratorState, DistillationLoss):
    """One student, several named teachers; see :class:`Teacher` and :func:`multi_teacher_loss`.

    The module owns every teacher's head (add ``loss_fn.parameters()`` to the optimiser) and
    standardisers (their running statistics are buffers, saved in ``state_dict``). With
    ``teacher_drop=p`` each sample skips each teacher with probability ``p`` (at least one
    teacher is kept per sample), drawn from ``seed``'s generator: dropped samples add nothing
    for that teacher, and the loss stays the mean over samples of the per-sample total. Token
    grids that differ are aligned by resampling the student's patch tokens (after the head) to
    the teacher's grid (:func:`~featkd.align_tokens`, square grids).

    Under DDP, wrap a model that holds this module (the heads then get DDP's gradient
    averaging); the running statistics are per process, like ``BatchNorm`` without
    ``SyncBatchNorm``.

    Args:
        student_dim: the student's width ``D_s``.
        teachers: ``{name: Teacher(...)}``.
        student_summary_tokens: the student's prefix tokens ``P_s`` before its patches.
        teacher_drop: probability that a sample skips a teacher.
        seed: the dropping's randomness: an integer seed, a ``torch.Generator`` or None. The
            generator's position is saved in ``state_dict()``, so a resumed run continues the
            same drops.
        mix: the weights of ``"cosine_smooth_l1"``.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"``.

    Shape:
        - student: ``(B, D_s)`` or ``(B, P_s + N_s, D_s)``
        - teachers[name]: ``(B, D_t)`` or ``(B, P_t + N_t, D_t)``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    ``last_parts``: ``"total"``, then per teacher ``"<name>/summary"`` and/or
    ``"<name>/patches"``, ``"<name>/kept"`` (the share of samples kept) with dropping, and a
    term module's own parts as ``"<name>/<section>/<part>"``.

    Example:
        >>> loss_fn = MultiTeacherLoss(
        ...     16,
        ...     {"dino": Teacher(32, normalize="running", tokens="both"),
        ...      "clip": Teacher(24, head="orthogonal", term="cosine_smooth_l1")},
        ... )
        >>> student = torch.randn(4, 1 + 16, 16, requires_grad=True)
        >>> teachers = {"dino": torch.randn(4, 1 + 64, 32), "clip": torch.randn(4, 1 + 16, 24)}
        >>> loss_fn(student, teachers).backward()
        >>> list(loss_fn.last_parts)
        ['total', 'dino/summary', 'dino/patches', 'clip/summary']
    """

    random_draws = "teacher drops"

    def __init__(
        self,
        student_dim: int,
        teachers: Mapping[str, Teacher],
        *,
        student_summary_tokens: int = 1,
        teacher_drop: float = 0.0,
        seed: int | torch.Generator | None = None,
        mix: tuple[float, float] = (0.9, 0.1),
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.student_dim = check_int(student_dim, "student_dim", minimum=1)
        if not isinstance(teachers, Mapping) or not teachers:
            raise FeatkdInputError(
                f"teachers: expected a non-empty mapping of names to Teacher, got {teachers!r}"
            )
        for name, spec in teachers.items():
            if not isinstance(name, str) or "/" in name or not isinstance(spec, Teacher):
                raise FeatkdInputError(
                    f"teachers[{name!r}]: expected a featkd.Teacher under a str name without '/', got "
                    f"{type(spec).__name__}"
                )
        self.student_summary_tokens = check_int(
            student_summary_tokens, "student_summary_tokens", minimum=0
        )
        self.teacher_drop = check_number(teacher_drop, "teacher_drop", minimum=0, maximum=1)
        self.mix = _check_mix(mix)
        self.reduction = check_reduction(reduction)
        self.parts = nn.ModuleDict(
            {
                name: TeacherParts(name, spec, student_dim, self.teacher_drop)
                for name, spec in teachers.items()
            }
        )
        self.seed = check_seed(seed)
        self.generator = seeded_generator(seed)
        self.weights = {}
        for name, spec in teachers.items():
            for section in sections(spec):
                self.weights[f"{name}/{section}"] = spec.weight * (
                    spec.patch_weight if section == "patches" else 1.0
                )

    @property
    def specs(self) -> dict[str, Teacher]:
        """Every teacher's :class:`Teacher`, by name (held by its parts)."""
        return {name: part.spec for name, part in self.parts.items()}

    def forward(
        self,
        student: torch.Tensor,
        teachers: Mapping[str, torch.Tensor],
        *,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted multi-teacher loss of the student's features.

        Args:
            student: the student's features.
            teachers: every teacher's features by name (detached inside).
            labels: accepted for the common call and unused.
        """
        self._check(student, teachers)
        rate = self.teacher_drop if self.training else 0.0  # like dropout: training only
        keep = draw_keep(self.generator, student, len(self.parts), rate)
        tensors, names, kinds, masked, extra = [], [], [], [], {}
        for column, (name, part) in enumerate(self.parts.items()):
            mask = None if keep is None else keep[:, column]
            for section, items, kind, term_parts in part.match(
                student, teachers[name], self.student_summary_tokens
            ):
                extra.update((f"{name}/{section}/{k}", v) for k, v in term_parts.items())
                names.append(f"{name}/{section}")
                kinds.append(kind)
                masked.append(mask is not None)
                tensors += [*items, *([] if mask is None else [mask])]
        self._guard(student, None)
        loss, self.last_parts = evaluate(
            terms_core,
            *tensors,
            names=names,
            kinds=kinds,
            masked=masked,
            mix=self.mix,
            weights=self.weights,
            reduction=self.reduction,
        )
        self.last_parts.update(extra)  # a term module's own parts, under "<name>/<section>/"
        return loss

    def _check(self, student: Any, teachers: Any) -> None:
        validate_features(student, "student", _FEATURES, width=self.student_dim, symbol="D_s")
        if not isinstance(teachers, Mapping) or set(teachers) != set(self.parts):
            given = sorted(teachers) if isinstance(teachers, Mapping) else type(teachers).__name__
            raise FeatkdInputError(
                f"teachers: expected features for {sorted(self.parts)}, got {given}"
            )
        for name, part in self.parts.items():
            part.check(student, teachers[name], self.student_summary_tokens)

    def extra_repr(self) -> str:
        text = f"student_dim={self.student_dim}, teachers={list(self.parts)}"
        if self.teacher_drop:
            text += f", teacher_drop={self.teacher_drop}, seed={self.seed}"
        return text
