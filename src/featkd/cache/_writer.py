"""Writing a teacher cache: the folder, the teacher's outputs as named fields, and one
preallocated memory-mapped file per field filled batch by batch with its block checksums."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featkd._checks import FeatkdInputError, ShapeError
from featkd._options import check_floating_dtype
from featkd.cache._format import (
    BLOCK_BYTES,
    MANIFEST,
    TENSOR_FIELD,
    CacheError,
    Field,
    block_checksum,
    file_name,
    read_manifest,
)

__all__ = ["FieldWriter", "discard", "named_outputs", "prepare_folder", "stored_dtypes"]

_OWN_FILE = re.compile(r"^\d{2}-.+\.bin$")


def prepare_folder(path: Path, overwrite: bool) -> bool:
    """Make ``path`` ready for a new cache; returns whether the folder was created here.

    Without ``overwrite`` an existing cache, or any file, is refused. With it, the old manifest
    goes first (an interrupted overwrite must not leave the old manifest over new files), then
    the old cache's files; files the cache did not write are left alone.
    """
    if path.exists() and not path.is_dir():
        raise CacheError(f"path: expected a folder for the cache, {str(path)!r} is a file")
    if not path.exists():
        path.mkdir(parents=True)
        return True
    present = sorted(p.name for p in path.iterdir())
    if not present:
        return False
    if not overwrite:
        if MANIFEST in present:
            raise CacheError(
                f"path: a teacher cache already exists at {str(path)!r}; pass overwrite=True to "
                f"replace it, or choose another path"
            )
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise CacheError(
            f"path: expected a new or empty folder, {str(path)!r} holds {shown} but no "
            f"{MANIFEST} (an interrupted cache?); pass overwrite=True to write there anyway"
        )
    old_files = []
    # a damaged cache cannot list its files, but they match the naming pattern below
    with contextlib.suppress(CacheError):
        old_files = [field.file for field in read_manifest(path)[1]]
    (path / MANIFEST).unlink(missing_ok=True)
    for name in present:
        if name in old_files or _OWN_FILE.match(name) or name == MANIFEST + ".tmp":
            (path / name).unlink()
    return False


def discard(path: Path, files: list[Path], created: bool) -> None:
    """Remove what an interrupted write left (its files, the folder if it made it)."""
    for file in [*files, path / (MANIFEST + ".tmp")]:
        file.unlink(missing_ok=True)
    if created and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def named_outputs(output: Any, features: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
    """The teacher's output as ``{field: tensor}``: a tensor is the one field ``"features"``, a
    dict gives its entries (only those ``features`` names, when given)."""
    if isinstance(output, torch.Tensor):
        if features is not None:
            raise FeatkdInputError(
                f"features: the teacher returned a tensor, not a dict, so there is no output to "
                f"pick by name; leave features=None (got {list(features)})"
            )
        return {TENSOR_FIELD: output}
    if not isinstance(output, Mapping):
        raise FeatkdInputError(
            f"teacher: expected it to return a tensor (B, ...) or a dict of them, got "
            f"{type(output).__name__}; wrap it, e.g. lambda x: dict(zip(names, teacher(x)))"
        )
    if features is not None:
        missing = [name for name in features if name not in output]
        if missing:
            raise FeatkdInputError(
                f"features: {missing} not among the teacher's outputs {list(output)}"
            )
        output = {name: output[name] for name in features}
    if not output:
        raise FeatkdInputError("teacher: returned an empty dict; there is nothing to cache")
    not_tensors = [key for key, value in output.items() if not isinstance(value, torch.Tensor)]
    if not_tensors or not all(isinstance(key, str) for key in output):
        raise FeatkdInputError(
            f"teacher: expected a dict of tensors with string keys; {not_tensors or list(output)} "
            f"are not (pick the tensor outputs with features=[...])"
        )
    return dict(output)


def stored_dtypes(
    outputs: dict[str, torch.Tensor], dtype: torch.dtype | Mapping[str, torch.dtype] | None
) -> dict[str, torch.dtype]:
    """The dtype each field is stored in: the teacher's, or ``dtype`` for floating-point fields,
    or ``dtype[name]`` for the fields a mapping names."""
    if isinstance(dtype, Mapping):
        unknown = [name for name in dtype if name not in outputs]
        if unknown:
            raise FeatkdInputError(
                f"dtype: {unknown} are not fields; the fields are {list(outputs)}"
            )
        for name, value in dtype.items():
            check_floating_dtype(value, f"dtype[{name!r}]")
        return {name: dtype.get(name, value.dtype) for name, value in outputs.items()}
    check_floating_dtype(dtype)
    return {
        name: dtype if dtype is not None and value.is_floating_point() else value.dtype
        for name, value in outputs.items()
    }


class FieldWriter:
    """One field's preallocated memory-mapped file, filled in order, with a running CRC-32 of
    the current block of rows (so nothing is read back to checksum it)."""

    def __init__(
        self,
        path: Path,
        index: int,
        name: str,
        first: torch.Tensor,
        dtype: torch.dtype,
        length: int,
        block_rows: int | None,
    ) -> None:
        if first.ndim < 1:
            raise ShapeError(f"teacher: output {name!r} is a scalar, expected (B, ...)")
        self.name, self.dtype, self.length = name, dtype, length
        self.shape = tuple(first.shape[1:])
        self.row_bytes = math.prod(self.shape) * dtype.itemsize
        self.block_rows = block_rows or max(1, BLOCK_BYTES // max(self.row_bytes, 1))
        self.file = path / file_name(index, name)
        size = length * self.row_bytes
        if size:
            self._array: np.memmap | None = np.memmap(
                self.file, dtype=np.uint8, mode="w+", shape=(size,)
            )
        else:  # numpy cannot map an empty file
            self.file.touch()
            self._array = None
        self.rows = 0
        self._checksums: list[int] = []
        self._running, self._in_block = 0, 0

    def write(self, values: torch.Tensor, batch: int) -> None:
        """Append the next rows (one batch of the teacher's output, ``batch`` samples)."""
        if tuple(values.shape[1:]) != self.shape or values.shape[0] != batch:
            raise ShapeError(
                f"teacher: output {self.name!r} of the batch at sample {self.rows}: expected "
                f"shape {(batch, *self.shape)} (the batch's size, then the per-sample shape of "
                f"the first batch), got {tuple(values.shape)}"
            )
        if self.rows + batch > self.length:
            raise FeatkdInputError(
                f"dataset: yielded more than len(dataset) = {self.length} samples"
            )
        values = values.detach().to(device="cpu", dtype=self.dtype).contiguous()
        # raw bytes of any dtype (bfloat16 too: numpy has no such type)
        raw = values.reshape(-1).view(torch.uint8).numpy()
        start = self.rows * self.row_bytes
        if self._array is not None:
            self._array[start : start + raw.size] = raw
        done = 0
        while done < batch:
            take = min(batch - done, self.block_rows - self._in_block)
            piece = raw[done * self.row_bytes : (done + take) * self.row_bytes]
            self._running = block_checksum(piece, self._running)
            self._in_block += take
            done += take
            if self._in_block == self.block_rows:
                self._checksums.append(self._running)
                self._running, self._in_block = 0, 0
        self.rows += batch

    def finish(self) -> Field:
        """Flush the file to disk; returns the field's manifest description."""
        if self.rows != self.length:
            raise FeatkdInputError(
                f"dataset: yielded {self.rows} samples, but len(dataset) is {self.length}"
            )
        if self._in_block:
            self._checksums.append(self._running)
        if self._array is not None:
            self._array.flush()
            self._array = None
        return Field(
            name=self.name,
            file=self.file.name,
            shape=self.shape,
            dtype=self.dtype,
            block_rows=self.block_rows,
            checksums=tuple(self._checksums),
        )

    def close(self) -> None:
        self._array = None  # unmaps the file
