"""FCFD's options: the stage lists, crossings, directions, path count, prefix tokens, the
probing forward, post-ReLU flags, mixed paths and term weights, each checked once.

Every check raises a :class:`featkd.ChoiceError` (or :class:`~featkd.ShapeError`,
:class:`~featkd.FeatkdInputError`) naming the argument, and returns the checked value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from featkd._checks import ChoiceError, FeatkdInputError, ShapeError
from featkd._options import check_choice, check_weights
from featkd.fcfd._inputs import check_feature_list
from featkd.fcfd._stages import eval_mode, run_probe

__all__ = [
    "DEFAULT_WEIGHTS",
    "DIRECTIONS",
    "TERMS",
    "check_crossings",
    "check_directions",
    "check_num_paths",
    "check_paths",
    "check_stages",
    "fcfd_weights",
    "post_relu_flags",
    "prefix_pair",
    "probe",
]

DIRECTIONS = ("s2t", "t2s")
#: FCFD's terms, in the order its docstring lists them
TERMS = ("kl", "mse")
#: beta = 1 on the KL terms, 5 on the squared-error terms (the official CIFAR runs)
DEFAULT_WEIGHTS = {"kl": 1.0, "mse": 5.0}


def check_stages(stages: Any, name: str) -> list[nn.Module]:
    """A list (or ``nn.ModuleList`` / ``nn.Sequential``) of stage modules."""
    if isinstance(stages, nn.Module) and not isinstance(stages, (nn.ModuleList, nn.Sequential)):
        raise FeatkdInputError(
            f"{name}: expected a list of stage modules, got a single {type(stages).__name__}"
        )
    if not isinstance(stages, (Sequence, nn.ModuleList, nn.Sequential)):
        raise FeatkdInputError(
            f"{name}: expected a list of stage modules, got {type(stages).__name__}"
        )
    stages = list(stages)
    for i, stage in enumerate(stages):
        if not isinstance(stage, nn.Module):
            raise FeatkdInputError(
                f"{name}[{i}]: expected an nn.Module (wrap functions in nn.Sequential or a "
                f"small module), got {type(stage).__name__}"
            )
    return stages


def check_stage_pair(student_stages: Any, teacher_stages: Any) -> tuple[list, list]:
    """Both stage lists, of one length ``K >= 2``."""
    student_stages = check_stages(student_stages, "student_stages")
    teacher_stages = check_stages(teacher_stages, "teacher_stages")
    if len(student_stages) != len(teacher_stages):
        raise ShapeError(
            f"teacher_stages: expected {len(student_stages)} stages (as many as "
            f"student_stages), got {len(teacher_stages)}"
        )
    if len(student_stages) < 2:
        raise ShapeError(
            f"student_stages: expected at least 2 stages (features, then a stage ending in "
            f"logits), got {len(student_stages)}"
        )
    return student_stages, teacher_stages


def check_directions(directions: Any) -> tuple[str, ...]:
    """``"s2t"``, ``"t2s"`` or a sequence of them; returned in the canonical order."""
    if isinstance(directions, str):
        directions = (directions,)
    if not isinstance(directions, Iterable):
        raise ChoiceError(
            f"directions: expected 's2t', 't2s' or a sequence of them, got {directions!r}"
        )
    directions = tuple(directions)
    if not directions:
        raise ChoiceError("directions: expected 's2t', 't2s' or both, got none")
    for d in directions:
        check_choice(d, "directions", DIRECTIONS)
    return tuple(d for d in DIRECTIONS if d in directions)


def default_crossings(count: int) -> tuple[int, ...]:
    """After stages ``1..K-2`` (never right before the last stage); ``(1,)`` when ``K = 2``."""
    return tuple(range(1, count - 1)) if count > 2 else (1,)


def check_crossings(crossings: Any, count: int) -> tuple[int, ...]:
    """``None`` (the default crossings) or stage numbers in ``1..K-1``; sorted, unique."""
    if crossings is None:
        return default_crossings(count)
    if not isinstance(crossings, Iterable) or isinstance(crossings, str):
        raise ChoiceError(
            f"crossings: expected None or a sequence of stage numbers in 1..{count - 1}, "
            f"got {crossings!r}"
        )
    crossings = tuple(crossings)
    if not crossings:
        raise ChoiceError(f"crossings: expected at least one stage in 1..{count - 1}, got none")
    for k in crossings:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= count - 1:
            raise ChoiceError(
                f"crossings: expected stage numbers in 1..{count - 1} (a path crosses "
                f"after stage k and finishes in the other network), got {k!r}"
            )
    return tuple(sorted(set(crossings)))


def check_num_paths(num_paths: Any, available: int) -> int:
    """An integer in ``1..available`` or ``"all"`` (= ``available``)."""
    if num_paths == "all":
        return available
    if not isinstance(num_paths, int) or isinstance(num_paths, bool) or num_paths < 1:
        raise ChoiceError(f"num_paths: expected an integer >= 1 or 'all', got {num_paths!r}")
    if num_paths > available:
        raise ChoiceError(
            f"num_paths: expected at most {available} (the number of mixed paths for these "
            f"crossings and directions) or 'all', got {num_paths}"
        )
    return num_paths


def check_paths(paths: Any, count: int, t2s: Sequence[Any]) -> list[tuple[str, int]]:
    """Mixed paths written ``"s2t@k"`` / ``"t2s@k"``; ``None``: every default crossing in each
    direction that has its bridge. A ``t2s`` path needs the bridge ``t2s[k - 1]``."""
    if paths is None:
        crossings = default_crossings(count)
        return [("s2t", k) for k in crossings] + [
            ("t2s", k) for k in crossings if t2s[k - 1] is not None
        ]
    if isinstance(paths, str) or not isinstance(paths, Iterable):
        raise ChoiceError(f"paths: expected a list of 's2t@k' / 't2s@k' strings, got {paths!r}")
    checked = []
    for path in paths:
        direction, _, stage = path.partition("@") if isinstance(path, str) else ("", "", "")
        if direction not in DIRECTIONS or not stage.isdigit() or not 1 <= int(stage) < count:
            raise ChoiceError(
                f"paths: expected 's2t@k' or 't2s@k' with k in 1..{count - 1} (the path crosses "
                f"after stage k), got {path!r}"
            )
        if direction == "t2s" and t2s[int(stage) - 1] is None:
            raise ChoiceError(f"paths: {path!r} needs the bridge t2s[{int(stage) - 1}], got None")
        checked.append((direction, int(stage)))
    if len(set(checked)) != len(checked):
        raise ChoiceError(f"paths: expected each path once, got {paths!r}")
    return checked


def check_bridges(bridges: Any, name: str, count: int, optional: bool) -> list[nn.Module | None]:
    """``K - 1`` bridge modules, one after each stage before the logits (``None`` entries
    allowed where ``optional``; ``None`` as a whole: no bridges)."""
    if bridges is None and optional:
        return [None] * (count - 1)
    what = "nn.Module or None" if optional else "nn.Module"
    if isinstance(bridges, nn.Module) and not isinstance(bridges, (nn.ModuleList, nn.Sequential)):
        bridges = None  # a single module: the message below
    if not isinstance(bridges, (Sequence, nn.ModuleList)) or len(bridges) != count - 1:
        raise FeatkdInputError(
            f"{name}: expected {count - 1} bridges (an {what} after each stage before the "
            f"logits), got {bridges!r}"
        )
    for i, bridge in enumerate(bridges):
        if not isinstance(bridge, nn.Module) and not (optional and bridge is None):
            raise FeatkdInputError(f"{name}[{i}]: expected an {what}, got {type(bridge).__name__}")
    return list(bridges)


def check_pool_callable(pool: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``None`` (no pooled terms) or a callable ``(x) -> (B, D)``."""
    if pool is not None and not callable(pool):
        raise ChoiceError(f"pool: expected None or a callable (x) -> (B, D), got {pool!r}")
    return pool


