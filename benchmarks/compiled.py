"""Eager against captured calls for the losses whose GPU time is host-bound: does capturing
the call in CUDA graphs bring them under the budget?

``docs/benchmarks-gpu.md`` infers from the baseline's GPU run that eager calls at these sizes are
bound by the host queuing kernels, so that trimming kernels cannot reach the budget and graph
capture could. This script measures that on the GPU: forward+backward of each case at
``B=256, N=197, D_s=192, D_t=768``, timed round-robin (medians), three ways:

- eager;
- ``torch.compile`` (on CUDA ``mode="reduce-overhead"``: fused kernels in CUDA graphs; elsewhere
  the default mode), with its compile time;
- graphed: featkd's own eager kernels captured as they are, forward and backward, by
  ``torch.cuda.make_graphed_callables`` (CUDA only): what capture alone gives, and a check that
  each case can be captured at all (no host synchronisation, static shapes).

A way that fails for a case is recorded with its error and the other cases go on.

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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

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


class Objective(nn.Module):
    """The scalar one step differentiates (``gpu.step_scalar``), as a module of tensor
    arguments only (what ``torch.cuda.make_graphed_callables`` takes, with the loss's
    parameters as its own): the labels are bound."""

    def __init__(self, fn: nn.Module, kind: str, labels: torch.Tensor) -> None:
        super().__init__()
        self.fn, self.kind, self.labels = fn, kind, labels

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return gpu.step_scalar(self.fn, self.kind, inputs, self.labels)


def _warmed(build: Callable[[], Callable[[], None]], device) -> tuple[Callable | None, dict]:
    """``build()``'s step run three times (compiling, warming up, recording a graph), and its
    seconds; or no step and the error, so that one failing case does not end the run."""
    start = time.perf_counter()
    try:
        step = build()
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # recorded, and the other cases go on
        return None, {"error": f"{type(error).__name__}: {error}"[:300]}
    return step, {"seconds": time.perf_counter() - start}


def steps(name: str, device: torch.device, sizes: tuple[int, int, int, int], mode: str, inputs):
    """The eager step of one case and builders of its compiled and graphed steps, on one module
    and on ``inputs`` (from ``gpu.seeded_inputs``)."""
    factory, kind = gpu.loss_and_head_cases(*sizes[2:])[name]
    torch.manual_seed(0)
    module = factory().to(device)
    raw, labels = inputs

    def compiled() -> Callable[[], None]:
        return gpu.forward_backward(torch.compile(module, mode=mode), kind, raw, labels, device)

    def graphed() -> Callable[[], None]:
        args = gpu.step_inputs(kind, raw, device)
        objective = torch.cuda.make_graphed_callables(
            Objective(module, kind, labels), args, allow_unused_input=True
        )
        return lambda: objective(*args).backward()

    return gpu.forward_backward(module, kind, raw, labels, device), compiled, graphed


def measure(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    sizes = (8, 5, 12, 24) if quick else (256, 197, 192, 768)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    inputs = gpu.seeded_inputs(device, *sizes)
    rows = []
    for name in CASES[:1] if quick else CASES:
        eager, compile_step, graph_step = steps(name, device, sizes, mode, inputs)
        compiled, compiling = _warmed(compile_step, device)
        if device.type == "cuda":
            graphed, graphing = _warmed(graph_step, device)
        else:
            graphed, graphing = None, {"error": "CUDA only"}
        timed = {"eager": eager, "compiled": compiled, "graphed": graphed}
        medians = overhead.timed_round_robin(
            {way: step for way, step in timed.items() if step is not None}, device, repeats, 2
        )
        row = {"name": name, "mode": mode, "compile_s": compiling.get("seconds")}
        row.update({f"{way}_ms": 1000 * medians[way] if way in medians else None for way in timed})
        row.update({f"{way}_error": got["error"] for way, got in (("compiled", compiling),
                    ("graphed", graphing)) if "error" in got})  # fmt: skip
        rows.append(row)
        print(
            f"{name:<36} "
            + "  ".join(f"{way} {_ms(row[way + '_ms'])}" for way in timed)
            + "".join(f"\n    {key}: {row[key]}" for key in row if key.endswith("_error")),
            flush=True,
        )
    return rows


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Eager against captured calls: {meta['device']}",
        "",
        f"torch {meta['torch']}, {meta['date']}; `{meta['command']}`; forward+backward, "
        f"B={meta['batch']}, N={meta['tokens']}, D_s={meta['d_s']}, D_t={meta['d_t']}, "
        "medians of calls taken round-robin. Compiled: `torch.compile` in the mode shown; "
        "graphed: the eager kernels captured by `torch.cuda.make_graphed_callables` (CUDA only).",
        "",
        "| loss or head | eager ms | compiled ms | graphed ms | eager / compiled "
        "| eager / graphed | compile mode | compile s |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    notes = []
    for row in result["rows"]:
        cells = [_number(row.get(f"{way}_ms")) for way in ("eager", "compiled", "graphed")]
        ratios = [_ratio(row["eager_ms"], row.get(f"{way}_ms")) for way in ("compiled", "graphed")]
        lines.append(
            f"| {row['name']} | {' | '.join(cells)} | {' | '.join(ratios)} | {row['mode']} "
            f"| {_number(row.get('compile_s'), '.0f')} |"
        )
        notes += [
            f"- {row['name']}, {way}: {row[way + '_error']}"
            for way in ("compiled", "graphed")
            if row.get(way + "_error") and row[way + "_error"] != "CUDA only"
        ]
    if notes:
        lines += ["", "Failures:", "", *notes]
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(eager: float, other: float | None) -> str:
    return "n/a" if other is None else f"{eager / other:.1f}x"


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
    return result


if __name__ == "__main__":
    main()
