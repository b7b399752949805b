"""One command for the GPU figures: the student step, every loss and head, and the anchors.

Everything is measured side by side in one process, on one device:

- **student step**: one training step (forward, cross-entropy, backward, AdamW) of timm's
  ``vit_tiny_patch16_224`` at batch 256 in float32 and under bfloat16 autocast (on a machine
  without timm, or with ``--quick``, the plain ViT of ``overhead.py``);
- **losses and heads**: forward+backward of each at ``B=256, N=197, D_s=192, D_t=768`` in eager
  mode, float32 features: median time, the time the host spends queuing it, share of the
  bfloat16 step, peak memory and the host synchronisations of one call (CUDA: ``torch.cuda.set_sync_debug_mode``; CPU: the aten ops that
  would force one on a GPU, recorded by a dispatch mode);
- **anchors**: Gaussian W2 (full covariance) against POT's ``bures_wasserstein_distance`` and
  entropic OT to tolerance against POT's ``sinkhorn2`` (log domain; both at featkd's defaults,
  ``eps = 0.1 mean(C)``, threshold ``1e-3``) at ``B`` in {256, 1024, 4096}, ``D`` in {384, 1024}, with each one's float32 error against float64; the default
  orthogonal map against torch's Cayley parametrisation at the shapes of ``orthogonal.py``.

Timings interleave the contenders round by round (medians), so a slow spell hits all alike.

    python benchmarks/gpu.py                 # on a CUDA machine, about 3 minutes on an H200
    python benchmarks/gpu.py --quick         # tiny sizes on the CPU: checks that it all runs

Writes ``benchmarks/results/gpu-<device>.json`` and ``.md`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import ot
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import losses as pot_cases
import orthogonal
import overhead
from _measure import PeakMemory, device_label, host_time_once, save_results

import featkd

RESULTS = Path(__file__).resolve().parent / "results"
# aten ops that read a device value on the host or have a data-dependent output shape
SYNC_OPS = re.compile(
    r"^aten::(_local_scalar_dense|item|nonzero|unique|_unique|masked_select|"
    r"repeat_interleave|linalg_cholesky_ex|linalg_inv_ex|linalg_solve_ex|_linalg_eigh|"
    r"linalg_eig|equal|is_nonzero|allclose)"
)


class SyncCounter(TorchDispatchMode):
    """CPU stand-in for ``set_sync_debug_mode``: counts the aten calls that would stall a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten::{func.__name__}"
        if SYNC_OPS.match(name) and not (
            name.startswith("aten::repeat_interleave") and (kwargs or {}).get("output_size")
        ):
            self.ops.append(name.split(".")[0])
        return func(*args, **(kwargs or {}))


def count_syncs(fn: Callable[[], None], device: torch.device) -> tuple[int, list[str]]:
    """Host synchronisations of one call of ``fn`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        # only the per-sync warnings (torch also warns once that the mode is a prototype);
        # where: the Python line that made the call
        found = [
            f"{Path(w.filename).name}:{w.lineno}"
            for w in caught
            if "called a synchronizing CUDA operation" in str(w.message)
        ]
        return len(found), sorted(set(found))
    counter = SyncCounter()
    with counter:
        fn()
    return len(counter.ops), sorted(set(counter.ops))


def round_robin(fns: dict[str, Callable[[], None]], device, repeats: int) -> dict[str, float]:
    return overhead.timed_round_robin(fns, device, repeats, warmup=2)


# ------------------------------------------------------------------------------ student step


def student_steps(device: torch.device, quick: bool, repeats: int) -> tuple[dict, dict]:
    """Median ms of one training step in float32 and under bfloat16 autocast."""
    torch.manual_seed(0)
    try:
        import timm

        use_timm = not quick
    except ImportError:
        use_timm = False
    if use_timm:
        batch = 256
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).to(device)
        inputs = torch.randn(batch, 3, 224, 224, device=device)
        forward = lambda: model(inputs)  # noqa: E731
        description = f"timm vit_tiny_patch16_224, batch {batch}"
    else:
        batch, depth, tokens = (4, 1, 17) if quick else (256, 12, 197)
        vit = overhead.TinyViT(192, depth, 3, tokens).to(device)
        model = vit
        inputs = torch.randn(batch, tokens, 48, device=device)
        forward = lambda: vit(inputs)[1]  # noqa: E731
        description = f"plain ViT width 192, depth {depth}, {tokens} tokens, batch {batch}"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(1000, (batch,), device=device)

    def step(dtype: torch.dtype | None) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                loss = nn.functional.cross_entropy(forward(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    medians = round_robin(
        {"float32": step(None), "bfloat16": step(torch.bfloat16)}, device, repeats
    )
    return {k: 1000 * v for k, v in medians.items()}, {"model": description}


# ------------------------------------------------------------------------- losses and heads


class TorchPath(nn.Module):
    """The wrapped loss with featkd's fused kernels off: the torch path, timed beside them."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, *args, **kwargs) -> torch.Tensor:
        previous = featkd.set_fused_kernels("off")
        try:
            return self.loss(*args, **kwargs)
        finally:
            featkd.set_fused_kernels(previous)


