# SPDX-License-Identifier: Apache-2.0
"""The measurements on one context length: continuation NLL, retrieval, logit fidelity.

Everything runs through :class:`sphkv_hf.SphKVCache` with attention ``"sphkv"`` (float32 attention
math for every method, the full bf16 cache included, so differences come from the cache only).

* Continuation: the first ``N`` corpus tokens are prefilled once (dense); each method compresses that
  prefix; tokens ``N .. N+S-1`` are fed in one forward at positions ``N ..`` over the compressed
  prefix and score targets ``N+1 .. N+S`` (``S = score_len``).
* Retrieval (:mod:`benchmarks.quality.retrieval`): 24 cases in one haystack built from the same
  ``N`` tokens (needles inserted at sentence ends; the tokens before the first needle are shared with
  the continuation prefill, so only the rest is prefilled again); the method compresses each haystack
  once, then every question and its answer run in one teacher-forced forward over it (the question
  is unknown at compression time). A case is a hit when every token of its value is the argmax.
  ``retrieval_rate`` is over all 24 cases; ``needle_hit_rate`` over the 8 single-needle cases
  (depths 1/16 … 15/16); ``answer_nll`` the mean summed answer NLL of the single cases.
* Fidelity: over the ``S`` scored positions, mean relative L2 error of the logits and mean
  KL(full ‖ method) of the next-token distributions, plus per layer the relative error of the
  attention block's output (errors accumulate through the layers, as in real use).
* Speed: coded segments' logits for many queries (a 256-token continuation, a question) are computed
  as ``q_rot · k̂_rot`` with ``k̂_rot`` built from the same codes (level-1 angle centres × pair radii
  of the higher levels, plus the page mean) — the same sum as :func:`sphkv.logits.logits_adc`'s
  one-hot GEMM, in a 64-wide instead of a (d/2 · n1)-wide product (16x fewer FLOPs on CPU); decode-
  sized calls keep the LUT recurrence (:func:`fast_logits_from_codes`, checked against ``logits_adc``
  in the tests).
* Queries for query-agnostic utilities: each prefill keeps the post-RoPE queries at every
  ``pool_stride``-th position and of the last ``window`` tokens (``PrefillContext.pooled_queries``).
* Information scores (computed on first use): ``PrefillContext.surprisal()`` from the prefill's final hidden
  states (a hook on the final norm; the LM head in chunks), ``PrefillContext.reconstruction()`` from one forward
  of :data:`REPEAT_PROMPT` + the context over the context's dense cache (KVzip-style; see
  :func:`sphkv.retention.utility.reconstruction_attention`). Neither sees a question.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sphkv_hf import CachePolicy, SphKVCache
from sphkv_hf.segments import DenseSegment

import sphkv_hf.segments as _segments
from sphkv.logits import logits_from_codes, mean_logits, pair_radii
from sphkv.retention.utility import reconstruction_attention

from .methods import CompressedPrefix, Method, PrefillContext
from .retrieval import TASKS, build_suite

REPEAT_PROMPT = "\n\nRepeat the text above exactly, from its first word.\n\n"


def _record_updates(cache: SphKVCache) -> dict:
    """Wrap ``cache.update`` (this instance only) so the next forward's new ``(k, v)`` per layer index are kept in
    the returned dict: what the model wrote, before a sliding layer's cache drops what fell out of its window."""
    new: dict = {}
    update = cache.update

    def _update(k, v, layer_idx, *args, **kwargs):
        new[layer_idx] = (k, v)
        return update(k, v, layer_idx, *args, **kwargs)

    cache.update = _update
    return new


class _Lazy:
    """A value computed on first call and kept (the reconstruction score costs one extra forward)."""

    def __init__(self, fn):
        self.fn, self.value = fn, None

    def __call__(self):
        if self.value is None:
            self.value = self.fn()
            self.fn = None
        return self.value

__all__ = ["ContextTask", "TaskResult", "fast_logits_from_codes", "own_nll"]


