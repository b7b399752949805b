"""The normalisations of VkD's teacher, unchecked: layer norm, batch standardisation and
whitening (Cholesky or ZCA, with shrinkage relative to the average variance).

Each function computes in its input's dtype; callers put it inside the precision fence
(:func:`featkd._precision.full_precision`) and check their inputs first
(:mod:`featkd.vkd.normalize` holds the checked, public forms). Axis legend: ``B`` batch, ``D``
width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featkd._sync import device_eye, sync_free

__all__ = [
    "WHITENING_METHODS",
    "batch_standardize",
    "cholesky_whitener",
    "covariance",
    "layer_norm",
    "whiten",
    "zca_whitener",
]

WHITENING_METHODS = ("cholesky", "zca")


def _eps_floor(eps: float, dtype: torch.dtype) -> float:
    # an eps below sqrt(smallest normal) rounds to 0 in float32 (1e-300 does), and the
    # gradient of (var + eps)^(-1/2), its cube, overflows: NaN on a constant channel
    return max(eps, torch.finfo(dtype).tiny ** 0.5)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each sample standardised across its channels (last axis), no affine."""
    return F.layer_norm(x, x.shape[-1:], eps=_eps_floor(eps, x.dtype))


def batch_standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each channel of ``x`` ``(B, D)`` standardised over the batch (biased variance)."""
    mean = x.mean(0, keepdim=True)
    var = x.var(0, unbiased=False, keepdim=True)
    return (x - mean) * (var + _eps_floor(eps, x.dtype)).rsqrt()


def covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``(D,)`` and biased covariance ``(D, D)`` of ``x`` ``(B, D)``."""
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.mT @ centred / x.shape[0]


def whiten(
    x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, method: str, shrinkage: float
) -> torch.Tensor:
    """``(x - mean) W`` with ``W^T (cov + s I) W = I``, ``s = shrinkage * mean(diag(cov))``:
    ``W = L^{-T}`` (``cholesky``) or ``(cov + s I)^{-1/2}`` (``zca``)."""
    # shrinkage relative to the average variance, so it means the same at any feature scale;
    # floored at sqrt(smallest normal): constant features (a zero covariance) would otherwise
    # give a shrinkage whose inverse square root, and the cube of it in the gradient, overflow
    shift = (shrinkage * cov.diagonal().mean()).clamp_min(torch.finfo(cov.dtype).tiny ** 0.5)
    whitener = cholesky_whitener if method == "cholesky" else zca_whitener
    return (x - mean) @ whitener(cov, shift)


def cholesky_whitener(cov: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """``W`` with ``W^T (cov + shift I) W = I`` from ``cov + shift I = L L^T``: ``W = L^{-T}``.

    Whitening is ``(x - mu) W``; returns the upper-triangular ``L^{-T}``.
    """
    eye = device_eye(cov.shape[0], cov)
    shifted = cov + shift * eye
    if sync_free(shifted):  # positive definite by the shift; checking info would sync
        lower = torch.linalg.cholesky_ex(shifted)[0]
    else:
        lower = torch.linalg.cholesky(shifted)
    # L^{-1} by a triangular solve, then transpose
    return torch.linalg.solve_triangular(lower, eye, upper=False).mT


class _InverseSqrtPSD(torch.autograd.Function):
    """``M^{-1/2}`` of a symmetric positive definite ``M`` by an eigendecomposition, with the
    Daleckii-Krein backward written out.

    ``torch.linalg.eigh``'s own backward divides by eigenvalue gaps and returns NaN when two
    eigenvalues coincide (constant features give ``M = shift I``), although ``M^{-1/2}`` is smooth
    there. With ``r = sqrt(eigenvalues)`` the divided difference of ``x^{-1/2}`` is
    ``-1 / (r_i r_j (r_i + r_j))``, finite and exact also for ``r_i = r_j``.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        evals, evecs = torch.linalg.eigh(matrix)
        roots = evals.clamp_min(torch.finfo(evals.dtype).tiny).sqrt()
        ctx.save_for_backward(evecs, roots)
        return (evecs / roots) @ evecs.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        evecs, roots = ctx.saved_tensors
        outer = roots[..., :, None] * roots[..., None, :]
        divided = -1.0 / (outer * (roots[..., :, None] + roots[..., None, :]))
        sym = 0.5 * (grad + grad.mT)
        return evecs @ (divided * (evecs.mT @ sym @ evecs)) @ evecs.mT


def zca_whitener(cov: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """``(cov + shift I)^{-1/2}`` (symmetric, the ZCA whitening matrix) by an eigendecomposition;
    its gradient stays finite when eigenvalues coincide (see :class:`_InverseSqrtPSD`)."""
    return _InverseSqrtPSD.apply(cov + shift * device_eye(cov.shape[-1], cov))
