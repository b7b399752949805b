"""How far each loss and head moves from float32 under ``torch.autocast``, against the tolerances
asserted by ``tests/test_autocast.py``.

For every case of ``tests/loss_cases.py`` and several seeds (batch 16), the script computes the
float32 result and the result inside an autocast region (CPU bfloat16; CUDA float16 and bfloat16
when present) for float32 features and for features rounded to the autocast dtype, and reports
the share of the tolerance used: ``max |autocast - float32| / (atol + rtol |float32|)`` over the
output's elements and the seeds (1.0 would be the limit). It prints the markdown table of
``docs/reliability.md``.

Usage::

    python benchmarks/autocast_error.py            # 8 seeds
    python benchmarks/autocast_error.py --quick    # 2 seeds, a check that everything runs

Writes ``benchmarks/results/autocast-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from loss_cases import CASES, head_scalar, stage_outputs, tiny_fcfd  # noqa: E402
from test_autocast import FCFD_TOLERANCE  # noqa: E402

TOLERANCES = {case.name: case.autocast_tolerance for case in CASES}

WHAT = {
    "KDLoss": "`KDLoss(4.0)`",
    "W2-emd": '`WassersteinLoss("emd")`',
    "W2-sinkhorn": '`WassersteinLoss("sinkhorn")`',
    "W2-sinkhorn-debias": '`WassersteinLoss("sinkhorn", debias=True)`',
    "W2-sliced": '`WassersteinLoss("sliced")`',
    "W2-emd-conditional": '`WassersteinLoss("emd", conditional=True)`',
    "W2-sinkhorn-conditional": '`WassersteinLoss("sinkhorn", conditional=True)`',
    "W2-sinkhorn-conditional-static": '`WassersteinLoss("sinkhorn", conditional=True, '
    "num_classes=12, tol=None)`",
    "JointW2-emd": "`JointWassersteinLoss()`",
    "JointW2-sinkhorn": '`JointWassersteinLoss(solver="sinkhorn")`',
    "GaussianW2-full": "`GaussianWassersteinLoss()`",
    "GaussianW2-diag": '`GaussianWassersteinLoss("diag")`',
    "GaussianW2-conditional": "`GaussianWassersteinLoss(conditional=True)`",
    "GaussianW2-conditional-static": "`GaussianWassersteinLoss(conditional=True, num_classes=12)`",
    "GaussianKL-full": "`GaussianKLLoss()`",
    "GaussianKL-diag": '`GaussianKLLoss("diag")`',
    "GaussianKL-conditional": "`GaussianKLLoss(conditional=True)`",
    "GaussianKL-conditional-static": "`GaussianKLLoss(conditional=True, num_classes=12)`",
    "MMD-rbf": '`MMDLoss("rbf")`',
    "MMD-rbf-unbiased": '`MMDLoss("rbf", estimator="unbiased")`',
    "MMD-linear": '`MMDLoss("linear")`',
    "MMD-poly": '`MMDLoss("poly")`',
    "MMD-rbf-conditional": '`MMDLoss("rbf", conditional=True)`',
    "MMD-rbf-conditional-static": '`MMDLoss("rbf", conditional=True, num_classes=12)`',
    "KD2M-projector": '`KD2MLoss("w2_gaussian", projector=nn.Linear(...))`',
    "KD2M-kl-diag-conditional": '`KD2MLoss("kl_gaussian_diag", conditional=True)`',
    "CosPress-tokens": "`CosPressLoss`, tokens",
    "CosPress-pooled": '`CosPressLoss(style="half")`, pooled',
    "Proteus-tokens": "`ProteusLoss`, tokens",
    "Proteus-pooled": "`ProteusLoss`, pooled",
    "VkD-tokens-map": "`VkDLoss`, ViT tokens to a CNN map",
    "VkD-batch-standardize-fixed-squarings": '`VkDLoss(normalize="batch_standardize")`',
    "VkD-whitening-cayley": '`VkDLoss(normalize="whitening", map="cayley")`',
    "VkD-householder-tokens": '`VkDLoss(normalize="none", map="householder")`',
    "LinearHead": "`LinearHead`",
    "TeacherCompressionHead": "`TeacherCompressionHead`",
    "OrthogonalProjector-expm": "`OrthogonalProjector`",
    "OrthogonalProjector-cayley-down": '`OrthogonalProjector(map="cayley")`',
    "Whitening": "`Whitening`",
    "Whitening-zca": '`Whitening(method="zca")`',
    "Whitening-eval": '`Whitening(method="zca").eval()`',
    "GlobalBatch-KD": "`GlobalBatch(KDLoss())`",
    "GlobalBatch-MMD-conditional": '`GlobalBatch(MMDLoss("rbf", conditional=True))`',
    "GlobalBatch-MMD-conditional-static": "`GlobalBatch(MMDLoss(..., num_classes=12))`",
    "GlobalBatch-CosPress": "`GlobalBatch(CosPressLoss(...))`",
}


def share(value: torch.Tensor, reference: torch.Tensor, tol: tuple[float, float]) -> float:
    rtol, atol = tol
    diff = (value.float() - reference.float()).abs()
    return float((diff / (atol + rtol * reference.float().abs())).max())


def run(case, s, t, labels, amp_dtype):
    module = case.make().to(s.device)
    s = s.detach().requires_grad_(True)
    with torch.autocast(s.device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
        out = case.call(module, s, t, labels)
    (head_scalar(out) if case.is_head else out).float().backward()
    return out.detach()


def measure_case(case, device, amp_dtype, seeds):
    worst = [0.0, 0.0]
    for seed in range(seeds):
        s, t, labels = case.inputs(16, generator=torch.Generator().manual_seed(seed))
        s, t = s.to(device), None if t is None else t.to(device)
        labels = None if labels is None else labels.to(device)
        reference = run(case, s, t, labels, None)
        for mode in (0, 1):
            s_in = s if mode == 0 else s.to(amp_dtype)
            t_in = t if (mode == 0 or t is None) else t.to(amp_dtype)
            value = run(case, s_in, t_in, labels, amp_dtype)
            worst[mode] = max(worst[mode], share(value, reference, TOLERANCES[case.name][mode]))
    return worst


def measure_fcfd(device, amp_dtype, seeds):
    worst = 0.0
    for seed in range(seeds):
        fcfd, student, teacher = tiny_fcfd()
        fcfd, student, teacher = fcfd.to(device), student.to(device), teacher.to(device)
        images = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).to(device)
        values = []
        for enabled in (False, True):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=enabled):
                with torch.no_grad():
                    t_feats = stage_outputs(teacher, images)
                values.append(fcfd(stage_outputs(student, images), t_feats).detach())
        worst = max(worst, share(values[1], values[0], FCFD_TOLERANCE))
    return worst


def text(tol) -> str:
    return f"rtol {tol[0]:g}, atol {tol[1]:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = 2 if args.quick else 8
    targets = [(torch.device("cpu"), torch.bfloat16)]
    if torch.cuda.is_available():
        targets += [(torch.device("cuda"), torch.float16), (torch.device("cuda"), torch.bfloat16)]
    results = {}
    for device, amp_dtype in targets:
        key = f"{device.type}-{str(amp_dtype).removeprefix('torch.')}"
        results[key] = {c.name: measure_case(c, device, amp_dtype, seeds) for c in CASES}
        results[key]["FCFD"] = [None, measure_fcfd(device, amp_dtype, seeds)]
        print(f"measured {key}", file=sys.stderr)

    keys = list(results)
    header = "| case | module | float32 features | half-precision features | share used |"
    lines = [header, "|---|---|---|---|---|"]
    for case in [*CASES, None]:
        name = "FCFD" if case is None else case.name
        what = "`FCFDLoss`, stage outputs under autocast" if case is None else WHAT[name]
        f32 = "n/a" if case is None else text(TOLERANCES[name][0])
        half = text(FCFD_TOLERANCE if case is None else TOLERANCES[name][1])
        used = " / ".join(
            "-" if v is None else f"{v:.2f}" for key in keys for v in results[key][name]
        )
        lines.append(f"| `{name}` | {what} | {f32} | {half} | {used} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results"
    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {
        "seeds": seeds,
        "batch": 16,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "columns": keys,
    }
    (out / f"autocast-{device_name}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1)
    )
    (out / f"autocast-{device_name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
