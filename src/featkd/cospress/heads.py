"""Projection heads: ``LayerNorm -> Linear`` maps between feature widths.

One structure serves two roles that differ only in which side they sit on:

- :class:`LinearHead` ``(in_features, out_features)``: the student-side head of Proteus and
  FitNets-style losses, mapping the student up to the teacher's width.
- :class:`TeacherCompressionHead` ``(student_dim=..., teacher_dim=...)``: the CosPress head,
  compressing the teacher down to the student's width. The same module with its widths named
  after the two models.

Both follow one dtype policy, that of a plain layer such as ``nn.Linear``: under autocast they
follow autocast; outside it, the input must have the dtype of the parameters (a
:class:`~featkd.DTypeError` otherwise, rather than torch's matmul error). A loss that owns a head
(:class:`~featkd.CosPressLoss`, :class:`~featkd.ProteusLoss`) runs it with autocast off, in its
parameters' dtype, casting the input to it.
"""

from __future__ import annotations

import torch
from torch import nn

from featkd._checks import (
    DTypeError,
    ShapeError,
    check_finite,
    check_floating,
    check_same_device,
    check_width,
    describe_shape,
)
from featkd._options import (
    check_bool,
    check_device,
    check_floating_dtype,
    check_int,
    keyword_widths,
)

__all__ = ["LinearHead", "TeacherCompressionHead"]


class LinearHead(nn.Module):
    """``LayerNorm(in_features) -> Linear(in_features, out_features)`` with bias.

    Both layers use torch's default initialisation (LayerNorm affine at ones/zeros, Linear
    Kaiming-uniform). Applied to the last dimension, so token tensors ``(B, N, in)`` and pooled
    vectors ``(B, in)`` both work.

    Dtype: a plain layer, like ``nn.Linear``. Under autocast it follows autocast; outside, the
    input must have the parameters' dtype (a :class:`~featkd.DTypeError` otherwise: convert the
    head with ``.to(dtype)``). :class:`~featkd.ProteusLoss` runs it with autocast off in its
    parameters' dtype, casting the student's features to it.

    Args:
        in_features: width of the input features.
        out_features: width of the output features.
        device: where to create the parameters.
        dtype: parameter dtype.

    Shape:
        - input: ``(..., in_features)``
        - output: ``(..., out_features)``

    Example:
        >>> head = LinearHead(192, 384)
        >>> head(torch.randn(2, 197, 192)).shape
        torch.Size([2, 197, 384])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)
        check_floating_dtype(dtype)
        check_device(device)
        self.norm = nn.LayerNorm(self.in_features, device=device, dtype=dtype)
        self.linear = nn.Linear(self.in_features, self.out_features, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix of the linear layer (for diagnostics such
        as :func:`featkd.orthogonality_error`)."""
        return self.linear.weight

    _input_name = "x"

    def forward(self, x: torch.Tensor, *, finite_check: bool = True) -> torch.Tensor:
        """Apply the head to the last dimension of ``x``.

        Args:
            x: input features.
            finite_check: reject NaN/Inf in ``x`` (one host synchronisation, also governed by
                :func:`featkd.set_finite_check`); a loss that validated ``x`` already passes
                ``False``.
        """
        name = self._input_name
        check_bool(finite_check, "finite_check")
        check_floating(x, name)
        if x.ndim == 0 or x.numel() == 0:
            raise ShapeError(
                f"{name}: expected (..., {self.in_features}) with no zero-sized dimension, "
                f"got {describe_shape(x.shape)}"
            )
        check_width(x, name, self.in_features)
        check_same_device({"the head's parameters": self.linear.weight, name: x})
        weight_dtype = self.linear.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise DTypeError(
                f"{name}: expected {weight_dtype} (the dtype of the head's parameters), got "
                f"{x.dtype}; convert the head with .to({x.dtype}) or run under torch.autocast"
            )
        if finite_check:
            check_finite(x, name)
        return self.linear(self.norm(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class TeacherCompressionHead(LinearHead):
    """The CosPress teacher head: ``LayerNorm(teacher_dim) -> Linear(teacher_dim, student_dim)``.

    A :class:`LinearHead` whose widths are named after the two models. It compresses teacher
    features into the student's width; :class:`featkd.CosPressLoss` trains it to preserve the
    teacher's cosine-similarity neighbourhoods.

    Dtype: the policy of :class:`LinearHead`, a plain layer like ``nn.Linear``. Under autocast
    it follows autocast; outside, the input must have the parameters' dtype (a
    :class:`~featkd.DTypeError` otherwise). :class:`~featkd.CosPressLoss` and
    :func:`~featkd.cospress.cospress_loss` run it with autocast off in its parameters' dtype,
    casting the teacher's features to it.

    Args:
        student_dim: width of the student features (output). Keyword-only: featkd 0.1 took
            ``(teacher_dim, student_dim)`` by position, still read so for one release with a
            ``FutureWarning``.
        teacher_dim: width of the teacher features (input).
        device: where to create the parameters.
        dtype: parameter dtype.

    Shape:
        - input: ``(..., teacher_dim)``
        - output: ``(..., student_dim)``

    Example:
        >>> head = TeacherCompressionHead(student_dim=192, teacher_dim=384)
        >>> head(torch.randn(2, 257, 384)).shape
        torch.Size([2, 257, 192])
    """

    _input_name = "teacher"

    def __init__(
        self,
        *widths: int,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        student_dim, teacher_dim = keyword_widths(
            type(self).__name__, widths, ("teacher_dim", "student_dim"), student_dim, teacher_dim
        )
        super().__init__(teacher_dim, student_dim, device=device, dtype=dtype)

    @property
    def teacher_dim(self) -> int:
        return self.in_features

    @property
    def student_dim(self) -> int:
        return self.out_features

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}"
