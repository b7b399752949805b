"""FCFD: function-consistent feature distillation (Liu et al., ICLR 2023).

Both networks are split into ``K`` stages, the last one ending in logits. Stage outputs are
carried across by bridges (:mod:`featkd.fcfd.bridges`), and *mixed paths* run the first ``k`` stages
of one network and the remaining stages of the other:

* ``s2t@k``: student stages ``1..k`` -> the s2t bridge after stage ``k`` -> teacher stages
  ``k+1..K``;
* ``t2s@k``: teacher stages ``1..k`` -> the t2s bridge after stage ``k`` -> student stages
  ``k+1..K``.

The student features are not only pushed towards the teacher's (appearance), they must also
*work* inside the teacher (function): the teacher's later stages, run on the bridged student
features, should reproduce the teacher's own features and logits.

Axis legend: ``B`` batch; stage outputs are maps ``(B, C, H, W)``, tokens ``(B, N, D)`` or
vectors ``(B, D)``; the last stage's output is logits ``(B, num_classes)``.

:func:`fcfd_loss` computes the loss for given bridges and paths; :class:`FCFDLoss` builds the
bridges from a probing forward and samples the paths of each call.
"""

from featkd.fcfd._options import DIRECTIONS
from featkd.fcfd.function import fcfd_loss
from featkd.fcfd.module import FCFDLoss, WarmupSkippedWarning

__all__ = ["DIRECTIONS", "FCFDLoss", "WarmupSkippedWarning", "fcfd_loss"]
