"""Modules that own a seeded generator: its position travels in ``state_dict()``."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from featkd._checks import FeatkdInputError
from featkd._loss import user_stacklevel

__all__ = ["GeneratorState"]


class GeneratorState:
    """Mixin of a module with an owned ``generator`` (``None`` with ``seed=None``): saves its
    position in ``state_dict()`` so that a resumed run continues the same random draws.

    Loading a seeded module's state into a ``seed=None`` one loads everything else and warns
    that the sequence is not resumed (the module draws from torch's global generator, which it
    does not own); loading a ``seed=None`` state into a seeded module leaves that module's
    generator as it is. ``random_draws`` names what the generator draws, for that warning.
    """

    generator: torch.Generator | None
    random_draws: str = "random draws"

    def get_extra_state(self) -> dict[str, Any]:
        """The position of the module's own generator (None with ``seed=None``), saved in
        ``state_dict()`` so that a resumed run continues its random draws."""
        if self.generator is None:
            return {"generator_state": None}
        return {
            "generator_state": self.generator.get_state(),
            "generator_device": self.generator.device.type,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint saved before the generator state was kept has no such key: load it as
        # one saved with seed=None (the generator keeps its position) instead of failing
        state_dict.setdefault(prefix + "_extra_state", {"generator_state": None})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Any) -> None:
        """Restore the generator saved by :meth:`get_extra_state` (see :class:`GeneratorState`)."""
        saved = state.get("generator_state") if isinstance(state, dict) else None
        if saved is None:
            return  # saved with seed=None: no sequence of its own to resume
        if self.generator is None:  # e.g. a trained loss rebuilt without seed= to evaluate
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the checkpoint holds a seeded "
                "generator's position, which is not restored: this module has seed=None and "
                "draws from torch's global generator. Its parameters and buffers loaded as usual; "
                f"build it with seed= to resume the sequence of {self.random_draws}",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return
        device = state.get("generator_device", "cpu")
        if device != self.generator.device.type:
            raise FeatkdInputError(
                f"state_dict: expected the state of a {self.generator.device.type} generator "
                f"(this module's seed), got that of a {device} generator"
            )
        self.generator.set_state(saved.cpu())
