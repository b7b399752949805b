"""The function form of every featkd loss: stateless, no owned parameters.

Each function here is what the corresponding module calls; use it when the projection or head
is managed elsewhere.
"""

from featkd.cospress import flat_cosine_loss, neighbourhood_kl
from featkd.kd import kd_loss

__all__ = ["flat_cosine_loss", "kd_loss", "neighbourhood_kl"]