def loss_and_head_cases(d_s: int, d_t: int) -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """overhead.py's losses plus the heads; name -> (factory, input kind)."""
    cases = dict(overhead.loss_builders(d_s, d_t))
    cases.update(
        {
            # with the fused Triton kernels (the default on CUDA) above, without them here
            "CosPressLoss (tokens, torch path)": (
                lambda: TorchPath(featkd.CosPressLoss(student_dim=d_s, teacher_dim=d_t)),
                "tokens",
            ),
            "OrthogonalProjector (matrix_exp)": (
                lambda: featkd.OrthogonalProjector(d_s, d_t),
                "head-student",
            ),
            "OrthogonalProjector (cayley)": (
                lambda: featkd.OrthogonalProjector(d_s, d_t, map="cayley"),
                "head-student",
            ),
            "TeacherCompressionHead": (
                lambda: featkd.TeacherCompressionHead(student_dim=d_s, teacher_dim=d_t),
                "head-teacher",
            ),
            "LinearHead": (lambda: featkd.LinearHead(d_s, d_t), "head-student"),
            "Whitening (cholesky)": (lambda: featkd.Whitening(d_t), "head-teacher"),
            # class-conditional with static groups (the benchmark's labels have 10 classes)
            "GaussianWassersteinLoss (full, conditional)": (
                lambda: featkd.GaussianWassersteinLoss(
                    conditional=True, num_classes=10, projector=nn.Linear(d_s, d_t)
                ),
                "pooled",
            ),
            "WassersteinLoss (sinkhorn, conditional)": (
                lambda: featkd.WassersteinLoss(
                    "sinkhorn", conditional=True, num_classes=10, projector=nn.Linear(d_s, d_t)
                ),
                "pooled",
            ),
            "MMDLoss (rbf, conditional)": (
                lambda: featkd.MMDLoss(
                    conditional=True, num_classes=10, projector=nn.Linear(d_s, d_t)
                ),
                "pooled",
            ),
        }
    )
    return cases


def seeded_inputs(device, batch: int, tokens: int, d_s: int, d_t: int) -> tuple[dict, torch.Tensor]:
    """The seeded ``(student, teacher)`` features of each input kind (``tokens``, ``pooled``,
    ``logits``; on the CPU) and the labels (on ``device``)."""
    gen = torch.Generator().manual_seed(0)
    raw = {
        "tokens": (
            torch.randn(batch, tokens, d_s, generator=gen),
            torch.randn(batch, tokens, d_t, generator=gen),
        ),
        "pooled": (torch.randn(batch, d_s, generator=gen), torch.randn(batch, d_t, generator=gen)),
        "logits": (
            torch.randn(batch, 1000, generator=gen),
            torch.randn(batch, 1000, generator=gen),
        ),
    }
    return raw, torch.randint(10, (batch,), generator=gen).to(device)


