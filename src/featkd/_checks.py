"""Input validation shared by every featkd loss, head and utility.

Every error raised for bad user input is a subclass of :class:`FeatkdInputError`, itself a
``ValueError``, and its message names the argument, what was expected and what came::

    student: expected (B, D) or (B, N, D), got (8, 3, 32, 32)

The checks run before any maths, so a user sees the mistake in their own terms rather than a
shape error from deep inside torch. The finiteness check needs one host synchronisation; it can
be switched off with :func:`set_finite_check` once a pipeline is known to be clean (for example
under ``torch.compile``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

# transitional re-exports: the precision policy lives in _precision
from featkd._precision import result_dtype
from featkd._precision import work_dtype as compute_dtype

__all__ = [
    "FLOATING_DTYPES",
    "ChoiceError",
    "DTypeError",
    "DeviceError",
    "FeatkdInputError",
    "NonFiniteError",
    "ShapeError",
    "check_bool",
    "check_choice",
    "check_device",
    "check_feature_pair",
    "check_finite",
    "check_floating",
    "check_floating_dtype",
    "check_int",
    "check_labels",
    "check_min_batch",
    "check_number",
    "check_positive",
    "check_rank",
    "check_same_batch",
    "check_same_device",
    "check_seed",
    "check_weights",
    "check_width",
    "compute_dtype",
    "describe_shape",
    "finite_check_enabled",
    "keyword_widths",
    "renamed",
    "result_dtype",
    "seeded_generator",
    "set_finite_check",
    "validate_features",
]


class FeatkdInputError(ValueError):
    """Base class of every error featkd raises for bad user input."""


class ShapeError(FeatkdInputError):
    """A tensor has the wrong rank, size, batch size or width."""


class DTypeError(FeatkdInputError):
    """A tensor has a dtype the operation cannot use (integers where floats are needed)."""


class NonFiniteError(FeatkdInputError):
    """A tensor contains NaN or Inf."""


class ChoiceError(FeatkdInputError):
    """An option is not one of the accepted values, or a number is out of its range."""


class DeviceError(FeatkdInputError):
    """Tensors that must live together are on different devices."""


_FINITE_CHECK = True


def set_finite_check(enabled: bool) -> bool:
    """Turn the NaN/Inf input check on or off for every featkd loss; returns the old setting.

    The check costs one host synchronisation per call. Turn it off inside ``torch.compile``
    regions or when the inputs are known to be finite.

    Example:
        >>> import featkd
        >>> previous = featkd.set_finite_check(False)
        >>> _ = featkd.set_finite_check(previous)
    """
    global _FINITE_CHECK
    previous = _FINITE_CHECK
    _FINITE_CHECK = bool(enabled)
    return previous


def finite_check_enabled() -> bool:
    """Whether :func:`check_finite` currently inspects values."""
    return _FINITE_CHECK


def describe_shape(shape: Iterable[int]) -> str:
    """``(8, 3, 32, 32)`` for a shape; ``(8,)`` for one dimension."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 1:
        return f"({dims[0]},)"
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _require_tensor(x: Any, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise FeatkdInputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def check_rank(x: Any, name: str, layouts: Mapping[int, str]) -> None:
    """Check ``x.ndim`` is one of the keys of ``layouts`` (rank -> layout name like ``"(B, D)"``).

    Also rejects empty tensors (a zero-sized dimension), which no loss can use.
    """
    _require_tensor(x, name)
    expected = " or ".join(layouts[k] for k in sorted(layouts))
    if x.ndim not in layouts:
        raise ShapeError(f"{name}: expected {expected}, got {describe_shape(x.shape)}")
    if x.numel() == 0:
        raise ShapeError(
            f"{name}: expected {expected} with no zero-sized dimension, "
            f"got {describe_shape(x.shape)}"
        )


def check_floating(x: torch.Tensor, name: str) -> None:
    """Reject integer, boolean and complex tensors."""
    _require_tensor(x, name)
    if not x.is_floating_point():
        raise DTypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )


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


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or Inf (one host sync; see
    :func:`set_finite_check`)."""
    if not _FINITE_CHECK:
        return
    finite = torch.isfinite(x.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteError(
            f"{name}: expected finite values, got {bad} NaN/Inf entries "
            f"in a tensor of shape {describe_shape(x.shape)}"
        )


def check_same_batch(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """The leading (batch) sizes of ``a`` and ``b`` agree."""
    if a.shape[0] != b.shape[0]:
        raise ShapeError(
            f"{name_b}: expected batch size {a.shape[0]} (the batch of {name_a}), "
            f"got {b.shape[0]} (shape {describe_shape(b.shape)})"
        )


def check_width(x: torch.Tensor, name: str, expected: int, symbol: str = "D") -> None:
    """The last dimension of ``x`` equals ``expected``."""
    if x.shape[-1] != expected:
        raise ShapeError(
            f"{name}: expected last dimension {symbol}={expected}, "
            f"got {x.shape[-1]} (shape {describe_shape(x.shape)})"
        )


def check_min_batch(x: torch.Tensor, name: str, minimum: int, why: str = "") -> None:
    """``x.shape[0] >= minimum``; ``why`` explains the requirement in the message."""
    if x.shape[0] < minimum:
        reason = f" ({why})" if why else ""
        raise ShapeError(
            f"{name}: expected a batch of at least {minimum}{reason}, "
            f"got {x.shape[0]} (shape {describe_shape(x.shape)})"
        )


def check_same_device(tensors: Mapping[str, torch.Tensor]) -> None:
    """All the named tensors live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise DeviceError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}), "
                f"got one on {t.device}"
            )


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices``; the message lists them all."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ChoiceError(f"{name}: expected one of {listed}, got {value!r}")


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` is a real number > 0 (or >= 0 with ``allow_zero``): :func:`check_number`
    with a lower bound of 0. Returns it as a float."""
    return check_number(value, name, minimum=0, exclusive_minimum=not allow_zero)


def check_labels(labels: Any, batch_size: int, name: str = "labels") -> torch.Tensor:
    """Class labels: an integer tensor of shape ``(B,)`` with values >= 0. Returns it."""
    _require_tensor(labels, name)
    if labels.ndim != 1 or labels.shape[0] != batch_size:
        raise ShapeError(
            f"{name}: expected shape ({batch_size},) of integer class indices, "
            f"got {describe_shape(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DTypeError(f"{name}: expected an integer tensor of class indices, got {labels.dtype}")
    if bool((labels < 0).any()):
        raise ChoiceError(f"{name}: expected class indices >= 0, got a negative label")
    return labels


def validate_features(
    x: Any,
    name: str,
    layouts: Mapping[int, str],
    *,
    width: int | None = None,
    symbol: str = "D",
) -> None:
    """The common front door: tensor, rank, floating dtype, optional width, finite."""
    check_rank(x, name, layouts)
    check_floating(x, name)
    if width is not None:
        check_width(x, name, width, symbol)
    check_finite(x, name)


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


def check_feature_pair(
    student: Any,
    teacher: Any,
    *,
    student_dim: int | None = None,
    teacher_dim: int | None = None,
) -> None:
    """The front door of a loss on student/teacher features that are both pooled ``(B, D)`` or
    both tokens ``(B, N, D)``: ranks, dtypes, widths, finiteness, batch, token count, device."""
    layouts = {2: "(B, D)", 3: "(B, N, D)"}
    validate_features(student, "student", layouts, width=student_dim, symbol="D_s")
    validate_features(teacher, "teacher", layouts, width=teacher_dim, symbol="D_t")
    if teacher.ndim != student.ndim:
        expected = "(B, D_t)" if student.ndim == 2 else f"(B, {student.shape[1]}, D_t)"
        raise ShapeError(
            f"teacher: expected {expected} to match student {describe_shape(student.shape)} "
            f"(both pooled or both tokens), got {describe_shape(teacher.shape)}"
        )
    check_same_batch(student, teacher, "student", "teacher")
    if student.ndim == 3 and teacher.shape[1] != student.shape[1]:
        raise ShapeError(
            f"teacher: expected {student.shape[1]} tokens (the token count of student), got "
            f"{teacher.shape[1]} (shape {describe_shape(teacher.shape)}); resample the patch "
            f"grid with featkd.align_tokens"
        )
    check_same_device({"student": student, "teacher": teacher})
