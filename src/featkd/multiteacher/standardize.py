"""Teacher-feature standardisers with running statistics: per channel, and PHI-S.

Teachers of a multi-teacher student have very different activation statistics (one's variance
can be thousands of times another's), so a loss summed over teachers is dominated by one of
them unless each teacher's features are standardised first. Both modules here keep running
statistics in buffers (saved in ``state_dict``), update them in training mode over every token
of the batch, and standardise with the updated statistics; in eval mode they only read them.
Both are invertible (:meth:`inverse`), so a student's prediction can be mapped back to the
teacher's space.

Axis legend: ``D`` channels; any leading axes (batch, tokens) are pooled for the statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from featkd._checks import ShapeError, check_floating, describe_shape
from featkd._options import check_int, check_number, check_positive

__all__ = ["PHIStandardize", "RunningStandardize", "hadamard_matrix"]


def _paley_order(size: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``q + 1`` by Paley's first construction, for a prime
    ``q = size - 1`` with ``q % 4 == 3``; None when ``size - 1`` is not such a prime."""
    q = size - 1
    if q < 3 or q % 4 != 3 or any(q % p == 0 for p in range(2, math.isqrt(q) + 1)):
        return None
    squares = {(x * x) % q for x in range(1, q)}
    # Jacobsthal matrix Q[i, j] = chi(j - i), chi the quadratic character mod q
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    jacobsthal = chi[index]
    matrix = torch.ones(size, size, dtype=torch.float64)
    matrix[1:, 0] = -1.0
    matrix[1:, 1:] = jacobsthal + torch.eye(q, dtype=torch.float64)
    return matrix