def step_inputs(kind: str, raw: dict, device) -> tuple[torch.Tensor, ...]:
    """The tensor arguments of one step on the inputs of ``kind`` from :func:`seeded_inputs`,
    on ``device``: ``(x,)`` for a head, ``(student, teacher)`` for a loss; the first requires
    a gradient."""
    if kind.startswith("head"):
        return (raw["pooled"][0 if kind == "head-student" else 1].to(device).requires_grad_(),)
    return raw[kind][0].to(device).requires_grad_(), raw[kind][1].to(device)


def step_scalar(fn, kind: str, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor):
    """The scalar one step differentiates: a head's output squared and averaged, or a loss of
    ``inputs`` with the labels."""
    if kind.startswith("head"):
        return fn(*inputs).square().mean()
    return fn(*inputs, labels=labels)


def forward_backward(fn, kind: str, raw: dict, labels: torch.Tensor, device) -> Callable[[], None]:
    """One forward+backward of ``fn`` (a loss or head module, or its compiled form) on the
    inputs of ``kind`` from :func:`seeded_inputs` (:func:`step_scalar`)."""
    inputs = step_inputs(kind, raw, device)
    return lambda: step_scalar(fn, kind, inputs, labels).backward()


def loss_and_head_steps(
    device, batch: int, tokens: int, d_s: int, d_t: int, missing_ok: bool = False
) -> dict[str, tuple[Callable[[], None] | None, str]]:
    """name -> (one forward+backward, input kind) for every case of
    :func:`loss_and_head_cases`, on seeded inputs; with ``missing_ok`` a case this featkd
    cannot build (an older checkout, counted by ``launches.py --src``) has no step."""
    raw, labels = seeded_inputs(device, batch, tokens, d_s, d_t)
    steps: dict[str, tuple[Callable[[], None] | None, str]] = {}
    for name, (factory, kind) in loss_and_head_cases(d_s, d_t).items():
        try:
            module = factory().to(device)
        except (TypeError, AttributeError):  # an option or class this featkd lacks
            if not missing_ok:
                raise
            steps[name] = None, kind
            continue
        steps[name] = forward_backward(module, kind, raw, labels, device), kind
    return steps


def host_times(fns: dict[str, Callable[[], None]], device, repeats: int) -> dict[str, float]:
    """Median seconds each call takes to hand control back to the host, round-robin
    (:func:`_measure.host_time_once`). Where it is close to the device time, the call is bound
    by the host, not by its arithmetic."""
    return overhead.timed_round_robin(fns, device, repeats, warmup=0, timer=host_time_once)


