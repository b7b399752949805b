"""Overhead of each featkd loss relative to one training step of a realistic student.

For every loss: forward + backward time of the loss alone (features given, as in training),
divided by the time of one full training step (forward, backward, optimiser) of a ViT student at
the same batch. On CUDA the student is ViT-Ti sized (width 192, depth 12, 197 tokens) at batch
256; on CPU a reduced ViT (width 192, depth 4, 65 tokens) at batch 32 keeps the run short.
FCFD is excluded: its cost is running the networks' later stages, not a loss on features.

    python benchmarks/overhead.py [--device cuda] [--quick]

Writes benchmarks/results/overhead-<device>.{json,md} and the figure docs/assets/benchmarks/overhead-<device>.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _measure import figure_path, time_once
from torch import nn

import featkd

RESULTS = Path(__file__).parent / "results"


class TinyViT(nn.Module):
    """A plain pre-norm ViT on ready-made patch embeddings: enough to time a training step."""

    def __init__(self, width: int, depth: int, heads: int, tokens: int, classes: int = 1000):
        super().__init__()
        self.patch = nn.Linear(48, width)
        self.pos = nn.Parameter(torch.zeros(1, tokens, width))
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.norm(self.blocks(self.patch(patches) + self.pos))
        return tokens, self.head(tokens[:, 0])


def timed_round_robin(
    fns: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    warmup: int,
    timer: Callable[[Callable[[], None], torch.device], float] = time_once,
) -> dict[str, float]:
    """Median seconds of each function by ``timer`` (the device's time of a call by default),
    the functions interleaved round by round so that a slow spell of a shared machine hits the
    student step and the losses alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def loss_builders(d_s: int, d_t: int) -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """name -> (factory, input kind): 'tokens' (B, N, D), 'pooled' (B, D), 'logits'."""
    projector = lambda: nn.Linear(d_s, d_t)  # noqa: E731 - KD2M needs equal widths
    return {
        "KDLoss": (lambda: featkd.KDLoss(4.0), "logits"),
        "CosPressLoss (tokens)": (
            lambda: featkd.CosPressLoss(student_dim=d_s, teacher_dim=d_t),
            "tokens",
        ),
        "CosPressLoss (pooled)": (
            lambda: featkd.CosPressLoss(student_dim=d_s, teacher_dim=d_t),
            "pooled",
        ),
        "ProteusLoss (tokens)": (
            lambda: featkd.ProteusLoss(student_dim=d_s, teacher_dim=d_t),
            "tokens",
        ),
        "WassersteinLoss (emd)": (
            lambda: featkd.WassersteinLoss("emd", projector=projector()),
            "pooled",
        ),
        "WassersteinLoss (sinkhorn)": (
            lambda: featkd.WassersteinLoss("sinkhorn", projector=projector()),
            "pooled",
        ),
        "WassersteinLoss (sliced)": (
            lambda: featkd.WassersteinLoss("sliced", projector=projector()),
            "pooled",
        ),
        "GaussianWassersteinLoss (full)": (
            lambda: featkd.GaussianWassersteinLoss(projector=projector()),
            "pooled",
        ),
        "GaussianKLLoss (full)": (lambda: featkd.GaussianKLLoss(projector=projector()), "pooled"),
        "MMDLoss (rbf)": (lambda: featkd.MMDLoss(projector=projector()), "pooled"),
        "VkDLoss (tokens, layer_norm)": (
            lambda: featkd.VkDLoss(student_dim=d_s, teacher_dim=d_t, teacher_pool="patch_mean"),
            "tokens",
        ),
        "VkDLoss (pooled, whitening)": (
            lambda: featkd.VkDLoss(student_dim=d_s, teacher_dim=d_t, normalize="whitening"),
            "pooled",
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default 20 CUDA, 9 CPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        batch, depth, tokens, repeats = 256, 12, 197, 20
    else:
        batch, depth, tokens, repeats = 32, 4, 65, 9
    if args.quick:
        batch, depth, repeats = 8, 1, 2
    repeats = args.repeats or repeats
    d_s, d_t, classes = 192, 384, 1000
    torch.manual_seed(0)

    student = TinyViT(d_s, depth, 3, tokens, classes).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    patches = torch.randn(batch, tokens, 48, device=device)
    labels = torch.randint(classes, (batch,), device=device)

    def student_step() -> None:
        _, logits = student(patches)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    inputs = {
        "tokens": (torch.randn(batch, tokens, d_s), torch.randn(batch, tokens, d_t)),
        "pooled": (torch.randn(batch, d_s), torch.randn(batch, d_t)),
        "logits": (torch.randn(batch, classes), torch.randn(batch, classes)),
    }
    class_labels = torch.randint(10, (batch,), device=device)
    steps: dict[str, Callable[[], None]] = {"student step": student_step}
    kinds = {}
    for name, (factory, kind) in loss_builders(d_s, d_t).items():
        loss_fn = factory().to(device)
        s0, t0 = (x.to(device) for x in inputs[kind])
        s = s0.clone().requires_grad_(True)

        def loss_step(loss_fn=loss_fn, s=s, t0=t0) -> None:
            loss_fn(s, t0, labels=class_labels).backward()

        steps[name] = loss_step
        kinds[name] = kind

    medians = timed_round_robin(steps, device, repeats, warmup=2)
    step_seconds = medians.pop("student step")
    print(
        f"student step: {1000 * step_seconds:.1f} ms (batch {batch}, depth {depth}, {tokens} tokens)"
    )
    rows = []
    for name, seconds in medians.items():
        rows.append(
            {
                "loss": name,
                "input": kinds[name],
                "ms": 1000 * seconds,
                "fraction": seconds / step_seconds,
            }
        )
        print(
            f"{name:<36} {1000 * seconds:9.2f} ms  {100 * seconds / step_seconds:6.2f}% of a step"
        )

    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"overhead-{device.type}"
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": batch,
        "depth": depth,
        "tokens": tokens,
        "student_step_ms": 1000 * step_seconds,
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Student step: {meta['student_step_ms']:.1f} ms (ViT width {d_s}, depth {depth}, "
        f"{tokens} tokens, batch {batch}, {device.type}, {meta['threads']} threads).",
        "",
        "| loss | input | loss fwd+bwd (ms) | fraction of a student step |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['loss']} | {r['input']} | {r['ms']:.2f} | {100 * r['fraction']:.2f}% |" for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ax.barh([r["loss"] for r in rows], [100 * r["fraction"] for r in rows], color="#3b75af")
    ax.axvline(5, color="k", ls="--", lw=1, label="5% target (CUDA)")
    ax.set_xlabel("loss forward+backward, % of one student training step")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure_path(stem, publish=True), dpi=120)
    print(f"saved {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
