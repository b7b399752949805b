"""Exact OT's host solver: featkd's optimal assignment against POT's network simplex.

Between two uniform measures on ``n`` points each (every batch, and every class of a
class-conditional batch, in featkd's exact OT), an optimal plan may be taken a permutation over
``n``, so an optimal assignment (``scipy.optimize.linear_sum_assignment``) is an exact solution.
This script times, on the same float64 cost matrices and in one run, the plans featkd computes
(``featkd.kd2m._exact``, what ``WassersteinLoss("emd")`` calls on the host) against
``ot.emd`` called once per group as featkd did before, and checks that both give the same
transport cost. Feature kinds at ``D = 768``: ``correlated`` (the student a noisy copy of the
teacher, as late in training), ``independent`` (as at the start), ``clustered`` (8 distinct
points per side, repeated: many optimal plans), and ``conditional`` (independent features in
10 classes, one group per class). The fastest of ``--repeats`` calls each, taken in turns.

    python benchmarks/exact_ot.py            # B in {256, 1024}, a few seconds
    python benchmarks/exact_ot.py --quick    # B = 64

Writes ``benchmarks/results/exact-ot-cpu.{json,md}`` (``exact-ot-quick`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _measure import save_results

from featkd.kd2m._exact import _assignments_on_host

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("correlated", "independent", "clustered", "conditional")
WIDTH = 768


def grouped_costs(kind: str, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Squared-distance costs ``(G, n, n)``, zero-padded, and the real size of each group."""
    teacher = rng.standard_normal((batch, WIDTH))
    student = rng.standard_normal((batch, WIDTH))
    if kind == "correlated":
        student = teacher + 0.5 * student
    elif kind == "clustered":
        teacher = np.repeat(teacher[:8], batch // 8, axis=0)
        student = np.repeat(student[:8], batch // 8, axis=0)
    if kind != "conditional":
        return ot.dist(student, teacher)[None], [batch]
    labels = np.arange(batch) % 10
    sizes = [int((labels == c).sum()) for c in range(10)]
    costs = np.zeros((10, max(sizes), max(sizes)))
    for c, size in enumerate(sizes):
        rows = labels == c
        costs[c, :size, :size] = ot.dist(student[rows], teacher[rows])
    return costs, sizes


def network_simplex(costs: np.ndarray, sizes: list) -> float:
    """The transport cost summed over the groups as featkd computed it before: ``ot.emd`` per
    group (with its iteration cap of then), then ``<P, C>``."""
    plans = np.zeros_like(costs)
    for g, size in enumerate(sizes):
        mass = np.full(size, 1.0 / size)
        block = costs[g, :size, :size]
        plans[g, :size, :size] = ot.emd(mass, mass, block, numItermax=max(100_000, 20 * size**2))
    return float((plans * costs).sum())


def assignment(costs: torch.Tensor, counts: torch.Tensor, sizes: list) -> float:
    """The same with featkd's solver: the matched column of each row, then their costs."""
    matches = _assignments_on_host(costs, counts, 0).numpy()
    host = costs.numpy()
    return sum(
        float(host[g, np.arange(size), matches[g, :size]].sum()) / size
        for g, size in enumerate(sizes)
    )


def time_both(costs: np.ndarray, sizes: list, repeats: int) -> tuple[dict, dict]:
    """The fastest of ``repeats`` calls of each solver, in turns, and its plans' cost."""
    cost_t = torch.from_numpy(costs)
    counts = torch.tensor(sizes, dtype=torch.float64)
    ways = {
        "assignment": lambda: assignment(cost_t, counts, sizes),
        "network simplex": lambda: network_simplex(costs, sizes),
    }
    best = dict.fromkeys(ways, float("inf"))
    values = {}
    for _ in range(repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            values[name] = way()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, values


def measure(batches: tuple[int, ...], repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        for kind in KINDS:
            costs, sizes = grouped_costs(kind, batch, rng)
            best, values = time_both(costs, sizes, repeats)
            row = {
                "batch": batch,
                "kind": kind,
                "groups": len(sizes),
                "assignment_ms": 1000 * best["assignment"],
                "network_simplex_ms": 1000 * best["network simplex"],
                "relative_difference": abs(values["assignment"] - values["network simplex"])
                / abs(values["network simplex"]),
            }
            rows.append(row)
            print(
                f"B={batch:<5} {kind:<12} assignment {row['assignment_ms']:8.2f} ms  "
                f"network simplex {row['network_simplex_ms']:8.2f} ms  "
                f"value difference {row['relative_difference']:.1e}",
                flush=True,
            )
    return rows


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Exact OT's host solver: optimal assignment against the network simplex",
        "",
        f"numpy {meta['numpy']}, POT {meta['pot']}, {meta['date']}; `{meta['command']}`; float64 "
        f"costs at D={WIDTH}, the fastest of {meta['repeats']} calls each, in turns. The "
        "value difference is that of the two plans' transport costs, relative.",
        "",
        "| B | features | groups | assignment ms | network simplex ms | speed-up "
        "| value difference |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        speedup = row["network_simplex_ms"] / row["assignment_ms"]
        lines.append(
            f"| {row['batch']} | {row['kind']} | {row['groups']} | {row['assignment_ms']:.2f} "
            f"| {row['network_simplex_ms']:.2f} | {speedup:.1f}x "
            f"| {row['relative_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 64 only: a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    batches = (64,) if args.quick else (256, 1024)
    result = {
        "rows": measure(batches, repeats),
        "meta": {
            "numpy": np.__version__,
            "pot": ot.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/exact_ot.py"
            + (" --quick" if args.quick else "")
            + (f" --repeats {args.repeats}" if args.repeats else ""),
            "repeats": repeats,
        },
    }
    stem = args.out / f"exact-ot-{'quick' if args.quick else 'cpu'}"
    save_results(stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
