"""CachedTeacherDataset: a dataset's samples paired with the teacher's cached features."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from featkd._checks import FeatkdInputError
from featkd._options import check_bool
from featkd.cache._format import CacheError, dataset_length
from featkd.cache._random import random_transforms, reads_differ
from featkd.cache.store import TeacherCache

__all__ = ["CachedTeacherDataset", "RandomTransformWarning"]


class RandomTransformWarning(UserWarning):
    """The dataset paired with a teacher cache gives random inputs (augmentation), while the
    cached features were computed once, from one version of each input: the student would be
    distilled towards features of inputs it does not see."""


class CachedTeacherDataset(Dataset):
    """``dataset[i]`` paired with the cached teacher features of sample ``i``.

    ``item = (dataset[i], features_i)``, where ``features_i`` is ``cache[i]``: a dict of tensors,
    or a tensor when the teacher returned one (see :class:`~featkd.TeacherCache`). With the
    default ``DataLoader`` collation a batch is ``(inputs_batch, features_batch)``, e.g.
    ``((images, labels), {"pooled": (B, D), "tokens": (B, N, D)})``. Shuffle freely: the pairing
    is by index. The dataset must hold the samples the cache was computed from, in the same
    order; its length is checked against the cache's.

    The cached features belong to the inputs as they were when cached, so random augmentation
    at training time breaks the pairing. When ``warn_random`` is on, a
    :class:`RandomTransformWarning` is issued (once, here) if ``dataset[0]`` differs between two
    reads, or if a ``transform``/``transforms`` attribute of the dataset (or of a dataset it
    wraps) holds a class named like a random augmentation (``Random...``, ``...Jitter``,
    ``AutoAugment``, ``RandAugment``, ``TrivialAugment``, ``AugMix``, ``RandomErasing``).
    The two reads leave torch's, numpy's and Python's random generators as they were.

    Works with ``DataLoader(num_workers>0)``: each worker maps the cache files itself.

    Args:
        dataset: a map-style dataset of the same samples as the cache, in the same order.
        cache: a :class:`~featkd.TeacherCache` or the path of one.
        warn_random: check for random inputs and warn; ``False`` turns it off (for example
            when a mild augmentation is intended).

    Raises:
        CacheError: the dataset's length is not the cache's; no valid cache at the path.

    Example:
        >>> import tempfile, torch, featkd
        >>> data = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.arange(6))
        >>> scratch = tempfile.TemporaryDirectory()  # removed at exit
        >>> folder = scratch.name
        >>> _ = featkd.cache_teacher_features(
        ...     torch.nn.Linear(4, 3), data, folder, name="linear", progress=False
        ... )
        >>> paired = featkd.CachedTeacherDataset(data, folder)
        >>> loader = torch.utils.data.DataLoader(paired, batch_size=4, shuffle=True)
        >>> (x, labels), teacher_features = next(iter(loader))
        >>> tuple(x.shape), tuple(teacher_features.shape)
        ((4, 4), (4, 3))
    """

    def __init__(
        self,
        dataset: Any,
        cache: TeacherCache | str | os.PathLike[str],
        *,
        warn_random: bool = True,
    ) -> None:
        if not isinstance(cache, (TeacherCache, str, os.PathLike)):
            raise FeatkdInputError(
                f"cache: expected a TeacherCache or the path of one, got {type(cache).__name__}"
            )
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
        check_bool(warn_random, "warn_random")
        length = dataset_length(dataset)
        if length != len(self.cache):
            raise CacheError(
                f"dataset: has {length} samples, but the teacher cache {str(self.cache.path)!r} "
                f"({self.cache.name!r}) holds features of {len(self.cache)}; pair it with the "
                f"dataset the cache was computed from"
            )
        self.dataset = dataset
        if warn_random:
            self._warn_if_random()

    def _warn_if_random(self) -> None:
        reasons = []
        names = sorted(set(random_transforms(self.dataset)))
        if names:
            reasons.append(f"its transforms include {', '.join(names)}")
        if reads_differ(self.dataset):
            reasons.append("dataset[0] differed between two reads")
        if reasons:
            warnings.warn(
                f"dataset: {' and '.join(reasons)}, so its inputs are random, but the cached "
                f"teacher features ({self.cache.name!r}) were computed once, from one version of "
                f"each input: the student would be distilled towards features of inputs it does "
                f"not see. Train on the inputs the cache was computed from, or pass "
                f"warn_random=False if the mismatch is intended",
                RandomTransformWarning,
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor | dict[str, torch.Tensor]]:
        return self.dataset[index], self.cache[index]

    def __repr__(self) -> str:
        return f"CachedTeacherDataset({type(self.dataset).__name__}, {self.cache!r})"
