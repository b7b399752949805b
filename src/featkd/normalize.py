"""Teacher normalisations of VkD (Miles et al., CVPR 2024): layer norm, batch standardisation,
whitening.

Axis legend: ``B`` batch, ``D`` width. All maths in float32 (float64 for float64 input) with
autocast off; results come back in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featkd._checks import (
    DeviceError,
    ShapeError,
    check_floating,
    check_min_batch,
    validate_features,
)
from featkd._linalg import cholesky_whitener, zca_whitener
from featkd._options import (
    check_bool,
    check_choice,
    check_device,
    check_floating_dtype,
    check_int,
    check_number,
    check_positive,
)
from featkd._precision import work_dtype

__all__ = ["WHITENING_METHODS", "Whitening", "batch_standardize", "layer_norm", "whiten"]

WHITENING_METHODS = ("cholesky", "zca")
_VECTORS = {2: "(B, D)"}


def _eps_floor(eps: float, dtype: torch.dtype) -> float:
    # an eps below sqrt(smallest normal) rounds to 0 in float32 (1e-300 does), and the
    # gradient of (var + eps)^(-1/2), its cube, overflows: NaN on a constant channel
    return max(eps, torch.finfo(dtype).tiny ** 0.5)


def layer_norm(x: torch.Tensor, eps: float = 1e-5, *, name: str = "x") -> torch.Tensor:
    """Standardise each sample across its channels, no affine (VkD's classification prior).

    ``eps`` (a number > 0) is added to the variance; below the square root of the compute
    dtype's smallest normal number it is raised to it (so a constant sample gives 0).

    Shape:
        - x: ``(..., D)``
        - output: same as ``x``

    Example:
        >>> y = layer_norm(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> bool(torch.allclose(y, torch.tensor([[-1.2247, 0.0, 1.2247]]), atol=1e-4))
        True
    """
    check_floating(x, name)
    if x.ndim == 0:
        raise ShapeError(f"{name}: expected (..., D), got a scalar")
    eps = check_positive(eps, "eps")  # it guards a division
    work = work_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(work), x.shape[-1:], eps=_eps_floor(eps, work)).to(x.dtype)


def batch_standardize(x: torch.Tensor, eps: float = 1e-5, *, name: str = "x") -> torch.Tensor:
    """Standardise each channel over the batch (VkD's detection prior): zero mean, unit
    (biased) variance per channel. ``eps`` (> 0) is added to the variance, floored as in
    :func:`layer_norm`.

    Shape:
        - x: ``(B, D)`` with ``B >= 2``
        - output: ``(B, D)``

    Example:
        >>> y = batch_standardize(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> bool(torch.allclose(y, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-3))
        True
    """
    validate_features(x, name, _VECTORS)
    check_min_batch(x, name, 2, "batch statistics need two samples")
    eps = check_positive(eps, "eps")  # it guards a division
    work = work_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        xw = x.to(work)
        mean = xw.mean(0, keepdim=True)
        var = xw.var(0, unbiased=False, keepdim=True)
        return ((xw - mean) * (var + _eps_floor(eps, work)).rsqrt()).to(x.dtype)


def _whitener(cov: torch.Tensor, method: str, eps: float) -> torch.Tensor:
    # shrinkage relative to the average variance, so eps means the same at any feature scale
    # floored at sqrt(smallest normal): constant features (a zero covariance) would otherwise
    # give a shrinkage whose inverse square root, and the cube of it in the gradient, overflow
    shrink = (eps * cov.diagonal().mean()).clamp_min(torch.finfo(cov.dtype).tiny ** 0.5)
    if method == "cholesky":
        return cholesky_whitener(cov, shrink)
    return zca_whitener(cov, shrink)


def _mean_and_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.mT @ centred / x.shape[0]


def whiten(
    x: torch.Tensor, method: str = "cholesky", eps: float = 1e-5, *, name: str = "x"
) -> torch.Tensor:
    """Whiten a batch with its own statistics: ``(x - mu) W`` with ``W^T (Sigma + s I) W = I``.

    ``cholesky``: ``W = L^{-T}`` from ``Sigma + s I = L L^T`` (VkD's generative prior);
    ``zca``: ``W = (Sigma + s I)^{-1/2}``. The shrinkage ``s = eps * mean(diag(Sigma))`` is
    relative to the average variance; it is what makes ``B <= D`` (a singular batch covariance)
    work. On a full-rank batch the output covariance is the identity up to about
    ``eps * mean variance / smallest eigenvalue``.

    Shape:
        - x: ``(B, D)``, ``B >= 2``
        - output: ``(B, D)``

    Example:
        >>> mix = torch.tensor([[1.0, 0.5, 0, 0], [0, 2, 0, 0], [0, 0, 3, 1], [0, 0, 0, 4]])
        >>> x = torch.randn(512, 4, dtype=torch.float64) @ mix.double() + 5
        >>> y = whiten(x)
        >>> bool(torch.allclose(y.T @ y / 512, torch.eye(4, dtype=torch.float64), atol=1e-4))
        True
    """
    validate_features(x, name, _VECTORS)
    check_min_batch(x, name, 2, "a covariance needs two samples")
    check_choice(method, "method", WHITENING_METHODS)
    eps = check_positive(eps, "eps")  # it guards a division
    work = work_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        xw = x.to(work)
        mean, cov = _mean_and_cov(xw)
        return ((xw - mean) @ _whitener(cov, method, eps)).to(x.dtype)


class Whitening(nn.Module):
    """Whitening with optional running statistics for evaluation.

    In training mode the batch's own mean and covariance are used (and, with
    ``track_running_stats``, folded into running estimates with ``momentum``); in eval mode the
    running estimates are used, so single samples can be whitened. See :func:`whiten`.

    Args:
        dim: feature width ``D``.
        method: ``"cholesky"`` (default, as in VkD) or ``"zca"``.
        eps: shrinkage relative to the average variance (needed when ``B <= D``), > 0.
        momentum: weight of the new batch in the running estimates, in ``(0, 1]`` (beyond 1
            the update extrapolates and the running covariance stops being positive definite).
        track_running_stats: keep running mean/covariance buffers for eval mode.
        device: where the buffers live.
        dtype: the buffers' floating-point dtype (default float32).

    Shape:
        - x: ``(B, D)``
        - output: ``(B, D)``

    Example:
        >>> white = Whitening(8)
        >>> y = white(torch.randn(64, 8) @ torch.randn(8, 8))
        >>> y.shape
        torch.Size([64, 8])
        >>> _ = white.eval()
        >>> white(torch.randn(1, 8)).shape
        torch.Size([1, 8])
    """

    def __init__(
        self,
        dim: int,
        *,
        method: str = "cholesky",
        eps: float = 1e-5,
        momentum: float = 0.1,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(dim, "dim", 1)
        check_choice(method, "method", WHITENING_METHODS)
        eps = check_positive(eps, "eps")  # it guards a division
        momentum = check_number(momentum, "momentum", minimum=0, maximum=1, exclusive_minimum=True)
        check_bool(track_running_stats, "track_running_stats")
        check_floating_dtype(dtype)
        check_device(device)
        self.dim, self.method, self.eps, self.momentum = dim, method, eps, momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            factory = {"device": device, "dtype": dtype or torch.float32}
            self.register_buffer("running_mean", torch.zeros(dim, **factory))
            self.register_buffer("running_cov", torch.eye(dim, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, device=device))

    def forward(self, x: torch.Tensor, *, name: str = "x") -> torch.Tensor:
        """Whiten ``x`` ``(B, D)``; ``name`` is how errors call it (a loss that whitens its
        teacher passes ``"teacher"``)."""
        validate_features(x, name, _VECTORS, width=self.dim)
        if self.track_running_stats and x.device != self.running_mean.device:
            # torch would fail inside the running-statistics update, naming neither side
            raise DeviceError(
                f"{name}: expected a tensor on {self.running_mean.device} (the device of the "
                f"running statistics; move the loss or module that holds them with .to()), "
                f"got one on {x.device}"
            )
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            check_min_batch(x, name, 2, "whitening with batch statistics needs two samples")
        work = work_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xw = x.to(work)
            if use_batch:
                mean, cov = _mean_and_cov(xw)
                if self.track_running_stats:
                    with torch.no_grad():
                        m = self.momentum
                        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                        self.running_cov.lerp_(cov.detach().to(self.running_cov.dtype), m)
                        self.num_batches_tracked += 1
            else:
                mean, cov = self.running_mean.to(work), self.running_cov.to(work)
            return ((xw - mean) @ _whitener(cov, self.method, self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, method={self.method!r}, eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )
