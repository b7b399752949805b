"""The per-sample matching terms of the multi-teacher loss and its unchecked core.

Axis legend: ``B`` batch, ``N`` tokens (absent for pooled features), ``D`` teacher width.
A term compares a prediction with a target of the same shape, vector by vector along ``D``,
and averages over the tokens: one value per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from featkd._loss import Terms

__all__ = ["TERMS", "per_sample_term", "terms_core"]

#: The built-in terms: cosine distance, smooth-L1 (``beta = 1``), mean squared error, and the
#: AM-RADIO-style mix ``mix[0] * cosine + mix[1] * smooth_l1``.
TERMS = ("cosine", "smooth_l1", "mse", "cosine_smooth_l1")


def _cosine_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` along the last axis; a zero vector counts as orthogonal to everything
    (finite gradient) instead of dividing by zero."""
    tiny = torch.finfo(prediction.dtype).tiny
    p = prediction / prediction.norm(dim=-1, keepdim=True).clamp_min(tiny**0.5)
    t = target / target.norm(dim=-1, keepdim=True).clamp_min(tiny**0.5)
    return 1 - (p * t).sum(dim=-1)


def per_sample_term(
    kind: str, prediction: torch.Tensor, target: torch.Tensor, mix: Sequence[float]
) -> torch.Tensor:
    """``(B, [N,] D) x 2 -> (B,)``: the term per vector, averaged over the tokens."""
    if kind == "cosine":
        value = _cosine_distance(prediction, target)
    elif kind == "smooth_l1":
        value = F.smooth_l1_loss(prediction, target, reduction="none", beta=1.0).mean(dim=-1)
    elif kind == "mse":
        value = (prediction - target).square().mean(dim=-1)
    else:  # cosine_smooth_l1
        smooth = F.smooth_l1_loss(prediction, target, reduction="none", beta=1.0).mean(dim=-1)
        value = mix[0] * _cosine_distance(prediction, target) + mix[1] * smooth
    return value.reshape(value.shape[0], -1).mean(dim=1)


def terms_core(
    *tensors: torch.Tensor,
    names: Sequence[str],
    kinds: Sequence[str],
    masked: Sequence[bool],
    mix: Sequence[float],
) -> Terms:
    """Unchecked core. ``tensors`` holds, per name in order, either a prediction and a target
    (a built-in kind) or one precomputed value (kind ``"given"``: ``(B,)`` or a batch-level
    scalar), then a keep mask ``(B,)`` when ``masked``. A dropped sample's value is zero."""
    values: dict[str, torch.Tensor] = {}
    diagnostics: dict[str, torch.Tensor] = {}
    position = 0
    for name, kind, has_mask in zip(names, kinds, masked, strict=True):
        if kind == "given":
            value = tensors[position]
            position += 1
        else:
            value = per_sample_term(kind, tensors[position], tensors[position + 1], mix)
            position += 2
        if has_mask:
            keep = tensors[position]
            position += 1
            value = value * keep
            # one mask per teacher, shared by its sections ("dino/summary", "dino/patches")
            diagnostics[f"{name.split('/')[0]}/kept"] = keep.detach().mean()
        values[name] = value
    return Terms(values, diagnostics)
