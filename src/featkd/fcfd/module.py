"""FCFDLoss: FCFD as a module that builds its bridges from a probing forward and samples the
mixed paths of each call; it computes :func:`featkd.fcfd.fcfd_loss`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from featkd._checks import ChoiceError, ShapeError, describe_shape
from featkd._loss import DistillationLoss, check_reduction, user_stacklevel
from featkd._options import check_choice, check_int, check_positive, renamed, seeded_generator
from featkd._seeded import GeneratorState
from featkd.fcfd._inputs import check_stage_outputs
from featkd.fcfd._options import (
    DIRECTIONS,
    check_crossings,
    check_directions,
    check_num_paths,
    check_stage_pair,
    fcfd_weights,
    post_relu_flags,
    prefix_pair,
    probe,
)
from featkd.fcfd.bridges import RESAMPLE_MODES, FeatureSpec, build_bridge
from featkd.fcfd.function import _fcfd_unchecked
from featkd.fcfd.layouts import last_feature_pool, stage_specs

__all__ = ["FCFDLoss", "WarmupSkippedWarning"]

ExampleInput = tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[Sequence, Sequence]]


class WarmupSkippedWarning(UserWarning):
    """An :class:`FCFDLoss` with a warm-up has trained for ``warmup_check_calls`` calls without
    :meth:`FCFDLoss.set_epoch` or an assignment of ``warmup``: its MSE terms run at full weight
    from the first step, where the official runs ramp them up.

    Silence it with ``warnings.filterwarnings("ignore", category=featkd.fcfd.WarmupSkippedWarning)``
    or ``FCFDLoss(..., warmup_check_calls=None)``.
    """


class FCFDLoss(GeneratorState, DistillationLoss):
    """Function-consistent feature distillation through cross-network feeds; see
    :func:`~featkd.fcfd.fcfd_loss` for the terms.

    Drops into an existing loop: the models are not rewritten, only their stage modules are
    referenced (not owned: ``fcfd.parameters()`` holds the bridges only). Each call takes the
    per-stage outputs of this batch from the user's own forward passes (for example captured
    with :class:`~featkd.FeatureTap`), samples the mixed paths and returns

    ``weights["kl"] * kl + weights["mse"] * warmup * mse``

    ``kl`` summing every sampled path's ``T^2 KL`` against the teacher's logits, ``mse`` the
    appearance terms (every stage's bridged student features against the teacher's, and the
    pooled last features) and the function terms (``s2t`` paths: the teacher's later stages
    run on bridged student features against the teacher's own; ``t2s`` paths have only KL).

    Defaults follow the official CIFAR runs: ``T = 4``, ``weights = {"kl": 1, "mse": 5}`` with
    a linear warm-up over 20 epochs (:meth:`set_epoch`), crossings after stages ``1..K-2``
    (never right before the last stage), 2 of the ``2 (K - 2)`` paths sampled uniformly per
    call. The ``warmup`` factor starts at 1 (no warm-up) until :meth:`set_epoch` or an
    assignment changes it; so that the warm-up is not skipped silently, a
    :class:`WarmupSkippedWarning` (once, no host synchronisation) reports ``warmup_check_calls``
    training-mode calls with grad enabled without either, while ``warmup_epochs > 0``.

    Gradients: the teacher's stages run in eval mode with detached parameters, so the gradient
    of the function and KL terms flows *through* them into the bridges and the student while
    the teacher's parameters receive none and its BatchNorm statistics never change (the
    official code leaves the frozen teacher in train mode; featkd uses the teacher as it is
    deployed). The student's later stages run on bridged teacher features in the student's
    current mode on scratch copies of their buffers, so its BatchNorm running statistics see
    only its own forward passes; its parameters do get gradient. Teacher features are detached.

    Note:
        owns parameters: add ``fcfd.parameters()`` (the bridges) to the optimiser, and call
        ``fcfd.train()`` / ``fcfd.eval()`` with the student (the bridges hold BatchNorm layers).

    Note:
        The stages are called again inside the loss, so forward hooks on them fire again: read
        what a :class:`~featkd.FeatureTap` captured before calling the loss. Under
        DistributedDataParallel the sampled paths leave some ``t2s`` bridges unused on a step:
        pass the same integer ``seed`` on every rank and ``find_unused_parameters=True``, or
        ``num_paths="all"``.

    Args:
        student_stages: the ``K`` student stage modules in order; stage ``k`` maps the output of
            stage ``k - 1`` to its own output, the first takes the stem output, the last
            returns logits (e.g. ``nn.Sequential(avgpool, nn.Flatten(1), fc)``).
        teacher_stages: the ``K`` teacher stage modules, same convention.
        example_input: for the probing forward that reads every stage's output shape, either
            ``(student_stem_output, teacher_stem_output)`` or a callable returning
            ``(student_feats, teacher_feats)``, two lists of ``K`` stage outputs (run once under
            ``no_grad`` with the stages in eval mode). Bridges are created on the probe's
            device, in float64 for a float64 probe and float32 otherwise.
        num_paths: mixed paths sampled (uniformly, without replacement) per call, or ``"all"``.
        seed: randomness of the path sampling: an integer seed ``>= 0``, a ``torch.Generator``,
            or ``None`` (torch's global RNG); its position is saved in ``state_dict()``. Was
            ``generator=`` (kept one release, with a ``FutureWarning``).
        temperature: ``T`` of the KL terms (4; 8 for some pairs in the paper).
        weights: by term, ``{"kl": beta, "mse": ...}``; terms not named keep their default
            (1 and 5). ``kl_weight=`` / ``mse_weight=`` still work one release (FutureWarning).
        warmup_epochs: epochs of the linear warm-up applied by :meth:`set_epoch`.
        start_epoch: ``None`` (default: ``warmup`` stays 1 until :meth:`set_epoch`) or the epoch
            training starts at, counted from 0: :meth:`set_epoch` is applied at construction, so
            the warm-up holds from the first step (``start_epoch=0``: the official first-epoch
            factor ``1 / warmup_epochs``). Call :meth:`set_epoch` at every later epoch.
        warmup_check_calls: training calls (in training mode, grad enabled) after which a
            :class:`WarmupSkippedWarning` reports that neither :meth:`set_epoch` was called nor
            ``warmup`` assigned (default 50); ``None`` disables the check. Never with
            ``warmup_epochs=0``.
        crossings: the stages ``k`` (1-based) after which a path may cross; default
            ``1..K-2`` (``[1]`` when ``K = 2``). Any of ``1..K-1``.
        directions: ``("s2t", "t2s")`` (default), or one of them.
        post_relu: end bridges with LeakyReLU(0.1): ``"auto"`` (when the probed target features
            are all non-negative), a bool for every bridge, or a mapping ``{"s2t": ..., "t2s":
            ...}`` of a bool or a list of ``K - 1`` bools (one per stage).
        resample: spatial resampling in map bridges: ``"conv"`` (strided / transposed conv,
            integer ratios only), ``"interpolate"`` or ``"auto"``; see :mod:`featkd.fcfd.bridges`.
        pool: how the last features are pooled for the pooled terms: ``"auto"`` (GAP of a map,
            CLS of tokens with a prefix token, else the token mean; no pooled term when the last
            features are already vectors), a :func:`~featkd.pool` mode, a callable ``(x) ->
            (B, D)``, or ``None`` (no pooled terms). A mode is tried on the probed last teacher
            features at construction, so one that does not fit their layout fails there.
        num_prefix_tokens: prefix tokens of token features, one int for both networks or a pair
            ``(student, teacher)``.
        student_layouts: per-stage layouts of the ``K - 1`` student features: ``None`` (read
            from the rank: 4 map, 3 tokens, 2 vector), or a list of ``"map"`` / ``"tokens"`` /
            ``"vector"`` / :class:`~featkd.fcfd.bridges.FeatureSpec` (to give a non-square grid).
        teacher_layouts: the same for the teacher.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per image).

    Shape:
        - student: a list of ``K`` tensors, ``(B, ...)`` as probed, the last ``(B, num_classes)``
        - teacher: a list of ``K`` tensors, ``(B, ...)`` as probed, the last ``(B, num_classes)``
        - labels: ignored
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    ``last_parts``: ``"total"``, ``"kl"``, ``"mse"``, then the diagnostics ``"appearance"``,
    ``"function"`` and every sub-term of the sampled paths (``"appearance/stage1"``,
    ``"function/s2t@1/stage2"``, ``"kl/t2s@1"``, ...); ``last_paths`` the paths sampled.

    Example:
        >>> def net(width):
        ...     def block(i, o, s):
        ...         return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())
        ...     head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5))
        ...     return [block(3, width, 1), block(width, 2 * width, 2), head]
        >>> student, teacher = net(4), net(8)
        >>> images = torch.randn(6, 3, 8, 8)
        >>> fcfd = FCFDLoss(student, teacher, example_input=(images, images), seed=0)
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
        >>> list(fcfd.last_parts)[:3]  # the total, then the two terms; diagnostics follow
        ['total', 'kl', 'mse']
        >>> fcfd.last_paths
        ['s2t@1', 't2s@1']
    """

    random_draws = "sampled paths"

    def __init__(
        self,
        student_stages: Sequence[nn.Module],
        teacher_stages: Sequence[nn.Module],
        *,
        example_input: ExampleInput,
        num_paths: int | str = 2,
        seed: int | torch.Generator | None = None,
        temperature: float = 4.0,
        weights: Mapping[str, float] | None = None,
        warmup_epochs: int = 20,
        start_epoch: int | None = None,
        warmup_check_calls: int | None = 50,
        crossings: Sequence[int] | None = None,
        directions: Sequence[str] = DIRECTIONS,
        post_relu: bool | str | Mapping[str, bool | Sequence[bool]] = "auto",
        resample: str = "conv",
        pool: str | Callable[[torch.Tensor], torch.Tensor] | None = "auto",
        num_prefix_tokens: int | tuple[int, int] = 1,
        student_layouts: Sequence[str | FeatureSpec] | None = None,
        teacher_layouts: Sequence[str | FeatureSpec] | None = None,
        reduction: str = "mean",
        generator: torch.Generator | int | None = None,
        kl_weight: float | None = None,
        mse_weight: float | None = None,
    ) -> None:
        super().__init__()
        seed = renamed("FCFDLoss", "generator", "seed", generator, seed)
        student_stages, teacher_stages = check_stage_pair(student_stages, teacher_stages)
        count = len(student_stages)
        self.temperature = check_positive(temperature, "temperature")
        self.weights = fcfd_weights(weights, "FCFDLoss", kl_weight, mse_weight)
        self.warmup_epochs = check_int(warmup_epochs, "warmup_epochs", 0)
        check_choice(resample, "resample", RESAMPLE_MODES)
        self.reduction = check_reduction(reduction)
        # plain tuples: the networks are referenced, never registered as submodules
        self._student_stages = tuple(student_stages)
        self._teacher_stages = tuple(teacher_stages)
        self.num_stages = count
        self.warmup = 1.0
        self._warmup_chosen = False  # set_epoch or an assignment of warmup sets it
        self._unwarmed_calls = 0
        self.warmup_check_calls = (
            None
            if warmup_check_calls is None
            else check_int(warmup_check_calls, "warmup_check_calls", 1)
        )
        if start_epoch is not None:
            self.set_epoch(check_int(start_epoch, "start_epoch", 0))
        self.directions = check_directions(directions)
        self.crossings = check_crossings(crossings, count)
        self.paths = [(d, k) for d in self.directions for k in self.crossings]
        self.num_paths = check_num_paths(num_paths, len(self.paths))
        self.generator = seeded_generator(seed, "seed")

        prefix = prefix_pair(num_prefix_tokens)
        student_probe, teacher_probe = probe(example_input, student_stages, teacher_stages)
        self.student_specs = stage_specs(
            student_probe, student_layouts, prefix[0], "student", "student_layouts"
        )
        self.teacher_specs = stage_specs(
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
        relu = post_relu_flags(post_relu, student_probe, teacher_probe)
        self._build_bridges(relu, resample, teacher_probe[0])
        self.pool_fn = last_feature_pool(pool, self.teacher_specs[-1], teacher_probe[-2])
        self.last_paths: list[str] = []

    def _build_bridges(self, relu: dict[str, list[bool]], resample: str, probe: torch.Tensor):
        self.s2t = nn.ModuleDict()
        self.t2s = nn.ModuleDict()
        for k in range(1, self.num_stages):
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
        dtype = torch.float64 if probe.dtype == torch.float64 else torch.float32
        self.to(device=probe.device, dtype=dtype)

    # ---------------------------------------------------------------- warm-up and sampling
    @property
    def warmup(self) -> float:
        """The factor on the ``mse`` term, in ``[0, 1]`` by convention (1 after the warm-up)."""
        return self._warmup

    @warmup.setter
    def warmup(self, value: float) -> None:
        self._warmup = check_positive(value, "warmup", allow_zero=True)
        self._warmup_chosen = True

    def _check_warmup(self) -> None:
        """Count the training calls made before the warm-up was chosen; warn once (host-side
        counting only)."""
        if (
            self._warmup_chosen
            or self.warmup_check_calls is None
            or self.warmup_epochs == 0
            or not self.training
            or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
        ):
            return
        self._unwarmed_calls += 1
        if self._unwarmed_calls == self.warmup_check_calls:
            warnings.warn(
                f"FCFDLoss: {self._unwarmed_calls} training calls without set_epoch() or an "
                f"assignment of warmup: the MSE terms run at full weight from the first step, "
                f"while the official runs ramp them up linearly over warmup_epochs="
                f"{self.warmup_epochs} epochs (min(1, (epoch + 1) / {self.warmup_epochs})). Call "
                "fcfd.set_epoch(epoch) at the start of every epoch (counted from 0; "
                "FCFDLoss(..., start_epoch=0) sets the first at construction), assign "
                "fcfd.warmup yourself, or pass warmup_epochs=0 for no warm-up. (Silence: "
                "warnings.filterwarnings('ignore', "
                "category=featkd.fcfd.WarmupSkippedWarning), or warmup_check_calls=None.)",
                WarmupSkippedWarning,
                stacklevel=user_stacklevel(),
            )

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

    # ---------------------------------------------------------------- the call
    def _check(self, student, teacher, labels) -> None:
        expected_s = [s.shape for s in self.student_specs] + [self._logit_shapes[0]]
        expected_t = [s.shape for s in self.teacher_specs] + [self._logit_shapes[1]]
        bridge_param = next(self.s2t.parameters(), None)
        check_stage_outputs(
            student, teacher, self.num_stages, bridge_param, (expected_s, expected_t)
        )

    def forward(
        self,
        student: Sequence[torch.Tensor],
        teacher: Sequence[torch.Tensor],
        *,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """FCFD loss of one batch: ``student`` / ``teacher`` the ``K`` stage outputs (the last
        the logits), ``labels`` ignored. Overrides the common call because the stage passes
        run before the precision fence, in the networks' dtype and under the caller's autocast.
        """
        self._check(student, teacher, labels)
        paths = self.sample_paths()
        self._guard(student[-1], teacher[-1])
        self._check_warmup()
        count = self.num_stages
        t2s = dict(self.t2s.items())
        loss, self.last_parts = _fcfd_unchecked(
            student,
            teacher,
            self._student_stages,
            self._teacher_stages,
            [self.s2t[f"stage{k}"] for k in range(1, count)],
            [t2s.get(f"stage{k}") for k in range(1, count)],
            paths,
            self.pool_fn,
            self.temperature,
            self.weights,
            self.warmup,
            self.reduction,
        )
        self.last_paths = [f"{d}@{k}" for d, k in paths]
        return loss

    def extra_repr(self) -> str:
        paths = ", ".join(f"{d}@{k}" for d, k in self.paths)
        return (
            f"stages={self.num_stages}, paths=[{paths}], num_paths={self.num_paths}, "
            f"temperature={self.temperature}, weights={self.weights}, "
            f"warmup_epochs={self.warmup_epochs}, warmup_check_calls={self.warmup_check_calls}, "
            f"reduction={self.reduction!r}"
        )
