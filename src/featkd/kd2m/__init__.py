"""KD2M: distillation by matching the distributions of student and teacher features
(Montesuma, 2025).

Every loss here compares the two batches as *sets* of feature vectors, so each is batch-level
(``reduction="mean"`` only). The public modules, one per distance:

- :mod:`~featkd.kd2m.wasserstein`: empirical OT (exact, entropic, sliced; class-conditional),
  and :mod:`~featkd.kd2m.joint_wasserstein`, OT on (feature, label) pairs;
- :mod:`~featkd.kd2m.gaussian_wasserstein` and :mod:`~featkd.kd2m.gaussian_kl`: closed forms
  between Gaussians fitted to the batches;
- :mod:`~featkd.kd2m.mmd`: maximum mean discrepancy;
- :mod:`~featkd.kd2m.metrics`: :class:`KD2MLoss`, one front door naming the distance by a
  metric string.

The private modules below them: ``_sets`` (input checks, class groups), ``_base`` (the module
base with the owned projector), ``_transport`` (OT solvers), ``_wasserstein_terms``,
``_gaussian`` (moments, Bures residual, shrunk covariances) and ``_kernels`` (MMD sums).
"""

from featkd.kd2m.gaussian_kl import KL_DIRECTIONS, GaussianKLLoss, gaussian_kl_loss
from featkd.kd2m.gaussian_wasserstein import GaussianWassersteinLoss, gaussian_wasserstein_loss
from featkd.kd2m.joint_wasserstein import JointWassersteinLoss, joint_wasserstein_loss
from featkd.kd2m.metrics import METRICS, KD2MLoss, kd2m_loss
from featkd.kd2m.mmd import MMDLoss, mmd_loss
from featkd.kd2m.wasserstein import SinkhornConvergenceWarning, WassersteinLoss, wasserstein_loss

__all__ = [
    "KL_DIRECTIONS",
    "METRICS",
    "GaussianKLLoss",
    "GaussianWassersteinLoss",
    "JointWassersteinLoss",
    "KD2MLoss",
    "MMDLoss",
    "SinkhornConvergenceWarning",
    "WassersteinLoss",
    "gaussian_kl_loss",
    "gaussian_wasserstein_loss",
    "joint_wasserstein_loss",
    "kd2m_loss",
    "mmd_loss",
    "wasserstein_loss",
]
