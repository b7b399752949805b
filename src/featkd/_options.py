"""Checks of option values: the arguments a loss, head or utility is built with (numbers,
choices, seeds, term weights, dtypes and devices) and the one-release shims for renamed or
reordered arguments. Tensor inputs are checked in :mod:`featkd._checks`.

Each check raises :class:`featkd.ChoiceError` naming the argument, what was expected and what
came, and returns the checked value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from featkd._checks import ChoiceError

__all__ = [
    "FLOATING_DTYPES",
    "check_bool",
    "check_choice",
    "check_device",
    "check_floating_dtype",
    "check_int",
    "check_number",
    "check_positive",
    "check_seed",
    "check_weights",
    "keyword_widths",
    "renamed",
    "seeded_generator",
]


# the dtypes featkd's parameters and buffers may have (float8 fails inside torch, later)
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_floating_dtype(value: Any, name: str = "dtype") -> torch.dtype | None:
    """A ``dtype=`` argument: ``None`` (the default) or one of :data:`FLOATING_DTYPES`.
    Returns it."""
    if value is not None and value not in FLOATING_DTYPES:
        listed = ", ".join(str(d) for d in FLOATING_DTYPES)
        raise ChoiceError(f"{name}: expected None or one of {listed}, got {value!r}")
    return value


def check_device(value: Any, name: str = "device") -> Any:
    """A ``device=`` argument: ``None``, a ``torch.device``, a string such as ``"cuda:0"`` or an
    index, anything ``torch.device`` parses. Returns it."""
    if value is not None:
        try:
            torch.device(value)
        except (RuntimeError, TypeError) as error:
            raise ChoiceError(
                f"{name}: expected None, a torch.device, a device string such as 'cpu' or "
                f"'cuda:0' or a device index, got {value!r} ({error})"
            ) from None
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices``; the message lists them all."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ChoiceError(f"{name}: expected one of {listed}, got {value!r}")


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` is a real number > 0 (or >= 0 with ``allow_zero``): :func:`check_number`
    with a lower bound of 0. Returns it as a float."""
    return check_number(value, name, minimum=0, exclusive_minimum=not allow_zero)


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` is a Python integer (not a bool) ``>= minimum``. Returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ChoiceError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` is ``True`` or ``False`` (not merely truthy: ``"no"`` is not ``False``)."""
    if not isinstance(value, bool):
        raise ChoiceError(f"{name}: expected True or False, got {value!r}")
    return value


def check_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` is a finite real number (not a bool) within the bounds. Returns it as a float.

    ``exclusive_minimum`` makes the lower bound strict (``> minimum``), likewise the upper.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if exclusive_maximum else value <= maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"{'<' if exclusive_maximum else '<='} {maximum}")
        where = f" {' and '.join(bounds)}" if bounds else ""
        raise ChoiceError(f"{name}: expected a finite number{where}, got {value!r}")
    return float(value)


def check_seed(value: Any, name: str = "seed") -> int | torch.Generator | None:
    """Randomness: ``None`` (torch's global generator), an integer seed ``>= 0`` or a
    ``torch.Generator``. Returns it unchanged."""
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ChoiceError(
            f"{name}: expected None, an integer seed >= 0 or a torch.Generator, got {value!r}"
        )
    return value


def seeded_generator(value: Any, name: str = "seed") -> torch.Generator | None:
    """A checked ``seed`` as a generator: ``None`` (torch's global one), the user's
    ``torch.Generator`` itself, or a fresh CPU generator seeded with the integer."""
    value = check_seed(value, name)
    if isinstance(value, int):
        return torch.Generator().manual_seed(value)
    return value


def check_weights(weights: Any, name: str, terms: Sequence[str], owner: str) -> dict[str, float]:
    """Term weights by name: a mapping from some of ``terms`` to finite numbers ``>= 0``, the
    others keeping weight 1. Returns every term's weight, in the order of ``terms``.

    A sequence (one weight per term, in order) is the form of featkd 0.1: still accepted for
    one release, with a ``FutureWarning``.
    """
    expected = "{" + ", ".join(f"{t!r}: ..." for t in terms) + "}"
    if (
        not isinstance(weights, Mapping)
        and isinstance(weights, Sequence)
        and not isinstance(weights, (str, bytes))
    ):
        if len(weights) != len(terms):
            raise ChoiceError(
                f"{name}: expected a dict of weights by term name {expected}, got {weights!r}"
            )
        warnings.warn(
            f"{owner}: positional {name}=({', '.join(terms)}) is deprecated and will be removed "
            f"in the next release; pass {name}={{{', '.join(f'{t!r}: ...' for t in terms)}}}",
            FutureWarning,
            stacklevel=3,
        )
        weights = dict(zip(terms, weights, strict=True))
    if not isinstance(weights, Mapping):
        raise ChoiceError(
            f"{name}: expected a dict of weights by term name {expected}, got {weights!r}"
        )
    for key in weights:
        if key not in terms:
            raise ChoiceError(
                f"{name}: unknown term {key!r}; expected some of {', '.join(map(repr, terms))}"
            )
    return {
        term: check_number(weights.get(term, 1.0), f"{name}[{term!r}]", minimum=0.0)
        for term in terms
    }


def renamed(
    owner: str, old: str, new: str, old_value: Any, new_value: Any, default: Any = None
) -> Any:
    """An argument renamed from ``old`` to ``new``: the value passed, with a ``FutureWarning``
    when it came under the old name (kept for one release)."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise ChoiceError(f"{old}: renamed to {new}; pass only {new}, got both")
    warnings.warn(
        f"{owner}: {old}= is renamed to {new}= and will be removed in the next release",
        FutureWarning,
        stacklevel=3,
    )
    return old_value


def keyword_widths(
    owner: str,
    args: tuple[Any, ...],
    old_order: tuple[str, str],
    student_dim: Any,
    teacher_dim: Any,
) -> tuple[int, int]:
    """``(student_dim, teacher_dim)`` of a constructor whose widths are now keyword-only.

    Positional widths, in the constructor's old order ``old_order``, still work for one release
    with a ``FutureWarning``. Both widths are checked as ints ``>= 1``.
    """
    if args:
        if len(args) > 2:
            raise ChoiceError(
                f"{owner}: expected at most 2 positional widths ({', '.join(old_order)}), "
                f"got {len(args)}"
            )
        given = dict(zip(old_order, args, strict=False))
        for key, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if key in given and value is not None:
                raise ChoiceError(f"{key}: given both by position and by keyword")
        student_dim = given.get("student_dim", student_dim)
        teacher_dim = given.get("teacher_dim", teacher_dim)
        warnings.warn(
            f"{owner}: positional widths are deprecated and will be removed in the next "
            f"release; write {owner}(student_dim={student_dim}, teacher_dim={teacher_dim}) "
            f"(this call read them in the order {', '.join(old_order)})",
            FutureWarning,
            stacklevel=3,
        )
    for key, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if value is None:
            raise ChoiceError(f"{key}: required (keyword-only: {owner}({key}=...))")
    return check_int(student_dim, "student_dim", 1), check_int(teacher_dim, "teacher_dim", 1)
