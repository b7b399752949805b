"""The function form of every featkd loss: stateless, no owned parameters.

Each function here is what the corresponding module calls; use it when the projection or head
is managed elsewhere.
"""

from featkd.distributed import gather_with_grad
from featkd.kd import kd_loss

__all__ = ["gather_with_grad", "kd_loss"]
