# SPDX-License-Identifier: Apache-2.0
"""SGLang plugin entry point (``[project.entry-points."sglang.srt.plugins"] sphkv``).

SGLang runs :func:`register` in every process it starts (launcher, tokenizer, scheduler,
detokenizer) before it parses arguments or builds pools. It is idempotent, and light in processes
that are not part of a sphkv server. It registers:

* the ``sphkv`` attention backend and its ``--attention-backend`` choice;
* the ``sphkv`` radix-cache backend (``--radix-cache-backend sphkv``);
* ``--sphkv`` / ``--sphkv-preset`` / ``--sphkv-budget`` / ``--sphkv-config`` (see :mod:`.cli`);
* HookRegistry hooks that are inert unless the server was launched with ``--sphkv``:
  KV budget (``_profile_available_bytes``), bytes per token (``_compute_cell_size``), the pool
  class (``_build_mha_kv_pool``), the allocator (``_build_token_to_kv_pool_allocator``) and the
  pool statistics in ``/get_server_info`` (``internal_states[i]["sphkv"]``).

Importing this module patches nothing.
"""
from __future__ import annotations

import functools
import logging
import math
import os

from .config import ENV_VAR

__all__ = ["register", "register_server"]

logger = logging.getLogger(__name__)
_registered = False
_server_registered = False

_SA = "sglang.srt.server_args.ServerArgs"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_POOLCFG = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
_STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"


def register() -> None:
    """Register the sphkv CLI flags everywhere, and the backend, radix cache and pool hooks in the
    processes of a sphkv server (idempotent).

    The launcher parses ``--sphkv`` and exports the resolved config as ``$SGLANG_SPHKV`` before SGLang
    spawns its tokenizer/scheduler/detokenizer processes; in those the variable is set when their
    ``load_plugins()`` runs, so the heavier registrations (they import the attention registry and
    the pool modules) happen only where they are used. ``sgl.Engine`` users set ``$SGLANG_SPHKV`` to
    a config JSON (and ``attention_backend="sphkv"``, ``radix_cache_backend="sphkv"``) themselves.
    """
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if "sphkv" not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices(["sphkv"])
    HookRegistry.register(f"{_SA}.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{_SA}.from_cli_args", _around_from_cli_args, HookType.AROUND)
    if os.environ.get(ENV_VAR):
        register_server()


def register_server() -> None:
    """Backend, radix cache and pool/sizing/stats hooks (a sphkv server's processes)."""
    global _server_registered
    if _server_registered:
        return
    _server_registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _register_backend()
    _register_radix_cache()
    hooks = [
        (f"{_KVC}._profile_available_bytes", _around_available_bytes, HookType.AROUND),
        (f"{_POOLCFG}._compute_cell_size", _around_cell_size, HookType.AROUND),
        (f"{_KVC}._build_mha_kv_pool", _around_build_pool, HookType.AROUND),
        (f"{_KVC}._build_token_to_kv_pool_allocator", _around_build_allocator, HookType.AROUND),
        (f"{_STATE}._add_memory_usage", _after_memory_usage, HookType.AFTER),
        ("sglang.srt.managers.tp_worker.TpModelWorker.get_worker_info", _after_worker_info, HookType.AFTER),
    ]
    for target, fn, kind in hooks:
        HookRegistry.register(target, fn, kind)


def _after_worker_info(result, worker, *args, **kwargs):
    """Make SGLang's ``max_req_input_len`` page-aware (it is computed in tokens).

    A prompt that passes SGLang's token check but, rounded up to whole pages plus the allocator's
    one-page reserve, never fits the pool would wait at the head of the queue forever and block
    every request behind it. Two pages of headroom make every admitted prompt fit an empty pool.
    """
    runner = getattr(worker, "model_runner", None)
    page = int(getattr(runner, "page_size", None) or getattr(worker, "page_size", None) or 1)
    if page <= 1 or not isinstance(result, tuple) or len(result) < 6:
        return result
    out = list(result)
    out[5] = max(1, int(out[5]) - 2 * page)
    return tuple(out)


def _register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if "sphkv" not in ATTENTION_BACKENDS:
        @register_attention_backend("sphkv")
        def _make(model_runner):
            from .backend import SphKVAttnBackend
            return SphKVAttnBackend(model_runner)


def _register_radix_cache() -> None:
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if get_radix_cache_factory("sphkv") is None:
        def _factory(ctx):
            from .radix import create_sphkv_radix_cache
            return create_sphkv_radix_cache(ctx)
        register_radix_cache_backend("sphkv", _factory)


# -- CLI ----------------------------------------------------------------------------------------------
def _after_add_cli_args(result, parser, *args, **kwargs):
    from .cli import add_sphkv_args
    add_sphkv_args(parser)
    return result


