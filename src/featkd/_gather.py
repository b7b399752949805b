"""The plumbing of :mod:`featkd.distributed`: the metadata exchange and the padded all-gather.

Every rank of a group must enter a gather's collectives, in the same order. A check that fails
on one rank only and raises there, before the collectives, leaves the other ranks waiting in
them, or pairing them with that rank's next step. So every check whose outcome may differ
between ranks (kind, shape, dtype, device) is written into one small table of integers instead,
gathered from every rank in one all-gather (one host synchronisation), and judged alike on
every rank: either every rank raises the same error, naming the argument and the rank, or
none does.

A row of the table describes one tensor on one rank::

    [kind, ndim, dtype code, device type code, device index, device problem, d_0, ..., d_7]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from featkd._checks import DeviceError, FeatkdInputError, ShapeError, describe_shape

__all__ = ["all_gather_padded", "batch_sizes", "exchange_metadata"]

_MAX_DIMS = 8
_KIND, _NDIM, _DTYPE, _DEVICE_TYPE, _DEVICE_INDEX, _DEVICE_PROBLEM, _SHAPE = range(7)
_ROW = _SHAPE + _MAX_DIMS
# kinds
_ABSENT, _TENSOR, _NOT_A_TENSOR, _BAD_RANK = 0, 1, 2, 3
# device problems, found on the rank itself
_DEVICE_OK, _OTHER_DEVICE, _UNSUPPORTED_DEVICE = 0, 1, 2
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
# Only to name devices in messages; whether two devices agree is decided on the rank itself.
_DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu", "hpu", "mtia", "xla", "privateuseone")


def _device_types(group: Any) -> tuple[str, ...] | None:
    """The device types ``group``'s backend gathers from (``("cpu", "cuda")`` for gloo), or
    ``None`` when torch does not say (older torch, a third-party backend)."""
    try:
        config = dist.get_backend_config(group)  # "cpu:gloo,cuda:gloo", "cuda:nccl"
    except (AttributeError, RuntimeError, ValueError):
        return None
    types: list[str] = []
    for entry in config.split(","):
        device, _, backend = entry.strip().rpartition(":")
        found = [device] if device else dist.Backend.backend_capability.get(backend, [])
        types += [t for t in found if t not in types]
    return tuple(types) or None


def _row(x: Any, first: torch.device | None, supported: tuple[str, ...] | None) -> list[int]:
    row = [0] * _ROW
    if x is None:
        return row
    if not isinstance(x, torch.Tensor):
        row[_KIND] = _NOT_A_TENSOR
        return row
    row[_NDIM], row[_DTYPE] = x.ndim, _DTYPE_CODE.get(x.dtype, -1)
    device, device_type = x.device, x.device.type
    row[_DEVICE_TYPE] = _DEVICE_TYPES.index(device_type) if device_type in _DEVICE_TYPES else -1
    row[_DEVICE_INDEX] = -1 if device.index is None else device.index
    if first is not None and device != first:
        row[_DEVICE_PROBLEM] = _OTHER_DEVICE
    elif device_type == "meta" or (supported is not None and device_type not in supported):
        # a meta tensor has no data to send: no backend can gather it
        row[_DEVICE_PROBLEM] = _UNSUPPORTED_DEVICE
    if x.ndim == 0 or x.ndim > _MAX_DIMS:
        row[_KIND] = _BAD_RANK
        return row
    row[_KIND] = _TENSOR
    row[_SHAPE : _SHAPE + x.ndim] = list(x.shape)
    return row


def _exchange_device(
    devices: Sequence[torch.device], supported: tuple[str, ...] | None
) -> torch.device:
    """Where to put the exchanged table: a device the backend gathers from, even when this
    rank's tensors disagree or sit on ``meta``. The first tensor's device when usable (under
    NCCL the student's GPU), else any usable one, else the backend's own."""
    for device in devices:
        if device.type != "meta" and (supported is None or device.type in supported):
            return device
    cuda_only = supported is not None and "cpu" not in supported and "cuda" in supported
    if cuda_only and torch.cuda.is_available():  # NCCL: the GPU set with torch.cuda.set_device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(row: Sequence[int]) -> str:
    kind = row[_KIND]
    if kind == _ABSENT:
        return "None"
    if kind == _NOT_A_TENSOR:
        return "a non-tensor"
    ndim, code = row[_NDIM], row[_DTYPE]
    if kind == _BAD_RANK:
        return f"a tensor with {ndim} dimensions"
    dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else "an unusual dtype"
    return f"{describe_shape(row[_SHAPE : _SHAPE + ndim])} {dtype}"


def _describe_device(row: Sequence[int]) -> str:
    code, index = row[_DEVICE_TYPE], row[_DEVICE_INDEX]
    kind = _DEVICE_TYPES[code] if 0 <= code < len(_DEVICE_TYPES) else "a device of another type"
    return kind if index < 0 else f"{kind}:{index}"


def exchange_metadata(
    tensors: Sequence[tuple[str, Any]],
    group: Any,
    world: int,
    rank: int,
    equal_shards: bool,
    required: Sequence[str] = (),
) -> list[list[list[int]]]:
    """Every rank's metadata row for every named tensor: ``result[rank][i]`` describes tensor
    ``i``. Raises the same featkd error on every rank when any rank's tensors are unusable.

    The tensors of one rank must share a device: the first one's. ``required`` names the
    arguments that may not be ``None``. With ``equal_shards`` nothing is exchanged: every rank
    is assumed to hold this rank's shapes, and this rank's own problems (a device mismatch
    among them) raise on this rank only.
    """
    names = [name for name, _ in tensors]
    present = [x for _, x in tensors if isinstance(x, torch.Tensor)]
    first = present[0].device if present else None
    supported = _device_types(group)
    local = [_row(x, first, supported) for _, x in tensors]
    if equal_shards:
        _validate_table(names, [local], [rank], required, supported, group)
        return [local] * world
    device = _exchange_device([x.device for x in present], supported)
    mine = torch.tensor(local, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).tolist()  # the one host sync
    _validate_table(names, table, range(world), required, supported, group)
    return table


def batch_sizes(table: list[list[list[int]]], i: int = 0) -> list[int]:
    """Every rank's batch size of tensor ``i``."""
    return [ranks[i][_SHAPE] for ranks in table]


def _validate_table(
    names: Sequence[str],
    table: list[list[list[int]]],
    ranks: Sequence[int],
    required: Sequence[str],
    supported: tuple[str, ...] | None,
    group: Any,
) -> None:
    """The same argument must have the same kind, ndim, dtype and trailing shape on every rank;
    the tensors of one rank one device, which the backend gathers from; arguments paired per
    sample (student, teacher, labels) the same batch size per rank."""
    for i, name in enumerate(names):
        for rank, ranks_rows in zip(ranks, table, strict=True):
            row = ranks_rows[i]
            if row[_KIND] == _NOT_A_TENSOR:
                raise FeatkdInputError(
                    f"{name}: expected a torch.Tensor on every process, "
                    f"got {_describe(row)} on rank {rank}"
                )
            if row[_KIND] == _BAD_RANK:
                raise ShapeError(
                    f"{name}: expected a batch-first tensor with 1 to {_MAX_DIMS} dimensions "
                    f"on every process, got {_describe(row)} on rank {rank}"
                )
    for rank, rows in zip(ranks, table, strict=True):
        _validate_devices(names, rows, rank, supported, group)
    for i, name in enumerate(names):
        first = table[0][i]
        for rank, ranks_rows in zip(ranks[1:], table[1:], strict=True):
            row = ranks_rows[i]
            same = row[_KIND : _DTYPE + 1] == first[_KIND : _DTYPE + 1]
            if not same or row[_SHAPE + 1 :] != first[_SHAPE + 1 :]:
                raise ShapeError(
                    f"{name}: expected the same number of dimensions, dtype and trailing "
                    f"shape on every process (only the batch size may differ), "
                    f"got {_describe(first)} on rank 0 and {_describe(row)} on rank {rank}"
                )
    for rank, rows in zip(ranks, table, strict=True):
        present = [(names[i], row) for i, row in enumerate(rows) if row[_KIND] == _TENSOR]
        if not present:
            continue
        first_name, first = present[0]
        for name, row in present[1:]:
            if row[_SHAPE] != first[_SHAPE]:
                raise ShapeError(
                    f"{name}: expected batch size {first[_SHAPE]} on rank {rank} (the batch of "
                    f"{first_name} there), got {row[_SHAPE]} (shape {_describe(row)})"
                )
    for name in required:
        if table[0][names.index(name)][_KIND] == _ABSENT:  # then absent on every rank
            raise FeatkdInputError(f"{name}: expected a torch.Tensor on every rank, got None")


def _validate_devices(
    names: Sequence[str],
    rows: Sequence[Sequence[int]],
    rank: int,
    supported: tuple[str, ...] | None,
    group: Any,
) -> None:
    tensors = [(name, row) for name, row in zip(names, rows, strict=True) if row[_KIND] == _TENSOR]
    for name, row in tensors:
        if row[_DEVICE_PROBLEM] == _OTHER_DEVICE:
            first_name, first = tensors[0]
            raise DeviceError(
                f"{name}: expected a tensor on {_describe_device(first)} on rank {rank} (the "
                f"device of {first_name} there), got one on {_describe_device(row)}"
            )
        if row[_DEVICE_PROBLEM] == _UNSUPPORTED_DEVICE:
            usable = ", ".join(supported) if supported else "devices with data"
            raise DeviceError(
                f"{name}: expected a tensor on a device the {dist.get_backend(group)} process "
                f"group gathers from ({usable}), got one on {_describe_device(row)} "
                f"on rank {rank}"
            )


def all_gather_padded(x: torch.Tensor, sizes: Sequence[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0; shards may differ in size (padded to the
    largest for the collective, unpadded after)."""
    largest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < largest:
        pad = x.new_zeros((largest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    pieces = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(pieces, x, group=group)
    if all(size == largest for size in sizes):
        return torch.cat(pieces)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])
