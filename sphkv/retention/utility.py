# SPDX-License-Identifier: Apache-2.0
"""Utility of each (token, kv head): the attention mass a token is expected to receive.

Units: attention probability per query step, summed over the query heads of a kv group (so a
group of ``G`` query heads spreads a total mass of ``G`` over its keys). All policies return the
same units, so prefill estimates and decode accumulation can be mixed and compared across
layers and heads (that is what lets per-layer and per-head budgets fall out of the allocator).

Policies (``RetentionPolicy.score(RetentionInputs) -> [Hkv, N]``), chosen by name in ``POLICIES``:

* ``"snapkv"`` — observation window (SnapKV): attention of the last ``W`` queries over all keys
  (causal), averaged over the window, pooled along tokens (avg or max, small kernel), summed over
  the query heads of each kv group.
* ``"h2o"`` — accumulated attention of all given queries, no pooling (H2O at prefill).
* ``"pooled"`` — query-agnostic: for each key the *largest* attention any of the given queries gives
  it (queries strided over the whole context plus the observation window, each causal at its own
  position), summed over the query heads of a kv group, then average-pooled over ``kernel`` tokens.
  A token some part of the context needed stays useful even when the last window ignores it.
* ``"mass"`` — a decode-time accumulated mass passed in (see :class:`AttentionMassTracker`).
* ``"recency"`` — ``(i + 1) / N``: newest first (StreamingLLM-style ordering).
* ``"uniform"`` — the same utility everywhere.

Information content (:func:`information_score`, mixed in by :func:`sphkv.retention.compress_prefill` when
``RetentionConfig.info_weight > 0``): a query-agnostic score per token — its surprisal ``-log p(x_t | x_<t)``
under the model itself (free from the prefill's logits) or, KVzip-style, the largest attention it draws while
the model repeats the context (:func:`reconstruction_attention`, one extra forward) — max-pooled over a few
neighbours and divided by its mean over the context. A token the model cannot regenerate carries information
no later query can recover once it is dropped. Nothing about a later question is used.

Priors (:func:`protected_mask`): the first ``sinks`` tokens and the last ``recent`` tokens are
protected — the allocator keeps them at the most precise tier whatever the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["RetentionInputs", "RetentionPolicy", "ObservationWindowPolicy", "AccumulatedAttentionPolicy",
           "MassPolicy", "RecencyPolicy", "UniformPolicy", "POLICIES", "make_policy", "window_attention",
           "protected_mask", "AttentionMassTracker", "layer_utility", "PooledAttentionPolicy", "max_attention",
           "information_score", "reconstruction_attention"]


@dataclass(frozen=True)
class RetentionInputs:
    """What an attention backend can cheaply hand to a policy, for one layer.

    Attributes
    ----------
    k : ``[Hkv, N, d]`` float — keys (post-RoPE), or ``None`` when the policy does not read them.
    q : ``[Hq, M, d]`` float — observation queries (post-RoPE), or ``None``.
    q_positions : ``[M]`` int64 positions of the queries among the ``N`` keys; default ``N-M .. N-1``.
    mass : ``[Hkv, N]`` float32 accumulated attention mass (decode), or ``None``.
    num_tokens : ``N`` when neither ``k`` nor ``mass`` is given.
    sm_scale : softmax scale; default ``d ** -0.5``.
    """

    k: torch.Tensor | None = None
    q: torch.Tensor | None = None
    q_positions: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    num_tokens: int | None = None
    num_kv_heads: int | None = None
    sm_scale: float | None = None

    def shape(self) -> tuple[int, int]:
        """``(Hkv, N)`` of the utility."""
        if self.k is not None:
            return self.k.shape[0], self.k.shape[1]
        if self.mass is not None:
            return self.mass.shape[0], self.mass.shape[1]
        if self.num_tokens is None or self.num_kv_heads is None:
            raise ValueError("RetentionInputs needs k, mass, or num_tokens and num_kv_heads")
        return self.num_kv_heads, self.num_tokens


class RetentionPolicy:
    """Single-method interface: ``score(inputs) -> [Hkv, N]`` float32 utilities (≥ 0)."""

    def score(self, inputs: RetentionInputs) -> torch.Tensor:
        raise NotImplementedError


def _causal_probs(k: torch.Tensor, q: torch.Tensor, q_positions, sm_scale, chunk: int):
    """Yield ``[Hkv, G, m', N]`` float32 causal softmax probabilities, ``chunk`` queries at a time."""
    hkv, n, d = k.shape
    hq, m, _ = q.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    g = hq // hkv
    scale = sm_scale if sm_scale is not None else d ** -0.5
    pos = (q_positions if q_positions is not None else torch.arange(n - m, n)).to(torch.int64).to(k.device)
    if int(pos.min()) < 0 or int(pos.max()) >= n:
        raise ValueError(f"q_positions must lie in 0..{n - 1}, got {int(pos.min())}..{int(pos.max())}")
    kf = k.to(torch.float32)
    qf = q.to(torch.float32).reshape(hkv, g, m, d)
    keys = torch.arange(n, device=k.device)
    for s in range(0, m, chunk):
        qs, ps = qf[:, :, s:s + chunk], pos[s:s + chunk]
        logits = torch.einsum("hgmd,hnd->hgmn", qs, kf) * scale            # [Hkv, G, m', N]
        yield torch.softmax(logits.masked_fill(keys[None, :] > ps[:, None], float("-inf")), -1)


def window_attention(k: torch.Tensor, q: torch.Tensor, q_positions: torch.Tensor | None = None, *,
                     sm_scale: float | None = None, chunk: int = 256) -> torch.Tensor:
    """Causal attention probabilities of queries over keys, summed over the queries.

    Parameters
    ----------
    k : ``[Hkv, N, d]`` float. q : ``[Hq, M, d]`` float (``Hq`` a multiple of ``Hkv``).
    q_positions : ``[M]`` int64; query ``j`` sees keys ``0..q_positions[j]``. Default ``N-M .. N-1``.

    Returns
    -------
    ``[Hq, N]`` float32: ``Σ_j softmax_j(q_j · k / √d)`` (causal), per query head.
    """
    out = torch.zeros(q.shape[0], k.shape[1], device=k.device)
    for p in _causal_probs(k, q, q_positions, sm_scale, chunk):
        out += p.sum(-2).reshape(out.shape)
    return out


def max_attention(k: torch.Tensor, q: torch.Tensor, q_positions: torch.Tensor | None = None, *,
                  sm_scale: float | None = None, chunk: int = 128) -> torch.Tensor:
    """Causal attention probabilities of queries over keys, maximum over the queries.

    Shapes as in :func:`window_attention`; returns ``[Hq, N]`` float32 ``max_j softmax_j(q_j·k/√d)``
    (a key no query sees gets 0).
    """
    out = torch.zeros(q.shape[0], k.shape[1], device=k.device)
    for p in _causal_probs(k, q, q_positions, sm_scale, chunk):
        out = torch.maximum(out, p.amax(-2).reshape(out.shape))
    return out


def _group_sum(per_qhead: torch.Tensor, hkv: int) -> torch.Tensor:
    return per_qhead.reshape(hkv, -1, per_qhead.shape[-1]).sum(1)


@dataclass(frozen=True)
class ObservationWindowPolicy(RetentionPolicy):
    """SnapKV: mean window attention, pooled over ``kernel`` tokens (``pool`` "avg" or "max"), summed per group."""

    pool: str = "avg"
    kernel: int = 5

    def __post_init__(self) -> None:
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool={self.pool!r} is not supported; allowed: ('avg', 'max')")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel!r} must be a positive odd int")

    def score(self, inputs: RetentionInputs) -> torch.Tensor:
        if inputs.k is None or inputs.q is None:
            raise ValueError("ObservationWindowPolicy needs RetentionInputs.k and .q")
        att = window_attention(inputs.k, inputs.q, inputs.q_positions, sm_scale=inputs.sm_scale)
        att = att / inputs.q.shape[1]                                        # [Hq, N] mean over the window
        if self.kernel > 1:
            pad = self.kernel // 2
            if self.pool == "avg":
                att = F.avg_pool1d(att[:, None], self.kernel, 1, pad, count_include_pad=False)[:, 0]
            else:
                att = F.max_pool1d(att[:, None], self.kernel, 1, pad)[:, 0]
        return _group_sum(att, inputs.k.shape[0])


