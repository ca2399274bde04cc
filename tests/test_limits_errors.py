# SPDX-License-Identifier: Apache-2.0
"""Every error in ``docs/limits-and-errors.md`` that is not raised by a server test elsewhere, raised
here without a server: the launcher's checks (``resolve_args``), the plugin's model check, the
attention backend's and radix cache's refusals, the pool's dense-access methods, and the
``nonfinite: "raise"`` debugging switch. Each test also checks that the page names what it tests,
so the page and the code cannot drift apart silently.
"""
from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sphkv.validation import NonFiniteError
from sphkv_sglang import cli
from sphkv_sglang.cli import SphKVArgumentError, add_sphkv_args, resolve_args
from sphkv_sglang.config import SphKVServeConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "limits-and-errors.md").read_text()
P = 8


def _parser():
    parser = argparse.ArgumentParser(exit_on_error=False)
    for name in ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend",
                 "--radix-cache-backend", "--model-path", "--device"):
        parser.add_argument(name, default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--max-running-requests", type=int, default=None)
    for name in ("--tp-size", "--dp-size", "--dcp-size"):
        parser.add_argument(name, type=int, default=1)
    for name in cli._UNSUPPORTED:
        parser.add_argument("--" + name.replace("_", "-"), default=None)
    add_sphkv_args(parser)
    return parser


def _refused(argv) -> str:
    args = _parser().parse_args(argv)
    before = dict(vars(args))
    with pytest.raises(SphKVArgumentError) as e:
        resolve_args(args)
    assert vars(args) == before                       # nothing half-rewritten
    return str(e.value)


# -- start-up: conflicting and refused flags --------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--attention-backend", "--prefill-attention-backend", "--decode-attention-backend",
                                  "--radix-cache-backend"])
def test_backend_conflicts(flag):
    msg = _refused(["--sphkv", flag, "lru" if "radix" in flag else "torch_native"])
    assert re.search(rf"{flag} '\w+' conflicts with --sphkv; allowed: 'sphkv' \(or leave it unset\)", msg), msg
    assert "--radix-cache-backend X" in DOC and "--attention-backend X" in DOC
    args = _parser().parse_args(["--sphkv", flag, "sphkv"])   # the value sphkv itself is accepted
    assert resolve_args(args) is not None and args.radix_cache_backend == args.attention_backend == "sphkv"


def test_kv_cache_dtype_conflict():
    msg = _refused(["--sphkv", "--kv-cache-dtype", "fp8_e4m3"])
    assert "--kv-cache-dtype 'fp8_e4m3' conflicts with --sphkv; allowed: auto, bf16, bfloat16" in msg
    assert "--kv-cache-dtype fp8_e4m3" in DOC


@pytest.mark.parametrize("name", sorted(cli._UNSUPPORTED))
def test_every_refused_feature_names_flag_and_reason(name):
    flag = "--" + name.replace("_", "-")
    msg = _refused(["--sphkv", flag, "EAGLE" if name == "speculative_algorithm" else "1"])
    assert msg == f"{flag} is not supported with --sphkv ({cli._UNSUPPORTED[name]})"
    assert _parser().parse_args([flag, "1"]) is not None and resolve_args(_parser().parse_args([flag, "1"])) is None
    words = {"speculative_algorithm": "speculative decoding", "enable_hierarchical_cache": "HiCache",
             "enable_lmcache": "LMCache", "enable_flexkv": "FlexKV", "enable_unified_memory": "unified memory",
             "enable_kv_cache_sharding": "KV sharding", "enable_hisparse": "HiSparse"}
    assert words[name] in DOC, f"{name} is refused but not documented"


@pytest.mark.parametrize("flag", ["--sphkv-preset sphkv-4", "--sphkv-budget 1GiB", "--sphkv-config {}"])
def test_sphkv_options_require_sphkv(flag):
    name, value = flag.split()
    msg = _refused([name, value])
    assert msg == f"{name} requires --sphkv"
    assert "--sphkv-preset requires --sphkv" in DOC


