"""Every public loss and head, with how to feed it: shared by the hostile-input, autocast and
compile tests so that a new loss is covered by all three once it is listed here.

A :class:`Case` builds a fresh module (seeded, so two builds have equal parameters), gives the
input shapes for a batch of ``B`` and calls the module uniformly. Heads take one input (the
``student`` slot); losses take ``(student, teacher)`` and, for the label-aware ones, ``labels``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import featkd

Shapes = tuple[tuple[int, ...], tuple[int, ...] | None]
Tolerance = tuple[float, float]

# (rtol, atol) against float32 under autocast
FLOAT32_MATHS = (1e-4, 1e-5)  # autocast off inside the loss: float32 rounding only
ROUNDED_INPUTS = (2e-2, 1e-3)  # the inputs and the result rounded to 8 (bf16) / 11 (fp16) bits
LAYER_UNDER_AUTOCAST = (2e-2, 3e-2)  # a linear layer computed in half precision
ROUNDED_HEAD_INPUTS = (2e-2, 1e-2)  # a head's outputs (O(1) values) from rounded inputs

# why a case breaks the compiled graph
SINKHORN_STOP = "Sinkhorn's stopping test reads the marginal error on the host"
SLICED_GENERATOR = "the sliced directions are drawn from a torch.Generator"
CLASS_GROUPS = "conditional=True without num_classes reads the class sizes on the host"
# why a case still synchronises
CLASS_GROUPS_AND_LABELS = "without num_classes, the classes are found on the host"
EIGH = "the ZCA whitener's eigh synchronises on CUDA"


@dataclass
class Case:
    """A public loss or head and how to feed it.

    Attributes:
        name: test id.
        build: builds the module (called under a fixed seed by :meth:`make`).
        shapes: ``B -> (student shape, teacher shape)``; teacher ``None`` for a head.
        labels: the loss takes ``labels=`` (class indices ``arange(B) % 3``).
        min_batch: the smallest batch it must accept (batch statistics need 2).
        names: how error messages name the student and teacher arguments.
        channels: the dimension holding the width of the student and of the teacher (``-1``,
            or ``1`` for a ``(B, C, H, W)`` map).
        plain_layer: a head that behaves like ``nn.Linear`` (LayerNorm -> Linear): it follows
            autocast, and outside autocast refuses inputs in another dtype than its parameters
            (a ``DTypeError``). Everything else computes in float32 or wider with autocast off
            and answers in the input's dtype.
        empty_ok: a head that maps an empty batch to an empty output (like ``nn.Linear``)
            rather than refusing it.
        autocast_tolerance: ``(rtol, atol)`` against float32 under autocast, for float32
            features and for half-precision features (``tests/test_autocast.py``, stated in
            ``docs/reliability.md``).
        graph_break: why ``torch.compile`` cannot make one graph of it (with the finite check
            off); empty when it does (``fullgraph=True`` is asserted).
        slow_compile: its graph breaks make it slow to trace (the compile test is marked slow).
        host_syncs: why it still makes the host wait for the device (with the finite check
            off; ``tests/test_host_sync.py``), empty when it does not.
    """

    name: str
    build: Callable[[], nn.Module]
    shapes: Callable[[int], Shapes]
    labels: bool = False
    min_batch: int = 1
    names: tuple[str, str] = ("student", "teacher")
    channels: tuple[int, int] = (-1, -1)
    plain_layer: bool = False
    empty_ok: bool = False
    autocast_tolerance: tuple[Tolerance, Tolerance] = (FLOAT32_MATHS, ROUNDED_INPUTS)
    graph_break: str = ""
    slow_compile: bool = False
    host_syncs: str = ""

    @property
    def is_head(self) -> bool:
        return self.shapes(2)[1] is None

    def make(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def inputs(self, batch: int, scale: float = 1.0, generator=None, teacher_scale=None):
        s_shape, t_shape = self.shapes(batch)
        s = scale * torch.randn(s_shape, generator=generator)
        t = None
        if t_shape is not None:
            t_scale = scale if teacher_scale is None else teacher_scale
            t = t_scale * torch.randn(t_shape, generator=generator)
        labels = torch.arange(batch) % 3 if self.labels else None
        return s, t, labels

    def call(self, module, s, t=None, labels=None):
        if self.is_head:
            return module(s)
        if self.labels:
            return module(s, t, labels=labels)
        return module(s, t)

    def scalar(self, module, s, t=None, labels=None) -> torch.Tensor:
        """The loss, or for a head a fixed weighted sum of its output (not its mean square,
        which whitening makes constant) for gradient checks."""
        out = self.call(module, s, t, labels)
        if self.is_head:
            return head_scalar(out)
        return out


def head_scalar(out: torch.Tensor) -> torch.Tensor:
    """``sum(w * out)`` with fixed weights of mixed signs, in float32."""
    weights = torch.arange(out.numel(), device=out.device, dtype=torch.float32).sin()
    return (out.float() * weights.view(out.shape)).sum()


def _pair(width_s: int, width_t: int | None = None) -> Callable[[int], Shapes]:
    width_t = width_s if width_t is None else width_t
    return lambda b: ((b, width_s), (b, width_t))


def _tokens(tokens: int, width_s: int, width_t: int) -> Callable[[int], Shapes]:
    return lambda b: ((b, tokens, width_s), (b, tokens, width_t))


def _head(*shape: int) -> Callable[[int], Shapes]:
    return lambda b: ((b, *shape), None)


def _tokens_to_map(tokens: int, width_s: int, width_t: int, side: int) -> Callable[[int], Shapes]:
    return lambda b: ((b, tokens, width_s), (b, width_t, side, side))


def _vkd_fixed_squarings() -> nn.Module:
    """VkD whose matrix exponential uses a fixed number of squarings: no host sync."""
    loss = featkd.VkDLoss(
        student_dim=8, teacher_dim=12, normalize="batch_standardize", distance="mse"
    )
    loss.projector.max_squarings = 8
    with torch.no_grad():  # away from the identity, so the exponential has work to do
        loss.projector.generator.normal_(0.0, 0.3)
    return loss


X = ("x", "x")

CASES: list[Case] = [
    Case("KDLoss", lambda: featkd.KDLoss(4.0), _pair(10)),
    Case("W2-emd", lambda: featkd.WassersteinLoss("emd"), _pair(8)),
    Case(
        "W2-sinkhorn",
        lambda: featkd.WassersteinLoss("sinkhorn"),
        _pair(8),
        graph_break=SINKHORN_STOP,
        host_syncs=SINKHORN_STOP,
    ),
    Case(
        "W2-sinkhorn-debias",
        lambda: featkd.WassersteinLoss("sinkhorn", debias=True, reg=0.5),
        _pair(8),
        graph_break=SINKHORN_STOP,
        host_syncs=SINKHORN_STOP,
    ),
    Case(
        "W2-sliced",
        lambda: featkd.WassersteinLoss("sliced", n_projections=16, seed=0),
        _pair(8),
        graph_break=SLICED_GENERATOR,
    ),
    Case(
        "W2-emd-conditional",
        lambda: featkd.WassersteinLoss("emd", conditional=True),
        _pair(8),
        labels=True,
        graph_break=CLASS_GROUPS,
        slow_compile=True,
        host_syncs=CLASS_GROUPS_AND_LABELS,
    ),
    Case(
        "W2-sinkhorn-conditional",
        lambda: featkd.WassersteinLoss("sinkhorn", conditional=True),
        _pair(8),
        labels=True,
        graph_break=CLASS_GROUPS,
        slow_compile=True,
        host_syncs=CLASS_GROUPS_AND_LABELS,
    ),
    Case(
        "W2-sinkhorn-conditional-static",
        lambda: featkd.WassersteinLoss(
            "sinkhorn", conditional=True, num_classes=12, tol=None, max_iter=30
        ),
        _pair(8),
        labels=True,
    ),
    Case(
        "JointW2-emd",
        lambda: featkd.JointWassersteinLoss(label_weight=1.0),
        _pair(8),
        labels=True,
    ),
    Case(
        "JointW2-sinkhorn",
        lambda: featkd.JointWassersteinLoss(label_weight=1.0, solver="sinkhorn"),
        _pair(8),
        labels=True,
        graph_break=SINKHORN_STOP,
        host_syncs=SINKHORN_STOP,
        slow_compile=True,
    ),
    Case(
        "GaussianW2-full",
        lambda: featkd.GaussianWassersteinLoss("full"),
        _pair(8),
        min_batch=2,
    ),
    Case("GaussianW2-diag", lambda: featkd.GaussianWassersteinLoss("diag"), _pair(8), min_batch=2),
    Case(
        "GaussianW2-conditional",
        lambda: featkd.GaussianWassersteinLoss("full", conditional=True),
        _pair(8),
        labels=True,
        graph_break=CLASS_GROUPS,
        slow_compile=True,
        host_syncs=CLASS_GROUPS_AND_LABELS,
    ),
    Case(
        "GaussianW2-conditional-static",
        lambda: featkd.GaussianWassersteinLoss("full", conditional=True, num_classes=12),
        _pair(8),
        labels=True,
    ),
    Case("GaussianKL-full", lambda: featkd.GaussianKLLoss("full"), _pair(8), min_batch=2),
    Case("GaussianKL-diag", lambda: featkd.GaussianKLLoss("diag"), _pair(8), min_batch=2),
    Case(
        "GaussianKL-conditional",
        lambda: featkd.GaussianKLLoss("full", conditional=True),
        _pair(8),
        labels=True,
        graph_break=CLASS_GROUPS,
        slow_compile=True,
        host_syncs=CLASS_GROUPS_AND_LABELS,
    ),
    Case(
        "GaussianKL-conditional-static",
        lambda: featkd.GaussianKLLoss("full", conditional=True, num_classes=12),
        _pair(8),
        labels=True,
    ),
    Case("MMD-rbf", lambda: featkd.MMDLoss("rbf"), _pair(8)),
    Case(
        "MMD-rbf-unbiased",
        lambda: featkd.MMDLoss("rbf", estimator="unbiased", multipliers=(0.5, 1.0, 2.0)),
        _pair(8),
        min_batch=2,
    ),
    Case("MMD-linear", lambda: featkd.MMDLoss("linear"), _pair(8)),
    Case("MMD-poly", lambda: featkd.MMDLoss("poly"), _pair(8)),
    Case(
        "MMD-rbf-conditional",
        lambda: featkd.MMDLoss("rbf", conditional=True),
        _pair(8),
        labels=True,
        graph_break=CLASS_GROUPS,
        slow_compile=True,
        host_syncs=CLASS_GROUPS_AND_LABELS,
    ),
    Case(
        "MMD-rbf-conditional-static",
        lambda: featkd.MMDLoss("rbf", conditional=True, num_classes=12),
        _pair(8),
        labels=True,
    ),
    Case(
        "KD2M-projector",
        lambda: featkd.KD2MLoss("w2_gaussian", projector=nn.Linear(6, 8)),
        _pair(6, 8),
        min_batch=2,
        autocast_tolerance=(ROUNDED_INPUTS, ROUNDED_INPUTS),
    ),
    Case(
        "KD2M-kl-diag-conditional",
        lambda: featkd.KD2MLoss("kl_gaussian_diag", conditional=True),
        _pair(8),
        labels=True,
        graph_break=CLASS_GROUPS,
        host_syncs=CLASS_GROUPS_AND_LABELS,
    ),
    Case(
        "CosPress-tokens",
        lambda: featkd.CosPressLoss(student_dim=8, teacher_dim=12),
        _tokens(5, 8, 12),
        min_batch=2,
    ),
    Case(
        "CosPress-pooled",
        lambda: featkd.CosPressLoss(student_dim=8, teacher_dim=12, style="half"),
        _pair(8, 12),
        min_batch=2,
    ),
    Case(
        "Proteus-tokens",
        lambda: featkd.ProteusLoss(student_dim=8, teacher_dim=12),
        _tokens(5, 8, 12),
    ),
    Case(
        "Proteus-pooled",
        lambda: featkd.ProteusLoss(student_dim=8, teacher_dim=12, num_prefix_tokens=0),
        _pair(8, 12),
    ),
    Case(
        "VkD-tokens-map",
        lambda: featkd.VkDLoss(student_dim=8, teacher_dim=12),
        _tokens_to_map(5, 8, 12, 2),
        channels=(-1, 1),
    ),
    Case("VkD-batch-standardize-fixed-squarings", _vkd_fixed_squarings, _pair(8, 12), min_batch=2),
    Case(
        "VkD-whitening-cayley",
        lambda: featkd.VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", map="cayley"),
        _pair(4, 6),  # B = 8 > D_t: a well-conditioned batch covariance
        min_batch=2,
    ),
    Case(
        "VkD-householder-tokens",
        lambda: featkd.VkDLoss(
            student_dim=8,
            teacher_dim=12,
            normalize="none",
            map="householder",
            teacher_pool="patch_mean",
        ),
        _tokens(5, 8, 12),
    ),
    Case(
        "LinearHead",
        lambda: featkd.LinearHead(8, 12),
        _head(5, 8),
        names=X,
        plain_layer=True,
        autocast_tolerance=(LAYER_UNDER_AUTOCAST, LAYER_UNDER_AUTOCAST),
    ),
    Case(
        "TeacherCompressionHead",
        lambda: featkd.TeacherCompressionHead(student_dim=8, teacher_dim=12),
        _head(12),
        names=("teacher", "teacher"),
        plain_layer=True,
        autocast_tolerance=(LAYER_UNDER_AUTOCAST, LAYER_UNDER_AUTOCAST),
    ),
    Case(
        "OrthogonalProjector-expm",
        lambda: featkd.OrthogonalProjector(8, 12, init="random"),
        _head(5, 8),
        names=X,
        empty_ok=True,
        autocast_tolerance=(FLOAT32_MATHS, ROUNDED_HEAD_INPUTS),
    ),
    Case(
        "OrthogonalProjector-cayley-down",
        lambda: featkd.OrthogonalProjector(12, 8, map="cayley", init="random"),
        _head(12),
        names=X,
        empty_ok=True,
        autocast_tolerance=(FLOAT32_MATHS, ROUNDED_HEAD_INPUTS),
    ),
    # width 4 < B = 8: a well-conditioned batch covariance
    Case(
        "Whitening",
        lambda: featkd.Whitening(4),
        _head(4),
        names=X,
        min_batch=2,
        autocast_tolerance=(FLOAT32_MATHS, ROUNDED_HEAD_INPUTS),
    ),
    Case(
        "Whitening-zca",
        lambda: featkd.Whitening(4, method="zca"),
        _head(4),
        names=X,
        min_batch=2,
        autocast_tolerance=(FLOAT32_MATHS, ROUNDED_HEAD_INPUTS),
        host_syncs=EIGH,
    ),
    Case(
        "Whitening-eval",
        lambda: featkd.Whitening(4, method="zca").eval(),
        _head(4),
        names=X,
        autocast_tolerance=(FLOAT32_MATHS, ROUNDED_HEAD_INPUTS),
        host_syncs=EIGH,
    ),
    Case("GlobalBatch-KD", lambda: featkd.GlobalBatch(featkd.KDLoss()), _pair(10)),
    Case(
        "GlobalBatch-MMD-conditional",
        lambda: featkd.GlobalBatch(featkd.MMDLoss("rbf", conditional=True)),
        _pair(8),
        labels=True,
        graph_break=CLASS_GROUPS,
        slow_compile=True,
        host_syncs=CLASS_GROUPS_AND_LABELS,
    ),
    Case(
        "GlobalBatch-MMD-conditional-static",
        lambda: featkd.GlobalBatch(featkd.MMDLoss("rbf", conditional=True, num_classes=12)),
        _pair(8),
        labels=True,
    ),
    Case(
        "GlobalBatch-CosPress",
        lambda: featkd.GlobalBatch(featkd.CosPressLoss(student_dim=8, teacher_dim=12)),
        _tokens(5, 8, 12),
        min_batch=2,
    ),
]

PAIRS = [c for c in CASES if not c.is_head]
LABELLED = [c for c in CASES if c.labels]


# ------------------------------------------------------------------ FCFD (lists of stage outputs)
def tiny_fcfd(init_seed: int = 0, **options):
    """A two-stage CNN pair on 4x4 images and the FCFD loss over it (every path, unless
    ``options`` say otherwise)."""

    def net(width):
        body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        return nn.ModuleList([body, nn.Sequential(nn.Flatten(1), nn.Linear(width * 16, 3))])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        student, teacher = net(4), net(6).eval().requires_grad_(False)
        images = torch.randn(4, 3, 4, 4)
        options = {"num_paths": "all", **options}
        fcfd = featkd.FCFDLoss(student, teacher, example_input=(images, images), **options)
    return fcfd, student, teacher


def stage_outputs(stages, images):
    """The output of every stage, in order (what a FeatureTap would capture)."""
    outputs, x = [], images
    for stage in stages:
        x = stage(x)
        outputs.append(x)
    return outputs
