"""TeacherCache: read the features that :func:`~featkd.cache_teacher_features` stored."""

from __future__ import annotations

import copy
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featkd._checks import FeatkdInputError
from featkd.cache._format import TENSOR_FIELD, CacheError, block_checksum, read_manifest

__all__ = ["TeacherCache"]


class TeacherCache:
    """A teacher's features cached on disk, memory-mapped and checked as they are read.

    Opening reads the manifest and checks every file's size (a truncated file is an error
    here). Values are checked lazily: each field stores a CRC-32 per block of rows, and the
    first read of a row checks its whole block, so a corrupted value is never returned while
    opening even a huge cache stays cheap. :meth:`verify` checks everything at once.

    ``cache[i]`` returns sample ``i`` as a dict ``field name -> tensor`` in the stored dtype;
    when the teacher returned a single tensor (not a dict), it returns that tensor (its one
    field is named ``"features"``). The tensors are copies of one row, safe to modify.
    :meth:`field` returns a whole field as a memory-mapped tensor, without copying the file.

    The files are mapped on first use in each process and a pickled cache carries only its
    path, so a cache (or a dataset holding one) works in ``DataLoader`` workers. Each process
    checks the blocks it reads once.

    Args:
        path: the cache directory written by :func:`~featkd.cache_teacher_features`.

    Shape:
        - field ``name`` of ``cache[i]``: the field's per-sample shape, e.g. ``(D,)`` or ``(N, D)``.
        - ``cache.field(name)``: ``(len(cache), *per-sample shape)``.

    Raises:
        CacheError: no cache there, an unfinished one (no manifest), a malformed manifest, a
            missing or wrongly sized file; on reading, a block whose checksum does not match.

    Example:
        >>> import tempfile, torch, featkd
        >>> images = torch.randn(10, 3, 8, 8)
        >>> teacher = lambda x: {"pooled": x.mean((2, 3)), "tokens": x.flatten(2).mT}
        >>> scratch = tempfile.TemporaryDirectory()  # removed at exit
        >>> folder = scratch.name
        >>> _ = featkd.cache_teacher_features(
        ...     teacher, images, folder, name="toy", progress=False
        ... )
        >>> cache = featkd.TeacherCache.open(folder)
        >>> len(cache), cache.name, cache.fields
        (10, 'toy', ('pooled', 'tokens'))
        >>> sample = cache[3]  # a dict: the teacher returned one
        >>> tuple(sample["tokens"].shape), tuple(cache.field("pooled").shape)
        ((64, 3), (10, 3))
        >>> torch.equal(sample["pooled"], images[3].mean((1, 2)))
        True
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise FeatkdInputError(f"path: expected a folder path, got {type(path).__name__}")
        self.path = Path(path)
        self._manifest, fields = read_manifest(self.path)
        self._fields = {field.name: field for field in fields}
        self._length: int = self._manifest["length"]
        self._single = self._manifest["output"] == "tensor"
        self._rows: dict[str, torch.Tensor] | None = None  # mapped on first read, per process
        self._checked = {
            name: np.zeros(f.blocks(self._length), bool) for name, f in self._fields.items()
        }

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TeacherCache:
        """Open the cache at ``path`` (the same as ``TeacherCache(path)``)."""
        return cls(path)

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        """The teacher's name given when the cache was written."""
        return self._manifest["name"]

    @property
    def fields(self) -> tuple[str, ...]:
        """The stored fields' names, in the teacher's output order."""
        return tuple(self._fields)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """Per-sample shape of each field."""
        return {name: torch.Size(field.shape) for name, field in self._fields.items()}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Stored dtype of each field."""
        return {name: field.dtype for name, field in self._fields.items()}

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed ``manifest.json`` (a copy)."""
        return copy.deepcopy(self._manifest)

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}: {tuple(field.shape)} {field.dtype}" for name, field in self._fields.items()
        )
        return f"TeacherCache({str(self.path)!r}, name={self.name!r}, length={len(self)}, {shapes})"

    # ------------------------------------------------------------------ reading
    def __getitem__(self, index: int) -> torch.Tensor | dict[str, torch.Tensor]:
        try:
            i = operator.index(index)
        except TypeError:
            raise FeatkdInputError(
                f"index: expected an integer sample index, got {type(index).__name__}"
            ) from None
        if not -self._length <= i < self._length:
            raise IndexError(f"index: {index} is out of range for a cache of {self._length}")
        i %= self._length
        rows = self._mapped()
        sample = {}
        for name, field in self._fields.items():
            self._check_block(name, i // field.block_rows)
            sample[name] = rows[name][i].clone()
        return sample[TENSOR_FIELD] if self._single else sample

    def field(self, name: str | None = None, *, verify: bool = True) -> torch.Tensor:
        """A whole field as a memory-mapped tensor ``(len(cache), *shape)``, no copy made.

        Writing into it changes this process's view only (later reads in this process see
        the change), never the file: the mapping is copy-on-write.

        Args:
            name: the field; may be left out when the cache has a single field.
            verify: check every block of the field not yet checked in this process first (the
                first time, it reads the whole file). ``False`` returns the view unchecked.

        Raises:
            FeatkdInputError: an unknown field name.
            CacheError: a block whose checksum does not match.
        """
        if name is None:
            if len(self._fields) != 1:
                raise FeatkdInputError(f"name: the cache has fields {list(self._fields)}; name one")
            name = next(iter(self._fields))
        if name not in self._fields:
            raise FeatkdInputError(
                f"name: {name!r} is not a field; the fields are {list(self._fields)}"
            )
        if verify:
            self._verify_field(name, again=False)
        return self._mapped()[name]

    def verify(self) -> TeacherCache:
        """Check every block of every field now, those already checked included (after a
        copy, or a long time on a disk); returns the cache itself. Blocks that fail are not
        read afterwards.

        Raises:
            CacheError: naming every field whose blocks do not match their checksums.
        """
        problems = []
        for name in self._fields:
            try:
                self._verify_field(name, again=True)
            except CacheError as error:
                problems.append(str(error))
        if problems:
            raise CacheError("; ".join(problems))
        return self

    def _verify_field(self, name: str, again: bool) -> None:
        checked = self._checked[name]
        if again:
            checked[:] = False
        bad = []
        for block in np.flatnonzero(~checked):
            try:
                self._check_block(name, int(block))
            except CacheError:
                bad.append(int(block))
        if bad:
            field = self._fields[name]
            shown = ", ".join(str(b) for b in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise CacheError(
                f"teacher cache {str(self.path)!r}, field {name!r} ({field.file}): {len(bad)} of "
                f"{len(self._checked[name])} blocks of {field.block_rows} rows do not match "
                f"their checksums (blocks {shown}); the file is corrupted, recompute the cache"
            )

    def _check_block(self, name: str, block: int) -> None:
        if self._checked[name][block]:
            return
        field = self._fields[name]
        start = block * field.block_rows
        stop = min(start + field.block_rows, self._length)
        raw = self._mapped_bytes()[name][
            start * field.bytes_per_sample : stop * field.bytes_per_sample
        ]
        found = block_checksum(raw)
        expected = field.checksums[block]
        if found != expected:
            raise CacheError(
                f"teacher cache {str(self.path)!r}, field {name!r} ({field.file}), block "
                f"{block} (rows {start} to {stop - 1}): expected crc32 {expected:#010x}, found "
                f"{found:#010x}; the file is corrupted, recompute the cache"
            )
        self._checked[name][block] = True

    def _mapped_bytes(self) -> dict[str, np.ndarray]:
        self._mapped()
        return self._bytes

    def _mapped(self) -> dict[str, torch.Tensor]:
        if self._rows is None:
            self._bytes: dict[str, np.ndarray] = {}
            rows = {}
            for name, field in self._fields.items():
                size = field.file_bytes(self._length)
                # "c": copy-on-write pages, so a tensor view may be written without a crash
                # and without reaching the file (numpy cannot map an empty file)
                raw = (
                    np.memmap(self.path / field.file, dtype=np.uint8, mode="c", shape=(size,))
                    if size
                    else np.zeros(0, np.uint8)
                )
                self._bytes[name] = raw
                # torch reads the raw bytes as any dtype, bfloat16 included (numpy has none)
                flat = torch.from_numpy(raw).view(field.dtype)
                rows[name] = flat.view(self._length, *field.shape)
            self._rows = rows
        return self._rows

    def __getstate__(self) -> dict[str, Any]:
        # a pickled cache (a DataLoader worker's copy) maps the files again in its process
        state = self.__dict__.copy()
        state["_rows"] = None
        state.pop("_bytes", None)
        state["_checked"] = {name: np.zeros_like(c) for name, c in self._checked.items()}
        return state
