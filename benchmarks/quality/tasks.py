# SPDX-License-Identifier: Apache-2.0
"""The three measurements on one context length: continuation NLL, needle, logit fidelity.

Everything runs through :class:`sphkv_hf.SphKVCache` with attention ``"sphkv"`` (float32 attention
math for every method, the full bf16 cache included, so differences come from the cache only).

* Continuation: the first ``N`` essay tokens are prefilled once (dense); each method compresses that
  prefix; tokens ``N .. N+S-1`` are fed in one forward at positions ``N ..`` over the compressed
  prefix and score targets ``N+1 .. N+S`` (``S = score_len``).
* Needle: ``"The secret passcode is 7-4-1-9-2."`` inserted at a sentence end near depth 10/50/90% of
  the same ``N``-token context (the tokens before it are shared with the continuation prefill, so
  only the rest is prefilled again); the method compresses the context; then the question
  ``"... The secret passcode is"`` and the answer run in one teacher-forced forward. ``answer_nll`` is
  the summed NLL of the answer tokens; a hit means every answer token is the argmax given the
  previous ones — exactly the condition for greedy decoding to emit the answer.
* Fidelity: over the ``S`` scored positions, mean relative L2 error of the logits and mean
  KL(full ‖ method) of the next-token distributions, plus per layer the relative error of the
  attention block's output (errors accumulate through the layers, as in real use).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sphkv_hf import CachePolicy, SphKVCache
from sphkv_hf.segments import DenseSegment

from .methods import CompressedPrefix, Method, PrefillContext

__all__ = ["NEEDLE", "QUESTION", "ANSWER", "ContextTask", "TaskResult"]

NEEDLE = " The secret passcode is 7-4-1-9-2."
QUESTION = "\n\nWhat is the secret passcode mentioned in the text above? The secret passcode is"
ANSWER = " 7-4-1-9-2"


@dataclass
class TaskResult:
    nll: float
    logits: torch.Tensor            # [S, V] float32 of the continuation forward
    layer_out: list[torch.Tensor]   # per layer [S, hidden] attention output
    needle_hits: list[bool]
    answer_nll: list[float]
    bits_per_element: float


class _AttnRecorder:
    """Forward hooks that keep each layer's attention-block output of one forward."""

    def __init__(self, model):
        self.out: list[torch.Tensor] = []
        self.handles = [layer.self_attn.register_forward_hook(self._hook) for layer in model.model.layers]

    def _hook(self, module, args, output):
        self.out.append(output[0][0].detach().float())

    def close(self) -> list[torch.Tensor]:
        for h in self.handles:
            h.remove()
        return self.out


class ContextTask:
    """Dense prefills of one context length and the scoring of any :class:`Method` against them."""

    def __init__(self, model, tokenizer, ids: torch.Tensor, ctx_len: int, *, score_len: int = 256,
                 window: int = 32, depths: tuple[float, ...] = (0.1, 0.5, 0.9)):
        if ids.numel() < ctx_len + score_len + 1:
            raise ValueError(f"need {ctx_len + score_len + 1} tokens of text, have {ids.numel()}")
        self.model, self.tok, self.n, self.s, self.w = model, tokenizer, ctx_len, score_len, window
        self.ids = ids[: ctx_len + score_len + 1]
        enc = lambda t: torch.tensor(tokenizer(t, add_special_tokens=False).input_ids)  # noqa: E731
        self.needle, self.question, self.answer = enc(NEEDLE), enc(QUESTION), enc(ANSWER)
        self.ctx = self._prefill(self.ids[:ctx_len][None], None, 0)
        self.needles = [self._needle_context(d) for d in depths]

    # -- prefills ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _prefill(self, ids: torch.Tensor, prefix: PrefillContext | None, start: int) -> PrefillContext:
        """Dense prefill of ``ids`` ``[1, T]`` at positions ``start..``, after ``prefix``'s first ``start`` tokens."""
        policy = CachePolicy(mode="dense", observe_window=self.w)
        if prefix is None:
            cache = SphKVCache(None, policy=policy)
        else:
            segs = [[DenseSegment.build(k[..., :start, :], v[..., :start, :])]
                    for k, v in zip(prefix.keys, prefix.values)]
            cache = SphKVCache.from_prefix(segs, start, policy=policy)
        pos = torch.arange(start, start + ids.shape[-1])[None]
        self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        kv = [layer.dense_kv() for layer in cache.layers]
        return PrefillContext([k for k, _ in kv], [v for _, v in kv],
                              [layer.observed_queries for layer in cache.layers], self.model.config,
                              base=prefix, shared=start)

    def _needle_context(self, depth: float) -> tuple[PrefillContext, int]:
        base = self.ids[: self.n]
        target = int(depth * (self.n - self.needle.numel()))
        ends = [i for i in range(max(1, target - 200), target + 1)
                if self.tok.decode(base[i - 1:i]).rstrip().endswith((".", "?", "!"))]
        pos = ends[-1] if ends else target
        ids = torch.cat([base[:pos], self.needle, base[pos: self.n - self.needle.numel()]])
        return self._prefill(ids[pos:][None], self.ctx, pos), pos

    # -- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, prefix: CompressedPrefix, ids: torch.Tensor, record: bool = False):
        cache = SphKVCache.from_prefix(prefix.segments, prefix.num_positions)
        pos = torch.arange(prefix.num_positions, prefix.num_positions + ids.numel())[None]
        rec = _AttnRecorder(self.model) if record else None
        try:
            logits = self.model(input_ids=ids[None], position_ids=pos, past_key_values=cache).logits[0].float()
        finally:
            layer_out = rec.close() if rec else []
        return logits, layer_out

    def run(self, method: Method) -> TaskResult:
        prefix = method.build(self.ctx)
        cont = self.ids[self.n:]
        logits, layer_out = self._forward(prefix, cont[:-1], record=True)
        nll = float(F.cross_entropy(logits, cont[1:]))
        hits, answer_nll = [], []
        qa = torch.cat([self.question, self.answer])
        for ctx, _ in self.needles:
            lg, _ = self._forward(method.build(ctx), qa)
            pred = lg[self.question.numel() - 1: -1]                        # predicts the answer tokens
            answer_nll.append(float(F.cross_entropy(pred, self.answer, reduction="sum")))
            hits.append(bool((pred.argmax(-1) == self.answer).all()))
        return TaskResult(nll, logits, layer_out, hits, answer_nll, prefix.bits_per_element)


def fidelity(ref: TaskResult, res: TaskResult) -> dict:
    """Logit relative error, KL(full ‖ method) and per-layer attention-output relative error."""
    rel = ((res.logits - ref.logits).norm(dim=-1) / ref.logits.norm(dim=-1)).mean()
    kl = F.kl_div(F.log_softmax(res.logits, -1), F.log_softmax(ref.logits, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    layers = [float((a - b).norm() / b.norm()) for a, b in zip(res.layer_out, ref.layer_out)]
    return {"logit_rel_err": float(rel), "kl": float(kl), "layer_attn_rel_err": layers}
