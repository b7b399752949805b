"""FCFD: function-consistent feature distillation (Liu et al., ICLR 2023).

Both networks are split into ``K`` stages, the last one ending in logits. Stage outputs are
carried across by bridges (:mod:`featkd.bridges`), and *mixed paths* run the first ``k`` stages
of one network and the remaining stages of the other:

* ``s2t@k``: student stages ``1..k`` -> bridge ``s2t[k]`` -> teacher stages ``k+1..K``;
* ``t2s@k``: teacher stages ``1..k`` -> bridge ``t2s[k]`` -> student stages ``k+1..K``.

The student features are not only pushed towards the teacher's (appearance), they must also
*work* inside the teacher (function): the teacher's later stages, run on the bridged student
features, should reproduce the teacher's own features and logits.

Axis legend: ``B`` batch; stage outputs are maps ``(B, C, H, W)``, tokens ``(B, N, D)`` or
vectors ``(B, D)``; the last stage's output is logits ``(B, num_classes)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from featkd._checks import (
    ChoiceError,
    FeatkdInputError,
    ShapeError,
    check_finite,
    check_floating,
    check_same_device,
    describe_shape,
    finite_check_enabled,
)
from featkd._options import check_choice, check_int, check_positive, seeded_generator
from featkd._precision import result_dtype, work_dtype
from featkd.bridges import LAYOUTS, RESAMPLE_MODES, FeatureSpec, build_bridge
from featkd.pooling import POOL_MODES, pool

__all__ = ["DIRECTIONS", "FCFDLoss"]

DIRECTIONS = ("s2t", "t2s")

ExampleInput = tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[Sequence, Sequence]]


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put every submodule in eval mode for the block, restoring each one's own flag after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _run_frozen(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A teacher stage in eval mode with its parameters detached: the gradient flows through
    the stage into ``x`` but never into the stage's parameters, whatever their requires_grad."""
    params = dict(stage.named_parameters())
    with _eval_mode([stage]):
        if not any(p.requires_grad for p in params.values()):
            return stage(x)
        detached = {name: p.detach() for name, p in params.items()}
        return functional_call(stage, detached, (x,))


def _run_with_scratch_buffers(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A student stage in its current mode (batch statistics while training) with its buffers
    replaced by copies, so running statistics updated by this forward are discarded. The
    parameters are the live ones: the student receives gradient."""
    if not any(m.training for m in stage.modules()):
        return stage(x)
    scratch = {name: b.clone() for name, b in stage.named_buffers()}
    if not scratch:
        return stage(x)
    return functional_call(stage, scratch, (x,))


def _through(bridge: nn.Module, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A bridge in its own parameters' dtype, handing back the dtype of the network it feeds
    (half-precision networks with float32 bridges work without autocast)."""
    param = next(bridge.parameters(), None)
    if param is not None:
        x = x.to(param.dtype)
    return bridge(x).to(out_dtype)


def _mse(a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    with torch.autocast(a.device.type, enabled=False):
        return F.mse_loss(a.to(work), b.to(work))


def _kl_t(logits: torch.Tensor, target: torch.Tensor, temperature: float, work: torch.dtype):
    """``T^2 * mean_b KL(softmax(target / T) || softmax(logits / T))``, as :func:`featkd.kd_loss`
    but without its input checks (shapes are fixed at construction; no host sync per path)."""
    with torch.autocast(logits.device.type, enabled=False):
        log_q = F.log_softmax(logits.to(work) / temperature, dim=1)
        log_p = F.log_softmax(target.to(work) / temperature, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return kl * temperature**2


class FCFDLoss(nn.Module):
    """Function-consistent feature distillation through cross-network feeds.

    Drops into an existing loop: the models are not rewritten, only their stage modules are
    referenced (not owned: ``fcfd.parameters()`` holds the bridges only). Each call takes the
    per-stage outputs of this batch from the user's own forward passes (for example captured
    with :class:`~featkd.FeatureTap`), runs the sampled mixed paths and returns

    ``kl_weight * sum_paths KL_T(path logits || teacher logits) * T^2
    + mse_weight * warmup * (appearance + function)``

    with, for stage outputs ``S_k``, ``T_k`` (``k = 1..K-1``; ``K`` is the logits):

    * appearance: ``MSE(s2t[k](S_k), T_k)`` at every stage ``k``, plus
      ``MSE(pool(s2t[K-1](S_{K-1})), pool(T_{K-1}))`` on the pooled last features;
    * function (``s2t@k`` paths only): the teacher's stages ``j = k+1..K-1`` run on the bridged
      student feature give ``X_j``, with terms ``MSE(X_j, T_j)``, plus
      ``MSE(pool(X_{K-1}), pool(T_{K-1}))``;
    * KL: every sampled path's logits against the teacher's logits (``t2s`` paths contribute
      only this term: their features live in the student's space, where there is no target).

    Defaults follow the official CIFAR runs: ``T = 4``, ``kl_weight = 1`` (beta),
    ``mse_weight = 5`` with a linear warm-up over 20 epochs (:meth:`set_epoch`), crossings after
    stages ``1..K-2`` (never right before the last stage), 2 of the ``2 (K - 2)`` paths sampled
    uniformly per call. All terms (sampled paths only) are in ``last_parts``. The ``warmup``
    factor starts at 1 (no warm-up) until :meth:`set_epoch` or an assignment changes it.

    Gradients: the teacher's stages run in eval mode with detached parameters, so the gradient
    of the function and KL terms flows *through* them into the bridges and the student while
    the teacher's parameters receive none and its BatchNorm statistics never change (the
    official code leaves the frozen teacher in train mode, i.e. uses batch statistics with
    separate running statistics per path; featkd uses the teacher as it is deployed). The
    student's later stages run on bridged teacher features in the student's current mode
    (batch statistics while training) on scratch copies of their buffers, so the student's
    BatchNorm running statistics see only its own forward passes; its parameters do get
    gradient. Teacher features are detached; teacher logits are the KL target.

    Note:
        owns parameters: add ``fcfd.parameters()`` (the bridges) to the optimiser, and call
        ``fcfd.train()`` / ``fcfd.eval()`` with the student (the bridges hold BatchNorm layers).

    Note:
        The stages are called again inside the loss, so forward hooks on them fire again: read
        what a :class:`~featkd.FeatureTap` captured (build the feature lists) before calling the
        loss. Under DistributedDataParallel the sampled paths leave some ``t2s`` bridges
        unused on a step: pass the same integer ``generator`` seed on every rank and
        ``find_unused_parameters=True``, or ``num_paths="all"``.

    Args:
        student_stages: the ``K`` student stage modules in order; stage ``k`` maps the output of
            stage ``k - 1`` to its own output, the first takes the stem output, the last
            returns logits (e.g. ``nn.Sequential(avgpool, nn.Flatten(1), fc)``).
        teacher_stages: the ``K`` teacher stage modules, same convention.
        example_input: for the probing forward that reads every stage's output shape, either
            ``(student_stem_output, teacher_stem_output)`` (two tensors; the stages are run
            under ``no_grad`` in eval mode) or a callable returning ``(student_feats,
            teacher_feats)``, two lists of ``K`` stage outputs (called once under ``no_grad``
            with the stages in eval mode). Bridges are created on the probe's device, in float64
            for a float64 probe and float32 otherwise.
        num_paths: mixed paths sampled (uniformly, without replacement) per call, or ``"all"``.
        generator: a ``torch.Generator`` or an integer seed ``>= 0`` for the path sampling;
            ``None`` uses torch's global RNG.
        temperature: ``T`` of the KL terms (4; 8 for some pairs in the paper).
        kl_weight: ``beta``, the weight of each path's KL term.
        mse_weight: the weight of the MSE terms (before the warm-up factor).
        warmup_epochs: epochs of the linear warm-up applied by :meth:`set_epoch`.
        crossings: the stages ``k`` (1-based) after which a path may cross; default
            ``1..K-2`` (``[1]`` when ``K = 2``). Any of ``1..K-1``.
        directions: ``("s2t", "t2s")`` (default), or one of them.
        post_relu: end bridges with LeakyReLU(0.1): ``"auto"`` (when the probed target features
            are all non-negative), a bool for every bridge, or a mapping ``{"s2t": ..., "t2s":
            ...}`` of a bool or a list of ``K - 1`` bools (one per stage).
        resample: spatial resampling in map bridges: ``"conv"`` (strided / transposed conv,
            integer ratios only), ``"interpolate"`` or ``"auto"``; see :mod:`featkd.bridges`.
        pool: how the last features are pooled for the pooled terms: ``"auto"`` (GAP of a map,
            CLS of tokens with a prefix token, else the token mean; no pooled term when the last
            features are already vectors), a :func:`~featkd.pool` mode, a callable ``(x) ->
            (B, D)`` (e.g. ``lambda x: F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)`` for a
            head that starts with a ReLU), or ``None`` (no pooled terms). A mode is tried on the
            probed last teacher features at construction, so one that does not fit their layout
            fails there.
        num_prefix_tokens: prefix tokens of token features, one int for both networks or a pair
            ``(student, teacher)``.
        student_layouts: per-stage layouts of the ``K - 1`` student features: ``None`` (read
            from the rank: 4 map, 3 tokens, 2 vector), or a list of ``"map"`` / ``"tokens"`` /
            ``"vector"`` / :class:`~featkd.bridges.FeatureSpec` (to give a non-square grid).
        teacher_layouts: the same for the teacher.

    Shape:
        - student: a list of ``K`` tensors, ``(B, ...)`` as probed, the last ``(B, num_classes)``
        - teacher: a list of ``K`` tensors, ``(B, ...)`` as probed, the last ``(B, num_classes)``
        - output: scalar

    Example:
        >>> def net(width):
        ...     def block(i, o, s):
        ...         return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())
        ...     head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5))
        ...     return [block(3, width, 1), block(width, 2 * width, 2), head]
        >>> student, teacher = net(4), net(8)
        >>> images = torch.randn(6, 3, 8, 8)
        >>> fcfd = FCFDLoss(student, teacher, example_input=(images, images), generator=0)
        >>> def features(stages, x):
        ...     outputs = []
        ...     for stage in stages:
        ...         x = stage(x)
        ...         outputs.append(x)
        ...     return outputs
        >>> with torch.no_grad():
        ...     teacher_feats = features(teacher, images)
        >>> loss = fcfd(features(student, images), teacher_feats)
        >>> loss.backward()
        >>> {"appearance", "appearance/pooled", "appearance/stage1"} <= set(fcfd.last_parts)
        True
        >>> fcfd.last_paths
        ['s2t@1', 't2s@1']
    """

    def __init__(
        self,
        student_stages: Sequence[nn.Module],
        teacher_stages: Sequence[nn.Module],
        *,
        example_input: ExampleInput,
        num_paths: int | str = 2,
        generator: torch.Generator | int | None = None,
        temperature: float = 4.0,
        kl_weight: float = 1.0,
        mse_weight: float = 5.0,
        warmup_epochs: int = 20,
        crossings: Sequence[int] | None = None,
        directions: Sequence[str] = DIRECTIONS,
        post_relu: bool | str | Mapping[str, bool | Sequence[bool]] = "auto",
        resample: str = "conv",
        pool: str | Callable[[torch.Tensor], torch.Tensor] | None = "auto",
        num_prefix_tokens: int | tuple[int, int] = 1,
        student_layouts: Sequence[str | FeatureSpec] | None = None,
        teacher_layouts: Sequence[str | FeatureSpec] | None = None,
    ) -> None:
        super().__init__()
        student_stages = self._check_stages(student_stages, "student_stages")
        teacher_stages = self._check_stages(teacher_stages, "teacher_stages")
        if len(student_stages) != len(teacher_stages):
            raise ShapeError(
                f"teacher_stages: expected {len(student_stages)} stages (as many as "
                f"student_stages), got {len(teacher_stages)}"
            )
        k_total = len(student_stages)
        if k_total < 2:
            raise ShapeError(
                f"student_stages: expected at least 2 stages (features, then a stage ending in "
                f"logits), got {k_total}"
            )
        check_positive(temperature, "temperature")
        check_positive(kl_weight, "kl_weight", allow_zero=True)
        check_positive(mse_weight, "mse_weight", allow_zero=True)
        check_int(warmup_epochs, "warmup_epochs", 0)
        check_choice(resample, "resample", RESAMPLE_MODES)
        # plain tuples: the networks are referenced, never registered as submodules
        self._student_stages = tuple(student_stages)
        self._teacher_stages = tuple(teacher_stages)
        self.num_stages = k_total
        self.temperature = float(temperature)
        self.kl_weight = float(kl_weight)
        self.mse_weight = float(mse_weight)
        self.warmup_epochs = warmup_epochs
        self.warmup = 1.0

        self.directions = self._check_directions(directions)
        self.crossings = self._check_crossings(crossings, k_total)
        self.paths = [(d, k) for d in self.directions for k in self.crossings]
        self.num_paths = self._check_num_paths(num_paths, len(self.paths))
        self.generator = seeded_generator(generator, "generator")

        prefix = self._prefix_pair(num_prefix_tokens)
        student_probe, teacher_probe = self._probe(example_input)
        self.student_specs = self._specs(
            student_probe, student_layouts, prefix[0], "student", "student_layouts"
        )
        self.teacher_specs = self._specs(
            teacher_probe, teacher_layouts, prefix[1], "teacher", "teacher_layouts"
        )
        self._logit_shapes = (
            tuple(student_probe[-1].shape[1:]),
            tuple(teacher_probe[-1].shape[1:]),
        )
        if self._logit_shapes[0] != self._logit_shapes[1] or len(self._logit_shapes[0]) != 1:
            raise ShapeError(
                f"example_input: the last stages must both return logits (B, num_classes) of one "
                f"width, got student {describe_shape(student_probe[-1].shape)} and teacher "
                f"{describe_shape(teacher_probe[-1].shape)}"
            )
        relu = self._post_relu_flags(post_relu, student_probe, teacher_probe)

        probe = teacher_probe[0]
        dtype = torch.float64 if probe.dtype == torch.float64 else torch.float32
        self.s2t = nn.ModuleDict()
        self.t2s = nn.ModuleDict()
        for k in range(1, k_total):
            self.s2t[f"stage{k}"] = build_bridge(
                self.student_specs[k - 1],
                self.teacher_specs[k - 1],
                post_relu=relu["s2t"][k - 1],
                resample=resample,
                name=f"s2t bridge after stage {k}",
            )
            if "t2s" in self.directions and k in self.crossings:
                self.t2s[f"stage{k}"] = build_bridge(
                    self.teacher_specs[k - 1],
                    self.student_specs[k - 1],
                    post_relu=relu["t2s"][k - 1],
                    resample=resample,
                    name=f"t2s bridge after stage {k}",
                )
        self.to(device=probe.device, dtype=dtype)
        self.pool_fn = self._pool_fn(pool, self.teacher_specs[-1], teacher_probe[-2])
        self.last_parts: dict[str, torch.Tensor] = {}
        self.last_paths: list[str] = []

    # ---------------------------------------------------------------- construction helpers
    @staticmethod
    def _check_stages(stages: Any, name: str) -> list[nn.Module]:
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

    @staticmethod
    def _check_directions(directions: Sequence[str]) -> tuple[str, ...]:
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

    @staticmethod
    def _check_crossings(crossings: Sequence[int] | None, k_total: int) -> tuple[int, ...]:
        if crossings is None:
            return tuple(range(1, k_total - 1)) if k_total > 2 else (1,)
        if not isinstance(crossings, Iterable) or isinstance(crossings, str):
            raise ChoiceError(
                f"crossings: expected None or a sequence of stage numbers in 1..{k_total - 1}, "
                f"got {crossings!r}"
            )
        crossings = tuple(crossings)
        if not crossings:
            raise ChoiceError(
                f"crossings: expected at least one stage in 1..{k_total - 1}, got none"
            )
        for k in crossings:
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= k_total - 1:
                raise ChoiceError(
                    f"crossings: expected stage numbers in 1..{k_total - 1} (a path crosses "
                    f"after stage k and finishes in the other network), got {k!r}"
                )
        return tuple(sorted(set(crossings)))

    @staticmethod
    def _check_num_paths(num_paths: int | str, available: int) -> int:
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

    @staticmethod
    def _prefix_pair(num_prefix_tokens: int | tuple[int, int]) -> tuple[int, int]:
        pair = (
            (num_prefix_tokens, num_prefix_tokens)
            if isinstance(num_prefix_tokens, int)
            else tuple(num_prefix_tokens)
        )
        if len(pair) != 2 or any(
            not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in pair
        ):
            raise ChoiceError(
                f"num_prefix_tokens: expected an integer >= 0 or a pair (student, teacher), "
                f"got {num_prefix_tokens!r}"
            )
        return pair  # type: ignore[return-value]

    def _probe(self, example_input: ExampleInput) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stages = self._student_stages + self._teacher_stages
        with torch.no_grad(), _eval_mode(stages):
            if callable(example_input):
                result = example_input()
                if not isinstance(result, (tuple, list)) or len(result) != 2:
                    raise FeatkdInputError(
                        "example_input: the callable must return (student_feats, teacher_feats), "
                        f"two lists of {self.num_stages} stage outputs; got {type(result).__name__}"
                    )
                student_probe, teacher_probe = result
            elif isinstance(example_input, (tuple, list)) and len(example_input) == 2:
                student_probe = self._run_stages(self._student_stages, example_input[0], "student")
                teacher_probe = self._run_stages(self._teacher_stages, example_input[1], "teacher")
            else:
                raise FeatkdInputError(
                    "example_input: expected (student_stem_output, teacher_stem_output) or a "
                    f"callable returning (student_feats, teacher_feats), got "
                    f"{type(example_input).__name__}"
                )
        self._check_feature_list(student_probe, "example_input (student features)", None)
        self._check_feature_list(teacher_probe, "example_input (teacher features)", None)
        student_probe, teacher_probe = list(student_probe), list(teacher_probe)
        batch = {x.shape[0] for x in student_probe + teacher_probe}
        if len(batch) != 1:
            raise ShapeError(
                f"example_input: expected one batch size across all stage outputs, "
                f"got {sorted(batch)}"
            )
        return [x.detach() for x in student_probe], [x.detach() for x in teacher_probe]

    @staticmethod
    def _run_stages(stages: Sequence[nn.Module], x: Any, who: str) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise FeatkdInputError(
                f"example_input: expected the {who} stem output as a tensor, got {type(x).__name__}"
            )
        outputs = []
        for i, stage in enumerate(stages):
            try:
                x = stage(x)
            except Exception as error:  # report which stage broke, in the user's terms
                raise ShapeError(
                    f"example_input: {who} stage {i + 1} failed on an input of shape "
                    f"{describe_shape(x.shape)}: {error}"
                ) from error
            if not isinstance(x, torch.Tensor):
                raise FeatkdInputError(
                    f"{who}_stages[{i}]: expected the stage to return a tensor, "
                    f"got {type(x).__name__}"
                )
            outputs.append(x)
        return outputs

    def _specs(
        self,
        probe: list[torch.Tensor],
        layouts: Sequence[str | FeatureSpec] | None,
        prefix: int,
        who: str,
        arg: str,
    ) -> list[FeatureSpec]:
        count = self.num_stages - 1
        if layouts is None:
            layouts = [None] * count
        elif not isinstance(layouts, Sequence) or isinstance(layouts, str) or len(layouts) != count:
            raise ShapeError(
                f"{arg}: expected {count} layouts (one per stage before the logits), got "
                f"{layouts!r}"
            )
        specs = []
        for k, (x, layout) in enumerate(zip(probe[:-1], layouts, strict=True), start=1):
            name = f"{who} stage {k} output"
            if isinstance(layout, FeatureSpec):
                if tuple(x.shape[1:]) != layout.shape:
                    raise ShapeError(
                        f"{arg}[{k - 1}]: the FeatureSpec describes {layout.describe()}, "
                        f"but the {name} is {describe_shape(x.shape)}"
                    )
                specs.append(layout)
                continue
            if layout is not None:
                check_choice(layout, f"{arg}[{k - 1}]", LAYOUTS)
            specs.append(FeatureSpec.of(x, layout, num_prefix_tokens=prefix, name=name))
        return specs

    def _post_relu_flags(
        self,
        post_relu: bool | str | Mapping[str, bool | Sequence[bool]],
        student_probe: list[torch.Tensor],
        teacher_probe: list[torch.Tensor],
    ) -> dict[str, list[bool]]:
        count = self.num_stages - 1
        # a bridge ends in LeakyReLU when its *target* features are post-ReLU
        targets = {"s2t": teacher_probe[:-1], "t2s": student_probe[:-1]}
        if post_relu == "auto":
            return {d: [bool((x >= 0).all()) for x in targets[d]] for d in DIRECTIONS}
        if isinstance(post_relu, bool):
            return {d: [post_relu] * count for d in DIRECTIONS}
        if isinstance(post_relu, Mapping):
            unknown = set(post_relu) - set(DIRECTIONS)
            if unknown:
                raise ChoiceError(
                    f"post_relu: expected keys 's2t' and/or 't2s', got {sorted(unknown)!r}"
                )
            flags = {}
            for d in DIRECTIONS:
                value = post_relu.get(d, "auto")
                if value == "auto":
                    flags[d] = [bool((x >= 0).all()) for x in targets[d]]
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
        raise ChoiceError(
            f"post_relu: expected 'auto', a bool or a mapping {{'s2t': ..., 't2s': ...}}, "
            f"got {post_relu!r}"
        )

    @staticmethod
    def _pool_fn(
        mode: str | Callable[[torch.Tensor], torch.Tensor] | None,
        spec: FeatureSpec,
        probe: torch.Tensor,
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if mode is None:
            return None
        if callable(mode):
            return mode
        check_choice(mode, "pool", ("auto", *POOL_MODES))
        chosen = mode
        if mode == "auto":
            if spec.layout == "vector":
                return None  # the last features are pooled already: the stage term covers them
            if spec.layout == "map":
                chosen = "gap"
            else:
                chosen = "cls" if spec.num_prefix_tokens > 0 else "mean"
        # a partial, not a closure: the loss module stays picklable
        pool_fn = functools.partial(
            pool, mode=chosen, num_prefix_tokens=spec.num_prefix_tokens, name="last features"
        )
        try:  # a mode that does not fit the layout would otherwise fail at the first call
            pool_fn(probe)
        except FeatkdInputError as error:
            raise ChoiceError(
                f"pool: mode {mode!r} cannot pool the teacher's last features "
                f"{spec.describe()} ({spec.layout}): {error}"
            ) from None
        return pool_fn

    # ---------------------------------------------------------------- warm-up and sampling
    @property
    def warmup(self) -> float:
        """The factor on the MSE terms, in ``[0, 1]`` by convention (1 after the warm-up)."""
        return self._warmup

    @warmup.setter
    def warmup(self, value: float) -> None:
        check_positive(value, "warmup", allow_zero=True)
        self._warmup = float(value)

    def set_epoch(self, epoch: int) -> float:
        """Set the linear warm-up for ``epoch`` (counted from 0) and return it.

        ``warmup = min(1, (epoch + 1) / warmup_epochs)`` as in the official runs: the first
        epoch gets ``1 / warmup_epochs``, full weight from epoch ``warmup_epochs - 1`` on.
        With ``warmup_epochs = 0`` the factor is always 1.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ChoiceError(f"epoch: expected an integer >= 0, got {epoch!r}")
        if self.warmup_epochs == 0:
            self.warmup = 1.0
        else:
            self.warmup = min(1.0, (epoch + 1) / self.warmup_epochs)
        return self.warmup

    def sample_paths(self) -> list[tuple[str, int]]:
        """The mixed paths for one call: ``num_paths`` of them, uniformly without replacement,
        in a fixed order (direction, then crossing)."""
        if self.num_paths == len(self.paths):
            return list(self.paths)
        device = self.generator.device if self.generator is not None else "cpu"
        order = torch.randperm(len(self.paths), generator=self.generator, device=device)
        chosen = sorted(order[: self.num_paths].tolist())
        return [self.paths[i] for i in chosen]

    # ---------------------------------------------------------------- forward
    def _check_feature_list(
        self, feats: Any, name: str, expected: list[tuple[int, ...]] | None
    ) -> None:
        k_total = self.num_stages
        if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)):
            raise FeatkdInputError(
                f"{name}: expected a list of {k_total} stage outputs (the last the logits), "
                f"got {type(feats).__name__}"
            )
        if len(feats) != k_total:
            raise ShapeError(
                f"{name}: expected {k_total} stage outputs (one per stage, the last the "
                f"logits), got {len(feats)}"
            )
        for i, x in enumerate(feats):
            item = f"{name}[{i}]"
            if not isinstance(x, torch.Tensor):
                raise FeatkdInputError(f"{item}: expected a torch.Tensor, got {type(x).__name__}")
            check_floating(x, item)
            if x.ndim < 2 or x.numel() == 0:
                raise ShapeError(
                    f"{item}: expected a batched stage output (B, ...), "
                    f"got {describe_shape(x.shape)}"
                )
            if expected is not None and tuple(x.shape[1:]) != expected[i]:
                want = "(B, " + ", ".join(str(d) for d in expected[i]) + ")"
                raise ShapeError(
                    f"{item}: expected {want} (the shape probed at construction), "
                    f"got {describe_shape(x.shape)}"
                )
        batch = feats[0].shape[0]
        for i, x in enumerate(feats):
            if x.shape[0] != batch:
                raise ShapeError(
                    f"{name}[{i}]: expected batch size {batch} (the batch of {name}[0]), "
                    f"got {x.shape[0]} (shape {describe_shape(x.shape)})"
                )

    def _validate(self, student: Any, teacher: Any) -> None:
        expected_s = [s.shape for s in self.student_specs] + [self._logit_shapes[0]]
        expected_t = [s.shape for s in self.teacher_specs] + [self._logit_shapes[1]]
        self._check_feature_list(student, "student", expected_s)
        self._check_feature_list(teacher, "teacher", expected_t)
        if teacher[0].shape[0] != student[0].shape[0]:
            raise ShapeError(
                f"teacher: expected batch size {student[0].shape[0]} (the batch of student), "
                f"got {teacher[0].shape[0]}"
            )
        bridge_param = next(self.s2t.parameters())
        tensors = {"bridges (fcfd.parameters())": bridge_param}
        tensors.update({f"student[{i}]": x for i, x in enumerate(student)})
        tensors.update({f"teacher[{i}]": x for i, x in enumerate(teacher)})
        check_same_device(tensors)
        if finite_check_enabled():
            # one host synchronisation for all 2K tensors; locate the culprit only on failure
            flags = torch.stack([torch.isfinite(x.detach()).all() for x in (*student, *teacher)])
            if not bool(flags.all()):
                for i, x in enumerate(student):
                    check_finite(x, f"student[{i}]")
                for i, x in enumerate(teacher):
                    check_finite(x, f"teacher[{i}]")

    def forward(
        self,
        student: Sequence[torch.Tensor],
        teacher: Sequence[torch.Tensor],
        *,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """FCFD loss of one batch.

        Args:
            student: the ``K`` student stage outputs of this batch (live tensors: the loss
                trains the student through them), the last the logits.
            teacher: the ``K`` teacher stage outputs of this batch (detached inside), the last
                the logits.
            labels: unused; accepted for the common loss signature.

        Returns:
            The weighted sum of the appearance, function and KL terms (``last_parts`` holds
            every term, ``last_paths`` the paths sampled), in the student logits' dtype.

        Shape:
            - student: ``K`` tensors ``(B, ...)`` as probed; the last ``(B, num_classes)``
            - teacher: ``K`` tensors ``(B, ...)`` as probed; the last ``(B, num_classes)``
            - output: scalar

        Example:
            >>> head = lambda c: nn.Sequential(nn.Flatten(), nn.Linear(c * 16, 3))
            >>> s_body, s_head = nn.Conv2d(3, 4, 3, padding=1), head(4)
            >>> t_body, t_head = nn.Conv2d(3, 6, 3, padding=1), head(6)
            >>> x = torch.randn(4, 3, 4, 4)
            >>> fcfd = FCFDLoss([s_body, s_head], [t_body, t_head], example_input=(x, x))
            >>> s1, t1 = s_body(x), t_body(x).detach()
            >>> loss = fcfd([s1, s_head(s1)], [t1, t_head(t1).detach()])
            >>> loss.shape, fcfd.last_paths
            (torch.Size([]), ['s2t@1', 't2s@1'])
        """
        self._validate(student, teacher)
        k_total = self.num_stages
        teacher = [t.detach() for t in teacher]
        work = work_dtype(*student, *teacher)
        parts: dict[str, torch.Tensor] = {}
        appearance: list[torch.Tensor] = []
        function: list[torch.Tensor] = []
        kls: list[torch.Tensor] = []

        bridged = {}
        for k in range(1, k_total):
            bridged[k] = _through(self.s2t[f"stage{k}"], student[k - 1], teacher[k - 1].dtype)
            term = _mse(bridged[k], teacher[k - 1], work)
            parts[f"appearance/stage{k}"] = term
            appearance.append(term)
        if self.pool_fn is not None:
            pooled_target = self.pool_fn(teacher[k_total - 2])
            term = _mse(self.pool_fn(bridged[k_total - 1]), pooled_target, work)
            parts["appearance/pooled"] = term
            appearance.append(term)

        paths = self.sample_paths()
        for direction, k in paths:
            path = f"{direction}@{k}"
            if direction == "s2t":
                x = bridged[k]
                for j in range(k + 1, k_total + 1):
                    x = _run_frozen(self._teacher_stages[j - 1], x)
                    if j < k_total:
                        term = _mse(x, teacher[j - 1], work)
                        parts[f"function/{path}/stage{j}"] = term
                        function.append(term)
                    if j == k_total - 1 and self.pool_fn is not None:
                        term = _mse(self.pool_fn(x), pooled_target, work)
                        parts[f"function/{path}/pooled"] = term
                        function.append(term)
            else:
                x = _through(self.t2s[f"stage{k}"], teacher[k - 1], student[k - 1].dtype)
                for j in range(k + 1, k_total + 1):
                    x = _run_with_scratch_buffers(self._student_stages[j - 1], x)
            kl = _kl_t(x, teacher[-1], self.temperature, work)
            parts[f"kl/{path}"] = kl
            kls.append(kl)

        zero = student[-1].new_zeros((), dtype=work)
        appearance_sum = torch.stack(appearance).sum() if appearance else zero
        function_sum = torch.stack(function).sum() if function else zero
        kl_sum = torch.stack(kls).sum()
        loss = self.kl_weight * kl_sum + self.mse_weight * self.warmup * (
            appearance_sum + function_sum
        )
        parts["appearance"] = appearance_sum
        parts["function"] = function_sum
        parts["kl"] = kl_sum
        parts["loss"] = loss
        self.last_parts = {name: value.detach() for name, value in parts.items()}
        self.last_paths = [f"{d}@{k}" for d, k in paths]
        return loss.to(result_dtype(student[-1].dtype))

    def extra_repr(self) -> str:
        paths = ", ".join(f"{d}@{k}" for d, k in self.paths)
        return (
            f"stages={self.num_stages}, paths=[{paths}], num_paths={self.num_paths}, "
            f"temperature={self.temperature}, kl_weight={self.kl_weight}, "
            f"mse_weight={self.mse_weight}, warmup_epochs={self.warmup_epochs}"
        )
