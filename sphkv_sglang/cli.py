# SPDX-License-Identifier: Apache-2.0
"""``--sphkv`` and its options on SGLang's command line, and how they reach every SGLang process.

Flags (added to ``python -m sglang.launch_server`` / ``sglang serve`` by the plugin, and to our
launcher):

``--sphkv``                turn Spherical KV on: sphkv pool + attention backend + radix cache;
``--sphkv-preset NAME``    top tier, one of ``sphkv-8 | sphkv-4 | sphkv-3 | sphkv-2`` (default sphkv-4);
``--sphkv-budget BYTES``   KV memory of the pool, e.g. ``512MiB``, ``1.5GiB``, ``268435456``;
``--sphkv-config JSON``    any field of :class:`~sphkv_sglang.config.SphKVServeConfig` as one JSON
                           object, e.g. ``'{"preset": "sphkv-8", "demote_to": [], "page_size": 32}'``;
                           ``--sphkv-preset`` / ``--sphkv-budget`` override its keys.

With ``--sphkv`` the launcher also sets ``--attention-backend sphkv``, ``--radix-cache-backend
sphkv``, ``--page-size`` (from the config; an explicit ``--page-size`` sets the config's instead),
``--max-running-requests`` (from the config; an explicit one sizes the staging area instead) and
disables CUDA graphs. Conflicting explicit choices and unsupported features stop the launch with a
message naming the option and the allowed values. The resolved config travels to SGLang's spawned
processes as JSON on ``server_args._sphkv`` and in the ``SGLANG_SPHKV`` environment variable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from sphkv.config import PRESETS

from .config import ENV_VAR, SphKVServeConfig, parse_bytes

__all__ = ["add_sphkv_args", "resolve_args", "config_of", "SphKVArgumentError"]

_UNSUPPORTED = {  # namespace attribute -> why sphkv refuses it when set
    "speculative_algorithm": "speculative decoding copies dense KV",
    "enable_hierarchical_cache": "HiCache mirrors dense KV to host memory",
    "enable_lmcache": "LMCache moves dense KV",
    "enable_flexkv": "FlexKV moves dense KV",
    "enable_unified_memory": "the unified memory pool owns the KV buffers",
    "enable_kv_cache_sharding": "KV sharding needs the plain MHA pool",
    "enable_hisparse": "HiSparse needs its own pool",
}
_UNSUPPORTED_ABOVE_ONE = {  # namespace attribute -> why sphkv refuses a value > 1
    "dcp_size": "decode context parallelism splits each request's KV across ranks; the sphkv pool codes whole "
                "pages per rank",
}


class SphKVArgumentError(ValueError):
    """A ``--sphkv*`` option is invalid or conflicts with another SGLang option."""


def _budget(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (budget must be > 0)") from None


def _config_json(text: str) -> dict:
    try:
        SphKVServeConfig.from_json(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return json.loads(text)


def add_sphkv_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``--sphkv*`` flags to ``parser`` (no-op if present)."""
    if any("--sphkv" in a.option_strings for a in parser._actions):
        return
    g = parser.add_argument_group("Spherical KV (sphkv_sglang)")
    g.add_argument("--sphkv", action="store_true",
                   help="Store the KV cache as angle-coded tiered pages (sphkv pool, attention backend and radix cache).")
    g.add_argument("--sphkv-preset", choices=sorted(PRESETS), default=None,
                   help="Top precision tier (default sphkv-4). Requires --sphkv.")
    g.add_argument("--sphkv-budget", type=_budget, default=None, metavar="BYTES",
                   help="KV memory of the pool, e.g. 512MiB, 1.5GiB or a byte count (> 0). Requires --sphkv.")
    g.add_argument("--sphkv-config", type=_config_json, default=None, metavar="JSON",
                   help=f"SphKVServeConfig fields as one JSON object; keys: "
                        f"{[f.name for f in dataclasses.fields(SphKVServeConfig)]}. Requires --sphkv.")


