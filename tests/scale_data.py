"""Batches at every scale from 1e-6 to 1e6, shared by the scale tests of the Gaussian losses."""

import numpy as np
import torch

SCALES = [1e-6, 1e-3, 1.0, 1e3, 1e6]


def labels_with_a_lone_class(batch: int) -> torch.Tensor:
    """Two classes of several rows and a class seen once."""
    return torch.tensor([i % 2 for i in range(batch - 1)] + [2])


def batch_at_scale(rng, batch: int, width: int, scale: float) -> np.ndarray:
    """Well-conditioned features of size ``scale`` with a mean of ``3 * scale``."""
    return (rng.standard_normal((batch, width)) * rng.uniform(0.5, 2, width) + 3) * scale
