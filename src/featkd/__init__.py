"""featkd: feature-distillation losses and projection heads for PyTorch.

Student first, always: ``loss_fn(student, teacher, *, labels=None)`` returns a scalar. Losses
that own parameters (heads, projectors, bridges) must be added to the optimiser.
"""

from featkd._checks import (
    ChoiceError,
    DeviceError,
    DTypeError,
    FeatkdInputError,
    NonFiniteError,
    ShapeError,
    set_finite_check,
)
from featkd.bridges import FeatureSpec, build_bridge
from featkd.diagnostics import (
    CosinePreservation,
    cosine_preservation,
    linear_cka,
    orthogonality_error,
)
from featkd.distributed import GlobalBatch, gather_with_grad
from featkd.fcfd import FCFDLoss
from featkd.hooks import FeatureTap, UnknownModuleError
from featkd.kd import KDLoss
from featkd.pooling import align_tokens, pool, to_tokens

__version__ = "0.1.0"

__all__ = [
    "ChoiceError",
    "CosinePreservation",
    "DTypeError",
    "DeviceError",
    "FCFDLoss",
    "FeatkdInputError",
    "FeatureSpec",
    "FeatureTap",
    "GlobalBatch",
    "KDLoss",
    "NonFiniteError",
    "ShapeError",
    "UnknownModuleError",
    "__version__",
    "align_tokens",
    "build_bridge",
    "cosine_preservation",
    "gather_with_grad",
    "linear_cka",
    "orthogonality_error",
    "pool",
    "set_finite_check",
    "to_tokens",
]
