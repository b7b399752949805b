"""Forward+backward time and peak memory of orthogonal projections: featkd against torch.

For each shape ``(d_s, d_t)`` and generator norm the script times one training step of a
projection, ``y = x P^T`` with ``x`` of shape ``(256, d_s)`` (requiring grad, as student
features do), ``loss = mean((y - target)^2)``, ``loss.backward()``, for:

- ``featkd matrix_exp``, ``featkd cayley``, ``featkd householder``:
  :class:`featkd.OrthogonalProjector` with that ``map``;
- ``torch matrix_exp``, ``torch cayley``, ``torch householder``:
  ``torch.nn.utils.parametrizations.orthogonal`` on ``nn.Linear(d_s, d_t, bias=False)`` with
  that ``orthogonal_map`` (default ``use_trivialization=True``);
- ``dense cayley solve``: a plain baseline, ``P = solve(I - A/2, (I + A/2)[:, :d_s])`` with
  ``A = W - W^T`` from a free dense ``d_t x d_t`` parameter ``W``.

Generators: one random ``(d_t, d_s)`` tensor ``G`` per shape and norm is given to the six
parametrised methods. featkd and torch build the same skew-symmetric
``A = [[L - L^T, -B^T], [B, 0]]`` from it (``L`` the strictly lower triangle of the top
``d_s x d_s`` block, ``B`` the other rows), so their ``P`` are the same matrix. ``G`` is scaled
so that ``||A||_F = theta * sqrt(r)``, ``r = min(2 d_s, d_t)`` the rank of ``A``: ``theta`` is
the root-mean-square magnitude of ``A``'s non-zero eigenvalues (its rotation angles, in
radians). The norms are ``small`` (``theta = 0.1``), ``medium`` (1, about featkd's
``init="random"``) and ``large`` (10). torch's trivialization ``base`` (a random orthogonal
``d_t x d_t`` matrix drawn at registration) is set to the identity so that torch's ``P`` equals
featkd's; torch still computes the product ``base @ Q``, so its cost is unchanged. The
Householder maps read the strictly lower triangle of the same ``G`` (Frobenius norm
``||A||_F / sqrt 2``; torch's diagonal signs are set to -1, which makes both maps produce the
same ``P``); their cost does not depend on the values. The dense baseline's ``A`` is a random
dense skew matrix scaled to the same ``||A||_F``; a solve's cost does not depend on it either.

Timing: one warm-up call per method, then the methods run round-robin (the starting method
rotating each round) and each reports the median of its calls, so a slow spell of a shared
machine hits every method alike. Up to ``--repeats`` (7) calls each, fewer for a method slower
than ``Settings.budget_s / repeats`` per call (at least ``Settings.min_repeats``, 3); a method
whose warm-up call takes longer than ``Settings.slow_s`` (5 s) gets a single timed call. A
method whose call takes longer than ``--time-cap`` seconds (10 s) is not run again at that
shape, nor at a later shape at least as large in both widths: those rows are recorded as
skipped, with the reason (``Settings.always``, by default torch's matrix_exp, which the
targets are measured against, is exempt).

Peak memory is measured on each method's warm-up call. On CUDA:
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call (CUDA events
time the calls). On CPU: the rise of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) during the call, with glibc's mmap threshold pinned at 64 KiB for
that call so that buffers go back to the system when freed (as ``benchmarks/losses.py`` does);
it counts every allocation (torch, MKL/LAPACK work space), not only torch tensors. The timed
calls run with the thresholds set to 32 MiB (mmap) and 64 MiB (trim), glibc's dynamic
maxima, because a pinned threshold faults every buffer in afresh and slows small calls by up to
60%. A method whose warm-up call exceeded the time cap keeps that call as its only timing
(marked ``*`` in the tables): it ran pinned, which slows allocation-heavy calls.

Accuracy: ``max |P^T P - I|`` (computed in float64 from each method's float32 ``P``) and the
largest difference between featkd's ``P`` and torch's for the same map.

Usage::

    python benchmarks/orthogonal.py                   # full run on CPU (2 threads), CUDA too
    python benchmarks/orthogonal.py --quick           # one small shape, to check that it runs
    python benchmarks/orthogonal.py --device cuda
    python benchmarks/orthogonal.py --shapes 192x3024 --norms medium --methods cayley
    python benchmarks/orthogonal.py --threads 1 --tag=-1thread
    python benchmarks/orthogonal.py --replot          # markdown and PNG again from the JSON

Writes ``benchmarks/results/orthogonal-<device><tag>.json`` and ``.md`` (with ``-partial`` in
the name for a ``--quick`` or filtered run); a full run's figure goes to
``docs/assets/benchmarks/orthogonal-<device><tag>.png`` (the one committed copy), any other
run's beside its JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _measure import PeakMemory, figure_path, time_once

import featkd
from featkd import OrthogonalProjector, orthogonality_error

RESULTS = Path(__file__).resolve().parent / "results"

BATCH = 256
SHAPES = ((384, 768), (384, 1024), (384, 1536), (192, 3024), (384, 3024), (768, 768))
NORMS = {"small": 0.1, "medium": 1.0, "large": 10.0}  # theta: rms rotation angle of A
METHODS = (
    "featkd matrix_exp",
    "featkd cayley",
    "featkd householder",
    "torch matrix_exp",
    "torch cayley",
    "torch householder",
    "dense cayley solve",
)
FEATKD = "featkd matrix_exp"

# ------------------------------------------------------------------------------------ cases


def skew_frobenius(generator: torch.Tensor) -> torch.Tensor:
    """``||A||_F`` of the skew ``A`` that featkd and torch build from an ``(n, k)`` generator:
    twice the squares of its strictly lower triangle (the diagonal cancels in ``X - X^T``)."""
    return (2.0 * generator.tril(-1).square().sum()).sqrt()


def generators(d_s: int, d_t: int, theta: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``(d_t, d_s)`` generator and the dense baseline's ``(d_t, d_t)`` one, both
    scaled so that their skew matrices have ``||A||_F = theta * sqrt(min(2 d_s, d_t))``."""
    rng = torch.Generator().manual_seed(seed)
    target = theta * math.sqrt(min(2 * d_s, d_t))
    shared = torch.randn(d_t, d_s, generator=rng, dtype=torch.float64)
    shared = shared * (target / skew_frobenius(shared))
    dense = torch.randn(d_t, d_t, generator=rng, dtype=torch.float64)
    dense = dense * (target / (dense - dense.T).norm())
    return shared.float(), dense.float()


