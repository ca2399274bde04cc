# SPDX-License-Identifier: Apache-2.0
"""Rate-Distortion Retention (RDR): utility, tier calibration, budgeted allocation, prefill compression.

Torch only; importing patches nothing. The paged storage it writes lives in :mod:`sphkv.pages`.

Example
-------
>>> import torch
>>> from sphkv.retention import compress_variant
>>> L, N = 2, 256
>>> keys = [torch.randn(1, 3, N, 64) for _ in range(L)]          # post-RoPE keys per layer
>>> values = [torch.randn(1, 3, N, 64) for _ in range(L)]
>>> window = [torch.randn(1, 9, 32, 64) for _ in range(L)]        # last 32 prefill queries
>>> res = compress_variant("ada+rdr", keys, values, window, 0.25, page_size=16)
>>> res.stored_bytes <= 0.25 * res.bf16_bytes
True
>>> segs = res.layer_segments(0)                                  # per head: kept positions per tier, decoded K/V
>>> out = res.attention(0, torch.randn(1, 9, 1, 64))              # decode attention over the pages
>>> out.shape
torch.Size([1, 9, 1, 64])
"""
from .allocation import Plan as Plan, TierCosts as TierCosts, allocate as allocate, uniform_plans as uniform_plans
from .allocation import bf16_bytes as bf16_bytes, budget_from_fraction as budget_from_fraction
from .calibration import TierStats as TierStats, calibrate as calibrate, measure_tiers as measure_tiers
from .pipeline import VARIANTS as VARIANTS, RetentionConfig as RetentionConfig, RetentionResult as RetentionResult
from .pipeline import Segment as Segment, ada_tierset as ada_tierset, compress_prefill as compress_prefill
from .pipeline import compress_variant as compress_variant, eviction_tierset as eviction_tierset
from .pipeline import rdkv_tierset as rdkv_tierset, ada_b_tierset as ada_b_tierset, ada_c_tierset as ada_c_tierset
from .nodes import NodePlan as NodePlan, plan_nodes as plan_nodes
from .replan import ShrinkReport as ShrinkReport, shrink_store as shrink_store
from .utility import POLICIES as POLICIES, AttentionMassTracker as AttentionMassTracker
from .utility import RetentionInputs as RetentionInputs, RetentionPolicy as RetentionPolicy
from .utility import layer_utility as layer_utility, make_policy as make_policy
from .utility import protected_mask as protected_mask, window_attention as window_attention
from .utility import max_attention as max_attention

__all__ = ["Plan", "TierCosts", "allocate", "bf16_bytes", "budget_from_fraction", "TierStats", "calibrate",
           "measure_tiers", "VARIANTS", "RetentionConfig", "RetentionResult", "Segment", "ada_tierset",
           "compress_prefill", "compress_variant", "eviction_tierset", "rdkv_tierset", "ada_b_tierset", "ada_c_tierset",
           "uniform_plans",
           "max_attention", "NodePlan", "plan_nodes", "ShrinkReport", "shrink_store",
           "POLICIES",
           "AttentionMassTracker", "RetentionInputs", "RetentionPolicy", "layer_utility", "make_policy",
           "protected_mask", "window_attention"]