def losses_and_heads(device, batch: int, tokens: int, d_s: int, d_t: int, repeats: int) -> list:
    memory = PeakMemory(device)
    built = loss_and_head_steps(device, batch, tokens, d_s, d_t)
    steps = {name: step for name, (step, _) in built.items()}
    kinds = {name: kind for name, (_, kind) in built.items()}
    medians = round_robin(steps, device, repeats)
    queued = host_times(steps, device, repeats)
    rows = []
    for name, step in steps.items():
        syncs, where = count_syncs(step, device)
        rows.append(
            {
                "name": name,
                "input": kinds[name],
                "ms": 1000 * medians[name],
                "host_ms": 1000 * queued[name],
                "peak_mib": memory.measure(step),
                "syncs": syncs,
                "sync_ops": where,
            }
        )
        print(f"{name:<36} {rows[-1]['ms']:8.2f} ms  syncs {syncs:3d}  {where[:3]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------- anchors


SINKHORN_REG, SINKHORN_TOL = 0.1, 1e-3  # featkd's defaults: eps = 0.1 mean(C), L1 error 1e-3


def _pot_sinkhorn(reg: float):
    """POT's log-domain Sinkhorn at featkd's default eps and threshold (POT tests the L2 norm
    of the column error, no stricter than featkd's L1 norm of the row error)."""

    def loss(student, teacher):
        weights = pot_cases._uniform(student.shape[0], student)
        cost = ot.dist(student, teacher)
        return ot.sinkhorn2(
            weights,
            weights,
            cost,
            reg,
            method="sinkhorn_log",
            stopThr=SINKHORN_TOL,
            numItermax=1000,
        )

    return loss


def anchors(device, sizes, repeats: int) -> list[dict]:
    """featkd against POT, fwd+bwd on the same tensors, with float32 errors vs float64."""
    pairs = {
        "Gaussian W2 (full)": (
            lambda reg: featkd.GaussianWassersteinLoss(),
            pot_cases._pot_bures,
        ),
        "Sinkhorn to tolerance": (lambda reg: featkd.WassersteinLoss("sinkhorn"), _pot_sinkhorn),
    }
    rows = []
    for batch, width in sizes:
        s32, t32 = pot_cases.features(batch, width, device)
        s64, t64 = pot_cases.features(batch, width, device, torch.float64)

        reg = SINKHORN_REG * float(ot.dist(s32, t32).mean())
        for family, (ours, theirs) in pairs.items():
            fns = {"featkd": ours(reg), "POT": theirs(reg)}
            steps = {}
            for library, fn in fns.items():
                s = s32.clone().requires_grad_()

                def step(fn=fn, s=s, t=t32) -> None:
                    fn(s, t).backward()

                steps[library] = step
            try:
                medians = round_robin(steps, device, repeats)
            except Exception as error:  # an anchor failing must not lose the other figures
                print(f"{family} B={batch} D={width}: {error!r}")
                continue
            row = {"family": family, "B": batch, "D": width}
            for library, fn in fns.items():
                # each against its own float64 value: the two Sinkhorn objectives differ
                reference, value = float(fn(s64, t64)), float(fn(s32, t32))
                row[f"{library}_ms"] = 1000 * medians[library]
                row[f"{library}_float32_error"] = abs(value - reference) / abs(reference)
            row["speedup"] = row["POT_ms"] / row["featkd_ms"]
            rows.append(row)
            print(
                f"{family:<22} B={batch:5d} D={width:5d} featkd {row['featkd_ms']:8.2f} ms  "
                f"POT {row['POT_ms']:8.2f} ms  x{row['speedup']:.2f}  "
                f"err {row['featkd_float32_error']:.1e} / {row['POT_float32_error']:.1e}",
                flush=True,
            )
    return rows


def orthogonal_maps(device, shapes, repeats: int) -> list[dict]:
    names = ["featkd matrix_exp", "featkd cayley", "torch cayley"]
    rows = []
    for d_s, d_t in shapes:
        cases = orthogonal.build_cases(d_s, d_t, orthogonal.NORMS["medium"], device, names, seed=0)
        medians = round_robin({c.name: c.step for c in cases}, device, repeats)
        row = {"shape": f"{d_s}->{d_t}", **{f"{k} ms": 1000 * v for k, v in medians.items()}}
        row["speedup vs torch cayley"] = medians["torch cayley"] / medians["featkd matrix_exp"]
        rows.append(row)
        print(row, flush=True)
    return rows


# ----------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    meta, step = result["meta"], result["student_step_ms"]
    budget = 0.05 * step["bfloat16"]
    lines = [
        f"# GPU results: {meta['device']}",
        "",
        f"torch {meta['torch']}, featkd {meta['featkd']}, "
        + (
            ""
            if "triton" not in meta
            else f"triton {meta['triton'] or 'absent (no fused kernels)'}, "
        )
        + f"{meta['date']}; command "
        f"`{meta['command']}`; {meta['seconds']:.0f} s in all."
        + (f" Note: {meta['note']}." if meta.get("note") else ""),
        "",
        f"Student step ({meta['model']}): **{step['float32']:.1f} ms** float32, "
        f"**{step['bfloat16']:.1f} ms** bfloat16 autocast; 5% of the latter: {budget:.2f} ms.",
        "",
        f"## Losses and heads (B={meta['batch']}, N={meta['tokens']}, D_s={meta['d_s']}, "
        f"D_t={meta['d_t']}; float32 features, eager, forward+backward)",
        "",
    ]
    timed_host = all("host_ms" in r for r in result["losses"])  # not in runs before it was
    if timed_host:
        lines += [
            "ms: the device's time of one call (CUDA events); host ms: the time the call takes "
            "to return to the host, the device idle before it (what queuing its kernels costs "
            "the CPU; close to ms where the call is bound by the host).",
            "",
        ]
    lines += [
        "| loss or head | input | ms | "
        + ("host ms | " if timed_host else "")
        + "share of bf16 step | peak MiB | host syncs | where |",
        "|---|---|---:|" + ("---:|" if timed_host else "") + "---:|---:|---:|---|",
    ]
    for r in result["losses"]:
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        host = f"{r['host_ms']:.2f} | " if timed_host else ""
        where = ", ".join(r["sync_ops"][:3])
        lines.append(
            f"| {r['name']} | {r['input']} | {r['ms']:.2f} | {host}"
            f"{100 * r['ms'] / step['bfloat16']:.1f}% | {peak} | {r['syncs']} | {where} |"
        )
    lines += [
        "",
        "## Against POT (float32 forward+backward; error: float32 value against the same code in float64)",
        "",
        "| family | B | D | featkd ms | POT ms | POT / featkd | featkd error | POT error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["anchors"]:
        lines.append(
            f"| {r['family']} | {r['B']} | {r['D']} | {r['featkd_ms']:.2f} | {r['POT_ms']:.2f} "
            f"| {r['speedup']:.2f}x | {r['featkd_float32_error']:.1e} | "
            f"{r['POT_float32_error']:.1e} |"
        )
    lines += [
        "",
        "## Orthogonal maps (batch 256, medium generator norm, forward+backward)",
        "",
        "| shape | featkd matrix_exp ms | featkd cayley ms | torch cayley ms | torch / featkd |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["orthogonal"]:
        lines.append(
            f"| {r['shape']} | {r['featkd matrix_exp ms']:.2f} | {r['featkd cayley ms']:.2f} | "
            f"{r['torch cayley ms']:.2f} | {r['speedup vs torch cayley']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def triton_version() -> str | None:
    """Triton's version if installed: without it the fused kernels fall back to torch."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, help="rewrite the markdown of a saved JSON")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(result))
        return result
    device = torch.device(args.device)
    start = time.perf_counter()
    if args.quick:
        batch, tokens, d_s, d_t, repeats = 8, 5, 12, 24, 2
        sizes, shapes = [(16, 8)], [(8, 16)]
    else:
        batch, tokens, d_s, d_t, repeats = 256, 197, 192, 768, args.repeats or 15
        sizes = [(b, d) for b in (256, 1024, 4096) for d in (384, 1024)]
        shapes = orthogonal.SHAPES
    orthogonal.BATCH = batch
    step_ms, step_meta = student_steps(device, args.quick, max(2, repeats // 3))
    print(f"student step: {step_ms} ({step_meta['model']})", flush=True)
    result = {
        "student_step_ms": step_ms,
        "losses": losses_and_heads(device, batch, tokens, d_s, d_t, repeats),
        "anchors": anchors(device, sizes, max(2, repeats // 3)),
        "orthogonal": orthogonal_maps(device, shapes, repeats),
    }
    name, slug = device_label(device, args.quick)
    result["meta"] = {
        "device": name,
        "torch": torch.__version__,
        "featkd": featkd.__version__,
        "triton": triton_version(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/gpu.py" + (" --quick" if args.quick else ""),
        "batch": batch,
        "tokens": tokens,
        "d_s": d_s,
        "d_t": d_t,
        "repeats": repeats,
        "seconds": time.perf_counter() - start,
        **step_meta,
    }
    stem = args.out / f"gpu-{slug}"
    print(markdown(result))
    print(f"{result['meta']['seconds']:.0f} s in all")
    save_results(stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