class DenseCayley(nn.Module):
    """The plain baseline: ``P = (I - A/2)^{-1} (I + A/2) E_k`` by a dense ``n x n`` solve,
    ``A = W - W^T`` from a free ``n x n`` parameter ``W``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.free = nn.Parameter(torch.zeros(out_features, out_features))

    def compute_weight(self) -> torch.Tensor:
        skew = self.free - self.free.T
        eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
        rhs = (eye + 0.5 * skew)[:, : self.in_features]
        return torch.linalg.solve(eye - 0.5 * skew, rhs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.compute_weight())


class Case:
    """One method at one shape and norm: ``step()`` is the timed forward+backward."""

    def __init__(self, name: str, module: nn.Module, x: torch.Tensor, target: torch.Tensor):
        self.name = name
        self.module = module
        self.x = x
        self.target = target
        self.params = list(module.parameters())
        self.torch_parametrized = name.startswith("torch")
        self.captured: torch.Tensor | None = None

    def step(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None
        loss = (self.module(self.x) - self.target).square().mean()
        loss.backward()

    def step_capturing_weight(self) -> None:
        """A step that also keeps ``P`` (torch's parametrisation is cached for the call, so
        ``P`` is the one the step used, not a second evaluation of its map)."""
        if not self.torch_parametrized:
            self.step()
            return
        with parametrize.cached():
            self.step()
            self.captured = self.module.weight.detach()

    def weight(self) -> torch.Tensor:
        """``P`` ``(d_t, d_s)``, float32, detached."""
        if self.captured is not None:
            return self.captured
        with torch.no_grad():
            if isinstance(self.module, DenseCayley):
                return self.module.compute_weight()
            return self.module.weight.detach()


def build_cases(
    d_s: int, d_t: int, theta: float, device: torch.device, names: list[str], seed: int
) -> list[Case]:
    """Every method in ``names`` set to the same generator (see the module docstring)."""
    gc.collect()  # the previous cases' buffers, before any memory is measured
    shared, dense = generators(d_s, d_t, theta, seed)
    rng = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, d_s, generator=rng).to(device).requires_grad_()
    target = torch.randn(BATCH, d_t, generator=rng).to(device)
    cases = []
    for name in names:
        library, kind = name.split(" ", 1)
        if library == "featkd":
            module = OrthogonalProjector(d_s, d_t, map=kind)
            with torch.no_grad():
                module.generator.copy_(shared)
        elif library == "torch":
            module = nn.Linear(d_s, d_t, bias=False)
            orthogonal(module, orthogonal_map=kind)
            with torch.no_grad():
                original = shared.clone()
                if kind == "householder":
                    original.diagonal().fill_(-1.0)  # the reflections' signs, as registered
                module.parametrizations.weight.original.copy_(original)
                module.parametrizations.weight[0].base.copy_(torch.eye(d_t))
        else:
            module = DenseCayley(d_s, d_t)
            with torch.no_grad():
                module.free.copy_(dense)
        cases.append(Case(name, module.to(device), x, target))
    return cases


@contextlib.contextmanager
def count_squarings() -> Iterator[list]:
    """Record the squarings featkd's scaling and squaring chose (a diagnostic only; reads a
    private function of ``featkd.vkd._expm`` and records nothing if it has moved)."""
    from featkd.vkd import _expm

    found: list = []
    original = getattr(_expm, "expm_columns", None)
    if original is None:
        yield found
        return

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        found.append(result[1])
        return result

    _expm.expm_columns = recording
    try:
        yield found
    finally:
        _expm.expm_columns = original


# ------------------------------------------------------------------------------------ timing


@dataclass
class Settings:
    repeats: int = 7
    min_repeats: int = 3
    budget_s: float = 8.0  # per method, shape and norm, for the timed calls
    slow_s: float = 5.0  # a warm-up call slower than this: a single timed call
    time_cap_s: float = 10.0  # a call slower than this: the method is skipped at later norms
    always: tuple[str, ...] = ("torch matrix_exp",)  # exempt from the time cap
    seed: int = 0


def parallel_overhead_ms(repeats: int = 20) -> float:
    """Median time of a tiny elementwise op on this process's threads: about 0.1 ms on idle
    cores, several ms when other processes keep the cores busy and the parallel region waits
    for a descheduled thread. Recorded to judge a CPU run's noise."""
    a = torch.empty(1536, 384)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.fill_(1.0)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure_shape_norm(
    d_s: int,
    d_t: int,
    norm: str,
    names: list[str],
    device: torch.device,
    memory: PeakMemory,
    settings: Settings,
) -> list[dict]:
    """Rows for every method in ``names`` at one shape and norm (warm-up with memory, then
    round-robin timing, then accuracy)."""
    theta = NORMS[norm]
    seed = settings.seed + 100_003 * d_s + d_t + int(1000 * theta)
    cases = build_cases(d_s, d_t, theta, device, names, seed)
    first: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    squarings: list = []
    for case in cases:
        holder: dict[str, float] = {}

        def warm(case=case, holder=holder) -> None:
            holder["s"] = time_once(case.step_capturing_weight, device)

        if case.name == FEATKD:
            with count_squarings() as squarings:
                peaks[case.name] = memory.measure(warm)
        else:
            peaks[case.name] = memory.measure(warm)
        first[case.name] = holder["s"]
    wanted = {}
    for case in cases:
        if first[case.name] > settings.slow_s:
            # one more call, unless over the cap: the method is then skipped from here on
            exempt = case.name in settings.always
            wanted[case.name] = int(first[case.name] <= settings.time_cap_s or exempt)
        else:
            by_budget = int(settings.budget_s / max(first[case.name], 1e-9))
            wanted[case.name] = max(settings.min_repeats, min(settings.repeats, by_budget))
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for round_index in range(max(wanted.values(), default=0)):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if len(times[case.name]) < wanted[case.name]:
                times[case.name].append(time_once(case.step, device))
    weights = {case.name: case.weight() for case in cases}
    rows = []
    for case in cases:
        measured = times[case.name] or [first[case.name]]
        p = weights[case.name]
        twin = "torch " + case.name.split(" ", 1)[1]
        row = {
            "d_s": d_s,
            "d_t": d_t,
            "norm": norm,
            "theta": theta,
            "method": case.name,
            "skipped": False,
            "time_ms": 1000 * statistics.median(measured),
            "times_ms": [1000 * t for t in measured],
            "first_call_ms": 1000 * first[case.name],
            "timed_by_warmup": not times[case.name],
            "peak_mib": peaks[case.name],
            "orthogonality_error": float(orthogonality_error(p)),
            "finite": bool(torch.isfinite(p).all()),
        }
        if case.name.startswith("featkd") and twin in weights:
            row["max_diff_vs_torch"] = float((p - weights[twin]).abs().max())
        if case.name == FEATKD:
            row["squarings"] = squarings[0] if squarings else None
        rows.append(row)
    return rows