def fast_logits_from_codes(q, code, codec, *, rotated: bool = False):
    """:func:`sphkv.logits.logits_from_codes` for many queries as ``q_rot · k̂_rot`` from the codes (same sum)."""
    if q.shape[-2] * codec.centers[0].numel() <= 64:
        return logits_from_codes(q, code, codec, rotated=rotated)
    q_rot = q.to(torch.float32) if rotated else codec.rotate(q)
    c1, rho = pair_radii(code, codec)                                        # [..., N, d/2] each
    ang = codec.centers[0].to(q_rot.device)[c1]
    k_rot = torch.stack([rho * torch.cos(ang), rho * torch.sin(ang)], -1).flatten(-2)   # [..., N, d]
    return q_rot @ k_rot.transpose(-1, -2) + mean_logits(q_rot, code, codec)


_segments.logits_from_codes = fast_logits_from_codes      # CodedSegment.logits in the harness's forwards


@dataclass
class TaskResult:
    nll: float
    logits: torch.Tensor            # [S, V] float32 of the continuation forward
    layer_out: list[torch.Tensor]   # per layer [S, hidden] attention output
    needle_hits: list[bool]                 # the single-needle cases, in depth order
    answer_nll: list[float]                 # their summed answer NLL
    bits_per_element: float
    hits: dict = None                       # task -> list[bool]
    answer_margin: list[float] = None       # single cases: min over value tokens of logit(answer) - best other


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


def _with_positions(prefix: list[list]) -> list[list]:
    """Segments a sliding layer can mask: each segment without ``positions`` gets its contiguous positions
    (a layer's segments cover positions ``0..N-1`` in order; segments that carry positions keep them)."""
    out = []
    for segs in prefix:
        off, layer = 0, []
        for seg in segs:
            n = seg.num_tokens
            if seg.positions is None:
                seg = dataclasses.replace(seg, positions=torch.arange(off, off + n)[None, None])
            layer.append(seg)
            off += n
        out.append(layer)
    return out


