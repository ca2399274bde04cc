# SPDX-License-Identifier: Apache-2.0
"""FlashInfer-style batch decode over Spherical KV tier pages: ``plan()`` once per batch, ``run()`` per layer."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from sphkv.pool import TierPool
from sphkv.tiers import Tier, TierSet
from sphkv_kernels.decode import (DEFAULT_CODED_KERNEL, LOG2E, _warn_once, default_tab16, interpreting,
                                  prefers_tc, rowwise_row_table_elems, rowwise_scratch_elems, rowwise_supported)
from sphkv_kernels.layout import KERNEL_HEAD_DIMS, CodedLayout
from sphkv_kernels.schedule import DecodeSchedule, entry_page_lens, schedule_decode

from . import ops
from .ops import NAMESPACE, absent, config_key

__all__ = ["BatchDecodeWithSphKVPagedKVCacheWrapper", "resolve_backend"]

_VARIANT_KEYS = ("kernel", "maxnreg", "tab16", "lut16", "asm_values", "prefetch")
# ``kernel_options["row_tables"]``: with the row-wise kernel on the GPU, one launch per coded tier rotates the queries
# and builds each (request, kv head)'s level-1 table once (``coded_row_tables``), shared by the row's work items;
# 0 keeps the per-work-item tables and the torch query rotation. Default: on from this head_dim up — H200, 2026-12-02
# (NOTES.md): d = 128 every shape faster (8 x 32K 317.8 -> 298.9 us, 1 x 8K 51.8 -> 43.3 us), d = 64 slower
# (8 x 32K 177.9 -> 209.2 us: the kernel reading a shared table compiled slower there)
ROW_TABLES_MIN_HEAD_DIM = 128
CODED_PROGRAMS_PER_SM = 8          # split-K target with a coded tier present (row-wise kernel: 2-warp programs)

_CODED_NAMES = ("k_codes", "k_radius", "k_mean", "v_codes", "v_scale", "v_zero")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` → ``"triton"`` on CUDA or under ``TRITON_INTERPRET=1``, else ``"cpu"`` (the C++ CPU
    kernels, :mod:`sphkv_kernels.cpu_decode`) where they build, else ``"reference"``."""
    if backend == "auto":
        if device.type == "cuda" or interpreting():
            return "triton"
        from sphkv_kernels.cpu_decode import available

        return "cpu" if device.type == "cpu" and available() else "reference"
    if backend not in ("triton", "reference", "cpu"):
        raise ValueError(f"backend={backend!r}; allowed: 'auto', 'triton', 'cpu', 'reference'")
    return backend


def _tier_tensors(entry, dense: bool) -> dict:
    names = ("k", "v") if dense else _CODED_NAMES
    if isinstance(entry, TierPool):
        return {n: getattr(entry, n) for n in names}
    if isinstance(entry, Mapping):
        return {n: entry[n] for n in names}
    return {n: getattr(entry, n) for n in names}



def _value_rotations(layouts, head_dim: int, device) -> tuple[list[torch.Tensor], int]:
    """Per tier, the ``[head_dim, head_dim]`` float32 value rotation the merge undoes (identity where a tier has
    none) and the bit mask of the tiers that have one (bit ``t`` set: tier ``t``'s partials are rotated)."""
    eye = torch.eye(head_dim, dtype=torch.float32, device=device)
    rot, mask = [], 0
    for t, lay in enumerate(layouts):
        if lay is not None and lay.value_rotate:
            rot.append(lay.on(device)["value_rotation"])
            mask |= 1 << t
        else:
            rot.append(eye)
    return rot, mask

class BatchDecodeWithSphKVPagedKVCacheWrapper:
    """Decode attention of one new token per request over tier-homogeneous Spherical KV pages.

    The same contract as FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``: :meth:`plan` once per
    batch (it may synchronize and allocate), :meth:`run` once per layer (no synchronization, no
    allocation when ``out``/``lse`` are given). A page holds ``page_size`` tokens of ONE kv head, so
    page lists are per (request, kv head): row ``r = request * num_kv_heads + kv_head``.

    Each tier present in the batch is one kernel launch (coded tiers: logits from angle codes and
    values dequantized in registers; the dense tier: bf16 pages), split over the sequence; a merge
    launch combines the partial softmax states exactly. Backends: ``"triton"`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), ``"cpu"`` (C++ page-tile kernels, :mod:`sphkv_kernels.cpu_decode`),
    ``"reference"`` (pure PyTorch), ``"auto"`` (Triton where it runs, else the CPU kernels where they build).

    Parameters
    ----------
    workspace_buffer : ``[nbytes]`` uint8 — scratch for the split-K partial states (float32
        ``num_slots × num_qo_heads/num_kv_heads × (head_dim + 1)``); :meth:`plan` allocates its own
        when too small.
    tiers : the :class:`sphkv.tiers.TierSet` (or sequence of :class:`~sphkv.tiers.Tier`) whose index
        is ``page_tiers``; ``run``'s ``kv_cache[t]`` is tier ``t``'s :class:`sphkv.pool.TierPool` (or a
        mapping with its tensors).
    backend : ``"auto"`` | ``"triton"`` | ``"reference"``.

    Examples
    --------
    >>> import torch
    >>> from sphkv.pool import TierPool
    >>> from sphkv.tiers import TierSet
    >>> ts = TierSet.default(head_dim=64, page_size=16)            # dense, sphkv-4, sphkv-2
    >>> pools = [TierPool(t, 8, head_dim=64, page_size=16) for t in ts.tiers]
    >>> for pg in range(1, 8):
    ...     for pool in pools:
    ...         pool.write(pg, torch.randn(16, 64), torch.randn(16, 64))
    >>> w = BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), tiers=ts)
    >>> # 1 request, 2 kv heads: head 0 reads pages (dense 1, sphkv-4 2, sphkv-2 3), head 1 (sphkv-4 4, dense 5)
    >>> w.plan(torch.tensor([0, 3, 5]), torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 1, 0]),
    ...        torch.tensor([7, 16]), 6, 2, 64, 16)
    >>> q = torch.randn(1, 6, 64, dtype=torch.bfloat16)
    >>> out, lse = w.run(q, pools, return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 6, 64]), torch.Size([1, 6]))
    """

    def __init__(self, workspace_buffer: torch.Tensor, *, tiers: TierSet | Sequence[Tier], backend: str = "auto"):
        self._workspace = workspace_buffer
        self._tiers = tuple(tiers.tiers if isinstance(tiers, TierSet) else tiers)
        if not self._tiers:
            raise ValueError("tiers must name at least one tier")
        self._layouts = [None if t.dense else CodedLayout.from_config(t.config) for t in self._tiers]
        self._config_keys = [None if t.dense else config_key(t.config) for t in self._tiers]
        self._backend_request = backend
        if backend not in ("auto", "triton", "reference", "cpu"):      # validate the name now
            resolve_backend(backend, torch.device("cpu"))
        self._plan = None

    # ---------------------------------------------------------------------------------------------
    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, page_tiers: torch.Tensor,
             last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, *,
             page_lens: torch.Tensor | None = None, pages_per_split: int | None = None,
             q_data_type: torch.dtype = torch.bfloat16, key_mass: bool = False, device=None,
             kernel_options: Mapping[str, int] | None = None) -> None:
        """Build the split-K schedule of one decode batch.

        Parameters
        ----------
        indptr : ``[batch_size * num_kv_heads + 1]`` int32 — row ``r = request * num_kv_heads + kv_head``
            owns entries ``indptr[r]:indptr[r+1]``.
        indices : ``[nnz]`` int32 — page id of each entry in its tier's arena.
        page_tiers : ``[nnz]`` int — tier index of each entry (into ``tiers``).
        last_page_len : ``[batch_size * num_kv_heads]`` int32 — valid tokens of each row's last page
            (the others are full), FlashInfer's convention; ignored when ``page_lens`` is given.
        num_qo_heads, num_kv_heads, head_dim, page_size : attention shape (``num_qo_heads`` a multiple
            of ``num_kv_heads``).
        page_lens : optional ``[nnz]`` int32 — valid tokens of every entry (tier pages may be partial
            anywhere in a row: RDR keeps what it keeps).
        pages_per_split : pages per split-K work item (default: enough items to fill the device).
        q_data_type : dtype of the queries ``run`` will receive.
        key_mass : allocate what ``run(..., key_mass_out=...)`` needs.
        device : where ``run`` will compute (default: ``indices``' device).
        kernel_options : optional Triton launch overrides for the tier kernels: ``block_n``
            (tokens per tile), ``num_warps``, ``num_stages`` (0 or absent: the launcher's default),
            ``programs_per_sm`` (split-K target when ``pages_per_split`` is None; default
            :data:`CODED_PROGRAMS_PER_SM` when a coded tier is present, 2 for dense-only batches, as
            measured on an H100 — NOTES.md), and for coded tiers ``kernel`` (``"rowwise"``/``"tile"``/``"tc"``;
            absent or ``"auto"``: on CUDA the tensor-core kernel from head_dim
            :data:`sphkv_kernels.decode.TC_MIN_HEAD_DIM` up where it covers the tier, else the row-wise one),
            ``maxnreg``, ``tab16``, ``lut16``, ``asm_values``, ``prefetch`` (see
            :func:`sphkv_kernels.decode.coded_decode_partial`), ``row_tables`` (1: per-row level-1 tables
            and the query rotation in one launch per coded tier, :func:`sphkv_kernels.decode.coded_row_tables`; 0:
            per-work-item tables, the query rotated by ``torch.matmul``; default 1 from head_dim
            :data:`ROW_TABLES_MIN_HEAD_DIM` up, as measured on an H200), ``merge_rotation`` (``"kernel"``: the
            coded tiers' value rotation inside the Triton merge; ``"pre"``: one ``torch.matmul`` on each rotated
            tier's partial outputs before the merge; default ``"pre"`` on CUDA above head_dim 128, where the merge's
            ``[d, d]`` rotation operand does not fit in shared memory, else ``"kernel"``).
        """
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        rows = indptr.numel() - 1
        if rows % num_kv_heads:
            raise ValueError(f"indptr has {rows} rows; expected batch_size * num_kv_heads (num_kv_heads={num_kv_heads})")
        for t, lay in zip(self._tiers, self._layouts):
            if lay is not None and (lay.head_dim, lay.page_size) != (head_dim, page_size):
                raise ValueError(f"tier {t.name!r} has head_dim/page_size {lay.head_dim}/{lay.page_size}, "
                                 f"the plan {head_dim}/{page_size}")
        device = torch.device(device) if device is not None else indices.device
        backend = resolve_backend(self._backend_request, device)
        if page_lens is None:
            page_lens = entry_page_lens(indptr, last_page_len, page_size)
        if pages_per_split is None:
            nnz = int(indices.numel())
            coded = any(not self._tiers[int(t)].dense for t in torch.unique(page_tiers.cpu()).tolist())
            per_sm = int((kernel_options or {}).get("programs_per_sm", 0)) or (CODED_PROGRAMS_PER_SM if coded else 2)
            target = per_sm * (torch.cuda.get_device_properties(device).multi_processor_count
                               if device.type == "cuda" else 2)
            pages_per_split = max(1, -(-nnz // target)) if backend == "triton" else max(1, nnz)
        sched = schedule_decode(indptr, page_tiers, indices, page_lens, num_tiers=len(self._tiers),
                                pages_per_split=pages_per_split, device=device)
        group = num_qo_heads // num_kv_heads
        batch = rows // num_kv_heads
        need = sched.num_slots * group * (head_dim + 1) * 4
        if self._workspace.numel() * self._workspace.element_size() >= need and self._workspace.device == device:
            flat = self._workspace.view(torch.uint8)[:need].view(torch.float32)
            part_o = flat[:sched.num_slots * group * head_dim].view(sched.num_slots, group, head_dim)
            part_lse = flat[sched.num_slots * group * head_dim:].view(sched.num_slots, group)
        else:
            part_o = torch.empty(sched.num_slots, group, head_dim, dtype=torch.float32, device=device)
            part_lse = torch.empty(sched.num_slots, group, dtype=torch.float32, device=device)
        rot, rotate_mask = _value_rotations(self._layouts, head_dim, device)
        present = [t for t in range(len(self._tiers)) if sched.tiers[t].num_items > 0]
        # per tier: the Triton kernels where they support the layout, else the reference (documented);
        # under the CPU interpreter every layout the kernels compile for runs through them
        interp = device.type != "cuda"
        kernel_ok = (head_dim >= 32 if interp else head_dim in KERNEL_HEAD_DIMS) and page_size >= 16
        tier_backend = [backend if (lay is None and kernel_ok) or
                        (lay is not None and (lay.kernel_compiles if interp else lay.kernel_supported))
                        else "reference" for lay in self._layouts]
        merge_backend = backend if kernel_ok else "reference"
        # where the coded tiers' value rotation is applied: "kernel" = inside the Triton merge (one [d, d] dot per row
        # and tier), "pre" = on the tier's partial outputs before the merge (one torch.matmul per tier, exact since
        # the merge is linear in them). The merge's dot keeps a [d, d] float32 operand in shared memory: 256 KB at
        # d = 256, over the 227 KB an H100/H200 block may use (offline sm_90 compile: 262,144 B with the rotation,
        # 512 B without), so the default on CUDA above head_dim 128 is "pre".
        merge_rotation = str((kernel_options or {}).get("merge_rotation",
                                                         "pre" if head_dim > 128 and not interp else "kernel"))
        if merge_rotation not in ("kernel", "pre"):
            raise ValueError(f"kernel_options['merge_rotation']={merge_rotation!r}; allowed: 'kernel', 'pre'")
        if backend == "cpu":                               # every layout; the merge is the torch one
            tier_backend, merge_backend = ["cpu"] * len(self._layouts), "reference"
        if backend == "triton" and not interp:
            for t, tb in enumerate(tier_backend):
                if tb == "reference" and t in present:
                    _warn_once(("ref", t, head_dim, page_size),
                               f"sphkv decode: tier {self._tiers[t].name!r} (head_dim={head_dim}, page_size={page_size}) "
                               f"has no CUDA kernel; running the pure-PyTorch reference (slow)")
        pre_rot, merge_mask = [], rotate_mask
        if merge_backend == "triton" and merge_rotation == "pre" and rotate_mask:
            pre_rot = [(sched.tiers[t].work[:, 3].to(torch.int64), rot[t]) for t in present if (rotate_mask >> t) & 1]
            merge_mask = 0
        # one rotated-query buffer per distinct key rotation among the coded tiers present
        qrot_of, rot_keys, qrot_bufs, rts = {}, [], [], []
        for t in present:
            lay = self._layouts[t]
            if lay is None:
                continue
            for i, k in enumerate(rot_keys):
                if torch.equal(k, lay.key_rotation):
                    qrot_of[t] = i
                    break
            else:
                rot_keys.append(lay.key_rotation)
                rts.append(lay.on(device)["key_rotation_t"])
                qrot_bufs.append(torch.empty(batch, num_qo_heads, head_dim, dtype=torch.float32, device=device))
                qrot_of[t] = len(rot_keys) - 1
        # the row-wise coded kernel's level-1 tables: one per row and coded tier, built together with the rotated
        # queries by one launch per tier (row_tables), or one per work item inside the kernel (one shared buffer)
        kopt = dict(kernel_options or {})
        variant = {k: v for k, v in kopt.items() if k in _VARIANT_KEYS}
        use_tables = (backend == "triton" and bool(int(kopt.get("row_tables", head_dim >= ROW_TABLES_MIN_HEAD_DIM)))
                      and variant.get("kernel", "auto") in ("auto", "rowwise")
                      and (variant.get("kernel") == "rowwise" or DEFAULT_CODED_KERNEL == "rowwise"))
        tables, variants, tab16s, tc_tiers = {}, {}, {}, set()
        for t in present:
            lay = self._layouts[t]
            if lay is None:
                continue
            v_t = dict(variant)
            # kernel "auto" on a GPU: the tensor-core kernel where it measured faster (TC_MIN_HEAD_DIM), per tier
            if (v_t.get("kernel", "auto") == "auto" and tier_backend[t] == "triton" and device.type == "cuda"
                    and not interpreting() and prefers_tc(lay, group)):
                v_t["kernel"] = "tc"
            if v_t.get("kernel") == "tc":
                tc_tiers.add(t)
            if (use_tables and t not in tc_tiers and tier_backend[t] == "triton"
                    and rowwise_supported(lay, group)):
                tab16s[t] = tab16 = bool(v_t.get("tab16", default_tab16()))
                tables[t] = torch.empty(rowwise_row_table_elems(lay, group, rows), dtype=torch.float32, device=device)
                variants[t] = json.dumps(dict(v_t, row_tables=True, tab16=tab16), sort_keys=True)
            else:
                variants[t] = json.dumps(v_t, sort_keys=True) if v_t else ""
        # rotations no row-table launch writes: torch.matmul in run()
        torch_rot = sorted({qrot_of[t] for t in qrot_of if t not in tables})
        need = max([rowwise_scratch_elems(self._layouts[t], group, sched.tiers[t].num_items) for t in present
                    if t not in tables and t not in tc_tiers and self._layouts[t] is not None
                    and rowwise_supported(self._layouts[t], group)] + [0])
        scratch = torch.empty(need, dtype=torch.float32, device=device) if need and backend == "triton" else None
        logits = {}
        if key_mass:
            for t in present:
                logits[t] = torch.empty(sched.tiers[t].page_ids.numel() * page_size, group, dtype=torch.float32,
                                        device=device)
        row_of_entry = torch.repeat_interleave(torch.arange(rows), (indptr[1:] - indptr[:-1]).to(torch.int64).cpu())
        self._plan = dict(
            sched=sched, backend=backend, device=device, batch=batch, num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, group=group, part_o=part_o,
            part_lse=part_lse, rotations=torch.stack(rot).contiguous(), rotate_mask=merge_mask, pre_rot=pre_rot,
            present=present,
            tier_backend=tier_backend, merge_backend=merge_backend,
            qrot_of=qrot_of, qrot_bufs=qrot_bufs, rts=rts,
            qf=torch.empty(batch, num_qo_heads, head_dim, dtype=torch.float32, device=device) if rts else None,
            logits=logits, q_data_type=q_data_type, nnz=int(indices.numel()),
            row_of_entry=row_of_entry.to(device), page_lens=page_lens.to(torch.int64).to(device),
            kopts=tuple(int((kernel_options or {}).get(k, 0)) for k in ("block_n", "num_warps", "num_stages")),
            variants=variants, tables=tables, tab16s=tab16s, torch_rot=torch_rot,
            scratch=scratch if scratch is not None else absent(device), none=absent(device),
            mass_lse=torch.empty(batch, num_qo_heads, dtype=torch.float32, device=device) if key_mass else None)

    # ---------------------------------------------------------------------------------------------
    def run(self, q: torch.Tensor, kv_cache: Sequence, *, sm_scale: float | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None, return_lse: bool = False,
            key_mass_out: torch.Tensor | None = None):
        """Attention of ``q`` over the planned pages of one layer.

        Parameters
        ----------
        q : ``[batch_size, num_qo_heads, head_dim]`` (the planned ``q_data_type``; last dim contiguous).
        kv_cache : sequence indexed by tier: tier ``t``'s :class:`sphkv.pool.TierPool` of this layer
            (or a mapping of its tensors: ``k``, ``v`` for the dense tier; ``k_codes``, ``k_radius``,
            ``k_mean``, ``v_codes``, ``v_scale``, ``v_zero`` for a coded tier).
        sm_scale : softmax scale (default ``head_dim ** -0.5``).
        out : optional ``[batch_size, num_qo_heads, head_dim]`` output (allocated like q if None).
        lse : optional ``[batch_size, num_qo_heads]`` float32 — natural-log log-sum-exp of the scaled logits.
        return_lse : also return ``lse`` (allocated if not given).
        key_mass_out : optional ``[nnz, page_size]`` float32 (needs ``plan(..., key_mass=True)``) —
            the attention probability every key received, summed over its GQA group's query heads;
            aligned with the plan's ``indices``; invalid slots get 0. This epilogue allocates
            temporaries: use it every N steps, not every step.

        Returns
        -------
        ``out`` ``[batch_size, num_qo_heads, head_dim]``, or ``(out, lse)`` when ``return_lse``.
        """
        pl = self._plan
        if pl is None:
            raise RuntimeError("call plan() before run()")
        sched: DecodeSchedule = pl["sched"]
        b, hq, d = pl["batch"], pl["num_qo_heads"], pl["head_dim"]
        if q.shape != (b, hq, d):
            raise ValueError(f"q must be [{b}, {hq}, {d}] as planned, got {tuple(q.shape)}")
        if len(kv_cache) != len(self._tiers):
            raise ValueError(f"kv_cache has {len(kv_cache)} tiers; the wrapper has {len(self._tiers)}")
        scale = float(sm_scale) if sm_scale is not None else d ** -0.5
        if out is None:
            out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
        if key_mass_out is not None:
            if pl["mass_lse"] is None:
                raise ValueError("key_mass_out needs plan(..., key_mass=True)")
            if lse is None:
                lse = pl["mass_lse"]
        if return_lse and lse is None:
            lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
        ns = getattr(torch.ops, NAMESPACE)
        for t, tab in pl["tables"].items():   # rotated queries + per-row level-1 tables, one launch per coded tier
            ns.coded_row_tables(q, pl["qrot_bufs"][pl["qrot_of"][t]], tab, self._config_keys[t], pl["num_kv_heads"],
                                scale, pl["tab16s"][t], "triton")
        if pl["torch_rot"]:
            pl["qf"].copy_(q)
            for i in pl["torch_rot"]:
                torch.matmul(pl["qf"], pl["rts"][i], out=pl["qrot_bufs"][i])
        po, plse = pl["part_o"], pl["part_lse"]
        for t in pl["present"]:
            tw = sched.tiers[t]
            lg = pl["logits"].get(t, pl["none"]) if key_mass_out is not None else pl["none"]
            if self._tiers[t].dense:
                c = _tier_tensors(kv_cache[t], True)
                ns.dense_decode_partial(q, c["k"], c["v"], tw.work, tw.page_ids, tw.page_lens, po, plse, lg,
                                        pl["num_kv_heads"], scale, pl["tier_backend"][t], *pl["kopts"])
            else:
                c = _tier_tensors(kv_cache[t], False)
                ns.coded_decode_partial(pl["qrot_bufs"][pl["qrot_of"][t]], *(c[n] for n in _CODED_NAMES),
                                        tw.work, tw.page_ids, tw.page_lens, po, plse, lg, self._config_keys[t],
                                        pl["num_kv_heads"], scale, pl["tier_backend"][t], *pl["kopts"],
                                        pl["tables"].get(t, pl["scratch"]), pl["variants"][t])
        for slots, r in pl["pre_rot"]:        # value rotation of a coded tier's partials (merge_rotation="pre")
            po.index_copy_(0, slots, torch.matmul(po.index_select(0, slots), r))
        ns.merge_partials(po, plse, sched.slot_ptr, pl["rotations"], out, lse if lse is not None else pl["none"],
                          pl["num_kv_heads"],
                          pl["rotate_mask"], pl["merge_backend"])
        if key_mass_out is not None:
            self._key_mass(lse, key_mass_out)
        return (out, lse) if return_lse else out

    def _key_mass(self, lse: torch.Tensor, key_mass_out: torch.Tensor) -> None:
        pl = self._plan
        p, g = pl["page_size"], pl["group"]
        if key_mass_out.shape != (pl["nnz"], p) or key_mass_out.dtype != torch.float32:
            raise ValueError(f"key_mass_out must be [{pl['nnz']}, {p}] float32")
        lse2 = (lse / math.log(2.0)).view(-1, g)                                # [rows, G] (row = b*Hkv + h)
        key_mass_out.zero_()
        for t in pl["present"]:
            tw = pl["sched"].tiers[t]
            ent = tw.entry_index
            rows = pl["row_of_entry"][ent]
            lg = pl["logits"][t].view(-1, p, g)
            valid = torch.arange(p, device=lg.device)[None, :] < pl["page_lens"][ent][:, None]
            mass = torch.exp2(lg - lse2[rows][:, None, :]).sum(-1)
            key_mass_out[ent] = torch.where(valid, mass, torch.zeros_like(mass))
