"""Kernel launches per forward+backward of every loss and head, counted on the CPU.

On a GPU a loss at these sizes is latency-bound: its time is roughly its number of kernel
launches times a few microseconds, whatever the arithmetic. Each aten operation that is not a
view launches (at least) one kernel, so counting them on the CPU, on the accelerator path
(``featkd._sync.simulate_accelerator``), gives a machine-independent measure of that latency
that CI can run without a GPU. ``--src`` counts another checkout's featkd with the same cases,
so two versions can be compared side by side (cases it cannot build are left blank).

    python benchmarks/launches.py                              # this checkout
    python benchmarks/launches.py --src /tmp/base/src --label base --out /tmp/base-launches
    python benchmarks/launches.py --render benchmarks/results/launches-cpu.json \\
        --baseline /tmp/base-launches/launches-base.json      # the two side by side
    python benchmarks/launches.py --render benchmarks/results/launches-cpu.json \\
        --baseline benchmarks/results/launches-base-6cda0fe.json \\
        --calibrate benchmarks/results/gpu-nvidia-h200.json    # + host-calibration.md

Sizes are those of ``benchmarks/gpu.py`` (B=256, N=197, D_s=192, D_t=768); ``--quick`` uses
tiny ones. Beside the counts, the **host time** of each case: one forward+backward at tiny sizes
(B=16, N=4, D_s=8, D_t=16) on one thread, the fastest of 60 calls taken round-robin, where the
arithmetic is negligible and what remains is what the CPU spends queuing the work (Python,
dispatch, autograd). Launches do not show Python-side costs such as a check that builds
tensors; this does. It is this machine's CPU, not a GPU host's, and a data-dependent loop
(Sinkhorn to tolerance) may run a different number of steps at tiny sizes. Writes
``launches-<label>.{json,md}`` (default label ``cpu``, into ``benchmarks/results``). Fused Triton kernels do not run on CPU: CosPress is counted on its
torch path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).parent / "results"
# operations that launch no kernel although torch does not mark them as views: allocations,
# metadata changes in place, Python scalars wrapped as host tensors (``where(c, x, 0.0)``), and
# dtype arithmetic (``promote_types`` returns a dtype)
NO_KERNEL = {
    "aten._unsafe_view", "aten.scalar_tensor", "aten.lift_fresh",
    "aten.empty", "aten.empty_like", "aten.new_empty", "aten.empty_strided",
    "aten.new_empty_strided", "aten.squeeze_", "aten.unsqueeze_", "aten.t_", "aten.transpose_",
    "aten.as_strided_", "aten.promote_types",
}  # fmt: skip


class CountLaunches(TorchDispatchMode):
    """Counts the aten operations that launch a kernel: not views, not in ``NO_KERNEL``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if func.namespace == "aten" and not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def accelerator_path():
    """featkd's accelerator path on CPU tensors, where this featkd has one."""
    try:
        return importlib.import_module("featkd._sync").simulate_accelerator()
    except (ImportError, AttributeError):  # older featkd: one path for every device
        return contextlib.nullcontext()


def count(step) -> Counter[str]:
    with accelerator_path():
        step()  # a first call: lazy buffers, warnings, kept constants
        with CountLaunches() as mode:
            step()
    return mode.ops


HOST_SIZES = (16, 4, 8, 16)  # B, N, D_s, D_t: the arithmetic is negligible


def host_times(steps: dict[str, Callable[[], None] | None], rounds: int = 60) -> dict:
    """name -> the fastest of ``rounds`` calls of each step, in microseconds, on one thread,
    on the accelerator path; the cases take turns, so a burst of load on a shared machine
    slows them all alike."""
    live = {name: step for name, step in steps.items() if step is not None}
    best = dict.fromkeys(live, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with accelerator_path():
            for step in live.values():
                step()  # lazy buffers, warnings, kept constants
            for _ in range(rounds):
                for name, step in live.items():
                    start = time.perf_counter()
                    step()
                    best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: round(1e6 * best[name], 1) if name in live else None for name in steps}


def cases(batch: int, tokens: int, d_s: int, d_t: int):
    """name -> step (None for a case this featkd cannot build), gpu.py's losses and heads."""
    import gpu

    built = gpu.loss_and_head_steps(torch.device("cpu"), batch, tokens, d_s, d_t, missing_ok=True)
    return {name: step for name, (step, _) in built.items()}