def prefix_pair(num_prefix_tokens: Any) -> tuple[int, int]:
    """One int for both networks, or a pair ``(student, teacher)``; each ``>= 0``."""
    pair = (
        (num_prefix_tokens, num_prefix_tokens)
        if isinstance(num_prefix_tokens, int)
        else tuple(num_prefix_tokens)
    )
    if len(pair) != 2 or any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in pair):
        raise ChoiceError(
            f"num_prefix_tokens: expected an integer >= 0 or a pair (student, teacher), "
            f"got {num_prefix_tokens!r}"
        )
    return pair  # type: ignore[return-value]


def probe(
    example_input: Any, student_stages: Sequence[nn.Module], teacher_stages: Sequence[nn.Module]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The stage outputs of the probing forward (``no_grad``, every stage in eval mode), detached:
    ``example_input`` is the two stem outputs or a callable returning the two lists."""
    count = len(student_stages)
    with torch.no_grad(), eval_mode([*student_stages, *teacher_stages]):
        if callable(example_input):
            result = example_input()
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise FeatkdInputError(
                    "example_input: the callable must return (student_feats, teacher_feats), "
                    f"two lists of {count} stage outputs; got {type(result).__name__}"
                )
            student_probe, teacher_probe = result
        elif isinstance(example_input, (tuple, list)) and len(example_input) == 2:
            student_probe = run_probe(student_stages, example_input[0], "student")
            teacher_probe = run_probe(teacher_stages, example_input[1], "teacher")
        else:
            raise FeatkdInputError(
                "example_input: expected (student_stem_output, teacher_stem_output) or a "
                f"callable returning (student_feats, teacher_feats), got "
                f"{type(example_input).__name__}"
            )
    check_feature_list(student_probe, "example_input (student features)", count)
    check_feature_list(teacher_probe, "example_input (teacher features)", count)
    student_probe, teacher_probe = list(student_probe), list(teacher_probe)
    batch = {x.shape[0] for x in student_probe + teacher_probe}
    if len(batch) != 1:
        raise ShapeError(
            f"example_input: expected one batch size across all stage outputs, got {sorted(batch)}"
        )
    return [x.detach() for x in student_probe], [x.detach() for x in teacher_probe]


def _auto_flags(targets: Sequence[torch.Tensor]) -> list[bool]:
    return [bool((x >= 0).all()) for x in targets]


def post_relu_flags(
    post_relu: Any, student_probe: list[torch.Tensor], teacher_probe: list[torch.Tensor]
) -> dict[str, list[bool]]:
    """One flag per bridge: does it end in LeakyReLU (its *target* features are post-ReLU)."""
    count = len(student_probe) - 1
    targets = {"s2t": teacher_probe[:-1], "t2s": student_probe[:-1]}
    if post_relu == "auto":
        return {d: _auto_flags(targets[d]) for d in DIRECTIONS}
    if isinstance(post_relu, bool):
        return {d: [post_relu] * count for d in DIRECTIONS}
    if not isinstance(post_relu, Mapping):
        raise ChoiceError(
            f"post_relu: expected 'auto', a bool or a mapping {{'s2t': ..., 't2s': ...}}, "
            f"got {post_relu!r}"
        )
    unknown = set(post_relu) - set(DIRECTIONS)
    if unknown:
        raise ChoiceError(f"post_relu: expected keys 's2t' and/or 't2s', got {sorted(unknown)!r}")
    flags = {}
    for d in DIRECTIONS:
        value = post_relu.get(d, "auto")
        if value == "auto":
            flags[d] = _auto_flags(targets[d])
        elif isinstance(value, bool):
            flags[d] = [value] * count
        elif (
            isinstance(value, Sequence)
            and len(value) == count
            and all(isinstance(v, bool) for v in value)
        ):
            flags[d] = list(value)
        else:
            raise ChoiceError(
                f"post_relu[{d!r}]: expected 'auto', a bool or {count} bools (one per "
                f"stage before the logits), got {value!r}"
            )
    return flags


def fcfd_weights(
    weights: Any, owner: str, kl_weight: Any = None, mse_weight: Any = None
) -> dict[str, float]:
    """The weights by term, ``{"kl": ..., "mse": ...}``: the terms not named keep their defaults
    (:data:`DEFAULT_WEIGHTS`). ``kl_weight=`` / ``mse_weight=`` are featkd 0.1's keywords,
    kept for one release with a ``FutureWarning``."""
    old = {"kl": kl_weight, "mse": mse_weight}
    old = {term: value for term, value in old.items() if value is not None}
    if old:
        if weights is not None and not isinstance(weights, Mapping):
            raise ChoiceError(
                f"weights: expected a dict when {next(iter(old))}_weight= is also given, "
                f"got {weights!r}; pass only weights={{'kl': ..., 'mse': ...}}"
            )
        given = dict(weights or {})
        for term in old:
            if term in given:
                raise ChoiceError(
                    f"{term}_weight: renamed to weights={{{term!r}: ...}}; pass only weights, "
                    "got both"
                )
        warnings.warn(
            f"{owner}: {', '.join(f'{t}_weight=' for t in old)} "
            f"{'is' if len(old) == 1 else 'are'} deprecated and will be removed "
            f"in the next release; pass weights={{{', '.join(f'{t!r}: ...' for t in old)}}}",
            FutureWarning,
            stacklevel=3,  # the caller of the constructor that calls this
        )
        weights = {**given, **old}
    if weights is None:
        weights = {}
    if isinstance(weights, Mapping):
        weights = {**{t: v for t, v in DEFAULT_WEIGHTS.items() if t not in weights}, **weights}
    return check_weights(weights, "weights", TERMS, owner)
