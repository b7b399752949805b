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
from featkd.cospress import CosPressLoss
from featkd.diagnostics import (
    CosinePreservation,
    cosine_preservation,
    linear_cka,
    orthogonality_error,
)
from featkd.heads import LinearHead, TeacherCompressionHead
from featkd.hooks import FeatureTap, UnknownModuleError
from featkd.kd import KDLoss
from featkd.pooling import align_tokens, pool, to_tokens
from featkd.proteus import ProteusLoss

__version__ = "0.1.0"

__all__ = [
    "ChoiceError",
    "CosPressLoss",
    "CosinePreservation",
    "DTypeError",
    "DeviceError",
    "FeatkdInputError",
    "FeatureTap",
    "KDLoss",
    "LinearHead",
    "NonFiniteError",
    "ProteusLoss",
    "ShapeError",
    "TeacherCompressionHead",
    "UnknownModuleError",
    "__version__",
    "align_tokens",
    "cosine_preservation",
    "linear_cka",
    "orthogonality_error",
    "pool",
    "set_finite_check",
    "to_tokens",
]
