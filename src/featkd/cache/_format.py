"""The on-disk format of a teacher cache: the manifest, the raw field files, their checksums.

A cache is a directory::

    manifest.json        written last, atomically: its presence means the cache is complete
    00-pooled.bin        one raw file per field: ``length`` rows of ``bytes_per_sample`` bytes,
    01-tokens.bin        C order, the stored dtype's native (little-endian) bytes

Every field keeps one CRC-32 per block of ``block_rows`` rows, so a reader can check a block the
first time it reads a row of it (opening stays cheap; no corrupted value is returned).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featkd._checks import FeatkdInputError

__all__ = [
    "BLOCK_BYTES",
    "FORMAT",
    "MANIFEST",
    "TENSOR_FIELD",
    "VERSION",
    "CacheError",
    "Field",
    "block_checksum",
    "dataset_length",
    "dtype_from_name",
    "dtype_name",
    "file_name",
    "read_manifest",
    "write_manifest",
]

FORMAT = "featkd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
# the one field of a teacher that returns a tensor, not a dict
TENSOR_FIELD = "features"
# default checksum block: about 1 MiB, so the first read of a row checks at most that much
BLOCK_BYTES = 1 << 20


class CacheError(FeatkdInputError):
    """A teacher cache is missing, unfinished, truncated, corrupted or does not fit the dataset.

    The message names the cache's path (and the field, file and block where it applies), what
    was expected and what was found. Recompute the cache with
    :func:`~featkd.cache_teacher_features` (``overwrite=True``) when its files are damaged.
    """


def dataset_length(dataset: Any) -> int:
    """``len(dataset)``, or an error naming ``dataset`` for one without a length."""
    try:
        return len(dataset)
    except TypeError:
        raise FeatkdInputError(
            f"dataset: expected a map-style dataset with a length, got {type(dataset).__name__}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CacheError(f"{where}: unknown dtype {name!r} in the manifest")
    return dtype


def file_name(index: int, field: str) -> str:
    """A file name for field ``index``: its position, then the name's safe characters (a
    name such as ``"blocks.11/out"`` must not make a path)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", field)[:40].strip(".")
    return f"{index:02d}-{safe or 'field'}.bin"


def block_checksum(data: Any, running: int = 0) -> int:
    """CRC-32 of a buffer (continuing ``running``): detects corruption, not tampering."""
    return zlib.crc32(memoryview(data).cast("B"), running)


@dataclass(frozen=True)
class Field:
    """One stored output of the teacher, as the manifest describes it."""

    name: str
    file: str
    shape: tuple[int, ...]  # per sample
    dtype: torch.dtype
    block_rows: int
    checksums: tuple[int, ...]  # one CRC-32 per block of block_rows rows

    @property
    def bytes_per_sample(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def file_bytes(self, length: int) -> int:
        return length * self.bytes_per_sample

    def blocks(self, length: int) -> int:
        return -(-length // self.block_rows)

    def to_json(self, length: int) -> dict[str, Any]:
        return {
            "file": self.file,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "bytes_per_sample": self.bytes_per_sample,
            "file_bytes": self.file_bytes(length),
            "checksum": {
                "algorithm": "crc32",
                "block_rows": self.block_rows,
                "blocks": list(self.checksums),
            },
        }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically: a reader sees the old file, none, or the whole new one,
    never a half-written one (a temporary file, synced, then renamed over)."""
    temporary = path / (MANIFEST + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path / MANIFEST)


def read_manifest(path: Path) -> tuple[dict[str, Any], list[Field]]:
    """The manifest of the cache at ``path`` and its fields, after checking that every field's
    file is there with exactly the expected size (a truncated file is found here, at open)."""
    where = f"teacher cache {str(path)!r}"
    if not path.is_dir():
        raise CacheError(f"{where}: expected a cache directory, found no directory there")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(
            f"{where}: expected {MANIFEST}, found none (the cache was never finished: an "
            f"interrupted cache_teacher_features leaves no manifest); recompute it"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheError(f"{where}: {MANIFEST} is not valid JSON ({error})") from None
    try:
        return manifest, _fields(path, manifest, where)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, CacheError):
            raise
        raise CacheError(f"{where}: {MANIFEST} is malformed ({error!r})") from None


def _fields(path: Path, manifest: dict[str, Any], where: str) -> list[Field]:
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(
            f"{where}: expected format {FORMAT!r} version {VERSION}, found "
            f"{manifest.get('format')!r} version {manifest.get('version')!r}"
        )
    if manifest["byte_order"] != sys.byteorder:
        raise CacheError(
            f"{where}: written on a {manifest['byte_order']}-endian machine, read on a "
            f"{sys.byteorder}-endian one; recompute the cache here"
        )
    length = manifest["length"]
    if not isinstance(length, int) or length < 1:
        raise CacheError(f"{where}: expected a dataset length >= 1, found {length!r}")
    fields = []
    for name, entry in manifest["fields"].items():
        checksum = entry["checksum"]
        field = Field(
            name=name,
            file=entry["file"],
            shape=tuple(int(size) for size in entry["shape"]),
            dtype=dtype_from_name(entry["dtype"], f"{where}, field {name!r}"),
            block_rows=int(checksum["block_rows"]),
            checksums=tuple(int(value) for value in checksum["blocks"]),
        )
        here = f"{where}, field {name!r} ({field.file})"
        if not isinstance(field.file, str) or Path(field.file).name != field.file:
            raise CacheError(f"{here}: expected a file name inside the cache folder")
        if checksum["algorithm"] != "crc32" or field.block_rows < 1:
            raise CacheError(f"{here}: expected crc32 checksums over blocks of >= 1 rows")
        if len(field.checksums) != field.blocks(length):
            raise CacheError(
                f"{here}: expected {field.blocks(length)} block checksums for {length} rows, "
                f"found {len(field.checksums)}"
            )
        if entry["file_bytes"] != field.file_bytes(length):
            raise CacheError(
                f"{here}: the manifest says {entry['file_bytes']} bytes, its shape and dtype "
                f"give {field.file_bytes(length)}"
            )
        file = path / field.file
        found = file.stat().st_size if file.is_file() else None
        if found != field.file_bytes(length):
            what = "no file" if found is None else f"{found} bytes"
            cut = " (truncated)" if found is not None and found < field.file_bytes(length) else ""
            raise CacheError(
                f"{here}: expected {field.file_bytes(length)} bytes ({length} samples of "
                f"{field.bytes_per_sample}), found {what}{cut}; recompute the cache"
            )
        fields.append(field)
    if not fields:
        raise CacheError(f"{where}: the manifest lists no field")
    return fields
