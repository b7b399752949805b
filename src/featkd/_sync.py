"""The one place that decides whether featkd may make the host wait for the device.

On CPU a host read costs nothing, so featkd keeps its exact checks and its adaptive algorithms
there (an error raised at the bad input, the fewest squarings, an SVD). On an accelerator every
host read stalls the CPU until the device drains, so the same calls take a synchronisation-free
path: checks become flags the device computes, algorithms run a fixed number of steps. Under
``torch.compile`` the sync-free path is taken too, so that the graph does not break.

:func:`simulate_accelerator` lets the CPU test suite run the accelerator path (issue 13's CPU
guards): inside it, CPU tensors are treated as if they lived on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch

__all__ = ["device_constant", "device_eye", "device_values", "simulate_accelerator", "sync_free"]

_SIMULATED = False


def sync_free(x: torch.Tensor) -> bool:
    """Whether the computation on ``x`` must not read device values on the host: ``x`` lives
    off the CPU, or the code is being compiled, or :func:`simulate_accelerator` is active."""
    return _SIMULATED or x.device.type != "cpu" or torch.compiler.is_compiling()


_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 64
# a constant this large is rebuilt in each call instead (an index table at a large batch would
# hold hundreds of MiB); the kept ones together stay under _MAX_BYTES
_MAX_KEPT_BYTES = 16 << 20
_MAX_BYTES = 64 << 20


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plain(t: torch.Tensor) -> bool:
    # a fake, functional or other subclass tensor belongs to a trace (make_fx, export): it must
    # neither be kept nor meet a kept real tensor
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def device_constant(key: Hashable, like: torch.Tensor, make: Callable[[], torch.Tensor]):
    """The tensor ``make()`` builds on ``like``'s device, built once per ``key``, device and
    dtype and then kept: read-only, for tables a computation needs in every call.

    Not kept while ``torch.compile`` traces (the graph holds its constants), a CUDA graph is
    captured (its memory belongs to the graph) or ``like`` is a tracing tensor (fake,
    functional); nor above 16 MiB. Made outside inference mode, so that autograd can save it.
    """
    if (
        torch.compiler.is_compiling()
        or not _plain(like)
        or (like.is_cuda and torch.cuda.is_current_stream_capturing())
    ):
        return make()
    full_key = (key, like.device, like.dtype)
    cached = _CONSTANTS.get(full_key)
    if cached is None:
        with torch.inference_mode(False):
            cached = make()
        if torch._C._functorch.is_functorch_wrapped_tensor(cached) or not _plain(cached):
            return cached  # made inside vmap, grad or a trace: it belongs to that transform
        size = _bytes(cached)
        if size > _MAX_KEPT_BYTES:
            return cached
        kept = sum(_bytes(t) for t in _CONSTANTS.values())
        if len(_CONSTANTS) >= _MAX_CONSTANTS or kept + size > _MAX_BYTES:
            _CONSTANTS.clear()  # a long-running process sweeping options or sizes: start afresh
        _CONSTANTS[full_key] = cached
    return cached


def device_eye(rows: int, like: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """The ``rows x columns`` identity (square by default) in ``like``'s dtype, on its device,
    built once and kept (:func:`device_constant`): one kernel fewer in every call that needs
    it. Read-only."""
    cols = rows if columns is None else columns
    return device_constant(
        ("eye", rows, cols),
        like,
        lambda: torch.eye(rows, cols, dtype=like.dtype, device=like.device),
    )


def device_values(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """The Python numbers ``values`` as a 1-D tensor of ``like``'s dtype, filled on its device.
    Read-only: the same tensor is returned for the same numbers, device and dtype.

    ``torch.tensor(values, device=...)`` builds the tensor on the host and copies it, and a
    copy from pageable host memory synchronises on CUDA, once per call. Filling on the device
    costs one kernel per number, so the result is kept (:func:`device_constant`: the options
    of a loss are few and fixed) and later calls launch none.
    """
    values = tuple(float(v) for v in values)
    # float.hex, not the floats: -0.0 == 0.0 and nan != nan as keys
    key = ("values", tuple(v.hex() for v in values))
    return device_constant(key, like, lambda: _filled(values, like))


def _filled(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    # torch.full, not like.new_full: inside vmap the latter makes a batched tensor
    scalars = [torch.full((), v, dtype=like.dtype, device=like.device) for v in values]
    return torch.stack(scalars)


@contextlib.contextmanager
def simulate_accelerator() -> Iterator[None]:
    """Inside the block, CPU tensors take the accelerator's synchronisation-free path (for tests
    and for comparing the two paths on one machine).

    Example:
        >>> import torch
        >>> from featkd._sync import simulate_accelerator, sync_free
        >>> x = torch.zeros(2)
        >>> with simulate_accelerator():
        ...     print(sync_free(x))
        True
        >>> print(sync_free(x))
        False
    """
    global _SIMULATED
    previous, _SIMULATED = _SIMULATED, True
    try:
        yield
    finally:
        _SIMULATED = previous