def hadamard_matrix(size: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthogonal Hadamard matrix ``H / sqrt(size)`` (entries ``+-1 / sqrt(size)``).

    Built as the Kronecker product of Sylvester's ``2^k`` matrix and, for the odd part, a
    Paley matrix of order ``q + 1`` (``q`` a prime ``= 3 mod 4``): every ``size = 2^k m`` with
    ``m`` in {1, 12, 20, 24, 44, 48, 60, 68, 72, 80, ...}, which covers the common
    widths (384 = 12 * 32, 768 = 12 * 64, 1024, 1152 = 72 * 16, 1280 = 20 * 64, 1536).

    Raises:
        ChoiceError: ``size`` is not an int ``>= 1``.
        ShapeError: no Hadamard matrix of this order is built here.

    Example:
        >>> h = hadamard_matrix(12)
        >>> bool(torch.allclose(h @ h.T, torch.eye(12, dtype=h.dtype)))
        True
        >>> sorted({round(float(v) * 12**0.5) for v in h.flatten()})
        [-1, 1]
    """
    check_int(size, "size", minimum=1)
    # size = power * core_order: try the largest power of two first (Sylvester is cheapest),
    # then move factors of two into the Paley core (12 = 3 * 4 is a Paley order, 3 is not)
    power = size & -size
    core = None
    while core is None and power >= 1:
        order = size // power
        core = torch.ones(1, 1, dtype=torch.float64) if order == 1 else _paley_order(order)
        if core is None:
            power //= 2
    if core is None:
        raise ShapeError(
            f"size: no Hadamard matrix of order {size} is built here (orders 2^k * m with m = 1 "
            "or m - 1 a prime = 3 mod 4); use another width, or normalize='running'"
        )
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while sylvester.shape[0] < power:
        sylvester = torch.kron(sylvester, block)
    matrix = torch.kron(sylvester, core)
    return (matrix / math.sqrt(size)).to(dtype)


def _check_width(x: torch.Tensor, dim: int, name: str) -> None:
    check_floating(x, name)
    if x.ndim < 1 or x.shape[-1] != dim:
        raise ShapeError(f"{name}: expected features (..., {dim}), got {describe_shape(x.shape)}")


class _RunningMoments(nn.Module):
    """Running mean (and second moments) over the rows of ``(..., D)`` inputs.

    ``momentum=None`` is the cumulative average of every batch seen (what a fixed set of
    dataset statistics converges to); a number ``m`` is the exponential average
    ``stat <- (1 - m) stat + m batch_stat`` (for the variance, the mixture's: plus
    ``m (1 - m)`` times the squared shift of the means). The count is an integer buffer, so
    ``.half()`` or ``.to(torch.bfloat16)`` never rounds it.
    """

    def __init__(self, dim: int, momentum: float | None, full: bool) -> None:
        super().__init__()
        self.dim = check_int(dim, "dim", minimum=1)
        self.momentum = (
            None if momentum is None else check_number(momentum, "momentum", minimum=0, maximum=1)
        )
        self.register_buffer("mean", torch.zeros(dim))
        shape = (dim, dim) if full else (dim,)
        self.register_buffer("second", torch.zeros(shape))  # E[x x^T] or E[x^2], centred later
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def _update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.dim).to(self.mean.dtype)
        n = rows.shape[0]
        if n == 0:  # nothing to learn from; a mean over no rows would be NaN for good
            return
        mean = rows.mean(dim=0)
        centred = rows - mean
        second = centred.mT @ centred / n if self.second.ndim == 2 else centred.square().mean(0)
        # combine (mean, centred second moment) pairs: exact for the cumulative average
        if self.momentum is None:
            weight = (n / (self.count + n).double()).to(self.mean.dtype)
        else:  # the first batch sets the statistics
            weight = torch.where(self.count > 0, self.momentum, 1.0).to(self.mean.dtype)
        shift = mean - self.mean
        outer = shift[:, None] * shift[None, :] if self.second.ndim == 2 else shift.square()
        self.second.mul_(1 - weight).add_(weight * second + weight * (1 - weight) * outer)
        self.mean.add_(weight * shift)
        self.count.add_(n)

    def covariance(self) -> torch.Tensor:
        return self.second


class RunningStandardize(_RunningMoments):
    """Per-channel standardisation ``(x - mean) / sqrt(var + eps)`` with running statistics.

    In eval mode before any training call (no statistics yet) the batch's own statistics are
    used, rather than dividing by ``sqrt(eps)``.

    Args:
        dim: channels ``D``.
        momentum: ``None`` (default) for the cumulative average over every training batch, or
            a number in ``[0, 1]`` for an exponential average.
        eps: added to the variance.

    Shape:
        - input: ``(..., D)``
        - output: ``(..., D)``, in the input's dtype

    Example:
        >>> norm = RunningStandardize(4)
        >>> y = norm(torch.randn(256, 4) * 10 + 3)
        >>> bool(y.mean(0).abs().max() < 1e-5), bool((y.var(0, unbiased=False) - 1).abs().max() < 1e-3)
        (True, True)
    """

    def __init__(self, dim: int, *, momentum: float | None = None, eps: float = 1e-6) -> None:
        super().__init__(dim, momentum, full=False)
        self.eps = check_positive(eps, "eps")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_width(x, self.dim, "x")
        if self.training:
            self._update(x)
        mean, var = self.mean, self.second
        if not self.training:  # before any training call there are no statistics: the batch's
            rows = x.detach().reshape(-1, self.dim).to(mean.dtype)
            seen = self.count > 0
            mean = torch.where(seen, mean, rows.mean(dim=0))
            var = torch.where(seen, var, rows.var(dim=0, unbiased=False))
        scale = (var + self.eps).rsqrt()
        return ((x.to(self.mean.dtype) - mean) * scale).to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Back to the teacher's units: ``y sqrt(var + eps) + mean``."""
        _check_width(y, self.dim, "y")
        scale = (self.second + self.eps).sqrt()
        return (y.to(self.mean.dtype) * scale + self.mean).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, momentum={self.momentum}, eps={self.eps}"


class PHIStandardize(_RunningMoments):
    """PHI-S, isotropic standardisation (Ranzinger et al., 2024): ``y = H U^T (x - mu) / a``.

    ``U`` holds the eigenvectors of the running covariance ``S``, ``H`` is an orthogonal
    Hadamard matrix (:func:`hadamard_matrix`) and ``a = sqrt(tr(S) / D)``. Rotating by ``U^T``
    then ``H`` spreads every eigenvalue evenly over the channels (each entry of ``H`` squared is
    ``1 / D``), so every output channel has variance ``tr(S) / D`` and one scalar ``a``
    standardises them all: the teacher's geometry is kept (a rotation and one scale), unlike
    per-channel standardisation or whitening.

    The transform is recomputed from the running statistics on each training call (one
    ``eigh``: on CUDA it synchronises once per call, like ZCA whitening) and kept in buffers,
    so eval mode only applies it; before any training call that transform is the identity.

    Args:
        dim: channels ``D`` (an order :func:`hadamard_matrix` builds).
        momentum: ``None`` (default) for the cumulative average over every training batch, or
            a number in ``[0, 1]`` for an exponential average.
        eps: floor of ``a``.

    Shape:
        - input: ``(..., D)``
        - output: ``(..., D)``, in the input's dtype

    Example:
        >>> phis = PHIStandardize(8)
        >>> x = torch.randn(512, 8) @ torch.randn(8, 8) + 5
        >>> y = phis(x)
        >>> variances = y.var(0, unbiased=False)
        >>> bool((variances - 1).abs().max() < 1e-4)
        True
    """

    def __init__(self, dim: int, *, momentum: float | None = None, eps: float = 1e-6) -> None:
        super().__init__(dim, momentum, full=True)
        self.eps = check_positive(eps, "eps")
        # +-1 entries: exact in every dtype (a scaled float32 copy would not stay orthogonal
        # after .double())
        signs = (hadamard_matrix(dim) * math.sqrt(dim)).round()
        self.register_buffer("signs", signs.to(torch.float32))
        self.register_buffer("rotation", torch.eye(dim))  # H U^T
        self.register_buffer("scale", torch.ones(()))  # a

    def _refresh(self) -> None:
        work = self.second.double()
        values, vectors = torch.linalg.eigh(work)
        # eigenvectors are defined up to sign, and eigh may flip one between two nearly equal
        # covariances: that would turn the student's target around from one step to the next.
        # Fix each sign by its largest entry (device-side, no host read)
        largest = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
        vectors = vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)
        rotation = self.signs.double() @ vectors.mT / math.sqrt(self.dim)
        self.rotation.copy_(rotation)
        self.scale.copy_((values.clamp_min(0).sum() / self.dim).sqrt().clamp_min(self.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_width(x, self.dim, "x")
        if self.training:
            self._update(x)
            self._refresh()
        centred = x.to(self.mean.dtype) - self.mean
        return (centred @ self.rotation.mT / self.scale).to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Back to the teacher's units: ``U H^T y a + mu`` (the transform is orthogonal)."""
        _check_width(y, self.dim, "y")
        return ((y.to(self.mean.dtype) * self.scale) @ self.rotation + self.mean).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, momentum={self.momentum}, eps={self.eps}"
