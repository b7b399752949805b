"""FeatureTap: capture the outputs of named submodules with forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from featkd._checks import FeatkdInputError

__all__ = ["FeatureTap", "UnknownModuleError"]


class UnknownModuleError(FeatkdInputError, KeyError):
    """A name passed to :class:`FeatureTap` is not a submodule of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class FeatureTap(MutableMapping):
    """Context manager that records the outputs of named submodules during a forward pass.

    Inside the ``with`` block the tap is a dict ``name -> output`` filled by every forward
    of the model; on exit every hook is removed and every captured tensor released (so no
    activation, and no autograd graph, outlives the block). Compute the loss inside the block.
    If a submodule runs several times in one block, the latest output is kept.

    Works for a frozen teacher under ``torch.no_grad()`` (the outputs carry no graph) and for a
    student with gradients (the outputs are the live tensors, so a loss on them trains the
    student). Pass ``detach=True`` to store detached tensors.

    Args:
        model: the network.
        names: dotted submodule names as in ``model.named_modules()`` (``"layer3.1.conv2"``).
        detach: store ``output.detach()`` instead of the output.

    Raises:
        UnknownModuleError: a name is not a submodule; the message lists close matches.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with FeatureTap(net, ["0", "1"]) as feats:
        ...     logits = net(torch.randn(3, 4))
        ...     hidden = feats["1"]
        ...     print(tuple(hidden.shape))
        (3, 8)
        >>> len(feats)  # released on exit
        0
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise FeatkdInputError(f"model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            names = [names]
        self.names = list(dict.fromkeys(names))
        if not self.names:
            raise FeatkdInputError("names: expected at least one submodule name, got none")
        modules = dict(model.named_modules())
        for name in self.names:
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise UnknownModuleError(f"names: {name!r} is not a submodule of the model{hint}")
        self.model = model
        self.detach = detach
        self._modules = {name: modules[name] for name in self.names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outputs: dict[str, Any] = {}

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.detach and isinstance(output, torch.Tensor):
                output = output.detach()
            self._outputs[name] = output

        return hook

    def __enter__(self) -> FeatureTap:
        if self._handles:
            raise RuntimeError("FeatureTap is already active; it cannot be entered twice")
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._release()

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are currently installed."""
        return bool(self._handles)

    def __getitem__(self, name: str) -> Any:
        if name in self._outputs:
            return self._outputs[name]
        if name in self._modules:
            raise KeyError(
                f"{name!r} has not run yet in this block (did the forward pass go through it?)"
            )
        raise KeyError(f"{name!r} is not tapped; tapped names: {', '.join(self.names)}")

    def __setitem__(self, name: str, value: Any) -> None:
        self._outputs[name] = value

    def __delitem__(self, name: str) -> None:
        del self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"FeatureTap(names={self.names}, {state}, captured={list(self._outputs)})"
