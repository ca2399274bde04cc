# SPDX-License-Identifier: Apache-2.0
"""A sliding-window model served for real: Gemma 3 270M (5 of 6 layers with a 512-token window, head_dim
256, one KV head) on SGLang's CPU engine, dense and with ``--sphkv``, on a ~2.4K-token prompt (well past
the window) whose needle sits ~1,800 tokens before the question: only the global layers can still see it.

Skipped unless the converted model folder exists (``make model-gemma3``; its wheels are not part of the
default environment). Slow (a dense and a sphkv-4 server start up in turn): marked ``server`` and ``slow``.
"""
from __future__ import annotations

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("sglang")

from sphkv_hf.prepare_model import default_model_dir, is_complete  # noqa: E402
from sphkv_sglang.server_process import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]
MODEL = default_model_dir("gemma3")
NEEDLE = "The secret number of the archive is 48213."
QUESTION = "\n\nQuestion: What is the secret number of the archive?\nAnswer: The secret number of the archive is"


def _prompt(tok, n_ctx: int = 2400, depth: float = 0.25) -> str:
    from sphkv_hf import load_essays

    ids = tok(load_essays(), add_special_tokens=False).input_ids[:n_ctx]
    cut = int(n_ctx * depth)
    return tok.decode(ids[:cut]) + " " + NEEDLE + " " + tok.decode(ids[cut:]) + QUESTION


def _generate(url: str, text: str, n: int = 8) -> dict:
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0}},
                      timeout=900)
    r.raise_for_status()
    return r.json()


@pytest.mark.skipif(not is_complete(MODEL), reason=f"Gemma 3 not converted at {MODEL} (make model-gemma3)")
def test_gemma3_serves_past_the_window_with_sphkv(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    prompt = _prompt(tok)
    n_prompt = len(tok(prompt).input_ids)
    assert n_prompt > 4 * 512                          # far past the sliding window
    outs = {}
    for name, sphkv, args in (("dense", False, ["--max-total-tokens", "8192"]),
                              ("sphkv-4", True, ["--sphkv-preset", "sphkv-4", "--sphkv-budget", "256MiB"])):
        with ServerProcess(MODEL, sphkv=sphkv, args=args, log_path=tmp_path / f"{name}.log") as srv:
            out = _generate(srv.url, prompt)
            outs[name] = out
            print(f"{name}: start {srv.start_seconds:.0f}s, prompt {out['meta_info']['prompt_tokens']} tokens, "
                  f"output {out['text']!r}")
    assert "48213" in outs["dense"]["text"], outs["dense"]["text"]       # the model itself finds the needle
    assert "48213" in outs["sphkv-4"]["text"], outs["sphkv-4"]["text"]    # make serve's default preset
