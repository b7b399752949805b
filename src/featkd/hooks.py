"""FeatureTap: capture the outputs of named submodules with forward hooks."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from featkd._checks import FeatkdInputError
from featkd._options import check_bool

__all__ = ["FeatureTap", "NotCapturedError", "UnknownModuleError"]


class _TapKeyError(FeatkdInputError, KeyError):
    """A :class:`FeatkdInputError` that ``except KeyError`` also catches (a tap is a mapping)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownModuleError(_TapKeyError):
    """A name passed to :class:`FeatureTap` is not a submodule of the model."""


class NotCapturedError(_TapKeyError):
    """A :class:`FeatureTap` holds no output under the name read: the name is not tapped, or
    its module did not run while the tap was open."""


def _detach_nested(value: Any) -> Any:
    """``value`` with every tensor detached, inside tuples (named ones too), lists and dicts:
    an LSTM returns ``(out, (h, c))``, and one live tensor would keep the whole graph."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        items = [_detach_nested(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [_detach_nested(v) for v in value]
    if isinstance(value, dict):
        detached = copy.copy(value)  # keeps the mapping's own type (OrderedDict, model outputs)
        for key, item in value.items():
            detached[key] = _detach_nested(item)
        return detached
    return value


class FeatureTap(MutableMapping):
    """Context manager that records the outputs of named submodules during a forward pass.

    Inside the ``with`` block the tap is a dict ``name -> output`` filled by every forward
    of the model; on exit every hook is removed. The outputs captured in the block stay
    readable after it, so the loss can be computed inside or after the block; entering the
    tap again starts from an empty dict. If a submodule runs several times in one block, the
    latest output is kept.

    A kept output is a live tensor: a student's keeps its autograd graph (and the activations
    it saved) alive for as long as the tap holds it. Call :meth:`clear` (or drop the tap) once
    the loss is computed if the tap outlives the training step.

    Works for a frozen teacher under ``torch.no_grad()`` (the outputs carry no graph) and for a
    student with gradients (the outputs are the live tensors, so a loss on them trains the
    student). Pass ``detach=True`` to store detached tensors.

    Args:
        model: the network.
        names: dotted submodule names as in ``model.named_modules()`` (``"layer3.1.conv2"``),
            one string or an iterable of them.
        detach: store outputs detached from the graph, including tensors nested in tuples,
            lists and dicts (an LSTM's ``(out, (h, c))``).

    Raises:
        UnknownModuleError: a name is not a submodule; the message lists close matches.
        NotCapturedError: (on reading) the name is not tapped, or its module did not run while
            the tap was open.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with FeatureTap(net, ["0", "1"]) as feats:
        ...     logits = net(torch.randn(3, 4))
        >>> hidden = feats["1"]  # still readable after the block
        >>> print(tuple(hidden.shape), feats.active)
        (3, 8) False
        >>> feats.clear()  # release what was captured
        >>> len(feats)
        0
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise FeatkdInputError(f"model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, Iterable):
            raise FeatkdInputError(
                f"names: expected a submodule name or an iterable of them, "
                f"got {type(names).__name__}"
            )
        names = list(names)
        for name in names:
            if not isinstance(name, str):
                raise FeatkdInputError(
                    f"names: expected submodule names as strings, got {name!r} "
                    f"({type(name).__name__})"
                )
        self.names = list(dict.fromkeys(names))
        if not self.names:
            raise FeatkdInputError("names: expected at least one submodule name, got none")
        self.detach = check_bool(detach, "detach")
        modules = dict(model.named_modules())
        for name in self.names:
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise UnknownModuleError(f"names: {name!r} is not a submodule of the model{hint}")
        self.model = model
        self._modules = {name: modules[name] for name in self.names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outputs: dict[str, Any] = {}
        self._entered = False

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.detach:
                output = _detach_nested(output)
            self._outputs[name] = output

        return hook

    def __enter__(self) -> FeatureTap:
        if self._handles:
            raise RuntimeError("FeatureTap is already active; it cannot be entered twice")
        self._outputs.clear()  # a new block: nothing from the previous one is mistaken for new
        self._entered = True
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are currently installed."""
        return bool(self._handles)

    def __getitem__(self, name: str) -> Any:
        if name in self._outputs:
            return self._outputs[name]
        if name not in self._modules:
            raise NotCapturedError(f"{name!r} is not tapped; tapped names: {', '.join(self.names)}")
        if not self._entered:
            raise NotCapturedError(
                f"{name!r} has no output: the tap has not been entered yet "
                f"(run the forward pass inside `with FeatureTap(...) as feats:`)"
            )
        when = "yet in this block" if self.active else "while the tap was open"
        raise NotCapturedError(
            f"{name!r} has not run {when}, so nothing was captured for it "
            f"(did the forward pass go through it?)"
        )

    def __setitem__(self, name: str, value: Any) -> None:
        self._outputs[name] = value

    def __delitem__(self, name: str) -> None:
        del self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def clear(self) -> None:
        """Release every captured output (the hooks, if active, stay installed)."""
        self._outputs.clear()

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"FeatureTap(names={self.names}, {state}, captured={list(self._outputs)})"