def _build_config(args: argparse.Namespace) -> SphKVServeConfig:
    data = dict(getattr(args, "sphkv_config", None) or {})
    if args.sphkv_preset is not None:
        data["preset"] = args.sphkv_preset
    if args.sphkv_budget is not None:
        data["budget_bytes"] = args.sphkv_budget
    if getattr(args, "page_size", None) not in (None, 1):
        data["page_size"] = args.page_size
    if getattr(args, "max_running_requests", None) is not None:
        data["max_running_requests"] = args.max_running_requests
    try:
        return SphKVServeConfig.from_dict(data)
    except ValueError as e:
        raise SphKVArgumentError(f"--sphkv-config / --sphkv-preset / --page-size: {e}") from None


def _explicit_conflict(args, name: str, want) -> None:
    have = getattr(args, name, None)
    if have not in (None, want):
        flag = "--" + name.replace("_", "-")
        raise SphKVArgumentError(f"{flag} {have!r} conflicts with --sphkv; allowed: {want!r} (or leave it unset)")


def resolve_args(args: argparse.Namespace) -> SphKVServeConfig | None:
    """Validate the ``--sphkv*`` flags and rewrite ``args`` for a sphkv server; ``None`` if not enabled."""
    extra = [f for f in ("sphkv_preset", "sphkv_budget", "sphkv_config") if getattr(args, f, None) is not None]
    if not getattr(args, "sphkv", False):
        if extra:
            raise SphKVArgumentError(f"--{extra[0].replace('_', '-')} requires --sphkv")
        return None
    cfg = _build_config(args)
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        _explicit_conflict(args, name, "sphkv")
    _explicit_conflict(args, "radix_cache_backend", "sphkv")
    if getattr(args, "kv_cache_dtype", "auto") not in ("auto", "bf16", "bfloat16", None):
        raise SphKVArgumentError(f"--kv-cache-dtype {args.kv_cache_dtype!r} conflicts with --sphkv; "
                                 "allowed: auto, bf16, bfloat16 (sphkv codes the cache itself)")
    for name, why in _UNSUPPORTED.items():
        if getattr(args, name, None):
            raise SphKVArgumentError(f"--{name.replace('_', '-')} is not supported with --sphkv ({why})")
    for name, why in _UNSUPPORTED_ABOVE_ONE.items():
        value = getattr(args, name, None)
        if value is not None and int(value) > 1:
            raise SphKVArgumentError(f"--{name.replace('_', '-')} {value} is not supported with --sphkv ({why})")
    _check_cpu_parallel(args)
    check_model(cfg, getattr(args, "model_path", "") or "", getattr(args, "tp_size", 1) or 1)
    args.attention_backend = "sphkv"
    args.radix_cache_backend = "sphkv"
    args.page_size = cfg.page_size
    args.max_running_requests = cfg.max_running_requests
    args.disable_decode_cuda_graph = True
    args.disable_prefill_cuda_graph = True
    return cfg


def _check_cpu_parallel(args) -> None:
    """Tensor parallelism on SGLang's CPU engine fails inside SGLang (dense too): refuse it up front."""
    tp = int(getattr(args, "tp_size", 1) or 1)
    device = getattr(args, "device", None)
    if tp <= 1:
        return
    from .cpu import has_gpu

    if device == "cpu" or (device in (None, "auto") and not has_gpu()):
        raise SphKVArgumentError(
            f"--tp-size {tp} with --sphkv on SGLang's CPU engine is not supported: SGLang 0.5.23 (CUDA build of "
            "torch) starts its NCCL communicator for tensor parallelism even with --device cpu and every rank fails "
            "('Expected a cuda device, but got: cpu'; dense servers too); allowed here: --tp-size 1, or a GPU machine")


