"""OrthogonalProjector: a linear map whose weight has orthonormal columns.

The weight ``P`` (``d_t x d_s``, ``d_t >= d_s``) is a function of a free parameter, the
``generator`` (``d_t x d_s``, the same size as ``P``), through one of three maps:

``matrix_exp``
    ``P = expm(A)[:, :d_s]`` with ``A = [[S, -B^T], [B, 0]]`` skew-symmetric, ``S`` from the
    strictly lower triangle of the generator's top ``d_s x d_s`` block and ``B`` its other
    rows. Evaluated from ``2 d_s x 2 d_s`` matrix functions and tall-skinny products
    (:func:`featkd.vkd._stiefel.stiefel_expm`), never forming a ``d_t x d_t`` matrix.
``cayley``
    ``P = (I - A/2)^{-1} (I + A/2)[:, :d_s]`` for the same ``A``, by one ``d_s x d_s`` solve
    (:func:`featkd.vkd._stiefel.stiefel_cayley`).
``householder``
    ``P = -H_1 H_2 ... H_{d_s} E`` with reflections ``H_i = I - 2 v_i v_i^T / ||v_i||^2``,
    ``v_i = e_i +`` the generator's column ``i`` below the diagonal
    (:func:`torch.linalg.householder_product`).

A zero generator gives the first ``d_s`` columns of the identity under every map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from featkd._checks import (
    ChoiceError,
    NonFiniteError,
    ShapeError,
    check_finite,
    check_floating,
    check_same_device,
    check_width,
    describe_shape,
)
from featkd._options import (
    check_choice,
    check_device,
    check_floating_dtype,
    check_int,
    seeded_generator,
)
from featkd._precision import full_precision
from featkd.vkd import _stiefel

__all__ = ["ORTHOGONAL_MAPS", "OrthogonalProjector"]

ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")
_INITS = ("identity", "random", "random_frame")


class OrthogonalProjector(nn.Module):
    """Linear map ``x -> x P^T`` with ``P^T P = I`` (no bias), for VkD-style distillation.

    ``P`` is recomputed from the ``generator`` parameter at every call, so it stays exactly
    on the Stiefel manifold whatever the optimiser does to the generator. When
    ``out_features < in_features`` the roles swap: the weight has orthonormal rows.

    Args:
        in_features: input width ``d_s``.
        out_features: output width ``d_t``.
        map: ``"matrix_exp"`` (default), ``"cayley"`` or ``"householder"`` (see the module
            docstring).
        init: ``"identity"`` (default: ``P`` starts at the first ``d_s`` columns of the
            identity) or ``"random"`` (generator entries drawn from ``N(0, 1/d_t)`` for
            ``matrix_exp``/``cayley``, so the principal angles between ``P`` and the identity
            columns are of order one; standard normal reflection vectors for
            ``householder``), or ``"random_frame"``: the official VkD start, torch's
            trivialisation with a random base. A fixed orthogonal ``base`` buffer
            ``(max, max)``, uniformly (Haar) distributed, multiplies the map's output and the
            generator starts at zero, so ``P`` starts at ``base[:, :min]``, a uniformly random
            orthonormal frame (``"random"`` stays close to the identity columns: principal
            angles of about one radian).
        seed: the randomness of ``init="random"``: ``None`` (torch's global generator, on the
            parameter's device), an integer seed or a ``torch.Generator`` (drawn on the
            generator's device, then copied: the same seed gives the same frame anywhere).
            Unused with ``init="identity"``. (Both random inits draw from it.)
        max_squarings: ``matrix_exp`` only. ``None`` (default): on CPU the Taylor degree and
            the number of squarings come from a bound on the generator's norm (a host read,
            free there); on accelerators and under ``torch.compile`` the call is
            synchronisation-free with up to 12 squarings (fixed degree; all 12 squares are
            formed and the device selects the one needed; accurate while
            ``||A|| <~ 2 ** 13``). An integer makes every device take the
            synchronisation-free path with that many, accurate while
            ``||A|| <~ 2 ** max_squarings`` (fewer is faster).
        device: where the parameter lives.
        dtype: the parameter's dtype.

    Shape:
        - input: ``(..., in_features)``
        - output: ``(..., out_features)``, in the input's dtype
        - weight: ``(out_features, in_features)``

    ``P`` and the product are computed in float32 (float64 when the input or the parameter is
    float64) with autocast disabled, then cast back to the input's dtype.

    Note:
        Owns parameters: add ``projector.parameters()`` (or the parameters of the loss that
        owns it) to the optimiser.

    Example:
        >>> proj = OrthogonalProjector(192, 384)
        >>> proj(torch.randn(8, 192)).shape
        torch.Size([8, 384])
        >>> bool(torch.equal(proj.weight, torch.eye(384, 192)))
        True
        >>> from featkd import orthogonality_error
        >>> rotated = OrthogonalProjector(16, 64, init="random")
        >>> bool(orthogonality_error(rotated.weight) < 1e-5)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        map: str = "matrix_exp",
        init: str = "identity",
        seed: int | torch.Generator | None = None,
        max_squarings: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)
        check_choice(map, "map", ORTHOGONAL_MAPS)
        check_choice(init, "init", _INITS)
        generator = seeded_generator(seed)
        if max_squarings is not None and (
            not isinstance(max_squarings, int)
            or isinstance(max_squarings, bool)
            or not 0 <= max_squarings <= 64
        ):
            raise ChoiceError(
                f"max_squarings: expected None or an int in [0, 64], got {max_squarings!r}"
            )
        if max_squarings is not None and map != "matrix_exp":
            raise ChoiceError(f"max_squarings: only used by map='matrix_exp', got map={map!r}")
        check_floating_dtype(dtype)
        check_device(device)
        self.map = map
        self.init = init
        self.max_squarings = max_squarings
        tall, narrow = max(in_features, out_features), min(in_features, out_features)
        self.generator = nn.Parameter(torch.empty(tall, narrow, device=device, dtype=dtype))
        base = None
        if init == "random_frame":  # a fixed rotation of the whole space, not trained
            base = torch.empty(tall, tall, device=device, dtype=dtype)
        self.register_buffer("base", base)
        self.reset_parameters(generator)

    @property
    def transposed(self) -> bool:
        """``True`` when ``out_features < in_features`` (the weight has orthonormal rows)."""
        return self.out_features < self.in_features

    def reset_parameters(self, seed: int | torch.Generator | None = None) -> None:
        """Re-draw the generator according to ``init`` (``seed`` as in the constructor)."""
        generator = seeded_generator(seed)
        param = self.generator
        std = 1.0 if self.map == "householder" else 1.0 / math.sqrt(param.shape[0])
        with torch.no_grad():
            if self.init == "random_frame":
                param.zero_()
                self.base.copy_(_haar_orthogonal(self.base.shape[0], generator, self.base))
            elif self.init == "identity":
                param.zero_()
            elif generator is None:
                param.normal_(0.0, std)
            else:
                wide = torch.float64 if param.dtype == torch.float64 else torch.float32
                draw = torch.randn(
                    param.shape, generator=generator, device=generator.device, dtype=wide
                )
                param.copy_(draw * std)

    def _orthonormal_columns(self, dtype: torch.dtype) -> torch.Tensor:
        """``P`` of shape ``(max, min)`` with orthonormal columns, in ``dtype``."""
        columns = self._mapped_columns(dtype)
        if self.base is not None:
            return self.base.to(dtype) @ columns
        return columns

    def _mapped_columns(self, dtype: torch.dtype) -> torch.Tensor:
        """The map of the generator alone (``P`` without the fixed base)."""
        gen = self.generator.to(dtype)
        if self.map == "householder":
            vectors = gen.tril(-1)
            tau = 2.0 / (1.0 + vectors.square().sum(dim=0))
            return -torch.linalg.householder_product(vectors, tau)
        skew, tall = _stiefel.stiefel_blocks(gen)
        if self.map == "cayley":
            return _stiefel.stiefel_cayley(skew, tall)
        try:
            return _stiefel.stiefel_expm(skew, tall, max_squarings=self.max_squarings)
        except FloatingPointError:
            raise NonFiniteError(
                f"generator: expected finite values, got NaN/Inf in the parameter of shape "
                f"{describe_shape(self.generator.shape)} (has training diverged?)"
            ) from None

    def compute_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out_features, in_features)``, computed with autocast disabled in
        ``dtype`` (default float32, or float64 for a float64 parameter)."""
        with full_precision(self.generator) as work:
            columns = self._orthonormal_columns(dtype or work)
        return columns.mT if self.transposed else columns

    @property
    def weight(self) -> torch.Tensor:
        """The orthonormal weight ``(out_features, in_features)`` (recomputed on each access)."""
        return self.compute_weight()

    def skew_generator(self) -> torch.Tensor:
        """The full ``(d, d)`` skew-symmetric ``A`` (``d = max(in, out)``) whose exponential
        (``matrix_exp``) or Cayley transform (``cayley``) gives the weight's columns (times the
        fixed ``base`` with ``init="random_frame"``)."""
        if self.map == "householder":
            raise ChoiceError("skew_generator: not defined for map='householder'")
        skew, tall = _stiefel.stiefel_blocks(self.generator)
        return _stiefel.stiefel_generator_matrix(skew, tall)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x``: ``(..., in_features) -> (..., out_features)``.

        Shape:
            - x: ``(..., in_features)``
            - output: ``(..., out_features)`` in ``x``'s dtype

        Example:
            >>> proj = OrthogonalProjector(4, 6)
            >>> proj(torch.ones(2, 3, 4)).shape
            torch.Size([2, 3, 6])
        """
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0:
            raise ShapeError(f"x: expected (..., {self.in_features}), got a scalar")
        check_floating(x, "x")
        check_width(x, "x", self.in_features, "in_features")
        check_same_device({"the projector's generator": self.generator, "x": x})
        check_finite(x, "x")
        with full_precision(x, self.generator) as work:
            weight = self.compute_weight(work)
            out = F.linear(x.to(work), weight)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"map={self.map!r}, init={self.init!r}"
        )
        if self.max_squarings is not None:
            text += f", max_squarings={self.max_squarings}"
        return text


def _haar_orthogonal(
    size: int, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """A ``size x size`` orthogonal matrix uniformly (Haar) distributed: the Q of a Gaussian
    matrix's QR, with the signs of R's diagonal moved into Q (Mezzadri, 2007). Drawn in
    float64 on the generator's device (the same seed gives the same matrix anywhere)."""
    device = like.device if generator is None else generator.device
    gaussian = torch.randn(size, size, generator=generator, device=device, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
    return q.to(device=like.device, dtype=like.dtype)
