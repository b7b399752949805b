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
from collections.abc import Iterator

import torch

from featkd._checks import ChoiceError

__all__ = ["FUSED_MODES", "fused_kernels_enabled", "interpret_on_cpu", "set_fused_kernels"]

FUSED_MODES = ("auto", "off")
_FUSED = "auto"
_TRITON: bool | None = None  # found on first use, not at import
_ON_CPU = False


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
    global _FUSED
    if isinstance(mode, bool):
        mode = "auto" if mode else "off"
    if mode not in FUSED_MODES:
        raise ChoiceError(
            f"mode: expected one of {', '.join(repr(m) for m in FUSED_MODES)} "
            f"(or True/False), got {mode!r}"
        )
    previous, _FUSED = _FUSED, mode
    return previous


def _triton_installed() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def fused_kernels_enabled(x: torch.Tensor) -> bool:
    """Whether a fused kernel may run on ``x`` under the current policy."""
    if _FUSED == "off" or torch.compiler.is_compiling():
        return False
    return (x.is_cuda or _ON_CPU) and _triton_installed()


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
