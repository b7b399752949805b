"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode``: records the operations that make the
host wait for the device on CUDA, or whose output shape depends on the data (issue 13).

On CPU nothing waits, so the operations are recorded instead of timed: aten ops that read a
value on the host or size their output from the data, linear-algebra ops that check their
results on the host (or that synchronise on CUDA by documentation: ``svd``, ``eigh``), tensors
built from host data in the call (copied to the device, which synchronises), and
``Tensor.tolist`` (which on CPU reads memory without dispatching an op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# reads a value on the host, or sizes its output from the data
DATA_DEPENDENT = {
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "unique_dim",
    "_unique",
    "_unique2",
    "unique_consecutive",
}
# checks its result on the host (``info``), or synchronises on CUDA by documentation
HOST_CHECKED_LINALG = {"_linalg_check_errors", "_linalg_svd", "_linalg_eigh", "linalg_eig"}
# a tensor made from host data (``torch.tensor(list)``): on CUDA it is copied from pageable
# memory, which synchronises; featkd._sync.device_values fills such constants on the device
HOST_BUILT = {"lift_fresh", "lift_fresh_copy"}


class HostSyncRecorder(TorchDispatchMode):
    """``with HostSyncRecorder() as recorder: ...``; then ``recorder.syncs`` lists the
    syncing operations, in order, and ``recorder.ops`` every dispatched one."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        if name in DATA_DEPENDENT or name in HOST_CHECKED_LINALG or name in HOST_BUILT:
            self.syncs.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.syncs.append(name)  # its output size is a sum over the data
        elif name in ("index", "index_put", "_index_put_impl") and _has_boolean_index(args):
            self.syncs.append(f"{name} with a boolean mask")  # the shape is the mask's count
        return func(*args, **kwargs)


def _has_boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@contextlib.contextmanager
def record_host_syncs() -> Iterator[list[str]]:
    """The syncs of the block: dispatched ops and ``Tensor.tolist`` calls."""
    original = torch.Tensor.tolist
    with HostSyncRecorder() as recorder:

        def tolist(self):
            recorder.syncs.append("tolist")
            return original(self)

        torch.Tensor.tolist = tolist
        try:
            yield recorder.syncs
        finally:
            torch.Tensor.tolist = original
