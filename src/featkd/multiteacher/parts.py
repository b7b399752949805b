"""What :class:`~featkd.MultiTeacherLoss` owns per teacher: its head, standardisers and term,
and how it picks the summary and patch tokens; plus the per-sample teacher dropping."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featkd._checks import (
    ChoiceError,
    ShapeError,
    check_same_batch,
    check_same_device,
    validate_features,
)
from featkd.multiteacher.standardize import PHIStandardize, RunningStandardize
from featkd.pooling import align_tokens
from featkd.vkd.projector import OrthogonalProjector

__all__ = ["NORMALIZERS", "TeacherParts", "draw_keep"]

NORMALIZERS = ("none", "layer_norm", "running", "phi_s")
HEADS = ("linear", "orthogonal", "identity")
_FEATURES = {2: "(B, D)", 3: "(B, N, D)"}


class _LayerNorm(nn.Module):
    """Layer normalisation without affine parameters (a standardiser owns no parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,))


def _normalizer(kind: str, dim: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "layer_norm":
        return _LayerNorm(dim)
    return RunningStandardize(dim) if kind == "running" else PHIStandardize(dim)


def _head(spec: Any, student_dim: int) -> nn.Module:
    if isinstance(spec.head, nn.Module):
        return spec.head
    if spec.head not in HEADS:
        raise ChoiceError(f"head: expected one of {HEADS} or a module, got {spec.head!r}")
    if spec.head == "linear":
        return nn.Linear(student_dim, spec.dim)
    if spec.head == "orthogonal":
        return OrthogonalProjector(student_dim, spec.dim)
    if student_dim != spec.dim and isinstance(spec.term, str):
        raise ChoiceError(
            f"head: 'identity' needs the student's width {student_dim} to equal the teacher's "
            f"dim {spec.dim} (or a term module that owns its head), got head='identity'"
        )
    return nn.Identity()


def sections(spec: Any) -> list[str]:
    """The terms a teacher adds: ``summary``, ``patches`` or both."""
    return ["summary", "patches"] if spec.tokens == "both" else [spec.tokens]


class TeacherParts(nn.Module):
    """One teacher's head, standardisers (one per section) and term module (if any)."""

    def __init__(self, name: str, spec: Any, student_dim: int, teacher_drop: float) -> None:
        super().__init__()
        if spec.normalize not in NORMALIZERS:
            raise ChoiceError(f"normalize: expected one of {NORMALIZERS}, got {spec.normalize!r}")
        self.name, self.spec = name, spec
        self.head = _head(spec, student_dim)
        self.normalizers = nn.ModuleDict(
            {section: _normalizer(spec.normalize, spec.dim) for section in sections(spec)}
        )
        self.term = spec.term if isinstance(spec.term, nn.Module) else None
        if (
            self.term is not None
            and teacher_drop > 0
            and getattr(self.term, "reduction", "") != "none"
        ):
            raise ChoiceError(
                f"teacher_drop: dropping teacher {name!r} per sample needs per-sample values, "
                f"but its term {type(self.term).__name__} has reduction="
                f"{getattr(self.term, 'reduction', None)!r}; build it with reduction='none' (a "
                "batch-level loss cannot be dropped per sample) or use teacher_drop=0"
            )

    def check(self, student: torch.Tensor, teacher: Any, student_prefix: int) -> None:
        name, spec = f"teachers[{self.name!r}]", self.spec
        validate_features(teacher, name, _FEATURES, width=spec.dim, symbol="D_t")
        check_same_batch(student, teacher, "student", name)
        check_same_device({"student": student, name: teacher})
        if spec.tokens != "summary":
            if student.ndim != 3 or teacher.ndim != 3:
                raise ShapeError(
                    f"{name}: tokens={spec.tokens!r} matches patch tokens, expected (B, N, D) "
                    f"student and teacher, got {tuple(student.shape)} and {tuple(teacher.shape)}"
                )
            patches = teacher.shape[1] - spec.summary_tokens
            side = math.isqrt(max(patches, 0))
            if patches > 0 and side * side != patches:
                raise ShapeError(
                    f"{name}: expected a square grid of patch tokens after summary_tokens="
                    f"{spec.summary_tokens}, got {patches} patches"
                )
        if teacher.ndim == 3 and teacher.shape[1] <= spec.summary_tokens:
            raise ShapeError(
                f"{name}: expected more than summary_tokens={spec.summary_tokens} tokens, got "
                f"{teacher.shape[1]}"
            )
        picks_token = student.ndim == 3 and "summary" in sections(spec) and student_prefix > 0
        if picks_token and spec.student_token >= student_prefix:
            raise ShapeError(
                f"{name}: student_token={spec.student_token} must index one of the "
                f"student's {student_prefix} summary tokens"
            )

    def _summary(self, x: torch.Tensor, prefix: int, index: int) -> torch.Tensor:
        if x.ndim == 2:
            return x
        return x[:, index] if prefix > 0 else x.mean(dim=1)

    def match(self, student: torch.Tensor, teacher: torch.Tensor, student_prefix: int):
        """``(section, tensors, kind, parts)`` per section: a prediction and a target for a
        built-in term, or the term module's value (kind ``"given"``) and its ``last_parts``."""
        spec = self.spec
        teacher = teacher.detach()
        out = []
        for section in sections(spec):
            if section == "summary":
                source = self._summary(student, student_prefix, spec.student_token)
                target = self._summary(teacher, spec.summary_tokens, 0)
                prediction = self.head(source)
            else:
                target = teacher[:, spec.summary_tokens :]
                prediction = self.head(student[:, student_prefix:])
                if prediction.shape[1] != target.shape[1]:
                    side = math.isqrt(target.shape[1])  # square: checked
                    prediction = align_tokens(
                        prediction, (side, side), num_prefix_tokens=0, name="student patches"
                    )
            target = self.normalizers[section](target)
            if self.term is None:
                out.append((section, [prediction, target], spec.term, {}))
            else:
                value = self.term(prediction, target)
                out.append((section, [value], "given", dict(self.term.last_parts)))
        return out


def draw_keep(
    generator: torch.Generator | None,
    like: torch.Tensor,
    count: int,
    rate: float,
) -> torch.Tensor | None:
    """A ``(B, count)`` keep mask: each entry kept with probability ``1 - rate``, and a sample
    that would keep none keeps one teacher drawn uniformly. None when nothing is dropped.

    Drawn on the generator's device (a seeded CPU generator gives the same mask on every
    device) and copied asynchronously from pinned memory: no host synchronisation.
    """
    if rate == 0:
        return None
    batch = like.shape[0]
    device = generator.device if generator is not None else like.device
    draws = torch.rand(batch, count + 1, generator=generator, device=device)
    keep = draws[:, :count] >= rate
    fallback = (draws[:, count] * count).long().clamp_max(count - 1)
    chosen = torch.arange(count, device=device)[None, :] == fallback[:, None]
    keep = keep | (chosen & ~keep.any(dim=1, keepdim=True))
    keep = keep.to(like.dtype)
    if keep.device != like.device:
        if keep.device.type == "cpu" and like.device.type == "cuda":
            keep = keep.pin_memory()
        keep = keep.to(like.device, non_blocking=True)
    return keep