def test_tensor_parallel_on_cpu_engine_is_refused_clearly():
    msg = _refused(["--sphkv", "--device", "cpu", "--tp-size", "2"])
    assert msg.startswith("--tp-size 2 with --sphkv on SGLang's CPU engine is not supported")
    assert "allowed here: --tp-size 1, or a GPU machine" in msg
    assert resolve_args(_parser().parse_args(["--sphkv", "--device", "cpu", "--tp-size", "1"])) is not None
    assert "`--tp-size N` (N > 1) on the CPU engine" in DOC


# -- in the scheduler: model kinds the pool cannot hold ---------------------------------------------------
def test_mla_and_v_head_dim_mismatch_are_refused():
    pytest.importorskip("sglang")
    from sphkv_sglang.plugin import _dims

    mla = SimpleNamespace(use_mla_backend=True, model_config=SimpleNamespace(head_dim=64, v_head_dim=64))
    with pytest.raises(NotImplementedError, match="MHA/GQA models with v_head_dim == head_dim only"):
        _dims(mla)
    mismatch = SimpleNamespace(use_mla_backend=False, model_config=SimpleNamespace(head_dim=128, v_head_dim=64))
    with pytest.raises(NotImplementedError, match="v_head_dim == head_dim"):
        _dims(mismatch)
    assert "MLA, `v_head_dim != head_dim`" in DOC


def test_pool_refuses_v_head_dim_mismatch():
    pytest.importorskip("sglang")
    from sphkv_sglang.pool import SphKVPool

    cfg = SphKVServeConfig(page_size=P, max_running_requests=2)
    with pytest.raises(ValueError, match="v_head_dim == head_dim, got 32 != 64"):
        SphKVPool(16 * P, P, torch.bfloat16, 2, 64, 2, "cpu", False, sphkv_config=cfg, v_head_dim=32)


@pytest.mark.parametrize("layer, needle", [
    (SimpleNamespace(layer_id=3, is_cross_attention=True, sliding_window_size=-1), "cross-attention"),
])       # causal sliding-window layers are served (issue 12: tests/test_sglang_window.py)
def test_backend_refuses_cross_attention_and_sliding_window(layer, needle):
    pytest.importorskip("sglang")
    from sphkv_sglang.backend import SphKVAttnBackend

    with pytest.raises(NotImplementedError) as e:
        SphKVAttnBackend._check_layer(layer)
    assert needle in str(e.value)
    SphKVAttnBackend._check_layer(SimpleNamespace(layer_id=0, is_cross_attention=False, sliding_window_size=-1))
    SphKVAttnBackend._check_layer(SimpleNamespace(layer_id=0, is_cross_attention=False, sliding_window_size=None))
    assert "cross-attention raise `NotImplementedError`" in DOC


@pytest.fixture
def pool():
    pytest.importorskip("sglang")
    from sphkv_sglang.pool import SphKVPool

    cfg = SphKVServeConfig(page_size=P, max_running_requests=2)
    return SphKVPool(16 * P, P, torch.bfloat16, 2, 64, 2, "cpu", False, sphkv_config=cfg)


@pytest.mark.parametrize("kind", ["is_hybrid_swa", "is_hybrid_ssm", "enable_hierarchical_cache"])
def test_radix_cache_refuses_hybrid_models_and_hicache(pool, kind):
    from sphkv_sglang.radix import create_sphkv_radix_cache

    flags = dict(is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False)
    flags[kind] = True
    ctx = SimpleNamespace(params=SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: pool)),
                          **flags)
    with pytest.raises(NotImplementedError, match="hybrid SWA/SSM models and HiCache are not supported"):
        create_sphkv_radix_cache(ctx)
    assert "sliding-window/SSM hybrids" in DOC


def test_radix_cache_and_backend_need_the_sphkv_pool():
    pytest.importorskip("sglang")
    from sphkv_sglang.backend import SphKVAttnBackend
    from sphkv_sglang.radix import create_sphkv_radix_cache

    dense = SimpleNamespace()
    ctx = SimpleNamespace(params=SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: dense)),
                          is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False)
    with pytest.raises(TypeError, match="--radix-cache-backend sphkv needs the sphkv KV pool"):
        create_sphkv_radix_cache(ctx)
    with pytest.raises(TypeError, match="--attention-backend sphkv needs the sphkv KV pool"):
        SphKVAttnBackend(SimpleNamespace(token_to_kv_pool=dense))


