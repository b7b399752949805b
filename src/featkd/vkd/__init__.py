"""VkD (Miles et al., CVPR 2024): orthogonal projection of the student + teacher normalisation.

``distance(P pool(student), normalize(sg(pool(teacher))))`` with ``P`` a ``D_t x D_s`` matrix with
orthonormal columns (matrix exponential of a skew-symmetric generator, first ``D_s`` columns):
:func:`vkd_loss` for a given ``P``, :class:`VkDLoss` owning it (an
:class:`~featkd.OrthogonalProjector`).

Modules: :mod:`~featkd.vkd.function` and :mod:`~featkd.vkd.module` (the loss),
:mod:`~featkd.vkd.projector` (:class:`OrthogonalProjector`), :mod:`~featkd.vkd.normalize`
(:class:`Whitening`, ``layer_norm``, ``batch_standardize``, ``whiten``); the private ``_expm``
(matrix exponential), ``_stiefel`` (orthogonal maps) and ``_normalization`` (the unchecked
normalisations) below them.
"""

from featkd.vkd.function import DISTANCES, NORMALIZATIONS, vkd_loss
from featkd.vkd.module import VkDLoss
from featkd.vkd.normalize import Whitening, batch_standardize, layer_norm, whiten
from featkd.vkd.projector import OrthogonalProjector

__all__ = [
    "DISTANCES",
    "NORMALIZATIONS",
    "OrthogonalProjector",
    "VkDLoss",
    "Whitening",
    "batch_standardize",
    "layer_norm",
    "vkd_loss",
    "whiten",
]
