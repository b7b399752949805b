"""Is a dataset's input random? Two looks: the class names of its transforms, and two reads of
one sample compared (tensors, arrays, numbers and nested tuples, lists and dicts)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["RANDOM_NAMES", "random_transforms", "reads_differ"]

# words in the class names of torchvision's (and most libraries') random augmentations
RANDOM_NAMES = (
    "Random",
    "Jitter",
    "AutoAugment",
    "RandAugment",
    "TrivialAugment",
    "AugMix",
    "Erasing",
)
_DEPTH = 12


def _attribute(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # a property of the user's class may raise anything
        return None


def random_transforms(dataset: Any) -> list[str]:
    """Class names of the random transforms in ``dataset``'s ``transform``/``transforms``
    attributes, inside Compose-like ``.transforms`` lists and ``nn.Sequential`` containers, and
    in the datasets it wraps (``.dataset`` of a ``Subset``, ``.datasets`` of a concatenation)."""
    found: list[str] = []
    seen: set[int] = set()

    def visit_transform(obj: Any, depth: int) -> None:
        if obj is None or depth > _DEPTH or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit_transform(item, depth + 1)
            return
        kind = type(obj).__name__
        if any(word in kind for word in RANDOM_NAMES):
            found.append(kind)
        for name in ("transforms", "transform"):
            visit_transform(_attribute(obj, name), depth + 1)
        if isinstance(obj, nn.Module):
            for child in obj.children():
                visit_transform(child, depth + 1)

    def visit_dataset(obj: Any, depth: int) -> None:
        if obj is None or depth > _DEPTH or id(obj) in seen:
            return
        seen.add(id(obj))
        for name in ("transform", "transforms"):
            visit_transform(_attribute(obj, name), depth + 1)
        visit_dataset(_attribute(obj, "dataset"), depth + 1)
        inner = _attribute(obj, "datasets")
        if isinstance(inner, (list, tuple)):
            for item in inner:
                visit_dataset(item, depth + 1)

    visit_dataset(dataset, 0)
    return found


def reads_differ(dataset: Any) -> bool:
    """Whether two reads of ``dataset[0]`` differ. The random generators (torch's, numpy's and
    Python's) are put back afterwards, so building a dataset leaves a seeded run unchanged."""
    # numpy's legacy global generator: the one np.random.seed and most transforms use
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    try:
        first, second = dataset[0], dataset[0]
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        random.setstate(states[2])
    return _same(first, second) is False


def _same(a: Any, b: Any) -> bool | None:
    """Equal, different, or ``None`` when the values cannot be compared (unknown types)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():  # NaN equals NaN here
            return bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        return torch.equal(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        nan = a.dtype.kind in "fc" and b.dtype.kind in "fc"
        return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=nan))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if list(a) != list(b):
            return False
        return _all([_same(a[key], b[key]) for key in a])
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        return _all([_same(x, y) for x, y in zip(a, b, strict=True)])
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        equal = a == b
    except Exception:
        return None
    return bool(equal) if isinstance(equal, (bool, np.bool_)) else None


def _all(results: list[bool | None]) -> bool | None:
    if False in results:
        return False
    return None if None in results else True
