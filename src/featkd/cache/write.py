"""cache_teacher_features: run a teacher once over a dataset and store its features on disk."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from featkd._checks import FeatkdInputError
from featkd._options import check_bool, check_device, check_int
from featkd.cache._format import FORMAT, VERSION, dataset_length, write_manifest
from featkd.cache._writer import (
    FieldWriter,
    discard,
    named_outputs,
    prepare_folder,
    stored_dtypes,
)
from featkd.cache.store import TeacherCache

__all__ = ["cache_teacher_features"]


def cache_teacher_features(
    teacher: Callable[[Any], torch.Tensor | Mapping[str, torch.Tensor]],
    dataset: Any,
    path: str | os.PathLike[str],
    *,
    name: str,
    batch_size: int = 64,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    features: Sequence[str] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    block_rows: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` and store its outputs in a cache folder at ``path``.

    The dataset is read in order, batch by batch, under ``torch.inference_mode()``; each batch's
    outputs go straight into preallocated memory-mapped files, so neither the dataset nor its
    features are ever held in memory whole. An ``nn.Module`` teacher (or a bound method of one,
    such as ``model.forward_features``) runs in eval mode, and every submodule's train/eval mode
    is restored afterwards; any other callable is called as it is.

    The manifest is written last, atomically: an interrupted run leaves no readable cache (its
    files are removed when the interruption is an exception). Each field keeps a CRC-32 per
    block of rows, checked when the cache is read (:class:`~featkd.TeacherCache`).

    Args:
        teacher: maps a batch of inputs to a tensor ``(B, ...)`` (stored as the one field
            ``"features"``; ``cache[i]`` is then a tensor) or to a dict of named tensors
            ``(B, ...)``, one field each (``cache[i]`` is then a dict).
        dataset: a map-style dataset (``len`` and ``dataset[i]``; a tensor works too), read in
            index order, so that cached row ``i`` is sample ``i``. Use it without random
            augmentation (see :class:`~featkd.CachedTeacherDataset`).
        path: the cache folder: new, or empty, or (with ``overwrite=True``) an old cache.
        name: the teacher's name, kept in the manifest (``cache.name``), e.g. ``"dinov2_vitb14"``.
        batch_size: samples per teacher call.
        device: where each batch of inputs is sent; default the device of the teacher's first
            parameter or buffer (inputs left where they are for a teacher without any). The
            teacher itself is not moved.
        dtype: the stored dtype of the floating-point outputs (``torch.float16`` or
            ``torch.bfloat16`` halve the disk), or a dict ``field -> dtype`` for some fields;
            default the teacher's output dtype. Integer and bool outputs keep theirs unless
            a dict names them.
        features: names of the dict outputs to keep (default all); ``None`` for a tensor
            teacher.
        input_fn: maps a collated batch to the teacher's input; default the batch's first
            element when ``dataset[0]`` is a tuple or list (``(image, label)``), else the
            batch (a dataset of strings gives the teacher a list of strings).
        block_rows: rows per checksum block; default as many as fill 1 MiB (at least one).
            The first read of a row checks its whole block.
        num_workers: ``DataLoader`` workers reading the dataset.
        progress: show a progress bar (with ``tqdm``, when it is installed).
        overwrite: replace an existing cache at ``path``; otherwise a folder that holds any
            file is refused.

    Returns:
        The written cache, opened (:class:`~featkd.TeacherCache`).

    Shape:
        - teacher output: ``(B, ...)`` per field, the same per-sample shape in every batch.
        - stored field: ``(len(dataset), ...)``.

    Raises:
        CacheError: ``path`` holds a cache or other files and ``overwrite`` is ``False``, or
            is a file.
        FeatkdInputError: a bad argument; the teacher returns something other than a tensor
            or a dict of tensors, or shapes that change between batches.

    Example:
        >>> import tempfile, torch, featkd
        >>> data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10))
        >>> teacher = torch.nn.Linear(4, 6)
        >>> scratch = tempfile.TemporaryDirectory()  # removed at exit
        >>> folder = scratch.name
        >>> cache = featkd.cache_teacher_features(
        ...     teacher, data, folder, name="linear", batch_size=4,
        ...     dtype=torch.bfloat16, progress=False,
        ... )
        >>> len(cache), cache.fields, cache[0].dtype  # samples are (x, label): x is cached
        (10, ('features',), torch.bfloat16)
        >>> x, label = data[7]
        >>> with torch.no_grad():
        ...     expected = teacher(x).to(torch.bfloat16)
        >>> torch.equal(cache[7], expected)
        True
    """
    checked = _checked_arguments(name, batch_size, device, features, block_rows, num_workers)
    check_bool(progress, "progress")
    check_bool(overwrite, "overwrite")
    if not callable(teacher):
        raise FeatkdInputError(f"teacher: expected a callable, got {type(teacher).__name__}")
    if input_fn is not None and not callable(input_fn):
        raise FeatkdInputError(f"input_fn: expected a callable, got {type(input_fn).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise FeatkdInputError(f"path: expected a folder path, got {type(path).__name__}")
    length = dataset_length(dataset)
    if length < 1:
        raise FeatkdInputError("dataset: expected at least one sample, got an empty dataset")

    module = teacher if isinstance(teacher, nn.Module) else getattr(teacher, "__self__", None)
    module = module if isinstance(module, nn.Module) else None
    device = _default_device(module) if device is None else torch.device(device)
    folder = Path(path)
    created = prepare_folder(folder, overwrite)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device is not None and device.type == "cuda",
    )
    writers: list[FieldWriter] = []
    pairs = input_fn is None and isinstance(dataset[0], (tuple, list))  # (input, label) samples
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    bar = _progress_bar(progress, length, name)
    try:
        if module is not None:
            module.eval()
        with torch.inference_mode():
            for batch in loader:
                inputs = input_fn(batch) if input_fn is not None else _default_inputs(batch, pairs)
                output = teacher(_to_device(inputs, device))
                outputs = named_outputs(output, checked)
                if not writers:
                    kind = "tensor" if isinstance(output, torch.Tensor) else "dict"
                    dtypes = stored_dtypes(outputs, dtype)
                    for index, (field, value) in enumerate(outputs.items()):
                        writers.append(
                            FieldWriter(
                                folder, index, field, value, dtypes[field], length, block_rows
                            )
                        )
                if list(outputs) != [w.name for w in writers] or isinstance(
                    output, torch.Tensor
                ) != (kind == "tensor"):
                    raise FeatkdInputError(
                        f"teacher: returned outputs {list(outputs)} for the batch at sample "
                        f"{writers[0].rows}, {[w.name for w in writers]} for the first batch"
                    )
                rows = min(batch_size, length - writers[0].rows)
                for writer in writers:
                    writer.write(outputs[writer.name], rows)
                bar.update(rows)
        fields = [writer.finish() for writer in writers]
        write_manifest(
            folder,
            {
                "format": FORMAT,
                "version": VERSION,
                "name": name,
                "length": length,
                "output": kind,
                "byte_order": sys.byteorder,
                "fields": {field.name: field.to_json(length) for field in fields},
            },
        )
    except BaseException:
        for writer in writers:
            writer.close()
        discard(folder, [writer.file for writer in writers], created)
        raise
    finally:
        for submodule, mode in modes:
            submodule.training = mode  # each one's own mode, not the root's
        bar.close()
    return TeacherCache(folder)


