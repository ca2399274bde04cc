# SPDX-License-Identifier: Apache-2.0
"""Spherical KV core: angle-domain key codes, value quantizers, logits from codes, reference attention.

Torch only; importing this package patches nothing.
"""
from .attention import attention_from_codes as attention_from_codes
from .codebooks import fit_codebook as fit_codebook, optimal_level_bits as optimal_level_bits
from .config import PRESETS as PRESETS, SphKVConfig as SphKVConfig
from .keys import AngleKeyCodec as AngleKeyCodec, KeyCode as KeyCode
from .logits import logits_adc as logits_adc, logits_from_codes as logits_from_codes, logits_lut as logits_lut
from .validation import NonFiniteError as NonFiniteError
from .values import GroupValueQuantizer as GroupValueQuantizer, ValueCode as ValueCode

__all__ = ["SphKVConfig", "PRESETS", "AngleKeyCodec", "KeyCode", "GroupValueQuantizer", "ValueCode",
           "logits_lut", "logits_adc", "logits_from_codes", "attention_from_codes", "fit_codebook",
           "optimal_level_bits", "NonFiniteError"]