def source_commit(path: Path) -> str:
    """The git commit of the checkout the package file ``path`` lies in, and whether the
    package has uncommitted changes."""
    git = ["git", "-C", str(path.parent)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "an installed featkd"
    return commit.stdout.strip() + (" with changes" if dirty.stdout.strip() else "")


def markdown(result: dict, baseline: dict | None = None) -> str:
    """The table of ``result``, with a column for ``baseline`` (another run's result) if given."""
    meta = result["meta"]
    lines = [
        f"# Kernel launches per forward+backward ({meta['label']})",
        "",
        f"featkd at `{meta['src']}`, torch {meta['torch']}, {meta['date']}; B={meta['batch']}, "
        f"N={meta['tokens']}, D_s={meta['d_s']}, D_t={meta['d_t']}; aten operations that launch "
        "a kernel, on the accelerator path, counted on the CPU (`python benchmarks/launches.py`).",
    ]
    host = result.get("host_us")  # absent from runs made before it was measured
    if host is not None:
        batch, tokens, d_s, d_t = HOST_SIZES
        lines.append(
            f"The host column is the fastest of {meta.get('host_rounds', 60)} calls at "
            f"B={batch}, N={tokens}, D_s={d_s}, D_t={d_t} on one CPU thread, in microseconds: "
            "what queuing the work costs, the arithmetic aside. At those sizes a case may launch "
            "another number of kernels (CosPress chunks differently, Sinkhorn runs its own "
            "number of iterations)."
        )
    columns = ["loss or head", "launches"]
    if baseline is not None:
        base = baseline["meta"]
        lines.append(
            f"The baseline column is featkd at `{base['src']}` ({base['label']}), same cases and "
            "sizes."
        )
        columns.append(base["label"])
    base_host = None if baseline is None else baseline.get("host_us")
    if host is not None:
        columns.append("host µs")
        if base_host is not None:
            columns.append(f"{baseline['meta']['label']} host µs")
    lines += ["", "| " + " | ".join([*columns, "most frequent"]) + " |"]
    lines.append("|---|" + "---:|" * (len(columns) - 1) + "---|")
    for name, ops in result["launches"].items():
        cells = [name, "n/a" if ops is None else str(sum(ops.values()))]
        if baseline is not None:
            old = baseline["launches"].get(name)
            cells.append("n/a" if old is None else str(sum(old.values())))
        if host is not None:
            cells.append("n/a" if host.get(name) is None else f"{host[name]:.0f}")
            if base_host is not None:
                old_us = base_host.get(name)
                cells.append("n/a" if old_us is None else f"{old_us:.0f}")
        top = "" if ops is None else ", ".join(f"{op} {n}" for op, n in Counter(ops).most_common(3))
        lines.append("| " + " | ".join([*cells, top]) + " |")
    return "\n".join(lines) + "\n"


def calibration(gpu: dict, baseline: dict, result: dict) -> str:
    """How the baseline's GPU times (``gpu``, a ``benchmarks/gpu.py`` result of the baseline's
    code) compare with its host times here (``baseline``), and this code's host times
    (``result``) beside them: a markdown table. The ratio is what this machine's host time
    must be multiplied by to give that GPU's time, for code of that shape; it is not a
    prediction of this code's GPU time."""
    base_host, host = baseline.get("host_us") or {}, result.get("host_us") or {}
    lines = [
        f"# Host time here against the GPU time of featkd at `{baseline['meta']['src']}`",
        "",
        f"GPU: {gpu['meta'].get('device', '?')} (`benchmarks/gpu.py`, eager forward+backward at "
        f"B={baseline['meta']['batch']}, N={baseline['meta']['tokens']}, "
        f"D_s={baseline['meta']['d_s']}, D_t={baseline['meta']['d_t']}). Host: the fastest of "
        "the calls at tiny sizes on one thread of this machine's CPU (`benchmarks/launches.py`).",
        "",
        f"| loss or head | GPU ms ({baseline['meta']['label']}) | GPU syncs | host µs "
        f"({baseline['meta']['label']}) | GPU / host | host µs ({result['meta']['label']}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in gpu["losses"]:
        name, old_us = row["name"], base_host.get(row["name"])
        if old_us is None:
            continue
        ratio = 1000 * row["ms"] / old_us
        now = host.get(name)
        lines.append(
            f"| {name} | {row['ms']:.2f} | {row['syncs']} | {old_us:.0f} | {ratio:.1f} | "
            + ("n/a" if now is None else f"{now:.0f}")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="a checkout's src/ to import featkd from")
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline", type=Path, help="another run's JSON, shown beside")
    parser.add_argument("--render", type=Path, help="rewrite this JSON's markdown, run nothing")
    parser.add_argument(
        "--calibrate",
        type=Path,
        help="with --render and --baseline: a gpu.py JSON of the baseline's code; writes "
        "host-calibration.md beside the rendered JSON",
    )
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if args.render:
        result = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(result, baseline))
        if args.calibrate and baseline is not None:
            table = calibration(json.loads(args.calibrate.read_text()), baseline, result)
            (args.render.parent / "host-calibration.md").write_text(table)
        return result
    if args.src:
        sys.path.insert(0, str(args.src.resolve()))
    sys.path.insert(0, str(Path(__file__).parent))  # gpu.py and its siblings
    import featkd

    torch.manual_seed(0)
    sizes = (8, 5, 12, 24) if args.quick else (256, 197, 192, 768)
    result = {"launches": {}}
    for name, step in cases(*sizes).items():
        try:
            result["launches"][name] = None if step is None else dict(count(step))
        except AttributeError:  # a function this featkd lacks (set_fused_kernels)
            result["launches"][name] = None
        ops = result["launches"][name]
        total = "n/a" if ops is None else sum(ops.values())
        print(f"{name:<45} {total}", flush=True)
    with warnings.catch_warnings():  # the cases never step an optimiser: FrozenParametersWarning
        warnings.simplefilter("ignore")
        rounds = 5 if args.quick else 60
        # the cases counted above (an older featkd may lack a function one of them calls)
        counted = {name for name, ops in result["launches"].items() if ops is not None}
        small = {
            name: step if name in counted else None for name, step in cases(*HOST_SIZES).items()
        }
        result["host_us"] = host_times(small, rounds)
    result["meta"] = {
        "label": args.label,
        "src": source_commit(Path(featkd.__file__)),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "host_rounds": rounds,
        **dict(zip(("batch", "tokens", "d_s", "d_t"), sizes, strict=True)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"launches-{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result, baseline))
    print(f"saved {stem}.json/.md")
    return result


if __name__ == "__main__":
    main()
