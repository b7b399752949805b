"""Input validation shared by every featkd loss, head and utility.

Every error raised for bad user input is a subclass of :class:`FeatkdInputError`, itself a
``ValueError``, and its message names the argument, what was expected and what came::

    student: expected (B, D) or (B, N, D), got (8, 3, 32, 32)

The checks run before any maths, so a user sees the mistake in their own terms rather than a
shape error from deep inside torch. Shapes, dtypes and devices are known on the host and always
checked. Checks that read values (NaN/Inf in the features, the range of class labels) follow one
policy, :func:`set_finite_check`: by default (``"auto"``) they are exact and raise on CPU, where
reading a value is free; on an accelerator and under ``torch.compile`` they cost no host
synchronisation (a loss module reports non-finite inputs in ``last_parts["nonfinite_inputs"]``
and a KD2M module labels out of range in ``last_parts["labels_out_of_range"]``, both computed
on the device); ``"raise"`` makes them exact everywhere, ``"off"`` skips them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from featkd._sync import sync_free

__all__ = [
    "FINITE_CHECKS",
    "ChoiceError",
    "DTypeError",
    "DeviceError",
    "FeatkdInputError",
    "NonFiniteError",
    "ShapeError",
    "check_feature_pair",
    "check_finite",
    "check_floating",
    "check_label_range",
    "check_labels",
    "check_min_batch",
    "check_rank",
    "check_same_batch",
    "check_same_device",
    "check_width",
    "count_bad_labels",
    "count_nonfinite",
    "deferred_value_checks",
    "describe_shape",
    "finite_check_enabled",
    "labels_outside",
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


FINITE_CHECKS = ("auto", "raise", "off")
_FINITE_CHECK = "auto"


def set_finite_check(mode: str | bool) -> str:
    """Set how every featkd loss checks input values; returns the previous mode.

    The policy covers the checks that must read values: NaN/Inf in features and logits, and
    class labels out of range. Shapes, dtypes and devices are always checked.

    - ``"auto"`` (default): exact and raising on CPU in eager mode. On an accelerator, and
      under ``torch.compile``, no host synchronisation: a loss module reports the number of
      non-finite input entries in ``last_parts["nonfinite_inputs"]`` (a device tensor; log it,
      or test it every few hundred steps), and a KD2M module the number of class labels out of
      range in ``last_parts["labels_out_of_range"]``.
    - ``"raise"``: exact and raising everywhere (a :class:`NonFiniteError` or a
      :class:`ChoiceError` at the bad input), at one host synchronisation per checked tensor.
    - ``"off"``: no value checks at all.

    ``True`` means ``"auto"`` and ``False`` means ``"off"``.

    Example:
        >>> import featkd
        >>> previous = featkd.set_finite_check("raise")  # debugging NaNs on a GPU
        >>> _ = featkd.set_finite_check(previous)
    """
    global _FINITE_CHECK
    if isinstance(mode, bool):
        mode = "auto" if mode else "off"
    if mode not in FINITE_CHECKS:
        raise ChoiceError(
            f"mode: expected one of {', '.join(repr(m) for m in FINITE_CHECKS)} "
            f"(or True/False), got {mode!r}"
        )
    previous, _FINITE_CHECK = _FINITE_CHECK, mode
    return previous


def finite_check_enabled() -> bool:
    """Whether value checks are on at all (the mode is not ``"off"``)."""
    return _FINITE_CHECK != "off"


def _counted_on_device(x: torch.Tensor) -> bool:
    """``"auto"`` where reading a value of ``x`` would synchronise: the check becomes the
    device-side count of :func:`count_nonfinite`."""
    return _FINITE_CHECK == "auto" and sync_free(x)


def deferred_value_checks(x: torch.Tensor) -> bool:
    """Whether the value checks on ``x`` are skipped now: mode ``"off"``, or ``"auto"`` where
    reading a value would synchronise (an accelerator, ``torch.compile``)."""
    return _FINITE_CHECK == "off" or _counted_on_device(x)


def count_nonfinite(tensors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The number of NaN/Inf entries across floating ``tensors``, as a float32 device tensor,
    when the ``"auto"`` policy deferred their check (``None`` otherwise): what a loss module
    reports as ``last_parts["nonfinite_inputs"]``. No host synchronisation."""
    tensors = [t for t in tensors if t.is_floating_point()]
    if not any(_counted_on_device(t) for t in tensors):
        return None
    # x * 0 is NaN exactly where x is NaN or infinite: three kernels a tensor, where
    # isfinite's decomposition takes six
    counts = [t.detach().mul(0).isnan().sum(dtype=torch.float32) for t in tensors]
    total = counts[0]
    for count in counts[1:]:
        total = total + count
    return total


def labels_outside(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Where ``labels`` fall outside ``[0, limit)``, a bool tensor on their device, compared in
    int64 so that a bound past a small dtype's range (int8 labels, 200 classes) does not wrap.
    No host synchronisation."""
    wide = labels.long()
    return wide.clamp(0, limit - 1) != wide


def count_bad_labels(labels: torch.Tensor | None, limit: int | None) -> torch.Tensor | None:
    """The number of ``labels`` outside ``[0, limit)``, as a float32 device tensor, when the
    ``"auto"`` policy deferred their range check (``None`` otherwise, or without labels or a
    limit): what a KD2M module reports as ``last_parts["labels_out_of_range"]``. No host
    synchronisation."""
    if labels is None or limit is None or not _counted_on_device(labels):
        return None
    return labels_outside(labels, limit).sum(dtype=torch.float32)


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


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or Inf, under the policy of
    :func:`set_finite_check` (exact on CPU, deferred to a device-side count on accelerators)."""
    if deferred_value_checks(x):
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


def check_width(
    x: torch.Tensor, name: str, expected: int, symbol: str = "D", hint: str = "", dim: int = -1
) -> None:
    """``x.shape[dim]`` (the last dimension, or the channels of a map with ``dim=1``) equals
    ``expected``; ``hint`` (the fix) ends the message."""
    if x.shape[dim] != expected:
        axis = "last dimension" if dim in (-1, x.ndim - 1) else "channel dimension"
        raise ShapeError(
            f"{name}: expected {axis} {symbol}={expected}, "
            f"got {x.shape[dim]} (shape {describe_shape(x.shape)}){'; ' + hint if hint else ''}"
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


def check_labels(labels: Any, batch_size: int, name: str = "labels") -> torch.Tensor:
    """Class labels: an integer tensor of shape ``(B,)`` with values >= 0 (the value check
    follows :func:`set_finite_check`). Returns it."""
    _require_tensor(labels, name)
    if labels.ndim != 1 or labels.shape[0] != batch_size:
        raise ShapeError(
            f"{name}: expected shape ({batch_size},) of integer class indices, "
            f"got {describe_shape(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DTypeError(f"{name}: expected an integer tensor of class indices, got {labels.dtype}")
    if not deferred_value_checks(labels) and bool((labels < 0).any()):
        raise ChoiceError(f"{name}: expected class indices >= 0, got a negative label")
    return labels


def check_label_range(labels: torch.Tensor, limit: int, why: str) -> None:
    """Class labels below ``limit`` (``why`` says where the limit comes from), read under the
    policy of :func:`set_finite_check` like the other value checks."""
    # int64 first: a bound past a small dtype's range (int8 labels, 200 classes) must not wrap
    if not deferred_value_checks(labels) and bool((labels.long() >= limit).any()):
        raise ChoiceError(
            f"labels: expected class indices < {limit} ({why}), got a maximum of "
            f"{int(labels.max())}"
        )


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
