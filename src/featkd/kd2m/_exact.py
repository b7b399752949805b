"""Exact OT between uniform measures on equal-sized sets, solved on the host.

An optimal plan between two uniform measures on ``n`` points each may always be taken a
permutation over ``n`` scaled by ``1/n`` (Birkhoff's theorem), so exact OT here is an
assignment problem. The costs go to the host once per call, the matched columns come back, and
the loss gathers their costs on the device: the gradient flows through the cost only.
"""

from __future__ import annotations

import warnings

import torch

from featkd._loss import user_stacklevel

__all__ = ["exact_transport_costs"]


def _assignments_on_host(cost: torch.Tensor, counts: torch.Tensor, max_iter: int) -> torch.Tensor:
    import numpy as np

    host = cost.to(device="cpu", dtype=torch.float64).numpy()
    # copied out with the cost: the same synchronisation, the one exact OT is allowed
    sizes = np.rint(counts.to(device="cpu", dtype=torch.float64).numpy()).astype(int)
    matches = np.zeros(host.shape[:-1], dtype=np.int64)
    for g, size in enumerate(sizes):
        matches[g, :size] = _optimal_assignment(host[g, :size, :size], max_iter)
    return torch.from_numpy(matches).to(cost.device)


def _optimal_assignment(cost, max_iter: int):
    """The column matched to each row by an optimal plan between two uniform measures on ``n``
    points each (``cost`` ``(n, n)``, numpy float64).

    Such a plan may always be taken a permutation over ``n`` (Birkhoff), so an optimal
    assignment is an exact solution, found several times faster than by the network simplex.
    ``max_iter > 0`` asks for POT's network simplex with that cap instead; its optimal plans
    are vertices of the transport polytope, permutations here, read back row by row. A run the
    cap stopped early may end on a permutation that is not optimal (POT warns), or on no
    coupling at all (rows without mass): the assignment then replaces it, with a
    :class:`UserWarning`.
    """
    import numpy as np

    size = cost.shape[0]
    if np.isnan(cost).any():
        # non-finite inputs that the device-side check counted instead of raising: every
        # permutation meets each NaN row and column of the cost, so any one carries them
        # into the loss
        return np.arange(size)
    if max_iter > 0 and np.isfinite(cost).all():  # POT calls a cost with +inf infeasible
        import ot

        mass = np.full(size, 1.0 / size)
        plan = ot.emd(mass, mass, cost, numItermax=max_iter)
        matches = plan.argmax(axis=1)
        concentrated = np.allclose(plan[np.arange(size), matches], 1.0 / size)
        if concentrated and np.unique(matches).size == size:
            return matches
        warnings.warn(
            f"WassersteinLoss('emd'): the network simplex stopped at max_iter={max_iter} "
            "before its plan was a coupling; the exact assignment was used instead (leave "
            "max_iter=None for it, without the network simplex)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    from scipy.optimize import linear_sum_assignment

    try:
        return linear_sum_assignment(cost)[1]
    except ValueError:  # +inf costs leave no finite assignment: the loss is infinite anyway
        return np.arange(size)


# A custom op is opaque to torch.compile: one node in the graph, no graph break, no tracing of
# the host solver's numpy code.
_assignment_op = torch.library.custom_op("featkd::emd_assignments", mutates_args=())(
    _assignments_on_host
)


@_assignment_op.register_fake
def _(cost: torch.Tensor, counts: torch.Tensor, max_iter: int) -> torch.Tensor:
    return cost.new_empty(cost.shape[:-1], dtype=torch.long)


def exact_transport_costs(
    cost: torch.Tensor, mask: torch.Tensor | None, counts: torch.Tensor, max_iter: int | None
) -> torch.Tensor:
    """Exact OT between uniform measures, ``<P, C>`` per group ``(G,)``, for costs
    ``(G, n, n)`` whose first ``counts`` ``(G,)`` rows and columns are real (``mask`` ``(G, n)``,
    None when all are).

    An optimal plan is a permutation over each group's rows scaled by ``1 / count``, computed
    on the host (:func:`_optimal_assignment`; the plan is a constant of the loss, so the
    gradient flows through the cost only). One copy of the cost to the host and one of the
    matched columns back: the documented host synchronisation of exact OT.
    """
    matches = _assignment_op(cost.detach(), counts.detach(), 0 if max_iter is None else max_iter)
    matched = cost.gather(-1, matches[..., None])[..., 0]
    if mask is not None:
        matched = torch.where(mask, matched, 0.0)
    return matched.sum(dim=-1) / counts
