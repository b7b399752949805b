"""The function form of every featkd loss: one function per loss, stateless, owning nothing.

Each function validates its arguments once and computes the same numbers as its module
(``kd_loss`` and :class:`featkd.KDLoss`, ...): a head, projector or bridge that the module owns
is an argument here. See the design page for the contract every function follows.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from featkd.cospress import cospress_loss
from featkd.cospress.proteus import proteus_loss
from featkd.fcfd import fcfd_loss
from featkd.kd import kd_loss
from featkd.kd2m import (
    gaussian_kl_loss,
    gaussian_wasserstein_loss,
    joint_wasserstein_loss,
    kd2m_loss,
    mmd_loss,
    wasserstein_loss,
)
from featkd.multiteacher import multi_teacher_loss
from featkd.vkd import vkd_loss

__all__ = [
    "cospress_loss",
    "fcfd_loss",
    "gaussian_kl_loss",
    "gaussian_wasserstein_loss",
    "joint_wasserstein_loss",
    "kd2m_loss",
    "kd_loss",
    "mmd_loss",
    "multi_teacher_loss",
    "proteus_loss",
    "vkd_loss",
    "wasserstein_loss",
]

# featkd 0.1 also listed building blocks here; they live at their modules now
_MOVED = {
    "neighbourhood_kl": "featkd.cospress",
    "flat_cosine_loss": "featkd.cospress",
    "layer_norm": "featkd.vkd.normalize",
    "batch_standardize": "featkd.vkd.normalize",
    "whiten": "featkd.vkd.normalize",
    "gather_with_grad": "featkd",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'featkd.functional' has no attribute {name!r}")
    home = _MOVED[name]
    warnings.warn(
        f"featkd.functional.{name} moved to {home}.{name}; the old path will be removed in the "
        "next release",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)