def model_dims(model_path: str, tp_size: int = 1) -> dict | None:
    """``num_layers``/``num_kv_heads``/``head_dim`` from a local HF folder's ``config.json`` (else ``None``)."""
    path = os.path.join(str(model_path), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        hf = json.load(f)
    hf = hf.get("text_config", hf)
    heads = hf.get("num_key_value_heads", hf.get("num_attention_heads"))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return dict(num_layers=hf["num_hidden_layers"], num_kv_heads=max(1, heads // max(1, tp_size)), head_dim=head_dim)


def minimum_budget(cfg: SphKVServeConfig, dims: dict) -> int:
    """Smallest KV budget that holds the staging area and two coded pages."""
    return cfg.staging_bytes(**dims) + 2 * math.ceil(cfg.cell_size(**dims)) * cfg.page_size


def tp_head_split_error(num_heads: int, num_kv_heads: int, tp_size: int) -> str | None:
    """Why ``tp_size`` ranks cannot split ``num_heads`` query / ``num_kv_heads`` KV heads (SGLang's
    models assert it in the scheduler), else ``None``. Allowed: ``tp`` divides the query heads, and
    divides the KV heads or is a multiple of them (KV heads are then replicated)."""
    if tp_size <= 1:
        return None
    kv_ok = num_kv_heads % tp_size == 0 if num_kv_heads >= tp_size else tp_size % num_kv_heads == 0
    if num_heads % tp_size == 0 and kv_ok:
        return None
    allowed = [t for t in range(1, num_heads + 1) if num_heads % t == 0 and
               (num_kv_heads % t == 0 if num_kv_heads >= t else t % num_kv_heads == 0)]
    return (f"--tp-size {tp_size} cannot split the model's {num_heads} attention heads / {num_kv_heads} KV heads "
            f"across ranks; allowed: --tp-size in {tuple(allowed)}")


def check_model(cfg: SphKVServeConfig, model_path: str, tp_size: int = 1) -> None:
    """Fail early (in the launcher) when the model's head_dim, its head split over ``tp_size`` ranks or
    the budget cannot work."""
    dims = model_dims(model_path, tp_size)
    if dims is None:
        return
    with open(os.path.join(str(model_path), "config.json")) as f:
        hf = json.load(f)
    hf = hf.get("text_config", hf)
    why = tp_head_split_error(hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"]),
                              int(tp_size or 1))
    if why:
        raise SphKVArgumentError(f"--sphkv: model {model_path}: {why}")
    try:
        cfg.codec_config(cfg.preset, dims["head_dim"])
    except ValueError as e:
        raise SphKVArgumentError(f"--sphkv: model {model_path}: {e}") from None
    if cfg.budget_bytes is not None and cfg.budget_bytes < minimum_budget(cfg, dims):
        need = minimum_budget(cfg, dims)
        raise SphKVArgumentError(
            f"--sphkv-budget {cfg.budget_bytes} B is below the minimum for {model_path}: {cfg.num_staging_pages} "
            f"dense staging pages ({cfg.staging_bytes(**dims)} B) plus two coded pages; allowed: >= {need} B "
            f"({need / 2**20:.1f} MiB), or lower --max-running-requests")


def publish(server_args, cfg: SphKVServeConfig) -> None:
    """Attach ``cfg`` to ``server_args`` (pickled to children) and the environment (inherited)."""
    text = cfg.to_json()
    server_args._sphkv = text
    os.environ[ENV_VAR] = text


def config_of(server_args) -> SphKVServeConfig | None:
    """The sphkv config of a server (``server_args._sphkv``, else ``$SGLANG_SPHKV``), or ``None``."""
    text = getattr(server_args, "_sphkv", None) if server_args is not None else None
    text = text or os.environ.get(ENV_VAR)
    return _parse_cached(text) if text else None


_cache: dict[str, SphKVServeConfig] = {}


def _parse_cached(text: str) -> SphKVServeConfig:
    if text not in _cache:
        _cache[text] = SphKVServeConfig.from_json(text, source=ENV_VAR)
    return _cache[text]


def fail(message: str) -> None:
    """Print an argparse-style error and exit with status 2 (nothing has started yet)."""
    print(f"sphkv: error: {message}", file=sys.stderr)
    raise SystemExit(2)
