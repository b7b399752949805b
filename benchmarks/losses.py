"""Forward+backward time and peak memory of every KD2M loss, side by side with POT.

For each batch size ``B`` and width ``D`` the script times ``loss = f(student, teacher);
loss.backward()`` (median of a few repeats after a warm-up) and measures the peak memory of one
such call, for every featkd KD2M metric and for POT's equivalents in the same process:
``ot.emd2``, ``ot.sinkhorn2`` (torch backend, log-domain and scaling methods, autodiff through
the iterations as POT does by default), ``ot.solve(..., grad="envelope")`` and
``ot.gaussian.bures_wasserstein_distance``.

Like-for-like entropic OT: the same ``eps`` (``0.05 * mean(C)``; featkd's default is now 0.1) and the same
number of iterations (no early stop: same iterates, same accuracy); the achieved L1 marginal
error of each plan is reported. The tolerance mode (featkd's ``tol=1e-4`` on the L1 row
error, POT's ``stopThr=1e-4`` on the L2 column error) is reported too, with its iterations and
marginal errors.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory in use before the
call; on CPU the rise of the process's peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, with glibc's mmap threshold pinned so freed buffers go back to the
OS), which counts torch, numpy (POT's network simplex) and LAPACK work space alike.

Usage::

    python benchmarks/losses.py            # full run (CPU; CUDA too when present)
    python benchmarks/losses.py --quick    # a small check that everything runs
    python benchmarks/losses.py --threads 1 --device cpu

Writes ``benchmarks/results/losses-<device>.json`` and ``.md``; the figure of a full run goes to
``docs/assets/benchmarks/losses-<device>.png`` (the one committed copy).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _measure import PeakMemory, figure_path

import featkd
from featkd import KD2MLoss, WassersteinLoss

RESULTS = Path(__file__).resolve().parent / "results"
REG_FRACTION = 0.05  # eps = 0.05 * mean cost, for both libraries (featkd's default was 0.05)
SINKHORN_ITERATIONS = 100
TOLERANCE = 1e-4

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ cases


def _uniform(batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), 1.0 / batch, dtype=like.dtype, device=like.device)


def _marginal_error(plan: torch.Tensor) -> float:
    batch = plan.shape[0]
    target = torch.full((batch,), 1.0 / batch, dtype=plan.dtype, device=plan.device)
    rows = (plan.sum(1) - target).abs().sum()
    columns = (plan.sum(0) - target).abs().sum()
    return float(torch.maximum(rows, columns))


class Case:
    """One loss to time: ``build(reg)`` returns ``f(student, teacher) -> scalar``."""

    def __init__(self, name: str, library: str, family: str, build, info=None) -> None:
        self.name, self.library, self.family = name, library, family
        self.build = build
        self.info = info  # optional: (student, teacher, reg) -> dict of accuracy figures


def _featkd(metric: str, **options) -> Callable[[float], LossFn]:
    def build(reg: float) -> LossFn:
        return KD2MLoss(metric, **options)

    return build


def _featkd_sinkhorn_fixed(reg: float) -> LossFn:
    return WassersteinLoss(
        "sinkhorn", reg=reg, relative_reg=False, tol=None, max_iter=SINKHORN_ITERATIONS
    )


def _featkd_sinkhorn_info(student, teacher, reg, fixed: bool) -> dict:
    if fixed:
        loss_fn = _featkd_sinkhorn_fixed(reg)
    else:
        loss_fn = WassersteinLoss("sinkhorn", reg=REG_FRACTION, tol=TOLERANCE)
    with torch.no_grad():
        loss_fn(student, teacher)
    parts = loss_fn.last_parts
    return {
        "iterations": int(parts["iterations"]),
        "marginal_error": float(parts["marginal_error"]),
        "transport": float(parts["transport"]),
    }


def _pot_emd(reg: float) -> LossFn:
    def loss(student, teacher):
        weights = _uniform(student.shape[0], student)
        return ot.emd2(weights, weights, ot.dist(student, teacher), numItermax=10_000_000)

    return loss


def _pot_sinkhorn(method: str, fixed: bool) -> Callable[[float], LossFn]:
    def build(reg: float) -> LossFn:
        def loss(student, teacher):
            weights = _uniform(student.shape[0], student)
            cost = ot.dist(student, teacher)
            if fixed:
                options = {"stopThr": 0.0, "numItermax": SINKHORN_ITERATIONS}
            else:
                options = {"stopThr": TOLERANCE, "numItermax": 1000}
            return ot.sinkhorn2(weights, weights, cost, reg, method=method, **options)

        return loss

    return build


def _pot_sinkhorn_info(method: str, fixed: bool):
    def info(student, teacher, reg) -> dict:
        weights = _uniform(student.shape[0], student)
        cost = ot.dist(student, teacher)
        if fixed:
            options = {"stopThr": 0.0, "numItermax": SINKHORN_ITERATIONS}
        else:
            options = {"stopThr": TOLERANCE, "numItermax": 1000}
        plan, log = ot.sinkhorn(weights, weights, cost, reg, method=method, log=True, **options)
        # POT's log["niter"] is the index of the last iteration
        iterations = SINKHORN_ITERATIONS if fixed else int(log["niter"]) + 1
        return {
            "iterations": iterations,
            "marginal_error": _marginal_error(plan),
            "transport": float((plan * cost).sum()),
        }

    return info


def _pot_solve_envelope(reg: float) -> LossFn:
    def loss(student, teacher):
        weights = _uniform(student.shape[0], student)
        result = ot.solve(
            ot.dist(student, teacher),
            weights,
            weights,
            reg=reg,
            method="sinkhorn_log",
            max_iter=SINKHORN_ITERATIONS,
            tol=0.0,
            grad="envelope",
        )
        return result.value

    return loss


def _pot_bures(reg: float) -> LossFn:
    def loss(student, teacher):
        mean_s, mean_t = student.mean(0), teacher.mean(0)
        centred_s, centred_t = student - mean_s, teacher - mean_t
        cov_s = centred_s.T @ centred_s / student.shape[0]
        cov_t = centred_t.T @ centred_t / teacher.shape[0]
        return ot.gaussian.bures_wasserstein_distance(mean_s, mean_t, cov_s, cov_t) ** 2

    return loss


def cases() -> list[Case]:
    return [
        Case("featkd w2_emd", "featkd", "exact OT", _featkd("w2_emd")),
        Case("POT emd2", "POT", "exact OT", _pot_emd),
        Case(
            f"featkd w2_sinkhorn ({SINKHORN_ITERATIONS} it)",
            "featkd",
            "entropic OT, fixed iterations",
            _featkd_sinkhorn_fixed,
            lambda s, t, reg: _featkd_sinkhorn_info(s, t, reg, fixed=True),
        ),
        Case(
            f"POT sinkhorn2 log ({SINKHORN_ITERATIONS} it)",
            "POT",
            "entropic OT, fixed iterations",
            _pot_sinkhorn("sinkhorn_log", fixed=True),
            _pot_sinkhorn_info("sinkhorn_log", fixed=True),
        ),
        Case(
            f"POT sinkhorn2 scaling ({SINKHORN_ITERATIONS} it)",
            "POT",
            "entropic OT, fixed iterations",
            _pot_sinkhorn("sinkhorn", fixed=True),
            _pot_sinkhorn_info("sinkhorn", fixed=True),
        ),
        Case(
            f"POT solve envelope ({SINKHORN_ITERATIONS} it)",
            "POT",
            "entropic OT, fixed iterations",
            _pot_solve_envelope,
        ),
        Case(
            "featkd w2_sinkhorn (tol)",
            "featkd",
            "entropic OT, tolerance",
            _featkd("w2_sinkhorn", reg=REG_FRACTION, tol=TOLERANCE),
            lambda s, t, reg: _featkd_sinkhorn_info(s, t, reg, fixed=False),
        ),
        Case(
            "POT sinkhorn2 log (tol)",
            "POT",
            "entropic OT, tolerance",
            _pot_sinkhorn("sinkhorn_log", fixed=False),
            _pot_sinkhorn_info("sinkhorn_log", fixed=False),
        ),
        Case(
            "POT sinkhorn2 scaling (tol)",
            "POT",
            "entropic OT, tolerance",
            _pot_sinkhorn("sinkhorn", fixed=False),
            _pot_sinkhorn_info("sinkhorn", fixed=False),
        ),
        Case("featkd w2_sliced", "featkd", "sliced OT", _featkd("w2_sliced", seed=0)),
        Case("featkd w2_gaussian", "featkd", "Gaussian W2", _featkd("w2_gaussian")),
        Case("POT bures_wasserstein_distance", "POT", "Gaussian W2", _pot_bures),
        Case("featkd w2_gaussian_diag", "featkd", "Gaussian W2", _featkd("w2_gaussian_diag")),
        Case("featkd kl_gaussian", "featkd", "Gaussian KL", _featkd("kl_gaussian")),
        Case("featkd kl_gaussian_diag", "featkd", "Gaussian KL", _featkd("kl_gaussian_diag")),
        Case("featkd mmd_rbf", "featkd", "MMD", _featkd("mmd_rbf")),
        Case("featkd mmd_linear", "featkd", "MMD", _featkd("mmd_linear")),
        Case("featkd mmd_poly", "featkd", "MMD", _featkd("mmd_poly")),
    ]


# ------------------------------------------------------------------------------------ running


def features(batch: int, width: int, device: torch.device, dtype=torch.float32, seed: int = 0):
    """Teacher ~ N(0, I); student correlated with it (cosine about 0.8), like a trained pair."""
    generator = torch.Generator().manual_seed(seed + 1000 * batch + width)
    teacher = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    student = 0.8 * teacher + 0.6 * torch.randn(
        batch, width, generator=generator, dtype=torch.float64
    )
    return student.to(device, dtype), teacher.to(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: LossFn, student, teacher, repeats: int, budget_s: float) -> tuple[float, float]:
    """Median seconds of forward+backward (after one warm-up call), and the loss value."""

    def once() -> tuple[float, float]:
        x = student.clone().requires_grad_()
        _sync(student.device)
        start = time.perf_counter()
        loss = fn(x, teacher)
        loss.backward()
        _sync(student.device)
        return time.perf_counter() - start, float(loss.detach())

    _, value = once()
    times: list[float] = []
    while len(times) < repeats:
        elapsed, _ = once()
        times.append(elapsed)
        if sum(times) > budget_s:
            break
    return statistics.median(times), value


def gaussian_agreement(batch: int, width: int, device: torch.device) -> dict[str, float]:
    """featkd's squared Bures distance and POT's (squared) on the same data: their relative
    difference in float64, and each one's float32 error against POT's float64 value."""
    values = {}
    for dtype, label in ((torch.float64, "float64"), (torch.float32, "float32")):
        s, t = features(batch, width, device, dtype)
        values[f"featkd_{label}"] = float(KD2MLoss("w2_gaussian")(s, t))
        values[f"pot_{label}"] = float(_pot_bures(0.0)(s, t))
    reference = values["pot_float64"]
    return {
        **values,
        "relative_difference_float64": abs(values["featkd_float64"] - reference) / reference,
        "featkd_float32_error": abs(values["featkd_float32"] - reference) / reference,
        "pot_float32_error": abs(values["pot_float32"] - reference) / reference,
    }


def run(device: torch.device, sizes, repeats: int, budget_s: float, only: str | None) -> dict:
    memory = PeakMemory(device)
    rows: list[dict] = []
    agreements: list[dict] = []
    all_cases = [c for c in cases() if only is None or only in c.name]
    for batch, width in sizes:
        student, teacher = features(batch, width, device)
        reg = REG_FRACTION * float(ot.dist(student, teacher).mean())
        for case in all_cases:
            fn = case.build(reg)
            seconds, value = time_call(fn, student, teacher, repeats, budget_s)

            def one_call(fn=fn, student=student, teacher=teacher):
                x = student.clone().requires_grad_()
                fn(x, teacher).backward()

            peak = memory.measure(one_call)
            row = {
                "B": batch,
                "D": width,
                "case": case.name,
                "library": case.library,
                "family": case.family,
                "time_ms": 1000 * seconds,
                "peak_mib": peak,
                "value": value,
            }
            if case.info is not None:
                row.update(case.info(student, teacher, reg))
            rows.append(row)
            print(
                f"B={batch:5d} D={width:5d} {case.name:38s} {1000 * seconds:10.2f} ms "
                f"{'' if peak is None else f'{peak:9.1f} MiB'}  value={value:.6g}",
                flush=True,
            )
        agreement = {"B": batch, "D": width, **gaussian_agreement(batch, width, device)}
        agreements.append(agreement)
        print(f"    Gaussian W2 agreement: {agreement}", flush=True)
    return {"rows": rows, "gaussian_agreement": agreements, "memory_method": memory.method}


# ------------------------------------------------------------------------------------ reports


def _time(rows, batch, width, name):
    for row in rows:
        if row["B"] == batch and row["D"] == width and row["case"] == name:
            return row
    return None


def summary(result: dict) -> list[dict]:
    """The targets: Gaussian W2 vs POT's Bures; entropic OT vs ot.sinkhorn2 (torch)."""
    rows = result["rows"]
    out = []
    for agreement in result["gaussian_agreement"]:
        batch, width = agreement["B"], agreement["D"]
        ours = _time(rows, batch, width, "featkd w2_gaussian")
        pot = _time(rows, batch, width, "POT bures_wasserstein_distance")
        fixed = _time(rows, batch, width, f"featkd w2_sinkhorn ({SINKHORN_ITERATIONS} it)")
        entry = {
            "B": batch,
            "D": width,
            "gaussian_speedup": pot["time_ms"] / ours["time_ms"],
            "gaussian_relative_difference_float64": agreement["relative_difference_float64"],
            "gaussian_featkd_float32_error": agreement["featkd_float32_error"],
            "gaussian_pot_float32_error": agreement["pot_float32_error"],
        }
        for method in ("log", "scaling"):
            pot_fixed = _time(
                rows, batch, width, f"POT sinkhorn2 {method} ({SINKHORN_ITERATIONS} it)"
            )
            entry[f"sinkhorn_speedup_vs_{method}"] = pot_fixed["time_ms"] / fixed["time_ms"]
        envelope = _time(rows, batch, width, f"POT solve envelope ({SINKHORN_ITERATIONS} it)")
        entry["sinkhorn_speedup_vs_solve_envelope"] = envelope["time_ms"] / fixed["time_ms"]
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"## KD2M losses: forward+backward time and peak memory ({meta['device']})",
        "",
        f"torch {meta['torch']}, POT {meta['pot']}, featkd {meta['featkd']}, "
        f"{meta['threads']} thread(s), {meta['machine']}; float32 features, student correlated "
        f"with the teacher; median of up to {meta['repeats']} calls after a warm-up. Peak memory: "
        f"{result['memory_method']}. Entropic OT: eps = {REG_FRACTION} x mean cost for every "
        f"solver; fixed-iteration rows run {SINKHORN_ITERATIONS} iterations (same iterates, same "
        f"accuracy); tolerance rows stop at {TOLERANCE} (featkd: L1 row-marginal error; POT: L2 "
        "column-marginal error).",
        "",
        "### Targets",
        "",
        "| B | D | Gaussian W2 speed-up vs POT | featkd vs POT, float64 | float32 error featkd "
        "| float32 error POT | entropic speed-up vs sinkhorn2 log | vs sinkhorn2 scaling "
        "| vs ot.solve envelope |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['B']} | {s['D']} | {s['gaussian_speedup']:.1f}x | "
            f"{s['gaussian_relative_difference_float64']:.1e} | "
            f"{s['gaussian_featkd_float32_error']:.1e} | {s['gaussian_pot_float32_error']:.1e} | "
            f"{s['sinkhorn_speedup_vs_log']:.1f}x | {s['sinkhorn_speedup_vs_scaling']:.1f}x | "
            f"{s['sinkhorn_speedup_vs_solve_envelope']:.1f}x |"
        )
    sizes = sorted({(r["B"], r["D"]) for r in result["rows"]})
    for batch, width in sizes:
        lines += [
            "",
            f"### B = {batch}, D = {width}",
            "",
            "| loss | time (ms) | peak memory (MiB) | value | <gamma, C> | iterations "
            "| marginal error |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["rows"]:
            if (r["B"], r["D"]) != (batch, width):
                continue
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            iterations = r.get("iterations", "")
            error = f"{r['marginal_error']:.1e}" if "marginal_error" in r else ""
            transport = f"{r['transport']:.6g}" if "transport" in r else ""
            lines.append(
                f"| {r['case']} | {r['time_ms']:.2f} | {peak} | {r['value']:.6g} | {transport} | "
                f"{iterations} | {error} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Top row: the losses POT also computes (featkd solid, POT dashed, one colour per pair);
    bottom row: the other featkd losses. One column per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    widths = sorted({r["D"] for r in rows})
    compared = {
        "exact OT": ("featkd w2_emd", ["POT emd2"]),
        "entropic OT": (
            f"featkd w2_sinkhorn ({SINKHORN_ITERATIONS} it)",
            [
                f"POT sinkhorn2 log ({SINKHORN_ITERATIONS} it)",
                f"POT sinkhorn2 scaling ({SINKHORN_ITERATIONS} it)",
                f"POT solve envelope ({SINKHORN_ITERATIONS} it)",
            ],
        ),
        "Gaussian W2": ("featkd w2_gaussian", ["POT bures_wasserstein_distance"]),
    }
    others = [
        c.name
        for c in cases()
        if c.library == "featkd"
        and c.name not in {v[0] for v in compared.values()}
        and "(tol)" not in c.name
    ]
    fig, axes = plt.subplots(2, len(widths), figsize=(6.5 * len(widths), 10), squeeze=False)
    colours = plt.get_cmap("tab10")
    markers = ["o", "s", "^", "v"]

    def line(axis, width, name, **style):
        points = sorted(
            (r["B"], r["time_ms"]) for r in rows if r["D"] == width and r["case"] == name
        )
        if points:
            axis.plot(*zip(*points, strict=True), label=name, **style)

    for column, width in enumerate(widths):
        top, bottom = axes[0][column], axes[1][column]
        for k, (ours, theirs) in enumerate(compared.values()):
            line(top, width, ours, color=colours(k), marker="o", linestyle="-", linewidth=2)
            for m, name in enumerate(theirs):
                line(top, width, name, color=colours(k), marker=markers[m + 1], linestyle="--")
        for k, name in enumerate(others):
            line(bottom, width, name, color=colours(k + 3), marker="o")
        top.set_title(f"featkd (solid) vs POT (dashed), D = {width}, {result['meta']['device']}")
        bottom.set_title(f"other featkd KD2M losses, D = {width}")
        for axis in (top, bottom):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("batch size B")
            axis.set_ylabel("forward + backward (ms)")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size, one repeat")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sizes", default=None, help="e.g. 256x1024,1024x384 (a partial run)")
    parser.add_argument("--only", default=None, help="only the cases whose name contains this")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*did not converge.*")
    warnings.filterwarnings("ignore", message=".*numItermax reached.*")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [args.device]
    sizes = [(128, 384)] if args.quick else [(b, d) for d in (384, 1024) for b in (128, 256, 1024)]
    partial = args.quick or args.sizes is not None or args.only is not None
    if args.sizes is not None:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    repeats, budget = (1, 1.0) if args.quick else (5, 4.0)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in devices:
        device = torch.device(name)
        start = time.perf_counter()
        result = run(device, sizes, repeats, budget, args.only)
        result["meta"] = {
            "device": name if name == "cpu" else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "pot": ot.__version__,
            "featkd": featkd.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
            "repeats": repeats,
            "quick": args.quick,
            "wall_s": time.perf_counter() - start,
            "sinkhorn_iterations": SINKHORN_ITERATIONS,
            "tolerance": TOLERANCE,
            "reg_fraction": REG_FRACTION,
        }
        result["summary"] = summary(result) if args.only is None else []
        stem = args.out / f"losses-{name}{'-partial' if partial else ''}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))
        plot(result, figure_path(stem, not partial))  # the docs show the latest full run
        print(f"wrote {stem}.json/.md/.png in {result['meta']['wall_s']:.0f} s")
        for entry in result["summary"]:
            print(
                {
                    k: (round(v, 3) if isinstance(v, float) and not math.isnan(v) else v)
                    for k, v in entry.items()
                }
            )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
