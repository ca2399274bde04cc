# SPDX-License-Identifier: Apache-2.0
"""One real sphkv server with ``--sphkv-config '{"retention": "rdr"}'`` and a pool small enough that the
top tier overflows: RDR plans the demotion, the metrics say so, the demoted prefix is still served.

12 MiB on SmolLM2-135M with 2 running requests: ~5.6 MiB of dense staging pages, then ~1.3K logical
tokens of which the sphkv-4 tier holds ~0.8K — three ~400-token prompts overflow it.
"""
from __future__ import annotations

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("sglang")

from sphkv_sglang.server_process import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _ids(model_path, n_prompts, n_tokens):
    from transformers import AutoTokenizer

    from sphkv_hf.data import load_essays

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(load_essays(), add_special_tokens=False)["input_ids"][: n_prompts * n_tokens]
    return [ids[i * n_tokens:(i + 1) * n_tokens] for i in range(n_prompts)]


def _gen(url, payload):
    r = requests.post(url + "/generate", json=payload, timeout=900)
    assert r.status_code == 200, r.text
    return r.json()


def _sphkv(url):
    return requests.get(url + "/get_server_info", timeout=60).json()["internal_states"][0]["sphkv"]


def test_rdr_plans_demotion_under_a_bound_budget(model_path, tmp_path):
    prompts = _ids(model_path, 3, 400)
    args = ["--sphkv-budget", "12MiB", "--max-running-requests", "2", "--enable-cache-report",
            "--sphkv-config", '{"retention": "rdr"}', "--watchdog-timeout", "3600"]
    with ServerProcess(model_path, args=args, log_path=tmp_path / "server.log") as srv:
        st0 = _sphkv(srv.url)
        assert st0["retention"] == "rdr" and st0["rdr_plans"] == 0
        for p in prompts:
            _gen(srv.url, {"input_ids": p, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
        st = _sphkv(srv.url)
        assert st["rdr_plans"] >= 1 and st["pages_demoted"] >= 1 and st["demoted_nodes"] >= 1, st
        assert st["rdr_pages_planned"] >= st["pages_demoted"]
        assert len(st["bytes_per_tier"]) == 2 and st["bytes_per_tier"][1] > 0
        from sphkv_sglang.config import SphKVServeConfig
        cfg = SphKVServeConfig()
        pb = [cfg.page_bytes(t, num_layers=30, num_kv_heads=3, head_dim=64) for t in cfg.tiers]   # SmolLM2-135M
        assert st["bytes_per_tier"] == [c * b for c, b in zip(st["coded_pages"], pb)]
        # the prefix RDR left in the pool (demoted or not) is still served from the cache
        again = _gen(srv.url, {"input_ids": prompts[-1] + [13], "sampling_params": {"max_new_tokens": 1,
                                                                                     "temperature": 0}})
        assert again["meta_info"]["cached_tokens"] >= 384
        out = _gen(srv.url, {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 6,
                                                                                     "temperature": 0}})
        assert "Paris" in out["text"]
