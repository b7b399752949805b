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
from featkd._fused import FusedKernelWarning, set_fused_kernels
from featkd._loss import FrozenParametersWarning, StudentGradientWarning
from featkd.cache import (
    CachedTeacherDataset,
    CacheError,
    RandomTransformWarning,
    TeacherCache,
    cache_teacher_features,
)
from featkd.cospress import CosPressLoss, LinearHead, ProteusLoss, TeacherCompressionHead
from featkd.diagnostics import (
    CosinePreservation,
    cosine_preservation,
    linear_cka,
    orthogonality_error,
)
from featkd.distributed import GlobalBatch, gather_with_grad
from featkd.fcfd import FCFDLoss, WarmupSkippedWarning
from featkd.fcfd.bridges import FeatureSpec, build_bridge
from featkd.hooks import FeatureTap, NotCapturedError, UnknownModuleError
from featkd.kd import KDLoss
from featkd.kd2m import (
    GaussianKLLoss,
    GaussianWassersteinLoss,
    JointWassersteinLoss,
    KD2MLoss,
    MMDLoss,
    SinkhornConvergenceWarning,
    WassersteinLoss,
)
from featkd.multiteacher import MultiTeacherLoss, PHIStandardize, RunningStandardize, Teacher
from featkd.pooling import align_tokens, pool, to_tokens
from featkd.queue import FeatureQueue
from featkd.vkd import OrthogonalProjector, VkDLoss, Whitening

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CachedTeacherDataset",
    "ChoiceError",
    "CosPressLoss",
    "CosinePreservation",
    "DTypeError",
    "DeviceError",
    "FCFDLoss",
    "FeatkdInputError",
    "FeatureQueue",
    "FeatureSpec",
    "FeatureTap",
    "FrozenParametersWarning",
    "FusedKernelWarning",
    "GaussianKLLoss",
    "GaussianWassersteinLoss",
    "GlobalBatch",
    "JointWassersteinLoss",
    "KD2MLoss",
    "KDLoss",
    "LinearHead",
    "MMDLoss",
    "MultiTeacherLoss",
    "NonFiniteError",
    "NotCapturedError",
    "OrthogonalProjector",
    "PHIStandardize",
    "ProteusLoss",
    "RandomTransformWarning",
    "RunningStandardize",
    "ShapeError",
    "SinkhornConvergenceWarning",
    "StudentGradientWarning",
    "Teacher",
    "TeacherCache",
    "TeacherCompressionHead",
    "UnknownModuleError",
    "VkDLoss",
    "WarmupSkippedWarning",
    "WassersteinLoss",
    "Whitening",
    "__version__",
    "align_tokens",
    "build_bridge",
    "cache_teacher_features",
    "cosine_preservation",
    "gather_with_grad",
    "linear_cka",
    "orthogonality_error",
    "pool",
    "set_finite_check",
    "set_fused_kernels",
    "to_tokens",
]