def _around_from_cli_args(original, cls, args, *rest, **kwargs):
    from .cli import SphKVArgumentError, fail, publish, resolve_args
    try:
        cfg = resolve_args(args)
    except SphKVArgumentError as e:
        fail(str(e))
    server_args = original(cls, args, *rest, **kwargs)
    if cfg is not None:
        publish(server_args, cfg)
        logger.info("sphkv: enabled with %s", cfg.to_json())
    else:
        os.environ.pop(ENV_VAR, None)          # a dense launch never inherits a stale sphkv config
    return server_args


# -- pool sizing and construction (scheduler process) -------------------------------------------------
def _dims(kvc) -> dict:
    from sglang.srt.runtime_context import get_parallel

    mc = kvc.model_config
    if getattr(kvc, "use_mla_backend", False) or mc.v_head_dim not in (None, mc.head_dim):
        raise NotImplementedError("sphkv supports MHA/GQA models with v_head_dim == head_dim only")
    heads = mc.get_num_kv_heads(get_parallel().attn_tp_size, get_parallel().attn_dcp_size)
    return dict(num_layers=kvc.layer_info.num_effective_layers, num_kv_heads=heads, head_dim=mc.head_dim)


def _around_available_bytes(original, self, *args, **kwargs):
    from .cli import config_of

    available = original(self, *args, **kwargs)
    cfg = config_of(self.server_args)
    if cfg is None:
        return available
    dims = _dims(self)
    total = available if cfg.budget_bytes is None else min(available, cfg.budget_bytes)
    if cfg.budget_bytes is not None and cfg.budget_bytes > available:
        logger.warning("sphkv: --sphkv-budget %d B exceeds the %d B available; using %d B",
                       cfg.budget_bytes, available, total)
    from .cli import minimum_budget

    staging = cfg.staging_bytes(**dims)
    minimum = minimum_budget(cfg, dims)
    if total < minimum:
        raise ValueError(f"--sphkv-budget {total} B is below the minimum {minimum} B for this model "
                         f"({cfg.num_staging_pages} dense staging pages = {staging} B plus two coded pages); "
                         f"allowed: >= {minimum}")
    logger.info("sphkv: KV budget %.1f MiB = staging %.1f MiB (%d pages) + coded pages %.1f MiB",
                total / 2**20, staging / 2**20, cfg.num_staging_pages, (total - staging) / 2**20)
    return total - staging


def _around_cell_size(original, self, kvc, num_layers, *args, **kwargs):
    from .cli import config_of

    cfg = config_of(kvc.server_args)
    if cfg is None:
        return original(self, kvc, num_layers, *args, **kwargs)
    dims = dict(_dims(kvc), num_layers=num_layers)
    cell = math.ceil(cfg.cell_size(**dims))
    dense = original(self, kvc, num_layers, *args, **kwargs)
    logger.info("sphkv: %d bytes per token (tiers %s, fractions %s) vs %d dense: %.2fx tokens per byte",
                cell, list(cfg.tiers), list(cfg.fractions), dense, dense / cell)
    return cell


def _around_build_pool(original, self, *args, mha_pool_class=None, quant_method=None, **kwargs):
    from .cli import config_of
    from .pool import SphKVPool

    cfg = config_of(self.server_args)
    if cfg is None:
        return original(self, *args, mha_pool_class=mha_pool_class, quant_method=quant_method, **kwargs)
    if quant_method is not None:
        raise ValueError("sphkv codes the KV cache itself; a --kv-cache-dtype quantization method cannot be combined")
    return original(self, *args, mha_pool_class=functools.partial(SphKVPool, sphkv_config=cfg),
                    quant_method=None, **kwargs)


def _around_build_allocator(original, self, *args, **kwargs):
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator

    from .allocator import SphKVPagedAllocator
    from .pool import SphKVPool

    alloc = original(self, *args, **kwargs)
    if not isinstance(kwargs.get("token_to_kv_pool"), SphKVPool) or isinstance(alloc, SphKVPagedAllocator):
        return alloc
    if type(alloc) is not PagedTokenToKVPoolAllocator:
        raise NotImplementedError(f"sphkv needs SGLang's PagedTokenToKVPoolAllocator, got {type(alloc).__name__}")
    return SphKVPagedAllocator.from_allocator(alloc)


def _after_memory_usage(result, self, state, *args, **kwargs):
    from .pool import SphKVPool

    scheduler = self.scheduler
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    if isinstance(pool, SphKVPool):
        stats = pool.stats()
        retention = getattr(scheduler.tree_cache, "retention_stats", None)
        if retention is not None:
            stats.update(retention())
        state["sphkv"] = stats
    return result