@dataclass(frozen=True)
class AccumulatedAttentionPolicy(RetentionPolicy):
    """H2O at prefill: mean attention over all given queries (pass every prefill query), no pooling."""

    def score(self, inputs: RetentionInputs) -> torch.Tensor:
        return ObservationWindowPolicy(kernel=1).score(inputs)


@dataclass(frozen=True)
class PooledAttentionPolicy(RetentionPolicy):
    """Query-agnostic utility: max attention over queries spread across the context (see module docstring)."""

    kernel: int = 5

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel!r} must be a positive odd int")

    def score(self, inputs: RetentionInputs) -> torch.Tensor:
        if inputs.k is None or inputs.q is None:
            raise ValueError("PooledAttentionPolicy needs RetentionInputs.k and .q (with q_positions)")
        att = max_attention(inputs.k, inputs.q, inputs.q_positions, sm_scale=inputs.sm_scale)
        if self.kernel > 1:
            att = F.avg_pool1d(att[:, None], self.kernel, 1, self.kernel // 2, count_include_pad=False)[:, 0]
        return _group_sum(att, inputs.k.shape[0])


@dataclass(frozen=True)
class MassPolicy(RetentionPolicy):
    """The accumulated decode mass of :class:`AttentionMassTracker` (``inputs.mass``)."""

    def score(self, inputs: RetentionInputs) -> torch.Tensor:
        if inputs.mass is None:
            raise ValueError("MassPolicy needs RetentionInputs.mass")
        return inputs.mass.to(torch.float32)


@dataclass(frozen=True)
class RecencyPolicy(RetentionPolicy):
    """``(i + 1) / N`` for token ``i``: newer tokens first."""

    def score(self, inputs: RetentionInputs) -> torch.Tensor:
        hkv, n = inputs.shape()
        return ((torch.arange(n, dtype=torch.float32) + 1) / n).expand(hkv, n).clone()


@dataclass(frozen=True)
class UniformPolicy(RetentionPolicy):
    """``1 / N`` everywhere."""

    def score(self, inputs: RetentionInputs) -> torch.Tensor:
        hkv, n = inputs.shape()
        return torch.full((hkv, n), 1.0 / n)


POLICIES: dict[str, type[RetentionPolicy]] = {
    "snapkv": ObservationWindowPolicy,
    "h2o": AccumulatedAttentionPolicy,
    "pooled": PooledAttentionPolicy,
    "mass": MassPolicy,
    "recency": RecencyPolicy,
    "uniform": UniformPolicy,
}


def make_policy(name: str, **params) -> RetentionPolicy:
    """Instantiate policy ``name`` (a key of ``POLICIES``) with its parameters."""
    if name not in POLICIES:
        raise ValueError(f"policy={name!r} is not registered; allowed: {sorted(POLICIES)}")
    return POLICIES[name](**params)


def layer_utility(policy: RetentionPolicy, keys: list[torch.Tensor], queries: list[torch.Tensor | None], *,
                  sm_scale: float | None = None, q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """One policy over layers: ``keys[l]`` ``[1, Hkv, N, d]``, ``queries[l]`` ``[1, Hq, W, d]`` → ``[L, Hkv, N]``.

    ``q_positions`` ``[W]``: positions of the queries (default: the last ``W`` tokens).
    """
    strip = lambda x: x[0] if x is not None and x.dim() == 4 else x  # noqa: E731
    return torch.stack([policy.score(RetentionInputs(k=strip(k), q=strip(q), q_positions=q_positions,
                                                     sm_scale=sm_scale))
                        for k, q in zip(keys, queries)])


def information_score(score: torch.Tensor, *, kernel: int = 1, power: float = 1.0) -> torch.Tensor:
    """Query-agnostic information content of each token, normalized to mean 1 along the tokens.

    Parameters
    ----------
    score : ``[..., N]`` float ``>= 0`` — e.g. the surprisal ``-log p(x_t | x_<t)`` (nats) of each context token
        under the model (``[N]``; token 0, which nothing predicts, may be 0), or a reconstruction attention per
        (layer, kv head) (``[L, Hkv, N]``, see :func:`reconstruction_attention`). Must be finite.
    kernel : odd window of the max-pool over neighbours: a token inherits the largest score within
        ``kernel // 2`` tokens on either side (a kept fact keeps its neighbours: its key words and the tokens a
        later question attends through).
    power : contrast; the pooled score is raised to ``power`` before normalizing (``> 1`` favours the
        rare high-scoring spans more).

    Returns
    -------
    ``[..., N]`` float32 ``≥ 0`` with mean 1 along the last dim (all ones in a row whose pooled score is 0).

    Examples
    --------
    >>> information_score(torch.tensor([0.0, 1.0, 5.0, 1.0, 1.0]), kernel=1)
    tensor([0.0000, 0.6250, 3.1250, 0.6250, 0.6250])
    >>> information_score(torch.tensor([0.0, 1.0, 5.0, 1.0, 1.0]), kernel=3)[3] > 1
    tensor(True)
    """
    if score.dim() < 1 or score.shape[-1] < 1:
        raise ValueError(f"score must be [..., N>=1], got {tuple(score.shape)}")
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel={kernel!r} must be a positive odd int")
    if not 0.0 < power < float("inf"):
        raise ValueError(f"power={power!r} must be finite and > 0")
    s = score.detach().to(torch.float32).cpu()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("score must be finite and >= 0 "
                         f"({int((~torch.isfinite(s)).sum())} non-finite, {int((s < 0).sum())} negative)")
    shape = s.shape
    s = s.reshape(-1, 1, shape[-1])
    if kernel > 1:
        s = F.max_pool1d(s, kernel, 1, kernel // 2)
    s = (s ** power).reshape(shape)
    m = s.mean(-1, keepdim=True)
    return torch.where(m > 0, s / m.clamp_min(1e-30), torch.ones_like(s))


def reconstruction_attention(k: torch.Tensor, q: torch.Tensor, num_context: int, *,
                             sm_scale: float | None = None, chunk: int = 128) -> torch.Tensor:
    """KVzip-style reconstruction score: the largest attention each context key gets while the model repeats it.

    Parameters
    ----------
    k : ``[Hkv, T, d]`` float — the context's ``N`` keys followed by the keys of a forward that asks the model to
        repeat the context (a prompt, then the context again), post-RoPE.
    q : ``[Hq, R, d]`` float — the queries of that forward's last ``R`` tokens (positions ``T-R .. T-1``,
        causal; e.g. the repeated context, without the prompt).
    num_context : ``N`` (``N <= T - R``).

    Returns
    -------
    ``[Hkv, N]`` float32: per kv head, the max over its query heads and the repeat queries of the causal
    attention probability on each context key. Query-agnostic: the repeat is the same for every future
    question; a token the model must copy (it cannot regenerate it from the rest) draws the attention.
    """
    hkv, total, _ = k.shape
    hq, r, _ = q.shape
    if not 1 <= num_context <= total - r:
        raise ValueError(f"k holds {total} keys and q {r} queries: num_context={num_context!r} must be in "
                         f"1..{total - r}")
    att = max_attention(k, q, torch.arange(total - r, total), sm_scale=sm_scale, chunk=chunk)[:, :num_context]
    return att.reshape(hkv, hq // hkv, num_context).amax(1)


def protected_mask(num_tokens: int, *, sinks: int, recent: int) -> torch.Tensor:
    """``[N]`` bool: the first ``sinks`` and the last ``recent`` tokens."""
    if sinks < 0 or recent < 0:
        raise ValueError(f"sinks={sinks!r} and recent={recent!r} must be >= 0")
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[:sinks] = True
    if recent:
        mask[max(num_tokens - recent, 0):] = True
    return mask


class AttentionMassTracker:
    """Decode-time utility: exponential moving average (or running sum) of per-step key mass.

    Parameters
    ----------
    initial : ``[L, Hkv, N]`` float32 starting utility (e.g. the prefill estimate), in the same units.
    decay : EMA factor ``β`` in ``u ← β·u + (1-β)·m``; ``mode="sum"`` accumulates ``u ← u + m`` instead.

    Examples
    --------
    >>> tr = AttentionMassTracker(torch.zeros(1, 1, 2), decay=0.5)
    >>> tr.update(0, torch.tensor([[2.0, 0.0, 1.0]]))      # a third token appeared
    >>> tr.utility()
    tensor([[[1.0000, 0.0000, 0.5000]]])
    """

    def __init__(self, initial: torch.Tensor, *, decay: float = 0.9, mode: str = "ema"):
        if mode not in ("ema", "sum"):
            raise ValueError(f"mode={mode!r} is not supported; allowed: ('ema', 'sum')")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r} must be in [0, 1)")
        self.decay, self.mode = decay, mode
        self._u = [initial[l].to(torch.float32).clone() for l in range(initial.shape[0])]

    def update(self, layer: int, mass: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add one step's mass ``[Hkv, n]`` of ``layer`` at ``positions`` ``[n]`` (default ``0..n-1``).

        The utility grows to cover new positions (new tokens start at 0 before this step).
        """
        pos = positions.to(torch.int64) if positions is not None else torch.arange(mass.shape[-1])
        u = self._u[layer]
        need = int(pos.max()) + 1 if pos.numel() else 0
        if need > u.shape[-1]:
            u = torch.nn.functional.pad(u, (0, need - u.shape[-1]))
        step = torch.zeros_like(u).index_add_(1, pos, mass.to(torch.float32))
        self._u[layer] = u + step if self.mode == "sum" else self.decay * u + (1 - self.decay) * step

    def utility(self) -> torch.Tensor:
        """``[L, Hkv, N]`` float32 (layers padded with zeros to the longest)."""
        n = max(u.shape[-1] for u in self._u)
        return torch.stack([torch.nn.functional.pad(u, (0, n - u.shape[-1])) for u in self._u])