class ContextTask:
    """Dense prefills of one context length and the scoring of any :class:`Method` against them
    (``retrieval=False``: the continuation prefill only, no retrieval haystacks)."""

    def __init__(self, model, tokenizer, ids: torch.Tensor, ctx_len: int, *, score_len: int = 256,
                 window: int = 32, pool_stride: int = 32, seed: int = 0, retrieval: bool = True):
        if ids.numel() < ctx_len + score_len + 1:
            raise ValueError(f"need {ctx_len + score_len + 1} tokens of text, have {ids.numel()}")
        self.model, self.tok, self.n, self.s, self.w = model, tokenizer, ctx_len, score_len, window
        self.stride = pool_stride
        types = getattr(model.config, "layer_types", None) or []
        self.sliding = "sliding_attention" in types          # a model with sliding-window layers (Gemma 3)
        self.ids = ids[: ctx_len + score_len + 1]
        self.ctx = self._prefill(self.ids[:ctx_len][None], None, 0)
        self.haystacks = [(h, self._prefill(h.ids[h.first:][None], self.ctx, h.first))
                          for h in build_suite(tokenizer, self.ids[:ctx_len], seed=seed)] if retrieval else []

    # -- prefills ----------------------------------------------------------------------------------
    def _pool_positions(self) -> torch.Tensor:
        n = self.n
        pos = set(range(self.stride - 1, n, self.stride)) | set(range(max(0, n - self.w), n))
        return torch.tensor(sorted(pos), dtype=torch.int64)

    @torch.no_grad()
    def _prefill(self, ids: torch.Tensor, prefix: PrefillContext | None, start: int) -> PrefillContext:
        """Dense prefill of ``ids`` ``[1, T]`` at positions ``start..``, after ``prefix``'s first ``start`` tokens."""
        policy = CachePolicy(mode="dense", observe_window=ids.shape[-1])
        if prefix is None:
            cache = SphKVCache(None, policy=policy)
        else:
            segs = [[DenseSegment.build(k[..., :start, :], v[..., :start, :])]
                    for k, v in zip(prefix.keys, prefix.values)]
            cache = SphKVCache.from_prefix(_with_positions(segs) if self.sliding else segs, start, policy=policy)
        pos = torch.arange(start, start + ids.shape[-1])[None]
        final = self.model.model.norm.register_forward_hook(lambda m, a, out: hidden.append(out.detach()))
        hidden: list[torch.Tensor] = []
        # a sliding layer drops what its window left behind: keep every layer's new K/V whole
        new = _record_updates(cache) if self.sliding else {}
        try:
            self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            final.remove()
        states = hidden[0][0]                                                # [T, D] final-norm states
        lead = self._states[id(prefix)][start - 1:start] if prefix is not None and start else None
        surprisal = _Lazy(lambda: self._surprisal(states, ids[0], prefix, start, lead))
        if self.sliding:          # every position of every layer (prefix + this forward) is compressed
            kv = []
            for i in range(len(cache.layers)):
                k, v = (x.to(torch.bfloat16) for x in new[i])
                if prefix is not None and start:
                    k = torch.cat([prefix.keys[i][..., :start, :], k], -2)
                    v = torch.cat([prefix.values[i][..., :start, :], v], -2)
                kv.append((k, v))
        else:
            kv = [tuple(x.to(torch.bfloat16) for x in layer.dense_kv()) for layer in cache.layers]   # the bf16 cache
        pp = self._pool_positions()
        own = pp[pp >= start]
        pooled = []
        for i, layer in enumerate(cache.layers):
            q = layer.observed_queries[..., own - start, :]                 # [1, Hq, M_own, d]
            if prefix is not None and start > 0:
                q = torch.cat([prefix.pooled_queries[i][..., :int((pp < start).sum()), :], q], -2)
            pooled.append(q)
        window = [q[..., -self.w:, :] for q in pooled]                       # the last W positions are in pp
        for layer in cache.layers:
            layer.observed_queries = None
        cell: list[PrefillContext] = []
        full_ids = torch.cat([self.ids[:start], ids[0]]) if start else ids[0]
        ctx = PrefillContext([k for k, _ in kv], [v for _, v in kv], window, self.model.config,
                             base=prefix, shared=start, pooled_queries=pooled, pooled_positions=pp,
                             surprisal=surprisal, reconstruction=_Lazy(lambda: self._reconstruction(cell[0], full_ids)))
        cell.append(ctx)
        if prefix is None:                  # a later prefill after this one scores its first token from these
            self._states = {id(ctx): states}
        return ctx

    @torch.no_grad()
    def _reconstruction(self, ctx: PrefillContext, ids: torch.Tensor) -> torch.Tensor:
        """``[L, Hkv, N]`` float32 KVzip-style score of ``ctx`` (token ids ``ids`` ``[N]``): one forward of
        :data:`REPEAT_PROMPT` + the context over the context's dense bf16 cache, then per layer
        :func:`sphkv.retention.utility.reconstruction_attention` of the repeated tokens' queries."""
        n = ids.numel()
        prompt = torch.tensor(self.tok(REPEAT_PROMPT, add_special_tokens=False).input_ids, dtype=ids.dtype)
        rep = torch.cat([prompt, ids])
        segs = [[DenseSegment.build(k, v)] for k, v in zip(ctx.keys, ctx.values)]
        policy = CachePolicy(mode="dense", observe_window=ids.numel())
        cache = SphKVCache.from_prefix(_with_positions(segs) if self.sliding else segs, n, policy=policy)
        pos = torch.arange(n, n + rep.numel())[None]
        new = _record_updates(cache)                                  # the repeat's own keys (sliding layers)
        self.model(input_ids=rep[None], position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = []
        for i, layer in enumerate(cache.layers):
            if self.sliding:        # a sliding layer's cache keeps its window only: the context's keys + the repeat's
                k = torch.cat([ctx.keys[i][0].float(), new[i][0][0].float()], -2)
            else:
                k = layer.dense_kv()[0][0].float()                           # [Hkv, N + P + N, d]
            q = layer.observed_queries[0]                                    # [Hq, N, d]: the repeated context
            out.append(reconstruction_attention(k, q, n))
            layer.observed_queries = None
        return torch.stack(out)

    @torch.no_grad()
    def _surprisal(self, hidden: torch.Tensor, ids: torch.Tensor, prefix: PrefillContext | None, start: int,
                   lead_state: torch.Tensor | None, chunk: int = 512) -> torch.Tensor:
        """``[start + T]`` float32 ``-log p(x_t | x_<t)``: ``prefix``'s for its first ``start`` tokens, then this
        forward's (``hidden`` ``[T, D]`` final-norm states, ``ids`` ``[T]``); the first token of the forward is
        scored from the prefix's state at ``start - 1`` (``lead_state`` ``[1, D]``; 0 at position 0, which
        nothing predicts)."""
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        states, targets = hidden[:-1], ids[1:]
        lead = torch.zeros(1)
        if prefix is not None and start > 0:
            states = torch.cat([lead_state, states])
            targets = ids
            lead = prefix.surprisal()[:start]
        out = []
        for a in range(0, targets.numel(), chunk):
            logits = head(states[a:a + chunk]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            out.append(F.cross_entropy(logits, targets[a:a + chunk], reduction="none"))
        return torch.cat([lead] + out)

    # -- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, prefix: CompressedPrefix, ids: torch.Tensor, record: bool = False):
        segments = _with_positions(prefix.segments) if self.sliding else prefix.segments
        cache = SphKVCache.from_prefix(segments, prefix.num_positions)
        pos = torch.arange(prefix.num_positions, prefix.num_positions + ids.numel())[None]
        rec = _AttnRecorder(self.model) if record else None
        try:
            logits = self.model(input_ids=ids[None], position_ids=pos, past_key_values=cache).logits[0].float()
        finally:
            layer_out = rec.close() if rec else []
        return logits, layer_out

    @torch.no_grad()
    def model_nll(self, attn_implementation: str = "sdpa") -> float:
        """The model's own continuation NLL: its own attention (``attn_implementation``, float32 K/V, every
        mask transformers builds for it: causal, sliding window, ...) over the ``N + S`` tokens in one
        forward without a cache, scored on the same ``S`` targets as :meth:`run`. The ``full`` row is
        checked against it (the sphkv attention over the full bf16 cache must reproduce it)."""
        return own_nll(self.model, self.ids, self.n, attn_implementation)

    def run(self, method: Method) -> TaskResult:
        prefix = method.build(self.ctx)
        cont = self.ids[self.n:]
        logits, layer_out = self._forward(prefix, cont[:-1], record=True)
        nll = float(F.cross_entropy(logits, cont[1:]))
        hits = {t: [] for t in TASKS}
        single = []                                     # (depth, hit, answer nll, margin)
        for hay, ctx in self.haystacks:
            compressed = method.build(ctx)
            for q in hay.questions:
                qa = torch.cat([q.question, q.answer])
                lg, _ = self._forward(compressed, qa)
                pred = lg[q.question.numel() - 1: -1]                      # predicts the answer tokens
                ok = pred.argmax(-1) == q.answer
                right = pred.gather(-1, q.answer[:, None])[:, 0]
                margin = right - pred.scatter(-1, q.answer[:, None], float("-inf")).amax(-1)   # > 0: argmax
                for (a, b), depth in zip(q.spans, q.depths):
                    hit = bool(ok[a:b].all())
                    hits[q.task].append(hit)
                    if q.task == "single":
                        single.append((depth, hit, float(F.cross_entropy(pred[a:b], q.answer[a:b], reduction="sum")),
                                       float(margin[a:b].min())))
        single.sort()
        return TaskResult(nll, logits, layer_out, [s[1] for s in single], [s[2] for s in single],
                          prefix.bits_per_element, hits, [s[3] for s in single])


@torch.no_grad()
def own_nll(model, ids: torch.Tensor, ctx_len: int, attn_implementation: str = "sdpa") -> float:
    """NLL of ``ids[ctx_len + 1:]`` (``ids`` ``[N + S + 1]`` int64) from one cache-less forward over ``ids[:-1]``
    with the model's own attention ``attn_implementation`` (what :meth:`ContextTask.model_nll` reports)."""
    own = model.config._attn_implementation
    model.set_attn_implementation(attn_implementation)
    try:
        s = ids.numel() - 1 - ctx_len
        logits = model(input_ids=ids[None, :-1], use_cache=False, logits_to_keep=s).logits[0].float()
    finally:
        model.set_attn_implementation(own)
    return float(F.cross_entropy(logits, ids[ctx_len + 1:]))


def fidelity(ref: TaskResult, res: TaskResult) -> dict:
    """Logit relative error, KL(full ‖ method) and per-layer attention-output relative error."""
    rel = ((res.logits - ref.logits).norm(dim=-1) / ref.logits.norm(dim=-1)).mean()
    kl = F.kl_div(F.log_softmax(res.logits, -1), F.log_softmax(ref.logits, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    layers = [float((a - b).norm() / b.norm()) for a, b in zip(res.layer_out, ref.layer_out)]
    return {"logit_rel_err": float(rel), "kl": float(kl), "layer_attn_rel_err": layers}
