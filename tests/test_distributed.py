"""Global-batch gathering under torch.distributed: a real 2-process gloo run on CPU.

One spawn runs every multi-process scenario (spawning costs seconds; the scenarios
milliseconds). Each scenario's results, or its traceback, go to a file per rank; the tests
compare them with a single-process computation on the concatenated batch done here, in the
parent, without any distributed code. The process group rendezvous through a FileStore in
``tmp_path``: no network, not even loopback ports.
"""

from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tolerance
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import featkd
from featkd import (
    ChoiceError,
    DeviceError,
    FeatkdInputError,
    GlobalBatch,
    JointWassersteinLoss,
    KDLoss,
    ShapeError,
)
from featkd.distributed import gather_with_grad, is_distributed

WORLD = 2
EQUAL = (4, 4)
UNEQUAL = (3, 6)
D_IN, D_S, D_T, CLASSES = 5, 4, 6, 3
LR = 0.1
JOIN_TIMEOUT_S = 120.0
TOL = tolerance(torch.float64)
TOKENS = 3  # CLS + 2 patch tokens, for CosPress's local term
IMAGE = (3, 8, 8)
STEPS = 2  # a missing find_unused_parameters=True only fails at the second forward
FCFD_SEED = 1  # samples [s2t@2, t2s@2] then [s2t@1, t2s@1]: each step leaves a t2s bridge unused
# A rank that raised alone leaves the other blocked in a collective; on this scenario's own
# group that ends after this long instead of the default group's 30 s.
DEVICE_GROUP_TIMEOUT_S = 10
# Rank 1's (student, teacher) devices for each bad step; rank 0's inputs are always good.
DEVICE_CASES = {
    "teacher_on_meta": ("cpu", "meta"),
    "student_on_meta": ("meta", "cpu"),
    "all_on_meta": ("meta", "meta"),
}
NEXT_STEP_SEED = 7  # the good step after the bad ones draws new data: mixed steps show


# --------------------------------------------------------------------------------------------
# A batch-level toy loss, written here so these tests depend on no other featkd loss.
# --------------------------------------------------------------------------------------------
def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


class BatchSimilarityLoss(nn.Module):
    """Three terms, each depending on the whole batch:

    - ``kl``: mean over rows of KL(softmax(C_t / tau) || softmax(C_s / tau)), C the cosine
      similarity matrix over the batch with the diagonal removed; student only.
    - ``gram``: mean squared difference of the cosine Gram matrices of ``head(teacher)`` and the
      student; head and student.
    - ``class``: mean over samples of ||s_i - mean_{j: y_j = y_i} head(t_j)||^2 (labels only).
    """

    def __init__(self, tau: float = 0.5) -> None:
        super().__init__()
        self.tau = tau
        self.head = nn.Linear(D_T, D_S)
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(self, student, teacher, *, labels=None):
        teacher = teacher.detach()
        n = student.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        c_s = (_unit(student) @ _unit(student).T)[off_diagonal].view(n, n - 1)
        c_t = (_unit(teacher) @ _unit(teacher).T)[off_diagonal].view(n, n - 1)
        log_p = F.log_softmax(c_t / self.tau, dim=1)
        log_q = F.log_softmax(c_s / self.tau, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
        compressed = self.head(teacher)
        gram = (
            (_unit(compressed) @ _unit(compressed).T - _unit(student) @ _unit(student).T) ** 2
        ).mean()
        parts = {"kl": kl, "gram": gram}
        if labels is not None:
            same = (labels[:, None] == labels[None, :]).to(compressed.dtype)
            class_means = (same @ compressed) / same.sum(dim=1, keepdim=True)
            parts["class"] = ((student - class_means) ** 2).sum(dim=1).mean()
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return sum(parts.values())


class Trainee(nn.Module):
    """A student (Linear features + classifier) with a global-batch distillation loss inside,
    so one DDP wraps the student and the loss's head together. Token features ``(B, N, D)`` are
    classified from their first (CLS) token."""

    def __init__(self, distill: nn.Module | None = None) -> None:
        super().__init__()
        self.features = nn.Linear(D_IN, D_S)
        self.classifier = nn.Linear(D_S, CLASSES)
        if distill is None:  # the toy loss, grad_mode="ddp"
            distill = GlobalBatch(BatchSimilarityLoss())
        self.distill = distill

    def forward(self, x, teacher, labels, task_scale=None):
        s = self.features(x)
        logits = self.classifier(s[:, 0] if s.ndim == 3 else s)
        if task_scale is None:
            task = F.cross_entropy(logits, labels)  # a local mean, as usual under DDP
        else:  # unequal shards: the sum over the shard, times R / B, averages to the global mean
            task = F.cross_entropy(logits, labels, reduction="sum") * task_scale
        return task + self.distill(s, teacher, labels=labels)


class Student(nn.Module):
    """The student part of a :class:`Trainee`, for a DDP of its own."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x):
        s = self.features(x)
        return s, self.classifier(s)


def _trainee(seed: int = 3) -> Trainee:
    torch.manual_seed(seed)
    return Trainee().double()


def _data(sizes, seed: int = 1):
    """Full batch (student features, inputs, teacher, labels); every class appears twice."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    student = torch.randn(n, D_S, generator=g, dtype=torch.float64)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, D_T, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    labels[: 2 * CLASSES] = torch.arange(CLASSES).repeat(2)
    return student, x, teacher, labels


def _shard(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]].clone()


# --------------------------------------------------------------------------------------------
# What each rank runs. Every scenario returns a dict of tensors / strings.
# --------------------------------------------------------------------------------------------
def _loss_and_grads(rank: int, sizes, grad_mode: str, equal_shards: bool = False) -> dict:
    torch.manual_seed(0)
    loss_fn = GlobalBatch(
        BatchSimilarityLoss().double(), grad_mode=grad_mode, equal_shards=equal_shards
    )
    student, _, teacher, labels = _data(sizes)
    s = _shard(student, sizes, rank).requires_grad_()
    t = _shard(teacher, sizes, rank).requires_grad_()  # must receive no gradient
    loss = loss_fn(s, t, labels=_shard(labels, sizes, rank))
    loss.backward()
    head = loss_fn.loss_fn.head
    return {
        "loss": loss.detach(),
        "parts": dict(loss_fn.last_parts),
        "student_grad": s.grad,
        "teacher_grad_is_none": t.grad is None,
        "head_weight_grad": head.weight.grad,
        "head_bias_grad": head.bias.grad,
    }


def _scenario_exact(rank):
    return _loss_and_grads(rank, EQUAL, "exact")


def _scenario_ddp_scale(rank):
    return _loss_and_grads(rank, EQUAL, "ddp")


def _scenario_unequal(rank):
    return _loss_and_grads(rank, UNEQUAL, "exact")


def _scenario_equal_shards_flag(rank):
    return _loss_and_grads(rank, EQUAL, "exact", equal_shards=True)


def _scenario_all_reduce(rank):
    # Ranks compute different losses from the gathered batch: rank r's loss is (r + 1) L.
    torch.manual_seed(0)
    loss_fn = BatchSimilarityLoss().double()
    student, _, teacher, labels = _data(UNEQUAL)
    s = _shard(student, UNEQUAL, rank).requires_grad_()
    gathered = gather_with_grad(s, grad_mode="all_reduce", name="student")
    t = gather_with_grad(_shard(teacher, UNEQUAL, rank))
    y = gather_with_grad(_shard(labels, UNEQUAL, rank))
    ((rank + 1) * loss_fn(gathered, t, labels=y)).backward()
    return {"student_grad": s.grad, "gathered_shape": torch.tensor(gathered.shape)}


def _ddp_step(rank, trainee, params: nn.Module, sizes=EQUAL, **kwargs) -> dict:
    _, x, teacher, labels = _data(sizes)
    optimizer = torch.optim.SGD(params.parameters(), lr=LR)
    loss = trainee(*(_shard(t, sizes, rank) for t in (x, teacher, labels)), **kwargs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in params.state_dict().items()}


def _scenario_ddp_joint(rank):
    # One DDP over student and loss head. Every parameter gets gradient each step, so
    # find_unused_parameters stays False.
    plain = _trainee()
    ddp = DistributedDataParallel(plain)
    return _ddp_step(rank, ddp, plain)


def _scenario_ddp_unequal(rank):
    # Unequal shards: the global-batch term stays exact; the task loss is weighted so the
    # average over ranks of the local terms is the global mean.
    plain = _trainee()
    ddp = DistributedDataParallel(plain)
    return _ddp_step(rank, ddp, plain, UNEQUAL, task_scale=WORLD / sum(UNEQUAL))


def _scenario_ddp_separate(rank):
    # The student in one DDP, the global-batch loss (its head) in a DDP of its own.
    plain = _trainee()
    student_ddp = DistributedDataParallel(Student(plain.features, plain.classifier))
    loss_ddp = DistributedDataParallel(plain.distill)

    def trainee(x, teacher, labels):
        s, logits = student_ddp(x)
        return F.cross_entropy(logits, labels) + loss_ddp(s, teacher, labels=labels)

    return _ddp_step(rank, trainee, plain)


# --------------------------------------------------------------------------------------------
# featkd's own losses with owned parameters in a DDP step, wrapped as docs/distributed.md says
# ("With DistributedDataParallel", "find_unused_parameters"). Every run is a few SGD steps; the
# states before and after each step are compared with single-process steps on the full batch.
# --------------------------------------------------------------------------------------------
def _sgd_steps(model, params: nn.Module, inputs, steps: int = STEPS) -> list[dict]:
    """``steps`` SGD steps of ``model(*inputs)`` over ``params``: the state before the first
    step and after each."""

    def state():  # the tensors: a seeded loss's generator position is not one
        items = params.state_dict().items()
        return {k: v.detach().clone() for k, v in items if isinstance(v, torch.Tensor)}

    optimizer = torch.optim.SGD(params.parameters(), lr=LR)
    states = [state()]
    for _ in range(steps):
        loss = model(*inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states.append(state())
    return states


def _token_data(sizes, seed: int = 2):
    """Full batch of student inputs ``(B, N, D_IN)``, teacher tokens ``(B, N, D_T)``, labels."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, TOKENS, D_IN, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, TOKENS, D_T, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return x, teacher, labels


def _cospress_trainee() -> Trainee:
    torch.manual_seed(11)
    # CosPress's global term compares the batch's CLS vectors: batch-level, so GlobalBatch.
    return Trainee(GlobalBatch(featkd.CosPressLoss(student_dim=D_S, teacher_dim=D_T))).double()


def _cospress_steps(rank: int | None) -> list[dict]:
    """CosPress (its head) inside the student's DDP on ``rank``'s shard; ``rank=None``: the
    single-process reference on the full batch, without any distributed code."""
    trainee = _cospress_trainee()
    inputs = _token_data(EQUAL)
    if rank is None:
        return _sgd_steps(trainee, trainee, inputs)
    # find_unused_parameters=False (the default): the docs say CosPress gives every parameter
    # gradient on every call; if it did not, the second step's forward would raise.
    ddp = DistributedDataParallel(trainee)
    return _sgd_steps(ddp, trainee, [_shard(t, EQUAL, rank) for t in inputs])


class MultiTeacherTrainee(nn.Module):
    """A token student with MultiTeacherLoss (its heads) inside, so one DDP wraps both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.features = nn.Linear(D_IN, D_S)
        self.distill = featkd.MultiTeacherLoss(
            D_S,
            {
                # stateless standardisers: running statistics differ by rank (DDP broadcasts
                # rank 0's), which a full-batch reference cannot reproduce
                "a": featkd.Teacher(D_T, normalize="layer_norm", tokens="both"),
                "b": featkd.Teacher(3, head="orthogonal", term="cosine_smooth_l1"),
            },
        )
        self.double()

    def forward(self, x, teacher_a, teacher_b):
        return self.distill(self.features(x), {"a": teacher_a, "b": teacher_b})


def _multi_teacher_steps(rank: int | None) -> list[dict]:
    """MultiTeacherLoss (per-sample terms) inside the student's DDP on ``rank``'s shard;
    ``rank=None``: the single-process reference on the full batch."""
    trainee = MultiTeacherTrainee()
    g = torch.Generator().manual_seed(5)
    n = sum(EQUAL)
    inputs = [
        torch.randn(n, 1 + 4, D_IN, generator=g, dtype=torch.float64),
        torch.randn(n, 1 + 4, D_T, generator=g, dtype=torch.float64),
        torch.randn(n, 1 + 4, 3, generator=g, dtype=torch.float64),
    ]
    if rank is None:
        return _sgd_steps(trainee, trainee, inputs)
    ddp = DistributedDataParallel(trainee)
    return _sgd_steps(ddp, trainee, [_shard(t, EQUAL, rank) for t in inputs])


class Staged(nn.Module):
    """A network given as stages; returns every stage's output, the last the logits."""

    def __init__(self, stages) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class StagedTrainee(nn.Module):
    """A staged student with FCFD inside, so one DDP wraps the student and the bridges."""

    def __init__(self, student: Staged, distill: featkd.FCFDLoss) -> None:
        super().__init__()
        self.student = student
        self.distill = distill

    def forward(self, images, teacher_feats, labels):
        feats = self.student(images)
        return F.cross_entropy(feats[-1], labels) + self.distill(feats, teacher_feats)


def _cnn_stages(width: int) -> list[nn.Module]:
    """A small CNN in K = 4 stages (paths may cross after stage 1 or 2: 4 mixed paths), without
    BatchNorm: the t2s paths run the student's later stages in train mode, and a BatchNorm
    there would normalise each shard with its own statistics."""

    def conv(c_in: int, c_out: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU())

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, CLASSES))
    return [
        conv(IMAGE[0], width, 1),
        conv(width, 2 * width, 2),
        conv(2 * width, 2 * width, 1),
        head,
    ]


def _image_data(sizes, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    images = torch.randn(n, *IMAGE, generator=g, dtype=torch.float64)
    return images, torch.randint(0, CLASSES, (n,), generator=g)


def _fcfd_setup() -> tuple[StagedTrainee, Staged]:
    """The student with FCFD inside, and the frozen teacher. Seeded (parameters and FCFD's path
    generator), so every rank and the parent build the same modules and sample the same paths."""
    torch.manual_seed(13)
    student = Staged(_cnn_stages(3)).double()
    teacher = Staged(_cnn_stages(5)).double().eval().requires_grad_(False)
    probe = _image_data(EQUAL)[0]  # shapes only (and post_relu="auto": ReLU outputs)
    fcfd = featkd.FCFDLoss(
        student.stages,
        teacher.stages,
        example_input=(probe, probe),
        num_paths=2,
        seed=FCFD_SEED,
    )
    # The bridges (conv + BatchNorm2d) run in eval mode. In train mode each process normalises
    # with its own shard's batch statistics, as any BatchNorm under DDP does, and the step is no
    # longer the full-batch step this test compares with. SyncBatchNorm
    # (nn.SyncBatchNorm.convert_sync_batchnorm) would make the statistics global, but it runs
    # on GPUs only, not under gloo on CPU. The affine parameters still train in eval mode.
    fcfd.eval()
    return StagedTrainee(student, fcfd), teacher


def _fcfd_steps(rank: int | None, wrap: str = "joint") -> list[dict]:
    """FCFD with its bridges under DDP on ``rank``'s shard, either in one DDP with the student
    (``wrap="joint"``) or in a DDP of its own (``"separate"``), with
    ``find_unused_parameters=True`` where the bridges are (``"off"``: the joint DDP without it);
    ``rank=None``: the single-process reference on the full batch."""
    trainee, teacher = _fcfd_setup()
    images, labels = _image_data(EQUAL)
    if rank is not None:
        images, labels = _shard(images, EQUAL, rank), _shard(labels, EQUAL, rank)
    with torch.no_grad():
        inputs = (images, teacher(images), labels)  # the teacher stays outside DDP
    if rank is None:
        return _sgd_steps(trainee, trainee, inputs)
    if wrap == "joint":
        return _sgd_steps(
            DistributedDataParallel(trainee, find_unused_parameters=True), trainee, inputs
        )
    if wrap == "off":
        return _sgd_steps(DistributedDataParallel(trainee), trainee, inputs)
    student_ddp = DistributedDataParallel(trainee.student)  # every student parameter is used
    fcfd_ddp = DistributedDataParallel(trainee.distill, find_unused_parameters=True)

    def model(images, teacher_feats, labels):
        feats = student_ddp(images)
        return F.cross_entropy(feats[-1], labels) + fcfd_ddp(feats, teacher_feats)

    return _sgd_steps(model, trainee, inputs)


def _scenario_ddp_cospress(rank):
    return {"states": _cospress_steps(rank)}


def _scenario_ddp_multi_teacher(rank):
    return {"states": _multi_teacher_steps(rank)}


def _scenario_ddp_fcfd(rank):
    return {"states": _fcfd_steps(rank, "joint")}


def _scenario_ddp_fcfd_separate(rank):
    return {"states": _fcfd_steps(rank, "separate")}


def _scenario_ddp_fcfd_without_find_unused(rank):
    try:
        _fcfd_steps(rank, "off")
    except RuntimeError as error:
        return {"message": str(error)}
    return {"message": "no error"}


def _scenario_width_mismatch(rank):
    s = torch.randn(4, D_S + rank)
    try:
        gather_with_grad(s, name="student")
    except ShapeError as error:
        return {"error_class": type(error).__name__, "message": str(error)}
    return {"message": "no error"}


def _scenario_pairing_mismatch(rank):
    loss_fn = GlobalBatch(BatchSimilarityLoss())
    s, t = torch.randn(4, D_S), torch.randn(4 - rank, D_T)
    try:
        loss_fn(s, t)
    except ShapeError as error:
        return {"error_class": type(error).__name__, "message": str(error)}
    return {"message": "no error"}


def _scenario_labels_on_one_rank(rank):
    loss_fn = GlobalBatch(BatchSimilarityLoss())
    labels = torch.zeros(4, dtype=torch.int64) if rank == 0 else None
    try:
        loss_fn(torch.randn(4, D_S), torch.randn(4, D_T), labels=labels)
    except ShapeError as error:
        return {"error_class": type(error).__name__, "message": str(error)}
    return {"message": "no error"}


def _scenario_teacher_not_a_tensor(rank):
    loss_fn = GlobalBatch(BatchSimilarityLoss())
    teacher = torch.randn(4, D_T) if rank == 0 else [[0.0] * D_T] * 4
    try:
        loss_fn(torch.randn(4, D_S), teacher)
    except FeatkdInputError as error:
        return {"error_class": type(error).__name__, "message": str(error)}
    return {"message": "no error"}


def _guarded_step(loss_fn, s, t, y) -> dict:
    """One step of a loop that logs a failing step and goes on: the loss, or the error."""
    try:
        return {"loss": loss_fn(s, t, labels=y).detach()}
    except Exception as error:  # a collective's timeout too, not only featkd's errors
        return {"error_class": type(error).__name__, "message": str(error)}


def _scenario_device_mismatch(rank):
    """Rank 1 puts its tensors on the wrong device for a few steps, then every rank runs a good
    step on fresh data. Every rank must raise on every bad step, and the good step must gather
    that step's shards, not a shard left over from a step some rank skipped."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=DEVICE_GROUP_TIMEOUT_S))
    torch.manual_seed(0)  # the head's parameters, as in the parent's reference
    loss_fn = GlobalBatch(BatchSimilarityLoss().double(), group=group, grad_mode="exact")
    result = {}
    for case, devices in DEVICE_CASES.items():
        student, _, teacher, labels = _data(EQUAL)
        s, t, y = (_shard(x, EQUAL, rank) for x in (student, teacher, labels))
        if rank == 1:
            s, t = s.to(devices[0]), t.to(devices[1])
        result[case] = _guarded_step(loss_fn, s, t, y)
    student, _, teacher, labels = _data(EQUAL, seed=NEXT_STEP_SEED)
    shards = [_shard(x, EQUAL, rank) for x in (student, teacher, labels)]
    result["next_step"] = _guarded_step(loss_fn, *shards)
    return result


def _scenario_equal_shards_device_mismatch(rank):
    # equal_shards skips the exchange: each rank judges its own devices and names itself
    loss_fn = GlobalBatch(BatchSimilarityLoss(), equal_shards=True)
    return _guarded_step(loss_fn, torch.randn(4, D_S), torch.randn(4, D_T, device="meta"), None)


def _scenario_gather_none(rank):
    try:
        gather_with_grad(None, name="student")
    except FeatkdInputError as error:
        return {"error_class": type(error).__name__, "message": str(error)}
    return {"message": "no error"}


def _scenario_single_rank_group(rank):
    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    x = torch.randn(3, 2, requires_grad=True)
    same = gather_with_grad(x, group=groups[rank]) is x
    return {"identity": torch.tensor(same), "is_distributed": torch.tensor(is_distributed())}


# --------------------------------------------------------------------------------------------
# featkd's own batch-level losses under GlobalBatch (the table in docs/distributed.md).
# --------------------------------------------------------------------------------------------
def _real_losses() -> dict[str, nn.Module]:
    """Seeded, so every rank and the parent build the same parameters."""
    torch.manual_seed(5)
    return {
        "CosPressLoss": featkd.CosPressLoss(student_dim=D_S, teacher_dim=D_T),
        "VkDLoss-whitening": featkd.VkDLoss(
            student_dim=D_S, teacher_dim=D_T, normalize="whitening"
        ),
        "VkDLoss-batch_standardize": featkd.VkDLoss(
            student_dim=D_S, teacher_dim=D_T, normalize="batch_standardize"
        ),
        "GaussianWassersteinLoss": featkd.GaussianWassersteinLoss(projector=nn.Linear(D_S, D_T)),
        "MMDLoss-conditional": featkd.MMDLoss(conditional=True, projector=nn.Linear(D_S, D_T)),
        "WassersteinLoss-emd": featkd.WassersteinLoss("emd", projector=nn.Linear(D_S, D_T)),
        "GaussianKLLoss": featkd.GaussianKLLoss(projector=nn.Linear(D_S, D_T)),
        "KD2MLoss-w2_sinkhorn": featkd.KD2MLoss("w2_sinkhorn", projector=nn.Linear(D_S, D_T)),
    }


def _loss_value_and_grads(loss_fn: nn.Module, s, t, labels, owner: nn.Module | None = None) -> dict:
    """Value and gradients; the parameter gradients are read from ``owner`` (the wrapped loss
    under GlobalBatch), so that their names match the unwrapped reference's."""
    s = s.clone().requires_grad_()
    loss = loss_fn(s, t, labels=labels)
    loss.backward()
    owner = loss_fn if owner is None else owner
    grads = {name: p.grad.clone() for name, p in owner.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "student_grad": s.grad, "param_grads": grads}


def _scenario_real_losses(rank):
    student, _, teacher, labels = _data(EQUAL)
    shards = [_shard(x, EQUAL, rank) for x in (student, teacher, labels)]
    return {
        name: _loss_value_and_grads(GlobalBatch(loss, grad_mode="exact"), *shards, owner=loss)
        for name, loss in ((n, m.double()) for n, m in _real_losses().items())
    }


def _logits(sizes, seed: int = 6):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    return torch.randn(total, CLASSES, generator=g), torch.randn(total, CLASSES, generator=g)


def _scenario_per_sample_none(rank):
    student, teacher = (_shard(x, UNEQUAL, rank) for x in _logits(UNEQUAL))
    loss = GlobalBatch(KDLoss(reduction="none"), grad_mode="exact")(student, teacher)
    return {"loss": loss}


def _joint_inputs():
    """Features, labels and logits of the global batch for the joint Wasserstein cost."""
    g = torch.Generator().manual_seed(7)
    total = sum(UNEQUAL)
    features = [torch.randn(total, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    logits = [torch.randn(total, CLASSES, generator=g, dtype=torch.float64) for _ in range(2)]
    labels = torch.arange(total) % CLASSES
    return features, logits, labels


def _joint_loss():
    return JointWassersteinLoss(label_weight=2.0, label_cost="kl_student_teacher")


def _scenario_joint_logits(rank):
    (student, teacher), (s_logits, t_logits), labels = _joint_inputs()
    shard = [_shard(x, UNEQUAL, rank) for x in (student, teacher, s_logits, t_logits, labels)]
    student, teacher = shard[0].requires_grad_(True), shard[1]
    s_logits = shard[2].requires_grad_(True)
    loss = GlobalBatch(_joint_loss(), grad_mode="exact")(
        student, teacher, labels=shard[4], student_logits=s_logits, teacher_logits=shard[3]
    )
    loss.backward()
    return {"loss": loss.detach(), "student_grad": student.grad, "logits_grad": s_logits.grad}


SCENARIOS = {
    "joint_logits": _scenario_joint_logits,
    "per_sample_none": _scenario_per_sample_none,
    "real_losses": _scenario_real_losses,
    "exact": _scenario_exact,
    "ddp_scale": _scenario_ddp_scale,
    "unequal": _scenario_unequal,
    "equal_shards_flag": _scenario_equal_shards_flag,
    "all_reduce": _scenario_all_reduce,
    "ddp_joint": _scenario_ddp_joint,
    "ddp_separate": _scenario_ddp_separate,
    "ddp_unequal": _scenario_ddp_unequal,
    "ddp_cospress": _scenario_ddp_cospress,
    "ddp_multi_teacher": _scenario_ddp_multi_teacher,
    "ddp_fcfd": _scenario_ddp_fcfd,
    "ddp_fcfd_separate": _scenario_ddp_fcfd_separate,
    "width_mismatch": _scenario_width_mismatch,
    "pairing_mismatch": _scenario_pairing_mismatch,
    "labels_on_one_rank": _scenario_labels_on_one_rank,
    "teacher_not_a_tensor": _scenario_teacher_not_a_tensor,
    "single_rank_group": _scenario_single_rank_group,
    "device_mismatch": _scenario_device_mismatch,
    "equal_shards_device_mismatch": _scenario_equal_shards_device_mismatch,
    "gather_none": _scenario_gather_none,
    # last: it leaves a DDP whose reduction never finished
    "ddp_fcfd_without_find_unused": _scenario_ddp_fcfd_without_find_unused,
}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank)
            except Exception:
                results[name] = {"traceback": traceback.format_exc()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread here too, as in the spawned processes: on tensors this small extra
    threads only synchronise, and on a busy machine they made the FCFD reference steps (small
    convolutions) some fifty times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Spawn the 2 processes once; every rank's results, by scenario."""
    tmp = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker,
        args=(str(tmp / "store"), str(tmp)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} spawned processes did not finish in {JOIN_TIMEOUT_S} s")
    except mp.ProcessRaisedException as error:  # the child's traceback is in the message
        pytest.fail(f"a spawned process failed:\n{error}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _result(ranks, scenario: str, rank: int) -> dict:
    result = ranks[rank][scenario]
    if "traceback" in result:
        pytest.fail(f"scenario {scenario!r} failed on rank {rank}:\n{result['traceback']}")
    return result


# --------------------------------------------------------------------------------------------
# Single-process references, computed here without any distributed code.
# --------------------------------------------------------------------------------------------
def _reference(sizes) -> dict:
    torch.manual_seed(0)
    loss_fn = BatchSimilarityLoss().double()
    student, _, teacher, labels = _data(sizes)
    s = student.clone().requires_grad_()
    loss = loss_fn(s, teacher, labels=labels)
    loss.backward()
    return {
        "loss": loss.detach(),
        "parts": dict(loss_fn.last_parts),
        "student_grad": s.grad,
        "head_weight_grad": loss_fn.head.weight.grad,
        "head_bias_grad": loss_fn.head.bias.grad,
    }


# --------------------------------------------------------------------------------------------
# (1) + (2): loss equals the single-process loss; each rank's shard gradient is the slice.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scenario", "sizes"),
    [("exact", EQUAL), ("unequal", UNEQUAL), ("equal_shards_flag", EQUAL), ("ddp_scale", EQUAL)],
)
def test_global_loss_equals_single_process_loss(ranks, scenario, sizes):
    reference = _reference(sizes)
    for rank in range(WORLD):
        result = _result(ranks, scenario, rank)
        torch.testing.assert_close(result["loss"], reference["loss"], **TOL)
        assert set(result["parts"]) == {"kl", "gram", "class"}
        for key, value in reference["parts"].items():
            torch.testing.assert_close(result["parts"][key], value, **TOL)


@pytest.mark.parametrize(
    ("scenario", "sizes"), [("exact", EQUAL), ("unequal", UNEQUAL), ("equal_shards_flag", EQUAL)]
)
def test_exact_mode_gives_each_rank_its_slice_of_the_gradient(ranks, scenario, sizes):
    reference = _reference(sizes)
    for rank in range(WORLD):
        result = _result(ranks, scenario, rank)
        expected = _shard(reference["student_grad"], sizes, rank)
        assert result["student_grad"].shape == (sizes[rank], D_S)
        torch.testing.assert_close(result["student_grad"], expected, **TOL)
        # the head is applied after the gather: the full gradient on every rank
        torch.testing.assert_close(result["head_weight_grad"], reference["head_weight_grad"], **TOL)
        torch.testing.assert_close(result["head_bias_grad"], reference["head_bias_grad"], **TOL)
        assert result["teacher_grad_is_none"]


def test_reduction_none_gives_each_rank_the_values_of_its_own_samples(ranks):
    """A per-sample loss (reduction="none") under GlobalBatch: rank r gets (B_r,), the slice of
    the single-process values on the concatenated batch."""
    reference = KDLoss(reduction="none")(*_logits(UNEQUAL))
    for rank in range(WORLD):
        result = _result(ranks, "per_sample_none", rank)
        assert result["loss"].shape == (UNEQUAL[rank],)
        torch.testing.assert_close(result["loss"], _shard(reference, UNEQUAL, rank))


def test_logits_are_gathered_for_the_joint_cost(ranks):
    """GlobalBatch passes the joint Wasserstein cost's logits on: the student's gathered with
    gradient, the teacher's without; the loss and both gradients are those of one process on
    the concatenated batch (grad_mode="exact")."""
    (student, teacher), (s_logits, t_logits), labels = _joint_inputs()
    student.requires_grad_(True)
    s_logits.requires_grad_(True)
    reference = _joint_loss()(
        student, teacher, labels=labels, student_logits=s_logits, teacher_logits=t_logits
    )
    reference.backward()
    for rank in range(WORLD):
        result = _result(ranks, "joint_logits", rank)
        torch.testing.assert_close(result["loss"], reference.detach(), **TOL)
        torch.testing.assert_close(result["student_grad"], _shard(student.grad, UNEQUAL, rank))
        torch.testing.assert_close(result["logits_grad"], _shard(s_logits.grad, UNEQUAL, rank))


def test_ddp_mode_scales_the_shard_gradient_by_world_size(ranks):
    reference = _reference(EQUAL)
    for rank in range(WORLD):
        result = _result(ranks, "ddp_scale", rank)
        expected = WORLD * _shard(reference["student_grad"], EQUAL, rank)
        torch.testing.assert_close(result["student_grad"], expected, **TOL)
        torch.testing.assert_close(result["head_weight_grad"], reference["head_weight_grad"], **TOL)


def test_all_reduce_mode_sums_what_every_rank_sends_to_a_shard(ranks):
    reference = _reference(UNEQUAL)
    weight = sum(r + 1 for r in range(WORLD))  # rank r's loss is (r + 1) L
    for rank in range(WORLD):
        result = _result(ranks, "all_reduce", rank)
        assert result["gathered_shape"].tolist() == [sum(UNEQUAL), D_S]
        expected = weight * _shard(reference["student_grad"], UNEQUAL, rank)
        torch.testing.assert_close(result["student_grad"], expected, **TOL)


# --------------------------------------------------------------------------------------------
# (3): a DDP step equals a single-process step on the full batch.
# --------------------------------------------------------------------------------------------
def _single_process_step(sizes=EQUAL) -> dict:
    trainee = _trainee()
    _, x, teacher, labels = _data(sizes)
    optimizer = torch.optim.SGD(trainee.parameters(), lr=LR)
    loss = trainee(x, teacher, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in trainee.state_dict().items()}


@pytest.mark.parametrize(
    ("scenario", "sizes"),
    [("ddp_joint", EQUAL), ("ddp_separate", EQUAL), ("ddp_unequal", UNEQUAL)],
)
def test_ddp_step_equals_single_process_step(ranks, scenario, sizes):
    expected = _single_process_step(sizes)
    initial = _trainee()
    for rank in range(WORLD):
        result = _result(ranks, scenario, rank)
        assert set(result) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(result[name], value, **TOL, msg=f"{scenario}: {name}")
    # the step moved every parameter (so the comparison is not vacuous)
    for name, value in initial.state_dict().items():
        assert not torch.allclose(expected[name], value), name


REAL_DDP_REFERENCES = {
    "ddp_cospress": lambda: _cospress_steps(None),
    "ddp_multi_teacher": lambda: _multi_teacher_steps(None),
    "ddp_fcfd": lambda: _fcfd_steps(None),
    "ddp_fcfd_separate": lambda: _fcfd_steps(None),
}


@pytest.mark.parametrize("scenario", list(REAL_DDP_REFERENCES))
def test_ddp_steps_with_featkd_losses_equal_single_process_steps(ranks, scenario):
    """The student and the loss's own head or bridges, after each step, equal the
    single-process steps on the concatenated batch."""
    expected = REAL_DDP_REFERENCES[scenario]()
    for rank in range(WORLD):
        states = _result(ranks, scenario, rank)["states"]
        assert len(states) == len(expected) == STEPS + 1
        for step, (result, want) in enumerate(zip(states, expected, strict=True)):
            assert set(result) == set(want)
            for name, value in want.items():
                msg = f"{scenario}, rank {rank}, step {step}: {name}"
                torch.testing.assert_close(result[name], value, **TOL, msg=msg)
    # every parameter moved (student, head, every bridge), so the comparison is not vacuous
    trainee = {
        "ddp_cospress": _cospress_trainee,
        "ddp_multi_teacher": MultiTeacherTrainee,
    }.get(scenario, lambda: _fcfd_setup()[0])()
    assert list(trainee.distill.parameters()), "the loss owns parameters"
    for name, _ in trainee.named_parameters():
        assert not torch.equal(expected[-1][name], expected[0][name]), name


def test_fcfd_seed_leaves_a_bridge_unused_on_every_step():
    """The premise of the FCFD DDP scenarios: each step samples one t2s path of the two, so the
    other t2s bridge gets no gradient (find_unused_parameters=True is needed), and the steps
    together use both (every bridge trains)."""
    fcfd = _fcfd_setup()[0].distill
    assert list(fcfd.t2s) == ["stage1", "stage2"]
    used = [{k for d, k in fcfd.sample_paths() if d == "t2s"} for _ in range(STEPS)]
    assert all(len(step) == 1 for step in used), used
    assert set.union(*used) == {1, 2}


def test_fcfd_under_ddp_needs_find_unused_parameters(ranks):
    """What the docs say: without find_unused_parameters=True, the bridges FCFD did not use on
    a step stop DDP at the next forward."""
    for rank in range(WORLD):
        message = _result(ranks, "ddp_fcfd_without_find_unused", rank)["message"]
        assert "Expected to have finished reduction in the prior iteration" in message, message


# --------------------------------------------------------------------------------------------
# Errors are raised on every rank (no rank left hanging in a collective).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scenario", "error_class", "fragments"),
    [
        ("width_mismatch", "ShapeError", ["student", "(4, 4)", "(4, 5)", "rank 1"]),
        ("pairing_mismatch", "ShapeError", ["teacher", "batch size 4 on rank 1", "got 3"]),
        ("labels_on_one_rank", "ShapeError", ["labels", "None", "rank 1"]),
        ("teacher_not_a_tensor", "FeatkdInputError", ["teacher", "torch.Tensor", "rank 1"]),
        ("gather_none", "FeatkdInputError", ["student: expected a torch.Tensor", "got None"]),
    ],
)
def test_mismatches_raise_on_every_rank(ranks, scenario, error_class, fragments):
    for rank in range(WORLD):
        result = _result(ranks, scenario, rank)
        assert result.get("error_class") == error_class, result["message"]
        for fragment in fragments:
            assert fragment in result["message"], (fragment, result["message"])


DEVICE_FRAGMENTS = {
    "teacher_on_meta": [
        "teacher: expected a tensor on cpu on rank 1 (the device of student there)",
        "got one on meta",
    ],
    "student_on_meta": [  # blamed first: no backend gathers from meta
        "student: expected a tensor on a device the gloo process group gathers from",
        "got one on meta on rank 1",
    ],
    "all_on_meta": ["student: expected a tensor on a device", "got one on meta on rank 1"],
}


@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_device_mismatch_on_one_rank_raises_the_same_error_on_every_rank(ranks, case):
    """Issue 11: the device check ran on each rank alone, before the shape exchange, so only
    the rank with the wrong device raised, and the other one gathered with its next step."""
    results = [_result(ranks, "device_mismatch", rank)[case] for rank in range(WORLD)]
    for result in results:
        assert result.get("error_class") == DeviceError.__name__, result
        for fragment in DEVICE_FRAGMENTS[case]:
            assert fragment in result["message"], (fragment, result["message"])
    assert results[0]["message"] == results[1]["message"]


def test_equal_shards_device_mismatch_raises_on_the_rank_that_has_it(ranks):
    """Without the exchange the device check is local: each rank names itself, not rank 0."""
    for rank in range(WORLD):
        result = _result(ranks, "equal_shards_device_mismatch", rank)
        assert result.get("error_class") == DeviceError.__name__, result
        assert f"teacher: expected a tensor on cpu on rank {rank}" in result["message"]


def test_step_after_a_device_mismatch_gathers_its_own_shards(ranks):
    """After the bad steps every rank is still in step: the good step's loss is the
    single-process loss on that step's batch."""
    torch.manual_seed(0)
    reference = BatchSimilarityLoss().double()
    student, _, teacher, labels = _data(EQUAL, seed=NEXT_STEP_SEED)
    expected = reference(student, teacher, labels=labels).detach()
    for rank in range(WORLD):
        result = _result(ranks, "device_mismatch", rank)["next_step"]
        assert "loss" in result, result
        torch.testing.assert_close(result["loss"], expected, **TOL)


@pytest.mark.parametrize("name", list(_real_losses()))
def test_featkd_losses_under_global_batch_equal_the_full_batch_loss(ranks, name):
    """Each rank's loss is the single-process loss on the concatenated batch; its shard gets
    the matching slice of the student gradient and the owned parameters the full gradient."""
    student, _, teacher, labels = _data(EQUAL)
    reference = _loss_value_and_grads(_real_losses()[name].double(), student, teacher, labels)
    assert reference["param_grads"], "the loss owns parameters that get gradient"
    for rank in range(WORLD):
        result = _result(ranks, "real_losses", rank)[name]
        torch.testing.assert_close(result["loss"], reference["loss"], **TOL)
        torch.testing.assert_close(
            result["student_grad"], _shard(reference["student_grad"], EQUAL, rank), **TOL
        )
        assert result["param_grads"].keys() == reference["param_grads"].keys()
        for key, grad in reference["param_grads"].items():
            torch.testing.assert_close(result["param_grads"][key], grad, **TOL, msg=key)


def test_group_of_one_process_is_the_identity(ranks):
    for rank in range(WORLD):
        result = _result(ranks, "single_rank_group", rank)
        assert bool(result["identity"])
        assert bool(result["is_distributed"])


# --------------------------------------------------------------------------------------------
# (5): without an initialised process group, everything is the identity.
# --------------------------------------------------------------------------------------------
def test_gather_is_the_identity_without_a_process_group():
    assert not dist.is_initialized()
    assert not is_distributed()
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_with_grad(x, grad_mode="exact") is x


def test_global_batch_is_the_wrapped_loss_without_a_process_group():
    torch.manual_seed(0)
    inner = BatchSimilarityLoss().double()
    wrapped = GlobalBatch(inner)
    student, _, teacher, labels = _data(EQUAL)
    s = student.clone().requires_grad_()
    loss = wrapped(s, teacher, labels=labels)
    reference = _reference(EQUAL)
    torch.testing.assert_close(loss.detach(), reference["loss"], **TOL)
    assert wrapped.last_parts is inner.last_parts
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in inner.parameters()]
    loss.backward()
    torch.testing.assert_close(s.grad, reference["student_grad"], **TOL)


def test_global_batch_passes_labels_only_when_given():
    seen = {}

    def loss_without_labels(student, teacher):
        seen["called"] = True
        return (student - teacher).pow(2).mean()

    s, t = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(GlobalBatch(loss_without_labels)(s, t), (s - t).pow(2).mean())
    assert seen["called"]
    assert GlobalBatch(loss_without_labels).last_parts == {}
    assert list(GlobalBatch(loss_without_labels).parameters()) == []


def test_global_batch_of_a_per_sample_loss_matches_it():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    wrapped = GlobalBatch(KDLoss(temperature=2.0))
    assert torch.equal(wrapped(s, t), KDLoss(temperature=2.0)(s, t))
    assert "grad_mode='ddp'" in repr(wrapped)


def test_bad_options_are_reported():
    with pytest.raises(ChoiceError, match="grad_mode: expected one of 'ddp', 'exact'"):
        gather_with_grad(torch.randn(2, 2), grad_mode="mean")
    with pytest.raises(ChoiceError, match="grad_mode.*got 'sum'"):
        GlobalBatch(KDLoss(), grad_mode="sum")
    with pytest.raises(FeatkdInputError, match="loss_fn: expected a callable.*got int"):
        GlobalBatch(3)


def test_equal_shards_must_be_a_bool():
    """``equal_shards="no"`` used to be truthy, silently skipping the cross-rank checks."""
    with pytest.raises(featkd.ChoiceError, match="^equal_shards: "):
        GlobalBatch(featkd.MMDLoss(), equal_shards="no")
