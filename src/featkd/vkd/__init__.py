"""VkD (Miles et al., CVPR 2024): orthogonal projection of the student + teacher normalisation.

``distance(P pool(student), normalize(sg(pool(teacher))))`` with ``P`` a ``D_t x D_s`` matrix with
orthonormal columns (matrix exponential of a skew-symmetric generator, first ``D_s`` columns):
:func:`vkd_loss` for a given ``P``, :class:`VkDLoss` owning it (an
:class:`~featkd.OrthogonalProjector`).
"""

from featkd.vkd.function import DISTANCES, NORMALIZATIONS, vkd_loss
from featkd.vkd.module import VkDLoss

__all__ = ["DISTANCES", "NORMALIZATIONS", "VkDLoss", "vkd_loss"]