def run(
    device: torch.device,
    shapes,
    norms: list[str],
    names: list[str],
    settings: Settings,
    log: Callable[[str], None] = print,
) -> dict:
    """The benchmark: rows for every shape, norm and method (skipped ones included)."""
    memory = PeakMemory(device)
    rows: list[dict] = []
    # initialise every library path once on a tiny shape, outside the measurements
    for case in build_cases(8, 20, 1.0, device, names, settings.seed):
        case.step()
    over_cap: dict[str, tuple[int, int, str]] = {}  # method -> the shape where a call was
    for d_s, d_t in shapes:
        skipped: dict[str, str] = {}
        for name, (a, b, reason) in over_cap.items():
            if d_s >= a and d_t >= b:  # every method's cost grows with both widths
                skipped[name] = f"not run: at {a} -> {b}, {reason}"
        for norm in norms:
            active = [name for name in names if name not in skipped]
            measured = measure_shape_norm(d_s, d_t, norm, active, device, memory, settings)
            by_name = {row["method"]: row for row in measured}
            for name in names:
                if name in skipped:
                    row = {
                        "d_s": d_s,
                        "d_t": d_t,
                        "norm": norm,
                        "theta": NORMS[norm],
                        "method": name,
                        "skipped": True,
                        "reason": skipped[name],
                    }
                    rows.append(row)
                    log(f"{d_s:4d} -> {d_t:4d} {norm:6s} {name:20s}  skipped: {skipped[name]}")
                    continue
                row = by_name[name]
                rows.append(row)
                peak = "" if row["peak_mib"] is None else f"{row['peak_mib']:9.1f} MiB"
                log(
                    f"{d_s:4d} -> {d_t:4d} {norm:6s} {name:20s} {row['time_ms']:10.1f} ms "
                    f"({len(row['times_ms'])} call(s)) {peak}  "
                    f"orth err {row['orthogonality_error']:.1e}"
                )
                slowest = max(row["times_ms"] + [row["first_call_ms"]]) / 1000
                if slowest > settings.time_cap_s and name not in settings.always:
                    reason = (
                        f"a call took {slowest:.1f} s > {settings.time_cap_s:g} s cap "
                        f"at the {norm} norm"
                    )
                    skipped[name] = reason
                    over_cap.setdefault(name, (d_s, d_t, reason))
    return {"rows": rows, "memory_method": memory.method}


