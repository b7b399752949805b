"""Cached teacher features: run a large teacher once, store its features on disk, train from them.

:func:`cache_teacher_features` writes a cache folder (a ``manifest.json`` written last and one
raw memory-mapped file per output field, with a CRC-32 per block of rows);
:class:`TeacherCache` opens it and checks each block on first read;
:class:`CachedTeacherDataset` pairs a dataset with it, ``(dataset[i], features_i)``.

Modules: :mod:`~featkd.cache.write`, :mod:`~featkd.cache.store`, :mod:`~featkd.cache.dataset`;
the private ``_format`` (manifest, files, checksums), ``_writer`` (the batch-by-batch writer) and
``_random`` (is a dataset's input random?) below them.
"""

from featkd.cache._format import CacheError
from featkd.cache.dataset import CachedTeacherDataset, RandomTransformWarning
from featkd.cache.store import TeacherCache
from featkd.cache.write import cache_teacher_features

__all__ = [
    "CacheError",
    "CachedTeacherDataset",
    "RandomTransformWarning",
    "TeacherCache",
    "cache_teacher_features",
]
