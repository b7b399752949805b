"""The one place that decides whether featkd runs a fused Triton kernel instead of plain torch.

Triton is optional: featkd never imports it at ``import featkd``, only at the first call that
can use a kernel. The pure-torch path stays the fallback and the reference the kernels are
tested against. A kernel runs when the policy is ``"auto"``, Triton is installed, the tensors
live on a CUDA device, and the code is not being traced by ``torch.compile`` (which fuses the
torch path itself). The tests run the kernels on CPU tensors in Triton's interpreter, inside
:func:`interpret_on_cpu`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from featkd._checks import ChoiceError

__all__ = [
    "FUSED_MODES",
    "FusedKernelWarning",
    "fused_kernel_failed",
    "fused_kernels_enabled",
    "interpret_on_cpu",
    "set_fused_kernels",
]

FUSED_MODES = ("auto", "off")
_FUSED = "auto"
_TRITON: bool | None = None  # found on first use, not at import
_ON_CPU = False
_FAILED: str | None = None  # why a kernel could not run here; the torch path is used since


class FusedKernelWarning(UserWarning):
    """A fused kernel could not be compiled or launched; featkd uses the torch path instead."""


def set_fused_kernels(mode: str | bool) -> str:
    """Set whether featkd may run its fused Triton kernels; returns the previous mode.

    - ``"auto"`` (default): on CUDA tensors, when Triton is installed (it comes with torch's
      CUDA builds on Linux), outside ``torch.compile``. Today one kernel: the neighbourhood KL of
      :class:`featkd.CosPressLoss`, in float32.
    - ``"off"``: plain torch everywhere (the reference; it bounds its memory by chunking).

    ``True`` means ``"auto"`` and ``False`` means ``"off"``.

    Example:
        >>> import featkd
        >>> previous = featkd.set_fused_kernels("off")  # compare against the torch path
        >>> _ = featkd.set_fused_kernels(previous)
    """
    global _FUSED, _FAILED
    if isinstance(mode, bool):
        mode = "auto" if mode else "off"
    if mode not in FUSED_MODES:
        raise ChoiceError(
            f"mode: expected one of {', '.join(repr(m) for m in FUSED_MODES)} "
            f"(or True/False), got {mode!r}"
        )
    previous, _FUSED = _FUSED, mode
    _FAILED = None  # a new choice: a kernel that failed gets another try
    return previous


def _triton_installed() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def fused_kernels_enabled(x: torch.Tensor) -> bool:
    """Whether a fused kernel may run on ``x`` under the current policy."""
    if _FUSED == "off" or _FAILED is not None or torch.compiler.is_compiling():
        return False
    return (x.is_cuda or _ON_CPU) and _triton_installed()


def fused_kernel_failed(name: str, error: Exception) -> None:
    """Record that the kernel ``name`` raised ``error`` (a Triton that cannot compile or launch
    on this machine: no compiler for this GPU, too little shared memory), warn once, and turn
    the kernels off until :func:`set_fused_kernels` is called again. The caller then computes
    the same value on the torch path: a training run goes on, slower, and says why."""
    global _FAILED
    _FAILED = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"featkd's fused kernel {name} failed ({_FAILED}); using the torch path from now on. "
        "featkd.set_fused_kernels('off') chooses the torch path without trying.",
        FusedKernelWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def interpret_on_cpu() -> Iterator[None]:
    """Inside the block, the kernels run on CPU tensors too, in Triton's interpreter (slowly: for
    tests). Triton chooses between compiling and interpreting its own library when it is first
    imported, so ``TRITON_INTERPRET=1`` must be set before that (``tests/conftest.py`` sets it
    on machines without CUDA)."""
    global _ON_CPU
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "interpret_on_cpu needs TRITON_INTERPRET=1 set before Triton is imported"
        )
    previous, _ON_CPU = _ON_CPU, True
    try:
        yield
    finally:
        _ON_CPU = previous
