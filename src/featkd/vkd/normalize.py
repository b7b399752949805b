"""Teacher normalisations of VkD (Miles et al., CVPR 2024): layer norm, batch standardisation,
whitening.

Axis legend: ``B`` batch, ``D`` width. All maths in float32 (float64 for float64 input) with
autocast off; results come back in the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from featkd._checks import (
    DeviceError,
    ShapeError,
    check_floating,
    check_min_batch,
    validate_features,
)
from featkd._options import (
    check_bool,
    check_choice,
    check_device,
    check_floating_dtype,
    check_int,
    check_number,
    check_positive,
    renamed,
)
from featkd._precision import full_precision
from featkd.vkd import _normalization
from featkd.vkd._normalization import WHITENING_METHODS

__all__ = ["WHITENING_METHODS", "Whitening", "batch_standardize", "layer_norm", "whiten"]

_VECTORS = {2: "(B, D)"}
_SHRINKAGE = 1e-5


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
    with full_precision(x) as work:
        return _normalization.layer_norm(x.to(work), eps).to(x.dtype)


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
    with full_precision(x) as work:
        return _normalization.batch_standardize(x.to(work), eps).to(x.dtype)


def whiten(
    x: torch.Tensor,
    method: str = "cholesky",
    shrinkage: float | None = None,
    *,
    eps: float | None = None,
    name: str = "x",
) -> torch.Tensor:
    """Whiten a batch with its own statistics: ``(x - mu) W`` with ``W^T (Sigma + s I) W = I``.

    ``cholesky``: ``W = L^{-T}`` from ``Sigma + s I = L L^T`` (VkD's generative prior);
    ``zca``: ``W = (Sigma + s I)^{-1/2}``. The shrinkage ``s = shrinkage * mean(diag(Sigma))``
    is relative to the average variance; it is what makes ``B <= D`` (a singular batch
    covariance) work. On a full-rank batch the output covariance is the identity up to about
    ``shrinkage * mean variance / smallest eigenvalue``.

    Args:
        x: the batch.
        method: ``"cholesky"`` or ``"zca"``.
        shrinkage: relative shrinkage, > 0 (default 1e-5).
        eps: the former name of ``shrinkage`` (featkd 0.1), accepted for one release with a
            ``FutureWarning``.
        name: how errors call ``x``.

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
    shrinkage = renamed("whiten", "eps", "shrinkage", eps, shrinkage, _SHRINKAGE)
    shrinkage = check_positive(shrinkage, "shrinkage" if eps is None else "eps")
    with full_precision(x) as work:
        xw = x.to(work)
        mean, cov = _normalization.covariance(xw)
        return _normalization.whiten(xw, mean, cov, method, shrinkage).to(x.dtype)


class Whitening(nn.Module):
    """Whitening with optional running statistics for evaluation.

    In training mode the batch's own mean and covariance are used (and, with
    ``track_running_stats``, folded into running estimates with ``momentum``); in eval mode the
    running estimates are used, so single samples can be whitened. See :func:`whiten`.

    Args:
        dim: feature width ``D``.
        method: ``"cholesky"`` (default, as in VkD) or ``"zca"``.
        shrinkage: shrinkage relative to the average variance (needed when ``B <= D``), > 0;
            default 1e-5.
        eps: the former name of ``shrinkage`` (featkd 0.1), accepted for one release with a
            ``FutureWarning``.
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
        shrinkage: float | None = None,
        eps: float | None = None,
        momentum: float = 0.1,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(dim, "dim", 1)
        check_choice(method, "method", WHITENING_METHODS)
        shrinkage = renamed("Whitening", "eps", "shrinkage", eps, shrinkage, _SHRINKAGE)
        shrinkage = check_positive(shrinkage, "shrinkage" if eps is None else "eps")
        momentum = check_number(momentum, "momentum", minimum=0, maximum=1, exclusive_minimum=True)
        check_bool(track_running_stats, "track_running_stats")
        check_floating_dtype(dtype)
        check_device(device)
        self.dim, self.method, self.shrinkage, self.momentum = dim, method, shrinkage, momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            factory = {"device": device, "dtype": dtype or torch.float32}
            self.register_buffer("running_mean", torch.zeros(dim, **factory))
            self.register_buffer("running_cov", torch.eye(dim, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, device=device))

    @property
    def uses_batch_statistics(self) -> bool:
        """Whether a call whitens with the batch's own statistics (training mode, or no running
        statistics) rather than the running ones."""
        return self.training or not self.track_running_stats

    def check_batch(self, x: torch.Tensor, name: str) -> None:
        """What a batch ``x`` (already checked as features of width ``D``) must satisfy for this
        module: the device of the running statistics, two samples for batch statistics.
        ``name`` is how errors call it (a loss that whitens its teacher passes ``"teacher"``)."""
        if self.track_running_stats and x.device != self.running_mean.device:
            # torch would fail inside the running-statistics update, naming neither side
            raise DeviceError(
                f"{name}: expected a tensor on {self.running_mean.device} (the device of the "
                f"running statistics; move the loss or module that holds them with .to()), "
                f"got one on {x.device}"
            )
        if self.uses_batch_statistics:
            check_min_batch(x, name, 2, "whitening with batch statistics needs two samples")

    def whiten_unchecked(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without its checks, computing in ``x``'s dtype with autocast left as
        it is: for a loss that has checked ``x`` (:meth:`check_batch`) and runs in full
        precision already. Updates the running statistics in training mode."""
        if self.uses_batch_statistics:
            mean, cov = _normalization.covariance(x)
            if self.track_running_stats:
                with torch.no_grad():
                    m = self.momentum
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                    self.running_cov.lerp_(cov.detach().to(self.running_cov.dtype), m)
                    self.num_batches_tracked += 1
        else:
            mean, cov = self.running_mean.to(x.dtype), self.running_cov.to(x.dtype)
        return _normalization.whiten(x, mean, cov, self.method, self.shrinkage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten ``x`` ``(B, D)``, in float32 (float64 for float64 input) with autocast off;
        returned in ``x``'s dtype."""
        validate_features(x, "x", _VECTORS, width=self.dim)
        self.check_batch(x, "x")
        with full_precision(x) as work:
            return self.whiten_unchecked(x.to(work)).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, method={self.method!r}, shrinkage={self.shrinkage}, "
            f"momentum={self.momentum}, track_running_stats={self.track_running_stats}"
        )
