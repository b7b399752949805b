"""The one precision fence: where featkd turns autocast off and picks its working dtype.

Similarity softmaxes, covariances, matrix functions and optimal transport lose too much in the
8-10 mantissa bits of float16 and bfloat16, and autocast would silently run their matmuls there.
So every loss core, and every head that is not a plain layer, runs inside :func:`full_precision`:
autocast off, inputs in float32 (float64 if any input is float64). Loss values come back in
:func:`result_dtype`; features (heads, pooling, normalisation) in the caller's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["full_precision", "result_dtype", "work_dtype"]


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
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


@contextlib.contextmanager
def full_precision(*tensors: torch.Tensor) -> Iterator[torch.dtype]:
    """Autocast off on the device of ``tensors[0]``; yields :func:`work_dtype` of ``tensors``.

    Example:
        >>> x = torch.randn(4, 3, dtype=torch.bfloat16)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision(x) as work:
        ...     (x.to(work) @ x.to(work).mT).dtype
        torch.float32
    """
    device_type = tensors[0].device.type
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type, enabled=False):
            yield work_dtype(*tensors)
    else:  # meta and other devices autocast does not know: nothing to turn off
        yield work_dtype(*tensors)