def test_decode_context_parallel_refused_at_startup():
    msg = _refused(["--sphkv", "--dcp-size", "2"])
    assert msg.startswith("--dcp-size 2 is not supported with --sphkv (decode context parallelism")
    assert resolve_args(_parser().parse_args(["--sphkv", "--dcp-size", "1"])) is not None
    assert "`--dcp-size N` (N > 1, decode context parallelism)" in DOC


def test_decode_context_parallel_write_is_refused(pool):
    k = torch.randn(3, 2, 64).bfloat16()
    with pytest.raises(NotImplementedError, match="decode context parallelism"):
        pool.set_kv_buffer(SimpleNamespace(layer_id=0), torch.arange(P, P + 3), k, k,
                           dcp_kv_mask=torch.ones(3, dtype=torch.bool))
    assert "decode context parallel" in DOC


# -- while serving: dense access and the nonfinite debugging switch ---------------------------------------
def test_every_dense_buffer_method_is_refused(pool):
    """Every public method of SGLang's MHA pool that touches the dense ``k_buffer``/``v_buffer`` is
    either overridden by the sphkv pool or ends in ``SphKVDenseAccessError`` (not an AttributeError or
    a silent write into buffers that do not exist); the refusing methods name themselves."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sphkv_sglang.pool import SphKVDenseAccessError, SphKVPool

    def required(fn):
        return [p for p in inspect.signature(fn).parameters.values()
                if p.name != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    dense = []
    for name, fn in inspect.getmembers(MHATokenToKVPool, inspect.isfunction):
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if not name.startswith("_") and re.search(r"\b[kv]_buffer\b|get_kv_buffer\(|get_key_buffer\(", src):
            dense.append(name)
    assert {"get_key_buffer", "get_kv_buffer", "move_kv_cache"} <= set(dense), dense
    silent = []
    for name in dense:
        if getattr(SphKVPool, name) is not getattr(MHATokenToKVPool, name):
            continue                                   # the sphkv pool implements it itself
        try:
            getattr(pool, name)(*([None] * len(required(getattr(MHATokenToKVPool, name)))))
        except SphKVDenseAccessError:
            continue
        except Exception as e:                         # noqa: BLE001
            silent.append(f"{name}: {type(e).__name__}: {e}"[:200])
        else:
            silent.append(f"{name}: returned")
    assert not silent, f"inherited dense-buffer methods that do not refuse clearly: {silent}"
    refusing = [n for n, fn in vars(SphKVPool).items() if callable(fn) and fn.__qualname__.startswith("_dense_access")]
    assert len(refusing) >= 10
    for name in refusing:
        target = getattr(MHATokenToKVPool, name, None)
        with pytest.raises(SphKVDenseAccessError) as e:
            getattr(pool, name)(*([None] * (len(required(target)) if target else 0)))
        assert f"SphKVPool.{name}: the sphkv pool stores angle-coded pages, not dense K/V buffers" in str(e.value)
    assert "SphKVDenseAccessError: SphKVPool.get_key_buffer: the sphkv pool stores angle-coded pages" in DOC


def test_nonfinite_raise_from_the_command_line():
    """``--sphkv-config '{"nonfinite": "raise"}'`` reaches the store and a NaN write raises the documented
    message (layer, row count, first index); the default config zeroes instead."""
    from sphkv_sglang.store import SphKVStore

    args = _parser().parse_args(["--sphkv", "--page-size", str(P), "--max-running-requests", "2",
                                 "--sphkv-config", '{"nonfinite": "raise"}'])
    cfg = resolve_args(args)
    assert cfg.nonfinite == "raise"
    st = SphKVStore(cfg, num_pages=8, num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    k, v = torch.randn(P, 2, 64), torch.randn(P, 2, 64)
    st.write(0, torch.arange(P, 2 * P), k, v)
    k2 = k.clone()
    k2[2, 0, 1] = float("inf")
    k2[5, 1, 0] = float("nan")
    with pytest.raises(NonFiniteError) as e:
        st.write(1, torch.arange(P, 2 * P), k2, v)
    assert re.search(r"keys of layer 1 contains NaN/Inf in 2 token row\(s\); first at index", str(e.value)), str(e.value)
    assert '`NonFiniteError: values of layer L contains NaN/Inf in N token row(s); first at index' in DOC
