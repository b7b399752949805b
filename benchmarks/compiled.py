"""Eager against ``torch.compile`` for the losses whose GPU time is host-bound: does capturing
the call (CUDA graphs, ``mode="reduce-overhead"``) bring them under the budget?

``docs/benchmarks-gpu.md`` infers from the baseline's GPU run that eager calls at these sizes are
bound by the host queuing kernels, so that trimming kernels cannot reach the budget and graph
capture could. This script measures that on the GPU: forward+backward of each case at
``B=256, N=197, D_s=192, D_t=768``, eager and compiled, timed round-robin (medians), with the
compile time. On CUDA the compiled mode is ``reduce-overhead``; elsewhere (``--quick`` on the
CPU, a smoke run) the default mode.

    python benchmarks/compiled.py                 # CUDA: a few minutes, mostly compiling
    python benchmarks/compiled.py --quick         # tiny sizes, KD only, on the CPU

Writes ``benchmarks/results/compiled-<device>.{json,md}``. ``benchmarks/gpu_checks.sh`` runs it
after ``gpu.py`` when ``COMPILED=1``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import gpu
import overhead
from _measure import device_label, save_results

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (
    "KDLoss",
    "MMDLoss (rbf)",
    "GaussianWassersteinLoss (full)",
    "VkDLoss (tokens, layer_norm)",
    "OrthogonalProjector (matrix_exp)",
)


def steps(name: str, device: torch.device, sizes: tuple[int, int, int, int], mode: str, inputs):
    """``(eager step, compiled step)`` of one case, on the same module and on ``inputs`` (from
    ``gpu.seeded_inputs``)."""
    factory, kind = gpu.loss_and_head_cases(*sizes[2:])[name]
    torch.manual_seed(0)
    module = factory().to(device)
    compiled = torch.compile(module, mode=mode)
    return tuple(gpu.forward_backward(fn, kind, *inputs, device) for fn in (module, compiled))


def measure(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    sizes = (8, 5, 12, 24) if quick else (256, 197, 192, 768)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    inputs = gpu.seeded_inputs(device, *sizes)
    rows = []
    for name in CASES[:1] if quick else CASES:
        eager, compiled = steps(name, device, sizes, mode, inputs)
        start = time.perf_counter()
        for _ in range(3):  # compiling, then the CUDA graph's warm-up and recording
            compiled()
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        medians = overhead.timed_round_robin(
            {"eager": eager, "compiled": compiled}, device, repeats, warmup=2
        )
        row = {
            "name": name,
            "mode": mode,
            "eager_ms": 1000 * medians["eager"],
            "compiled_ms": 1000 * medians["compiled"],
            "compile_s": compile_s,
        }
        rows.append(row)
        print(
            f"{name:<36} eager {row['eager_ms']:7.2f} ms  compiled {row['compiled_ms']:7.2f} ms "
            f"(compiling {compile_s:.0f} s)",
            flush=True,
        )
    return rows


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Eager against torch.compile: {meta['device']}",
        "",
        f"torch {meta['torch']}, {meta['date']}; `{meta['command']}`; forward+backward, "
        f"B={meta['batch']}, N={meta['tokens']}, D_s={meta['d_s']}, D_t={meta['d_t']}.",
        "",
        "| loss or head | eager ms | compiled ms | eager / compiled | compile mode | compile s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in result["rows"]:
        ratio = row["eager_ms"] / row["compiled_ms"]
        lines.append(
            f"| {row['name']} | {row['eager_ms']:.2f} | {row['compiled_ms']:.2f} | {ratio:.1f}x "
            f"| {row['mode']} | {row['compile_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, KD only: a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 15)
    with warnings.catch_warnings():  # never stepped: FrozenParametersWarning
        warnings.simplefilter("ignore")
        rows = measure(device, args.quick, repeats)
    name, slug = device_label(device, args.quick)
    batch, tokens, d_s, d_t = (8, 5, 12, 24) if args.quick else (256, 197, 192, 768)
    result = {
        "rows": rows,
        "meta": {
            "device": name,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/compiled.py" + (" --quick" if args.quick else ""),
            "batch": batch,
            "tokens": tokens,
            "d_s": d_s,
            "d_t": d_t,
        },
    }
    stem = args.out / f"compiled-{slug}"
    save_results(stem, result, markdown(result))
    print(f"saved {stem}.json/.md")
    return result


if __name__ == "__main__":
    main()
