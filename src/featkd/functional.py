"""The function form of every featkd loss: stateless, no owned parameters.

Each function here is what the corresponding module calls; use it when the projection or head
is managed elsewhere.
"""

from featkd.cospress import cospress_loss, flat_cosine_loss, neighbourhood_kl
from featkd.distributed import gather_with_grad
from featkd.fcfd import fcfd_loss
from featkd.kd import kd_loss
from featkd.kd2m.gaussian_kl import gaussian_kl_loss
from featkd.kd2m.gaussian_wasserstein import gaussian_wasserstein_loss
from featkd.kd2m.joint_wasserstein import joint_wasserstein_loss
from featkd.kd2m.metrics import kd2m_loss
from featkd.kd2m.mmd import mmd_loss
from featkd.kd2m.wasserstein import wasserstein_loss
from featkd.normalize import batch_standardize, layer_norm, whiten
from featkd.proteus import proteus_loss
from featkd.vkd import vkd_loss

__all__ = [
    "batch_standardize",
    "cospress_loss",
    "fcfd_loss",
    "flat_cosine_loss",
    "gather_with_grad",
    "gaussian_kl_loss",
    "gaussian_wasserstein_loss",
    "joint_wasserstein_loss",
    "kd2m_loss",
    "kd_loss",
    "layer_norm",
    "mmd_loss",
    "neighbourhood_kl",
    "proteus_loss",
    "vkd_loss",
    "wasserstein_loss",
    "whiten",
]