def benchmark(
    device: torch.device,
    shapes,
    norms: list[str],
    names: list[str],
    settings: Settings,
    *,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """:func:`run` with the run's description (``meta``) and the targets checked."""
    before = {"load": os.getloadavg(), "overhead": parallel_overhead_ms()}
    threads = torch.get_num_threads()
    if device.type == "cpu" and before["overhead"] > 1.0:
        log(
            f"warning: a tiny parallel op takes {before['overhead']:.1f} ms on {threads} "
            "thread(s): other processes are using the cores, timings are noisy"
        )
    start = time.perf_counter()
    result = run(device, shapes, norms, names, settings, log)
    result["meta"] = {
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "featkd": featkd.__version__,
        "threads": threads,
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "batch": BATCH,
        "norms": {n: NORMS[n] for n in norms},
        "settings": asdict(settings),
        "quick": quick,
        "wall_s": time.perf_counter() - start,
        "load_before": before["load"],
        "load_after": os.getloadavg(),
        "parallel_overhead_ms_before": before["overhead"],
        "parallel_overhead_ms_after": parallel_overhead_ms(),
    }
    result["targets"] = targets(result)
    return result


# ------------------------------------------------------------------------------------ reports


def find(rows: list[dict], d_s: int, d_t: int, norm: str, method: str) -> dict | None:
    for row in rows:
        if (row["d_s"], row["d_t"], row["norm"], row["method"]) == (d_s, d_t, norm, method):
            return row
    return None


def speedup(rows: list[dict], d_s: int, d_t: int, norm: str, other: str, ours: str = FEATKD):
    """``time(other) / time(ours)`` (above 1: ours faster), or ``None`` if either is missing."""
    a, b = find(rows, d_s, d_t, norm, ours), find(rows, d_s, d_t, norm, other)
    if a is None or b is None or a["skipped"] or b["skipped"]:
        return None
    return b["time_ms"] / a["time_ms"]


def memory_ratio(rows: list[dict], d_s: int, d_t: int, norm: str, other: str):
    """``peak(featkd matrix_exp) / peak(other)`` (at most 1: featkd uses no more)."""
    a, b = find(rows, d_s, d_t, norm, FEATKD), find(rows, d_s, d_t, norm, other)
    if a is None or b is None or a["skipped"] or b["skipped"]:
        return None
    if a["peak_mib"] is None or b["peak_mib"] is None or b["peak_mib"] <= 0:
        return None
    return a["peak_mib"] / b["peak_mib"]


def _status(values: dict[str, float | None], ok: Callable[[float], bool]) -> str:
    """``met``, ``missed at <norms>`` or ``not measured``, with the norms that had no value."""
    if all(v is None for v in values.values()):
        return "not measured"
    missed = [n for n, v in values.items() if v is not None and not ok(v)]
    status = "met" if not missed else "missed at " + ", ".join(missed)
    if absent := [n for n, v in values.items() if v is None]:
        status += " (not measured at " + ", ".join(absent) + ")"
    return status


def targets(result: dict) -> list[dict]:
    """The issue's targets, each checked at every norm of one run."""
    rows = result["rows"]
    shapes = list(dict.fromkeys((r["d_s"], r["d_t"]) for r in rows))
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    specs = [
        ("featkd matrix_exp >= 5x faster than torch cayley", [(192, 3024)], "torch cayley", 5.0),
        ("featkd matrix_exp >= 2x faster than torch cayley", [(384, 1536)], "torch cayley", 2.0),
        (
            "featkd matrix_exp >= 10x faster than torch matrix_exp",
            [s for s in shapes if s[1] > s[0]],
            "torch matrix_exp",
            10.0,
        ),
        (
            "featkd matrix_exp >= 2x faster than torch matrix_exp",
            [s for s in shapes if s[1] == s[0]],
            "torch matrix_exp",
            2.0,
        ),
        (
            "featkd matrix_exp within 1.5x of torch cayley",
            [(384, 1024)],
            "torch cayley",
            1 / 1.5,
        ),
    ]
    out = []
    for text, target_shapes, other, threshold in specs:
        for d_s, d_t in target_shapes:
            if (d_s, d_t) not in shapes:
                continue
            values = {n: speedup(rows, d_s, d_t, n, other) for n in norms}
            status = _status(values, lambda v, t=threshold: v >= t)
            out.append(
                {
                    "target": text,
                    "shape": [d_s, d_t],
                    "kind": "speed-up",
                    "threshold": threshold,
                    "values": values,
                    "status": status,
                }
            )
    for d_s, d_t in shapes:
        values = {n: memory_ratio(rows, d_s, d_t, n, "torch cayley") for n in norms}
        status = _status(values, lambda v: v <= 1.0)
        out.append(
            {
                "target": "peak memory of featkd matrix_exp <= torch cayley",
                "shape": [d_s, d_t],
                "kind": "memory ratio",
                "threshold": 1.0,
                "values": values,
                "status": status,
            }
        )
    return out


def _x(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def _ms(row: dict | None) -> str:
    if row is None:
        return "n/a"
    if row["skipped"]:
        return "skipped"
    star = "*" if row["timed_by_warmup"] else ""
    return f"{row['time_ms']:.1f}{star}"


def _mib(row: dict | None) -> str:
    if row is None or row["skipped"] or row["peak_mib"] is None:
        return "n/a"
    return f"{row['peak_mib']:.1f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    rows = result["rows"]
    shapes = list(dict.fromkeys((r["d_s"], r["d_t"]) for r in rows))
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = meta["settings"]
    thetas = ", ".join(f"{n} {NORMS[n]:g}" for n in norms)
    where = meta["device"]
    if where == "cpu":
        where += f", {meta['threads']} thread{'s' if meta['threads'] > 1 else ''}"
    lines = [
        f"## Orthogonal projections: forward+backward time and peak memory ({where})",
        "",
        f"torch {meta['torch']}, featkd {meta['featkd']}, {meta['threads']} thread(s), "
        f"{meta['machine']}; batch {BATCH}, float32. Time: median of up to "
        f"{settings['repeats']} calls after a warm-up (one call for methods slower than "
        f"{settings['slow_s']:g} s), methods interleaved round-robin; `*` marks a method over the "
        f"{settings['time_cap_s']:g} s time cap, timed by its warm-up call alone (run with the "
        "memory measurement, which slows allocation-heavy calls). "
        f"Generator norms (theta, the rms rotation angle of A in radians): {thetas}. "
        f"Peak memory: {result['memory_method']}, on the warm-up call. Speed-up = torch's time / "
        f"featkd matrix_exp's time (above 1: featkd faster). Wall time {meta['wall_s']:.0f} s; "
        f"load average {meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after; "
        f"a tiny parallel op took {meta['parallel_overhead_ms_before']:.2f} ms before and "
        f"{meta['parallel_overhead_ms_after']:.2f} ms after (about 0.1 ms on idle cores).",
        "",
        "### Targets",
        "",
        "| target | d_s -> d_t | " + " | ".join(norms) + " | result |",
        "|---|---|" + "---:|" * len(norms) + "---|",
    ]
    for t in result["targets"]:
        if t["kind"] == "speed-up":
            cells = [_x(t["values"].get(n)) for n in norms]
        else:
            cells = [
                "n/a" if t["values"].get(n) is None else f"{t['values'][n]:.2f}" for n in norms
            ]
        label = t["target"] + (" (ratio of peaks)" if t["kind"] == "memory ratio" else "")
        lines.append(
            f"| {label} | {t['shape'][0]} -> {t['shape'][1]} | "
            + " | ".join(cells)
            + f" | {t['status']} |"
        )
    lines += [
        "",
        "### Times (ms) and speed-ups",
        "",
        "| d_s -> d_t | norm | "
        + " | ".join(methods)
        + " | featkd matrix_exp vs torch cayley | vs torch matrix_exp "
        "| featkd cayley vs torch cayley |",
        "|---|---|" + "---:|" * (len(methods) + 3),
    ]
    for d_s, d_t in shapes:
        for norm in norms:
            cells = [_ms(find(rows, d_s, d_t, norm, m)) for m in methods]
            lines.append(
                f"| {d_s} -> {d_t} | {norm} | "
                + " | ".join(cells)
                + f" | {_x(speedup(rows, d_s, d_t, norm, 'torch cayley'))}"
                f" | {_x(speedup(rows, d_s, d_t, norm, 'torch matrix_exp'))}"
                f" | {_x(speedup(rows, d_s, d_t, norm, 'torch cayley', 'featkd cayley'))} |"
            )
    lines += [
        "",
        "### Peak memory (MiB)",
        "",
        "| d_s -> d_t | norm | " + " | ".join(methods) + " |",
        "|---|---|" + "---:|" * len(methods),
    ]
    for d_s, d_t in shapes:
        for norm in norms:
            cells = [_mib(find(rows, d_s, d_t, norm, m)) for m in methods]
            lines.append(f"| {d_s} -> {d_t} | {norm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Accuracy: max |P^T P - I| in float32 (and max |P_featkd - P_torch| for the same map)",
        "",
        "| d_s -> d_t | norm | " + " | ".join(methods) + " | featkd squarings |",
        "|---|---|" + "---:|" * (len(methods) + 1),
    ]
    for d_s, d_t in shapes:
        for norm in norms:
            cells = []
            for m in methods:
                row = find(rows, d_s, d_t, norm, m)
                if row is None or row["skipped"]:
                    cells.append("skipped" if row else "n/a")
                    continue
                cell = f"{row['orthogonality_error']:.1e}"
                if "max_diff_vs_torch" in row:
                    cell += f" ({row['max_diff_vs_torch']:.1e})"
                cells.append(cell)
            ours = find(rows, d_s, d_t, norm, FEATKD)
            count = "n/a" if ours is None or ours.get("squarings") is None else ours["squarings"]
            lines.append(f"| {d_s} -> {d_t} | {norm} | " + " | ".join(cells) + f" | {count} |")
    notes = sorted(
        {(r["d_s"], r["d_t"], r["method"], r["reason"]) for r in rows if r["skipped"]},
        key=lambda item: (shapes.index(item[:2]), item[2]),
    )
    if notes:
        lines += ["", "Skipped (over the time cap):", ""]
        for d_s, d_t, method, reason in notes:
            lines.append(f"- {method} at {d_s} -> {d_t}: {reason}.")
    return "\n".join(lines) + "\n"


_STYLE = {
    "featkd matrix_exp": ("C0", "-", "o"),
    "featkd cayley": ("C1", "-", "s"),
    "featkd householder": ("C2", "-", "^"),
    "torch matrix_exp": ("C0", "--", "o"),
    "torch cayley": ("C1", "--", "s"),
    "torch householder": ("C2", "--", "^"),
    "dense cayley solve": ("0.4", ":", "D"),
}


def plot(result: dict, path: Path) -> None:
    """Left: time of every method at the medium norm (or the first norm measured); middle:
    featkd matrix_exp's speed-ups at every norm with the targets; right: peak memory (the
    largest over the norms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    shapes = list(dict.fromkeys((r["d_s"], r["d_t"]) for r in rows))
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shown = "medium" if "medium" in norms else norms[0]
    xs = list(range(len(shapes)))
    labels = [f"{d_s}->{d_t}" for d_s, d_t in shapes]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(19, 5.8))
    for method in methods:
        colour, style, marker = _STYLE.get(method, ("k", "-", "x"))
        # NaN where a method was skipped or not run: the line breaks there
        times = [
            r["time_ms"] if (r := find(rows, *s, shown, method)) and not r["skipped"] else math.nan
            for s in shapes
        ]
        if not all(math.isnan(t) for t in times):
            left.plot(xs, times, style, color=colour, marker=marker, label=method)
        peaks = []
        for s in shapes:
            values = [
                r["peak_mib"]
                for n in norms
                if (r := find(rows, *s, n, method)) is not None
                and not r["skipped"]
                and r["peak_mib"] is not None
            ]
            peaks.append(max(values) if values else math.nan)
        if not all(math.isnan(v) for v in peaks):
            right.plot(xs, peaks, style, color=colour, marker=marker, label=method)
    for k, norm in enumerate(norms):
        for other, colour in (("torch cayley", "C1"), ("torch matrix_exp", "C0")):
            points = [
                (i + 0.08 * (k - 1), v)
                for i, s in enumerate(shapes)
                if (v := speedup(rows, *s, norm, other)) is not None
            ]
            if points:
                middle.plot(
                    *zip(*points, strict=True),
                    linestyle="none",
                    marker="osD"[k % 3],
                    color=colour,
                    alpha=0.5 + 0.25 * k,
                    label=f"vs {other}, {norm} norm",
                )
    for t in result["targets"]:
        if t["kind"] != "speed-up" or tuple(t["shape"]) not in shapes:
            continue
        i = shapes.index(tuple(t["shape"]))
        colour = "C1" if "cayley" in t["target"] else "C0"
        middle.hlines(t["threshold"], i - 0.3, i + 0.3, colors=colour, linestyles="--")
    middle.axhline(1.0, color="k", linewidth=0.8)
    device = result["meta"]["device"]
    threads = result["meta"]["threads"]
    plural = "s" if threads > 1 else ""
    left.set_title(f"forward + backward, {shown} norm ({device}, {threads} thread{plural})")
    left.set_ylabel("ms (log)")
    middle.set_title("featkd matrix_exp speed-up (dashes: targets)")
    middle.set_ylabel("torch time / featkd time (log)")
    right.set_title("peak memory of one call (largest over the norms)")
    right.set_ylabel("MiB (log)")
    for axis in (left, middle, right):
        axis.set_yscale("log")
        axis.set_xticks(xs, labels)
        axis.set_xlabel("d_s -> d_t")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, stem: Path, publish: bool) -> None:
    """``stem.json``, ``stem.md`` and the figure (see ``figure_path``)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    plot(result, figure_path(stem, publish))


# ------------------------------------------------------------------------------------ main


def _shape(text: str) -> tuple[int, int]:
    d_s, d_t = (int(v) for v in text.lower().split("x"))
    if d_t < d_s:
        raise argparse.ArgumentTypeError(f"expected d_s x d_t with d_t >= d_s, got {text}")
    return d_s, d_t


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few calls")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--shapes", default=None, help="e.g. 384x1536,192x3024 (a partial run)")
    parser.add_argument("--norms", default=None, help=f"subset of {','.join(NORMS)}")
    parser.add_argument("--methods", default=None, help="only methods whose name contains this")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 7)")
    parser.add_argument("--time-cap", type=float, default=None, help="seconds (default 10)")
    parser.add_argument("--tag", default="", help="appended to the file names, e.g. -1thread")
    parser.add_argument("--replot", action="store_true", help="rewrite .md/.png from the JSON")
    args = parser.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [args.device]
    if args.replot:
        for name in devices:
            stem = args.out / f"orthogonal-{name}{args.tag}"
            result = json.loads(stem.with_suffix(".json").read_text())
            result["targets"] = targets(result)
            write(result, stem, publish=args.out == RESULTS)
            print(f"rewrote {stem}.md/.png")
        return None

    torch.set_num_threads(args.threads)
    settings = Settings()
    shapes = [_shape(s) for s in args.shapes.split(",")] if args.shapes else list(SHAPES)
    norms = args.norms.split(",") if args.norms else list(NORMS)
    if unknown := [n for n in norms if n not in NORMS]:
        parser.error(f"--norms: expected names from {list(NORMS)}, got {unknown}")
    names = [m for m in METHODS if args.methods is None or args.methods in m]
    if args.quick:
        shapes = shapes if args.shapes else [(48, 160)]
        settings.repeats, settings.min_repeats, settings.budget_s = 2, 1, 1.0
    if args.repeats is not None:
        settings.repeats = args.repeats
        settings.min_repeats = min(settings.min_repeats, args.repeats)
    if args.time_cap is not None:
        settings.time_cap_s = args.time_cap
    partial = (
        args.quick or args.shapes is not None or args.norms is not None or args.methods is not None
    )
    result = None
    for name in devices:
        result = benchmark(torch.device(name), shapes, norms, names, settings, quick=args.quick)
        stem = args.out / f"orthogonal-{name}{args.tag}{'-partial' if partial else ''}"
        write(result, stem, publish=not partial and args.out == RESULTS)  # the docs' figure
        print(f"wrote {stem}.json/.md/.png in {result['meta']['wall_s']:.0f} s")
        for t in result["targets"]:
            values = {k: (None if v is None else round(v, 2)) for k, v in t["values"].items()}
            print(f"{t['target']} at {t['shape']}: {values} -> {t['status']}")
    return result


if __name__ == "__main__":
    main()
