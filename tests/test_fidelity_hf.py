# SPDX-License-Identifier: Apache-2.0
"""Fidelity: with a lossless sphkv cache the ``"sphkv"`` attention reproduces the model's own (eager) attention.

Tiny random-weight models of six families (float32): Llama, Qwen2 (qkv bias), Mistral (sliding window on
every layer), Gemma-2 (logit soft-capping, alternating sliding/global), Gemma-3 (5 sliding : 1 global pattern
cut to 3 layers, head_dim 256, one KV head), Llama-4 text (chunked attention, MoE). Sequences run past the window; the lossless cache
(``SphKVCache(None, policy=CachePolicy(page_size=P))``: full pages move to dense segments with their
positions, sliding layers drop the pages that left their window) is checked at several page sizes, in
prefill, chunked prefill + token-by-token decode, batched left-padded prompts, and ``generate``.
Eager is the reference: it applies every mask and the soft-cap (SDPA ignores ``softcap``).
"""
from __future__ import annotations

import pytest
import torch

import sphkv_hf
from sphkv.tiers import PAGE_META_BYTES
from sphkv_hf import CachePolicy, SphKVCache

TOL = 1e-4
VOCAB = 96
WINDOW = 12
SEQ = 56


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=256))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=256))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, sliding_window=WINDOW, max_position_embeddings=256))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=32, sliding_window=WINDOW, attn_logit_softcapping=0.5,
                                          final_logit_softcapping=None, query_pre_attn_scalar=32,
                                          max_position_embeddings=256))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=256, sliding_window=WINDOW,
                                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                              max_position_embeddings=256))


def _llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    return Llama4ForCausalLM(Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                              intermediate_size_mlp=96, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=16, num_local_experts=2,
                                              num_experts_per_tok=1, attention_chunk_size=WINDOW,
                                              max_position_embeddings=256))


MODELS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma2": _gemma2, "gemma3": _gemma3,
          "llama4": _llama4}
SLIDING = {"llama": (), "qwen2": (), "mistral": (0, 1), "gemma2": (0, 2), "gemma3": (0, 1), "llama4": ()}
# the config field that limits what a query sees (widened, the model must change): sliding window or chunk
LOCAL = {"mistral": "sliding_window", "gemma2": "sliding_window", "gemma3": "sliding_window",
         "llama4": "attention_chunk_size"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def arch(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    for mod in model.modules():                 # random weights: make the q/k/v biases of Qwen2 non-zero
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            torch.nn.init.normal_(mod.bias, std=0.5)
    sphkv_hf.install()
    return request.param, model


def _ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@torch.no_grad()
def _logits(model, impl: str, ids, **kw) -> torch.Tensor:
    model.set_attn_implementation(impl)
    return model(ids, **kw).logits


def test_the_window_matters(arch):
    """Guard on the test itself: past the window (or chunk), a wider one changes the model's logits."""
    name, model = arch
    if name not in LOCAL:
        pytest.skip("no sliding or chunked layers")
    ids = _ids(SEQ, 1)
    want = _logits(model, "eager", ids)
    wide = type(model)(model.config.__class__(**{**model.config.to_dict(), LOCAL[name]: 4 * SEQ})).eval()
    wide.load_state_dict(model.state_dict())
    assert _rel(_logits(wide, "eager", ids), want) > 100 * TOL


@pytest.mark.parametrize("page_size", [None, 4, 16])
def test_prefill_logits_equal_eager(arch, page_size):
    name, model = arch
    ids = _ids(SEQ, 2)
    want = _logits(model, "eager", ids)
    cache = SphKVCache(None, policy=CachePolicy(page_size=page_size))
    got = _logits(model, "sphkv", ids, past_key_values=cache)
    assert _rel(got, want) <= TOL
    assert cache.get_seq_length() == SEQ


@pytest.mark.parametrize("page_size", [4, 8])
def test_chunked_prefill_then_decode_equal_eager(arch, page_size):
    """Prefill 20 tokens, one chunk of 9, then one token per forward: every position's logits equal eager's."""
    name, model = arch
    ids = _ids(SEQ, 3)
    want = _logits(model, "eager", ids)
    cache = SphKVCache(None, policy=CachePolicy(page_size=page_size))
    cuts = [0, 20, 29] + list(range(30, SEQ + 1))
    got = torch.cat([_logits(model, "sphkv", ids[:, a:b], past_key_values=cache) for a, b in zip(cuts, cuts[1:])], 1)
    assert _rel(got, want) <= TOL
    for i, layer in enumerate(cache.layers):
        held = sum(s.num_tokens for s in layer.segments) + layer.tail_k.shape[-2]
        if i in SLIDING[name]:
            assert layer.sliding_window == WINDOW
            assert WINDOW - 1 <= held <= WINDOW - 1 + page_size          # its window, in whole pages
            pos = torch.cat([s.positions.flatten() for s in layer.segments] or [torch.empty(0, dtype=torch.long)])
            assert bool((pos >= SEQ - WINDOW + 1 - page_size).all())
        else:
            assert layer.sliding_window is None and held == SEQ
    for i in SLIDING[name]:                                                # dropped pages are not counted
        layer = cache.layers[i]
        rows, d = layer.rows_and_dim()
        held = sum(s.num_tokens for s in layer.segments) + layer.tail_k.shape[-2]
        pages = sum(s.num_tokens // page_size for s in layer.segments)
        assert layer.stored_bytes() == held * rows * d * 2 * 2 + pages * rows * PAGE_META_BYTES


def test_generate_equals_eager_generate(arch):
    name, model = arch
    ids = _ids(30, 4)
    model.set_attn_implementation("eager")
    want = model.generate(ids, max_new_tokens=24, do_sample=False)
    model.set_attn_implementation("sphkv")
    cache = SphKVCache(None, policy=CachePolicy(page_size=4))
    got = model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, want)


def test_left_padded_batch_equals_eager(arch):
    """Two prompts of unequal length, left-padded: the padding mask reaches every layer (prefill and decode)."""
    name, model = arch
    ids = _ids(40, 5, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    want = _logits(model, "eager", ids, attention_mask=mask)
    cache = SphKVCache(None, policy=CachePolicy(page_size=8))
    got = _logits(model, "sphkv", ids[:, :30], attention_mask=mask[:, :30], past_key_values=cache)
    steps = [got]
    for t in range(30, 40):
        steps.append(_logits(model, "sphkv", ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache))
    got = torch.cat(steps, 1)
    real = mask.bool()
    assert _rel(got[real], want[real]) <= TOL