def _checked_arguments(
    name: Any,
    batch_size: Any,
    device: Any,
    features: Any,
    block_rows: Any,
    num_workers: Any,
) -> tuple[str, ...] | None:
    """Check the plain arguments; returns ``features`` as a tuple of names (or ``None``)."""
    if not isinstance(name, str) or not name.strip():
        raise FeatkdInputError(
            f"name: expected the teacher's name as a non-empty string, got {name!r}"
        )
    check_int(batch_size, "batch_size", minimum=1)
    check_int(num_workers, "num_workers", minimum=0)
    check_device(device)
    if block_rows is not None:
        check_int(block_rows, "block_rows", minimum=1)
    if features is None:
        return None
    names = (features,) if isinstance(features, str) else features
    if (
        not isinstance(names, Sequence)
        or not names
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
    ):
        raise FeatkdInputError(
            f"features: expected None or distinct output names (strings), got {features!r}"
        )
    return tuple(names)


def _default_device(module: nn.Module | None) -> torch.device | None:
    """The device of the teacher's first parameter or buffer; ``None`` (inputs stay) without."""
    if module is not None:
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return None


def _default_inputs(batch: Any, pairs: bool) -> Any:
    # a dataset of (input, label) pairs collates to [inputs, labels]; the teacher gets inputs.
    # Decided by the samples, not the batch: a dataset of strings collates to a list too
    return batch[0] if pairs and isinstance(batch, (list, tuple)) else batch


def _to_device(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, Mapping):
        return {key: _to_device(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)) and not hasattr(inputs, "_fields"):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _progress_bar(progress: bool, length: int, name: str) -> Any:
    """A tqdm bar over the samples when asked for and tqdm is installed (an optional
    dependency), else a stand-in that does nothing."""
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=length, unit="sample", desc=f"caching {name}")
    return _NoBar()


class _NoBar:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass
