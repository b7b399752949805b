"""Distil a CNN teacher into a much smaller CNN student on scikit-learn's handwritten digits.

Every featkd method runs under the same budget, seeds and optimiser; the student sees labels for
only a small fraction of the training images (default 10%) while the distillation term sees all
training images (their labels unused). Prints a table, saves ``results.json`` and a bar chart.

    python examples/distill_digits.py             # full run: every method, 5 seeds
    python examples/distill_digits.py --quick     # smoke run, seconds
    python examples/distill_digits.py --device cuda

On CPU the (method, seed) runs go to ``--workers`` processes (default: one per core, one thread
each): the networks are small, so processes use the cores better than intra-op threads.

Each method's gain over the student alone is tested over paired seeds (the same seed gives the
same initial student and batches to every method): "better" or "worse" only when a paired t-test
gives p < 0.05. The losses whose weight the papers leave to the user (KD2M, VkD with whitening)
first run a small weight sweep on a validation split held out of the training images, one seed
per weight; the weight with the best validation accuracy is then used on the test seeds.

The data ships inside scikit-learn (1,797 8x8 images): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import featkd

# ----------------------------------------------------------------------------------------------
# data


VALIDATION_FRACTION = 0.15  # of the training split
SWEEP_WEIGHTS = tuple(float(w) for w in np.logspace(-3, 0, 5))  # 1e-3 ... 1
SWEEP_SEED = 100  # not one of the test seeds
SIGNIFICANCE = 0.05


@dataclass
class Digits:
    train_x: torch.Tensor  # (N_train, 1, 8, 8) in [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    labelled: torch.Tensor  # indices into train with usable labels
    val_x: torch.Tensor  # held out of the training images: chooses the swept weights
    val_y: torch.Tensor


def load_digits(label_fraction: float, split_seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_digits(return_X_y=True)
    images = images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.3, stratify=labels, random_state=split_seed
    )
    train_x, val_x, train_y, val_y = train_test_split(
        train_x, train_y, test_size=VALIDATION_FRACTION, stratify=train_y, random_state=split_seed
    )
    # a fixed, class-stratified labelled subset, the same for every method and seed
    labelled, _ = train_test_split(
        np.arange(len(train_y)),
        train_size=label_fraction,
        stratify=train_y,
        random_state=split_seed,
    )
    return Digits(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y).long(),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y).long(),
        torch.from_numpy(np.sort(labelled)),
        torch.from_numpy(val_x),
        torch.from_numpy(val_y).long(),
    )


# ----------------------------------------------------------------------------------------------
# networks: four stages each (the last ends in logits), so FCFD can cross between them


def conv_block(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class StagedCNN(nn.Module):
    """conv(8x8) -> conv + pool(4x4) -> conv(4x4) -> GAP + linear."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = conv_block(1, w1)
        self.stage2 = conv_block(w1, w2, pool=True)
        self.stage3 = conv_block(w2, w3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes))
        self.feature_dim = w3

    @property
    def stages(self) -> list[nn.Module]:
        return [self.stage1, self.stage2, self.stage3, self.head]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


def make_teacher() -> StagedCNN:
    return StagedCNN((64, 128, 256))  # about 370k parameters


def make_student() -> StagedCNN:
    return StagedCNN((8, 16, 32))  # about 6k parameters, feature width 32 vs 256


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (zero padding): cheap augmentation for the teacher."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_teacher(data: Digits, epochs: int, device: torch.device, seed: int = 0) -> StagedCNN:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher = make_teacher().to(device)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = data.train_x.to(device), data.train_y.to(device)
    steps = epochs * math.ceil(len(x) / 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    teacher.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(teacher(random_shift(x[idx], generator)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------------------------
# methods: each builds a distillation term from the per-stage outputs of both networks


@dataclass
class Batch:
    student_stages: list[torch.Tensor]  # outputs of the four student stages (last = logits)
    teacher_stages: list[torch.Tensor]  # same for the frozen teacher (computed without grad)


def tokens_with_pooled_prefix(feature_map: torch.Tensor) -> torch.Tensor:
    """A CNN map as a token sequence: its global average first (playing the CLS role), then
    the grid positions. ``(B, C, H, W) -> (B, 1 + H*W, C)``."""
    pooled = featkd.pool(feature_map, "gap").unsqueeze(1)
    return torch.cat([pooled, featkd.to_tokens(feature_map)], dim=1)


@dataclass
class Method:
    name: str
    build: Callable[[StagedCNN, StagedCNN, Digits], nn.Module | None]
    term: Callable[[nn.Module | None, Batch], torch.Tensor] | None
    weight: float = 1.0
    notes: str = ""
    sweep: bool = False  # choose the weight on the validation split (SWEEP_WEIGHTS)


def _kd_term(loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    return loss_fn(batch.student_stages[-1], batch.teacher_stages[-1])


def _build_fcfd(student: StagedCNN, teacher: StagedCNN, data: Digits) -> nn.Module:
    probe = data.train_x[:8]
    return nn.ModuleDict(
        {
            # 300 steps, no epochs: no warm-up (the official one spans 20 epochs)
            "fcfd": featkd.FCFDLoss(
                student.stages,
                teacher.stages,
                example_input=(probe, probe),
                seed=0,
                warmup_epochs=0,
            ),
            "kd": featkd.KDLoss(4.0),
        }
    )


def _fcfd_term(loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    # the official CIFAR objective: CE + KD + FCFD's path KL and (5x) MSE terms
    fcfd = loss_fn["fcfd"](batch.student_stages, batch.teacher_stages)
    return fcfd + loss_fn["kd"](batch.student_stages[-1], batch.teacher_stages[-1])


def _kd2m(metric: str) -> Callable[[StagedCNN, StagedCNN, Digits], nn.Module]:
    def build(student: StagedCNN, teacher: StagedCNN, data: Digits) -> nn.Module:
        # widths differ (32 vs 256): a linear projector of the student, owned by the loss
        projector = nn.Linear(student.feature_dim, teacher.feature_dim)
        return featkd.KD2MLoss(metric, projector=projector)

    return build


def _pooled_term(loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    student = featkd.pool(batch.student_stages[2], "gap")
    teacher = featkd.pool(batch.teacher_stages[2], "gap")
    return loss_fn(student, teacher)


def _map_term(loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    return loss_fn(batch.student_stages[2], batch.teacher_stages[2])


def _token_term(loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    student = tokens_with_pooled_prefix(batch.student_stages[2])
    teacher = tokens_with_pooled_prefix(batch.teacher_stages[2])
    return loss_fn(student, teacher)


METHODS: list[Method] = [
    Method("student alone", lambda s, t, d: None, None, notes="cross-entropy on the labelled 10%"),
    Method("Hinton KD", lambda s, t, d: featkd.KDLoss(4.0), _kd_term, notes="logits, T=4"),
    Method(
        "VkD (layer norm)",
        lambda s, t, d: featkd.VkDLoss(
            student_dim=s.feature_dim, teacher_dim=t.feature_dim, student_pool="gap"
        ),
        _map_term,
        notes="orthogonal projection 32->256, layer-normed teacher, smooth-L1",
    ),
    Method(
        "VkD (whitening)",
        lambda s, t, d: featkd.VkDLoss(
            student_dim=s.feature_dim,
            teacher_dim=t.feature_dim,
            normalize="whitening",
            student_pool="gap",
            shrinkage=1e-2,
        ),
        _map_term,
        notes="Cholesky-whitened teacher (B=128 < D=256: shrinkage 1e-2)",
        sweep=True,
    ),
    Method(
        "Proteus",
        lambda s, t, d: featkd.ProteusLoss(student_dim=s.feature_dim, teacher_dim=t.feature_dim),
        _token_term,
        notes="student heads up to 256, MSE on GAP token + 16 grid tokens",
    ),
    Method(
        "CosPress",
        lambda s, t, d: featkd.CosPressLoss(student_dim=s.feature_dim, teacher_dim=t.feature_dim),
        _token_term,
        notes="teacher head down to 32, GAP token as CLS + 16 grid tokens",
    ),
    Method(
        "KD2M exact W2",
        _kd2m("w2_emd"),
        _pooled_term,
        weight=0.01,
        notes="pooled features, linear projector",
        sweep=True,
    ),
    Method(
        "KD2M Gaussian W2",
        _kd2m("w2_gaussian"),
        _pooled_term,
        weight=0.01,
        notes="squared Bures, linear projector",
        sweep=True,
    ),
    Method("KD2M MMD (RBF)", _kd2m("mmd_rbf"), _pooled_term, notes="median bandwidth", sweep=True),
    Method("FCFD", _build_fcfd, _fcfd_term, notes="+ KD; 2 sampled paths, MSE weight 5"),
]


# ----------------------------------------------------------------------------------------------
# training and evaluation


@dataclass
class RunResult:
    accuracy: float
    cosine_spearman: float
    cka: float
    seconds: float
    final_parts: dict[str, float] = field(default_factory=dict)


def penultimate(model: StagedCNN, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return featkd.pool(model.forward_stages(x)[2], "gap")


def train_student(
    method: Method,
    teacher: StagedCNN,
    data: Digits,
    *,
    seed: int,
    steps: int,
    device: torch.device,
    weight: float | None = None,
    split: str = "test",
) -> RunResult:
    """One student run; ``weight`` overrides the method's, ``split`` ("test" or "val") is
    where it is evaluated."""
    weight = method.weight if weight is None else weight
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    student = make_student().to(device)
    loss_fn = method.build(student, teacher, data)
    params = list(student.parameters())
    if loss_fn is not None:
        loss_fn = loss_fn.to(device)
        params += list(loss_fn.parameters())  # heads, projectors and bridges train too
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    labelled = data.labelled.to(device)
    # the teacher is frozen and the distillation images are not augmented: run it once
    with torch.no_grad():
        teacher_all = teacher.forward_stages(train_x) if method.term is not None else []

    start = time.perf_counter()
    student.train()
    for _ in range(steps):
        lab = labelled[torch.randint(len(labelled), (32,), generator=generator).to(device)]
        loss = F.cross_entropy(student(train_x[lab]), train_y[lab])
        if method.term is not None:
            idx = torch.randint(len(train_x), (128,), generator=generator).to(device)
            batch = Batch(student.forward_stages(train_x[idx]), [t[idx] for t in teacher_all])
            loss = loss + weight * method.term(loss_fn, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start

    eval_x, eval_y = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    test_x, test_y = eval_x.to(device), eval_y.to(device)
    s_feat, t_feat = penultimate(student, test_x), penultimate(teacher, test_x)
    parts = getattr(loss_fn, "last_parts", {}) if loss_fn is not None else {}
    return RunResult(
        accuracy=accuracy(student, test_x, test_y),
        cosine_spearman=featkd.cosine_preservation(t_feat, s_feat).spearman,
        cka=float(featkd.linear_cka(t_feat, s_feat)),
        seconds=seconds,
        final_parts={k: float(v) for k, v in parts.items()},
    )


def _run_in_worker(
    method_name: str,
    teacher_state: dict[str, torch.Tensor],
    data: Digits,
    seed: int,
    steps: int,
    weight: float | None = None,
    split: str = "test",
) -> RunResult:
    """One (method, seed) run in a worker process (one thread): rebuild the teacher from its
    weights."""
    torch.set_num_threads(1)
    method = next(m for m in METHODS if m.name == method_name)
    teacher = make_teacher()
    teacher.load_state_dict(teacher_state)
    return train_student(
        method,
        teacher.eval(),
        data,
        seed=seed,
        steps=steps,
        device="cpu",
        weight=weight,
        split=split,
    )


@dataclass(frozen=True)
class Job:
    method: Method
    seed: int
    weight: float | None = None  # None: the method's own
    split: str = "test"


def run_jobs(
    jobs: list[Job],
    teacher: StagedCNN,
    data: Digits,
    *,
    steps: int,
    device: torch.device,
    workers: int,
    progress,
) -> list[RunResult]:
    """Every job's run, in the order given. With ``workers > 1`` (CPU only) the runs go to a
    pool of processes, one thread each."""
    results: list[RunResult | None] = [None] * len(jobs)
    if workers <= 1:
        for k, job in enumerate(jobs):
            progress.set_postfix_str(f"{job.method.name} seed {job.seed}")
            results[k] = train_student(
                job.method,
                teacher,
                data,
                seed=job.seed,
                steps=steps,
                device=device,
                weight=job.weight,
                split=job.split,
            )
            progress.update()
        return results
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    # the children import this file by its module name, also when it was loaded from its path
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    # spawn, not fork: a forked child inherits torch's thread pools in an undefined state
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = {
            pool.submit(
                _run_in_worker, job.method.name, state, data, job.seed, steps, job.weight, job.split
            ): k
            for k, job in enumerate(jobs)
        }
        for future in as_completed(futures):
            k = futures[future]
            try:
                results[k] = future.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # do not wait for the other runs
                raise
            progress.set_postfix_str(f"{jobs[k].method.name} seed {jobs[k].seed} done")
            progress.update()
    return results


def sweep_weights(
    methods: list[Method], teacher: StagedCNN, data: Digits, **run: object
) -> dict[str, dict[float, float]]:
    """Validation accuracy of each swept method at each weight of ``SWEEP_WEIGHTS`` (one seed,
    ``SWEEP_SEED``): ``{method: {weight: accuracy}}``."""
    swept = [m for m in methods if m.sweep]
    jobs = [Job(m, SWEEP_SEED, w, "val") for m in swept for w in SWEEP_WEIGHTS]
    results = run_jobs(jobs, teacher, data, **run)
    table: dict[str, dict[float, float]] = {m.name: {} for m in swept}
    for job, result in zip(jobs, results, strict=True):
        table[job.method.name][job.weight] = result.accuracy
    return table


def best_weight(accuracies: dict[float, float]) -> float:
    """The weight with the best validation accuracy; on a tie, the smallest."""
    return min(accuracies, key=lambda w: (-accuracies[w], w))


def run_all(
    methods: list[Method],
    teacher: StagedCNN,
    data: Digits,
    *,
    seeds: int,
    weights: dict[str, float] | None = None,
    **run: object,
) -> list[list[RunResult]]:
    """Every method over every seed: ``runs[i][seed]`` for ``methods[i]``, with the weights
    chosen by the sweep where given."""
    weights = weights or {}
    jobs = [Job(m, seed, weights.get(m.name)) for m in methods for seed in range(seeds)]
    results = run_jobs(jobs, teacher, data, **run)
    return [results[i * seeds : (i + 1) * seeds] for i in range(len(methods))]


def summarise(runs: list[RunResult]) -> dict[str, float]:
    def stats(values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=np.float64)
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0

    acc_mean, acc_std = stats([r.accuracy for r in runs])
    cos_mean, cos_std = stats([r.cosine_spearman for r in runs])
    cka_mean, cka_std = stats([r.cka for r in runs])
    return {
        "accuracy_mean": acc_mean,
        "accuracy_std": acc_std,
        "cosine_spearman_mean": cos_mean,
        "cosine_spearman_std": cos_std,
        "cka_mean": cka_mean,
        "cka_std": cka_std,
        "seconds_mean": float(np.mean([r.seconds for r in runs])),
    }


def paired_gain(runs: list[RunResult], alone: list[RunResult]) -> dict[str, float | str]:
    """Test accuracy gain over the student alone, paired by seed: mean and std of the per-seed
    differences, the two-sided paired t-test's p-value and the verdict it gives."""
    gains = np.array([r.accuracy - a.accuracy for r, a in zip(runs, alone, strict=True)])
    if len(gains) < 2:
        return {
            "gain_mean": float(gains.mean()),
            "gain_std": 0.0,
            "p_value": math.nan,
            "verdict": "",
        }
    if np.all(gains == gains[0]):  # no spread: the t statistic is undefined
        p_value = 0.0 if gains[0] != 0 else 1.0
    else:
        from scipy.stats import ttest_rel

        accuracies = [r.accuracy for r in runs], [a.accuracy for a in alone]
        p_value = float(ttest_rel(*accuracies).pvalue)
    significant = p_value < SIGNIFICANCE
    verdict = "no clear gain"
    if significant:
        verdict = "better" if gains.mean() > 0 else "worse"
    return {
        "gain_mean": float(gains.mean()),
        "gain_std": float(gains.std(ddof=1)),
        "p_value": p_value,
        "verdict": verdict,
    }


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'method':<24} {'test acc (%)':>14} {'gain (pp)':>13} {'p':>7} {'cos-pres (rho)':>15} "
        f"{'linear CKA':>11} {'time (s)':>9}  vs alone"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        gain, p_value = "", ""
        if "gain_mean" in r:
            gain = f"{100 * r['gain_mean']:+.2f} ± {100 * r['gain_std']:.2f}"
            p_value = "" if math.isnan(r["p_value"]) else f"{r['p_value']:.3f}"
        lines.append(
            f"{r['method']:<24} {100 * r['accuracy_mean']:>8.2f} ± {100 * r['accuracy_std']:<4.2f}"
            f" {gain:>13} {p_value:>7}"
            f" {r['cosine_spearman_mean']:>8.3f} ± {r['cosine_spearman_std']:<5.3f}"
            f" {r['cka_mean']:>11.3f} {r['seconds_mean']:>9.1f}  {r.get('verdict', '')}".rstrip()
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    means = [100 * r["accuracy_mean"] for r in rows]
    stds = [100 * r["accuracy_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = ["#888888" if n in ("student alone", "teacher") else "#3b75af" for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colours)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: student trained with 10% of the labels, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="student optimiser steps")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--methods", nargs="*", help="run only these methods (names as listed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--no-sweep",
        action="store_true",
        help="use each method's fixed weight instead of choosing it on the validation split",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the student runs (CPU; default one per core, 1 on CUDA and --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.teacher_epochs, args.no_sweep = 1, 25, 3, True
    on_cpu = torch.device(args.device).type == "cpu"
    if args.workers is None:
        args.workers = (os.cpu_count() or 1) if on_cpu and not args.quick else 1
    if args.workers > 1 and not on_cpu:
        parser.error("--workers > 1 is for CPU runs; on a GPU the runs go one after another")

    from tqdm.auto import tqdm

    device = torch.device(args.device)
    data = load_digits(args.label_fraction)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]
    print(
        f"digits: {len(data.train_x)} train ({len(data.labelled)} labelled), "
        f"{len(data.val_x)} validation, {len(data.test_x)} test; device {device}"
    )

    start = wall_start = time.perf_counter()
    teacher = train_teacher(data, args.teacher_epochs, device)
    teacher_seconds = time.perf_counter() - start
    teacher_acc = accuracy(teacher, data.test_x.to(device), data.test_y.to(device))
    print(f"teacher: {teacher_acc:.2%} test accuracy ({teacher_seconds:.1f} s)")

    run = {"steps": args.steps, "device": device, "workers": args.workers}
    sweep: dict[str, dict[float, float]] = {}
    swept = [m for m in methods if m.sweep] if not args.no_sweep else []
    if swept:
        progress = tqdm(
            total=len(swept) * len(SWEEP_WEIGHTS), disable=args.no_progress, desc="weight sweep"
        )
        sweep = sweep_weights(swept, teacher, data, progress=progress, **run)
        progress.close()
    weights = {name: best_weight(accuracies) for name, accuracies in sweep.items()}

    progress = tqdm(total=len(methods) * args.seeds, disable=args.no_progress, desc="distilling")
    all_runs = run_all(
        methods, teacher, data, seeds=args.seeds, weights=weights, progress=progress, **run
    )
    progress.close()
    named = dict(zip((m.name for m in methods), all_runs, strict=True))
    alone = named.get("student alone")
    rows = []
    for method, runs in zip(methods, all_runs, strict=True):
        row = {"method": method.name, "notes": method.notes, **summarise(runs)}
        row["weight"] = weights.get(method.name, method.weight) if method.term else None
        if method.name in sweep:
            row["sweep_val_accuracy"] = {f"{w:g}": a for w, a in sweep[method.name].items()}
        if alone is not None and method.name != "student alone":
            row.update(paired_gain(runs, alone))
        row["runs"] = [r.__dict__ for r in runs]
        rows.append(row)
    rows.append(
        {
            "method": "teacher",
            "notes": "trained on all labels",
            "accuracy_mean": teacher_acc,
            "accuracy_std": 0.0,
            "cosine_spearman_mean": 1.0,
            "cosine_spearman_std": 0.0,
            "cka_mean": 1.0,
            "cka_std": 0.0,
            "seconds_mean": teacher_seconds,
        }
    )

    print()
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "teacher_accuracy": teacher_acc,
        "wall_seconds": time.perf_counter() - wall_start,
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "results.png")
    print(f"\nsaved {args.out / 'results.json'} and {args.out / 'results.png'}")
    print(f"total wall time {result['wall_seconds']:.0f} s ({args.workers} worker(s))")
    return result


if __name__ == "__main__":
    main()
