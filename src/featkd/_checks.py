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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

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


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype sensitive maths runs in: float64 if any input is float64, else float32.

    Half-precision inputs (float16, bfloat16) are promoted: similarity softmaxes, covariances,
    matrix functions and OT lose too much in 8-10 bits of mantissa.
    """
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss value is returned in, given the student's dtype.

    float64 stays float64; everything else comes back as float32. A loss is a single number,
    so nothing is saved by returning it in float16 or bfloat16, and float16 silently overflows
    to ``inf`` above 65504 (a Wasserstein distance between batches whose means differ by 100
    already does), which neither the user nor ``GradScaler`` would notice: the gradient stays
    finite. Under autocast, torch's own losses also return float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def check_weights(weights: Any, name: str, terms: Sequence[str]) -> tuple[float, ...]:
    """One finite number ``>= 0`` per named term of a composite loss. Returns them as floats."""
    try:
        values = tuple(weights)
    except TypeError:
        values = ()
    ok = len(values) == len(terms) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 and w != float("inf")
        for w in values
    )
    if not ok:
        raise ChoiceError(
            f"{name}: expected {len(terms)} finite numbers >= 0 for the terms "
            f"({', '.join(terms)}), got {weights!r}"
        )
    return tuple(float(w) for w in values)


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
