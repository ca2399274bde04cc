# SPDX-License-Identifier: Apache-2.0
"""Model preparation and one real SmolLM2-135M check of the sphkv cache (slow: loads the real model)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import sphkv_hf
from sphkv import SphKVConfig
from sphkv_hf import SphKVCache, ensure_model, load_essays
from sphkv_hf.prepare_model import MARKER, default_model_dir, is_complete


def test_essays_load():
    from sphkv_hf.data import essays_dir

    files = sorted(essays_dir().glob("*.txt"))
    text = load_essays()
    assert len(files) == 49 and len(text) > 600_000
    assert text.startswith(files[0].read_text(encoding="utf-8").strip()[:200])     # sorted file order
    assert text.endswith(files[-1].read_text(encoding="utf-8").strip()[-200:])
    assert load_essays() is text                                    # cached, same text every call


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model.set_attn_implementation(sphkv_hf.install())
    return path, tok, model


@pytest.mark.slow
def test_prepared_folder_is_complete_and_servable(smollm):
    path, tok, model = smollm
    assert path == default_model_dir() and is_complete(path) and (path / MARKER).is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]) == (30, 3, 64)
    assert ensure_model() == path                                   # reused, not converted again
    assert model.dtype == torch.bfloat16 and tok("Hello").input_ids


def _chunked_nll(model, ids, cache, chunk):
    """NLL of ``ids`` fed ``chunk`` tokens per forward, so later chunks attend over coded pages."""
    logits = []
    with torch.no_grad():
        for s in range(0, ids.shape[-1], chunk):
            logits.append(model(ids[:, s:s + chunk], past_key_values=cache).logits[0].float())
    return float(F.cross_entropy(torch.cat(logits)[:-1], ids[0, 1:]))


@pytest.mark.slow
def test_smollm2_sphkv4_nll_close_to_dense(smollm):
    _, tok, model = smollm
    ids = torch.tensor(tok(load_essays()[:4000], add_special_tokens=False).input_ids[:512])[None]
    dense = _chunked_nll(model, ids, SphKVCache(None), 64)
    cache = SphKVCache(SphKVConfig.from_name("sphkv-4"))
    coded = _chunked_nll(model, ids, cache, 64)
    assert 2.0 < dense < 5.0
    assert abs(coded - dense) / dense < 0.006, (coded, dense)   # measured 0.26% (sphkv-2: 10%), was < 3%
    layer = cache.layers[0]                                         # every full page rolled into codes
    assert sum(s.num_tokens for s in layer.segments) == 512 and layer.tail_k.shape[-2] == 0
    assert cache.bits_per_element() < 6.0
