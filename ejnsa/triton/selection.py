"""Selected (block-sparse) attention (semantics.md piece 4) as Triton kernels, with its backward.

Token t of KV head h attends the keys of the blocks listed in block_indices[t, h] (the first
block_counts[t, h] entries), causally; a block listed twice counts twice.

Why token tiles
---------------
A kernel that gives every (token, KV head) its own program (fla's) re-reads S blocks of K and
V per token: at T = 64K, H = 4, S = 16, l = 64, D = 128 that is ~128 GiB through L2, and it
is L2-bandwidth bound. Consecutive tokens select mostly the same blocks (always the forced
ones: block 0, the current and the previous block), so here one program owns a *tile* of BT
consecutive tokens times GB query heads of one KV head (M = BT * GB rows, 64 by default, so
the dots are wgmma-sized) and walks the sorted *union* of the blocks its tokens selected:
each block of K and V is loaded once for all M rows. A row attends a block with its token's
*multiplicity* for that block (0 masks it, 2 counts its keys twice), which is exactly the contract's
rule for duplicates, plus the causal mask j <= t. A loop step streams one K/V block past
resident query rows and is load bound up to ~128 rows, and a tile's union is never longer
than the sum of its sub-tiles' unions, so one tiling serves every selection pattern.

The index metadata (block starts, tile unions, token lists, segments) is built in XLA by
ejnsa.triton.selection_index.

Backward
--------
dq mirrors the forward (tile x union loop, p recomputed from the saved lse) and forms
delta = rowsum(o * do) from the o and do rows it holds, for dk/dv (one read of o instead of
an XLA pass over o and do).

dk/dv are KEY-major, with no atomics: a program owns one block's dk/dv [l, D] and streams the
*tokens* that selected it (ascending, `selection_index.token_lists`: one 1-D stable sort of
all H * B * T * S entries, which XLA hands to CUB on GPUs). A loop step gathers P tokens x GB
query heads (`SelectionDkvConfig.rows` rows), so every row of a step selected the block and
the steps number about H * B * T * S / P whatever the pattern. A token listing a block twice
appears twice, which counts its keys twice. A block everybody selects (block 0) has a list
of B * T tokens, so lists are cut into segments of at most `seg` entries; segments of a
multi-segment list write float32 partials, which the reduce kernel sums in segment order
(bitwise reproducible). Every dk/dv row is written once by the reduce kernel (which copies
single-segment rows). `seg` is chosen statically so that the partials fit in
`SelectionDkvConfig.partial_bytes` for ANY selection. Segment programs run longest list first.

Extra memory at T = 64K, HQ = 64, H = 4, S = 16, l = 64 (bf16, D = 128), all linear in T:
forward: union + mult of the tiles (BT = 4) 32 MB. Backward: the tiles of the forward
(shared in fwd+bwd) 32 MB, the token lists (keys + tokens) 32 MB, partials <= 128 MiB,
direct dk/dv 128 MB, delta 16 MB: ~0.3 GB, against ~4.3 GB for q, k, v, o, do, dq, dk, dv.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from .._registry import Backend, Platform, kernel_registry
from .._varlen import cdiv, key_cu, token_info
from ._call import triton_call
from ._common import (LOG2E, bad_counts, bad_keys, dot_precision, finite_part, head_tile, log2_scale, mark_rows_nan,
                      per_query_head)
from ._shard import launcher
from .selection_index import SENT, block_rows, block_starts, tile_union, token_lists, token_segment


def _is_f32(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32


# ======================================================================================
# Configurations
#
# Checked with tools/hopper_compile.py for sm_90 (Triton 3.6): shared memory under 227 KiB
# everywhere, wgmma in every dot with 64 rows on the M side; register spills only in dk/dv
# at head dim 128 with 16-bit inputs (40-80 bytes at 4 warps, measured fastest anyway) and
# small ones for float32 with head dims > 128.
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """A tiling of the rows (tokens x query heads of one KV head): BT tokens x GB query heads
    per program, M rows (>= 16, a power of two); `make(G, rows)` for a target of rows."""

    bt: int  # tokens per tile
    gb: int  # query heads per program (G split into NG chunks of GB when G is large)
    ng: int
    rows: int  # M

    @staticmethod
    def make(group: int, target_rows: int) -> "TilePlan":
        ng = cdiv(group, max(1, target_rows))
        gb = cdiv(group, ng)
        bt = max(1, target_rows // gb)
        return TilePlan(bt, gb, ng, max(16, triton.next_power_of_2(bt * gb)))


@dataclasses.dataclass(frozen=True)
class SelectionFwdConfig:
    """Forward kernel (and the tiling dq shares): target rows per tile (tokens x query
    heads), keys per step (<= l), V columns per program, warps, stages."""

    rows: int
    block_keys: int
    block_v: int
    num_warps: int
    num_stages: int

    @staticmethod
    def default(dk: int, dv: int, group: int, block_size: int, dtype) -> "SelectionFwdConfig":
        # float32 dots run as three TF32 passes (tf32x3), which triples the registers and
        # shared memory of the operands: from head dims of 128 on, only dq's 16-row tiles
        # compile without spilling (dq follows the forward's tiling).
        rows = 16 if _is_f32(dtype) and max(dk, dv) >= 128 else 64
        m = TilePlan.make(group, rows).rows
        big = max(dk, dv) > 128
        bv = head_tile(dv)
        if _is_f32(dtype) or big:
            return SelectionFwdConfig(rows=rows, block_keys=min(block_size, 32), block_v=bv,
                                      num_warps=8 if big else 4, num_stages=2)
        return SelectionFwdConfig(rows=rows, block_keys=min(block_size, 64), block_v=bv,
                                  num_warps=8 if m >= 128 else 4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class SelectionDqConfig:
    """dq kernel: keys per step (<= l), warps, stages; its tiles are the forward's."""

    block_keys: int
    num_warps: int
    num_stages: int

    @staticmethod
    def default(dk: int, dv: int, rows: int, block_size: int, dtype) -> "SelectionDqConfig":
        big = max(dk, dv) > 128
        if _is_f32(dtype):
            if big:
                return SelectionDqConfig(block_keys=min(block_size, 16), num_warps=8, num_stages=1)
            return SelectionDqConfig(block_keys=min(block_size, 32), num_warps=8, num_stages=2)
        if big:
            # the o tile that delta is formed from needs registers too
            return SelectionDqConfig(block_keys=min(block_size, 32), num_warps=4 if rows < 64 else 8, num_stages=2)
        # One warpgroup per 64 rows: every wgmma gets its full M = 64 (measured 2.4x faster
        # than 8 warps on an H100; docs/kernels.md).
        return SelectionDqConfig(block_keys=min(block_size, 64), num_warps=8 if rows > 64 else 4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class SelectionDkvConfig:
    """dk/dv kernel: target query rows per loop step (tokens x query heads), keys per program
    (<= l), warps, stages; list splitting.

    min_segment: the shortest segment (loop steps) a list is cut into.
    partial_bytes: memory the float32 partials may take; the segment length grows with the
      problem so that they always fit.
    """

    rows: int
    block_keys: int
    num_warps: int
    num_stages: int
    min_segment: int = 64
    partial_bytes: int = 128 << 20

    @staticmethod
    def default(dk: int, dv: int, block_size: int, dtype) -> "SelectionDkvConfig":
        big = max(dk, dv) > 128
        if _is_f32(dtype):
            if big:
                return SelectionDkvConfig(rows=16, block_keys=min(block_size, 16), num_warps=8, num_stages=1)
            # tf32x3 operands: 64 gathered rows x 32 keys x D = 128 spill; 16 keys do not
            keys = 16 if max(dk, dv) >= 128 else 32
            return SelectionDkvConfig(rows=64, block_keys=min(block_size, keys), num_warps=8, num_stages=1)
        if big:
            return SelectionDkvConfig(rows=64, block_keys=min(block_size, 32), num_warps=8, num_stages=2)
        # One warpgroup: the dots have the block's (up to) 64 keys on the M side; 8 warps
        # would lay them out 8 warps along M and pass every p / ds tile between the
        # warpgroups through shared memory (1.8x slower on an H100; docs/kernels.md).
        return SelectionDkvConfig(rows=64, block_keys=min(block_size, 64), num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class SelectionReduceConfig:
    """Reduction of the dk/dv partials: keys per program, warps."""

    block_keys: int
    num_warps: int

    @staticmethod
    def default(dk: int, dv: int, block_size: int, dtype) -> "SelectionReduceConfig":
        # float32 rows of 128+ columns spill with 4 warps
        warps = 8 if _is_f32(dtype) and max(dk, dv) >= 128 else 4
        return SelectionReduceConfig(block_keys=min(block_size, 32 if max(dk, dv) <= 128 else 16), num_warps=warps)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Every tunable of selected attention; `default` is tuned for Hopper."""

    fwd: SelectionFwdConfig
    dq: SelectionDqConfig
    dkv: SelectionDkvConfig
    reduce: SelectionReduceConfig

    @staticmethod
    def default(dk: int, dv: int, group: int, block_size: int, dtype) -> "SelectionConfig":
        fwd = SelectionFwdConfig.default(dk, dv, group, block_size, dtype)
        rows = TilePlan.make(group, fwd.rows).rows
        return SelectionConfig(
            fwd=fwd,
            dq=SelectionDqConfig.default(dk, dv, rows, block_size, dtype),
            dkv=SelectionDkvConfig.default(dk, dv, block_size, dtype),
            reduce=SelectionReduceConfig.default(dk, dv, block_size, dtype),
        )


# ======================================================================================
# Kernels
#
# Shapes: B batch, T tokens, HQ query heads, H KV heads, G = HQ / H, K / V head dims (BK /
# BV their power-of-two paddings), BS = l the block size, BC keys per step (NC = BS / BC
# steps per block), BT tokens x GB query heads per tile (M rows, padded), W = BT * S union
# slots per tile, NT tiles per KV head (B * NTT, NTT = cdiv(T, BT) per batch row).
# Rows of a tile are token-major: row r is token r // GB, query head i_g * GB + r % GB.
# Token indices are global over the B * T axis (b * T + t); int32 is safe for them, and
# everything multiplied by a head dim or HQ is formed in int64.
# ======================================================================================


@triton.jit
def _tile_rows(i_tile, i_hg, T, NTT, qkey, HQ: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, NG: tl.constexpr,
               BT: tl.constexpr, M: tl.constexpr, SUFFIX: tl.constexpr):
    """The rows of program (i_tile, i_hg) of the forward and dq: its KV head, the global key
    of the tile's last query (no key past it is ever needed), and per row [M] its query
    within the tile, mask, global query (b * T + t), global key of its position, and offset
    (query * HQ + head, small int32) from row0, the int64 row of the tile's first (query,
    head) in q / o / lse. Without SUFFIX a query's key is the query itself (TQ == TK);
    with it, qkey [B * TQ] holds the key of every query."""
    i_h, i_g = i_hg // NG, i_hg % NG
    i_b, t0 = i_tile // NTT, (i_tile % NTT) * BT
    t_hi = i_b * T + tl.minimum(t0 + BT, T) - 1
    o_r = tl.arange(0, M)
    r_tok = o_r // GB
    r_g = i_g * GB + o_r % GB
    m_r = (o_r < BT * GB) & (t0 + r_tok < T) & (r_g < G)
    row0 = (i_b * T + t0).to(tl.int64) * HQ + i_h * G
    t_r = i_b * T + t0 + r_tok
    if SUFFIX:
        return i_h, tl.load(qkey + t_hi), r_tok, m_r, t_r, tl.load(qkey + t_r, mask=m_r, other=0), r_tok * HQ + r_g, row0
    return i_h, t_hi, r_tok, m_r, t_r, t_r, r_tok * HQ + r_g, row0


@triton.jit
def _tile_union_of(union, count, mult, i_h, i_tile, NT, W: tl.constexpr, BT: tl.constexpr):
    """Pointers to the union slots and multiplicities of tile i_tile of KV head i_h, and the
    number of blocks in its union."""
    i_ht = (i_h * NT + i_tile).to(tl.int64)
    return union + i_ht * W, mult + i_ht * W * BT, tl.load(count + i_ht)


@triton.jit
def _union_step(b_q, k, v, p_u, p_w, i, r_tok, m_r, t_r, o_c, o_k, o_v, m_k, m_v, t_hi, i_h, qk_scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NC: tl.constexpr,
                BC: tl.constexpr, PREC: tl.constexpr):
    """Step i of a tile's union loop (key chunk i % NC of union block i // NC): the scores
    [M, BC] in log2 units and where they count (the row's token selected the block and
    j <= t), the block's multiplicity for each row's token [M], and K [BC, BK], V [BC, BV]
    (0 past the tile's last token t_hi)."""
    i_u = i // NC
    i_c = i % NC
    s = tl.load(p_u + i_u)  # global token of the block's first key
    b_w = tl.load(p_w + i_u * BT + r_tok, mask=m_r, other=0).to(tl.float32)
    o_j = s + i_c * BC + o_c  # [BC] global key tokens
    m_j = o_j <= t_hi
    p_kv = (s.to(tl.int64) * H + i_h)
    o_kv = (i_c * BC + o_c) * H
    b_k = tl.load(k + p_kv * K + o_kv[:, None] * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.0)
    b_v = tl.load(v + p_kv * V + o_kv[:, None] * V + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0.0)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    m_s = (o_j[None, :] <= t_r[:, None]) & (b_w[:, None] > 0)
    return b_s, m_s, b_w, b_k, b_v


@triton.jit
def selection_fwd_kernel(
    q, k, v, qkey, union, count, mult,  # inputs
    T, NTT, qk_scale,  # scalars
    o, lse,  # outputs
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, BT: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    SUFFIX: tl.constexpr,
):
    """o [B*T, HQ, V] and lse [B*T, HQ] (natural log, -inf for rows with no key) of one tile;
    k and v finite parts (the rows that attend a non-finite key or value are marked NaN
    after the kernel, `rows_with_bad_keys`)."""
    NC: tl.constexpr = BS // BC
    i_tile, i_hg, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.num_programs(0)
    i_h, k_hi, r_tok, m_r, t_r, k_r, o_row, row0 = _tile_rows(i_tile, i_hg, T, NTT, qkey, HQ, G, GB, NG, BT, M,
                                                               SUFFIX)

    p_u, p_w, n_u = _tile_union_of(union, count, mult, i_h, i_tile, NT, W, BT)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    # [M, BK]
    b_q = tl.load(q + row0 * K + o_row[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)

    b_m = tl.full([M], float("-inf"), tl.float32)
    b_l = tl.zeros([M], tl.float32)
    b_o = tl.zeros([M, BV], tl.float32)
    for i in range(0, n_u * NC):
        b_s, m_s, b_w, b_k, b_v = _union_step(b_q, k, v, p_u, p_w, i, r_tok, m_r, k_r, o_c, o_k, o_v, m_k, m_v,
                                              k_hi, i_h, qk_scale, H, K, V, BT, NC, BC, PREC)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        # a row that has seen no key keeps m = -inf; shift by 0 so that nothing is NaN
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_a = tl.exp2(b_m - b_ms)
        b_p = tl.exp2(b_s - b_ms[:, None]) * b_w[:, None]
        b_l = b_l * b_a + tl.sum(b_p, 1)
        b_o = b_o * b_a[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_mn

    # Keys and values are finite parts: a row that attends no key keeps l = 0 (o = 0, lse =
    # -inf) whatever the values hold, a NaN query makes l NaN (o and lse NaN). Any other
    # work here, even a flag load per row in this epilogue, cost the forward ~5% at 64K.
    b_has = b_l != 0
    b_o = b_o / tl.where(b_has, b_l, 1.0)[:, None]
    tl.store(o + row0 * V + o_row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_r[:, None] & m_v[None, :])
    if i_v == 0:
        b_lse = tl.where(b_has, (b_m + tl.log2(tl.where(b_has, b_l, 1.0))) / LOG2E, float("-inf"))
        tl.store(lse + row0 + o_row, b_lse, mask=m_r)


@triton.jit
def selection_bwd_dq_kernel(
    q, k, v, o, do, lse, qkey, union, count, mult,  # inputs
    T, NTT, qk_scale, scale,  # scalars
    dq, delta,  # outputs
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, BT: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    SUFFIX: tl.constexpr,
):
    """dq [B*T, HQ, K] and delta = rowsum(o * do) [B*T, HQ] of one tile.

    The forward's loop with p recomputed from lse. delta is formed from the o and do rows of
    the tile (each row belongs to exactly one program, so it is written once); dk/dv read it.
    """
    NC: tl.constexpr = BS // BC
    i_tile, i_hg = tl.program_id(0), tl.program_id(1)
    NT = tl.num_programs(0)
    i_h, k_hi, r_tok, m_r, t_r, k_r, o_row, row0 = _tile_rows(i_tile, i_hg, T, NTT, qkey, HQ, G, GB, NG, BT, M,
                                                               SUFFIX)

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    # [M, BK], [M, BV]
    b_q = tl.load(q + row0 * K + o_row[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
    b_do = tl.load(do + row0 * V + o_row[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
    b_o = tl.load(o + row0 * V + o_row[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
    # [M]
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(delta + row0 + o_row, b_delta, mask=m_r)
    # an empty row (lse = -inf) gets +inf so that every p of it is exp2(-inf) = 0
    b_lse = tl.load(lse + row0 + o_row, mask=m_r, other=float("inf")).to(tl.float32)
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * LOG2E

    p_u, p_w, n_u = _tile_union_of(union, count, mult, i_h, i_tile, NT, W, BT)
    o_c = tl.arange(0, BC)

    b_dq = tl.zeros([M, BK], tl.float32)
    for i in range(0, n_u * NC):
        b_s, m_s, b_w, b_k, b_v = _union_step(b_q, k, v, p_u, p_w, i, r_tok, m_r, k_r, o_c, o_k, o_v, m_k, m_v,
                                              k_hi, i_h, qk_scale, H, K, V, BT, NC, BC, PREC)
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0) * b_w[:, None]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq = b_dq * scale
    tl.store(dq + row0 * K + o_row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_r[:, None] & m_k[None, :])


@triton.jit
def _list_block(lst, row_start, row_len, BR):
    """(KV head, first key token, number of keys) of the block of list lst = h * BR + row."""
    rho = lst % BR
    return lst // BR, tl.load(row_start + rho), tl.load(row_len + rho)


@triton.jit
def selection_bwd_dkv_kernel(
    q, k, v, do, lse, delta, toks, qkey, desc, row_start, row_len,  # inputs
    BR, qk_scale, scale,  # scalars
    dk_direct, dv_direct, part_k, part_v,  # outputs
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, P: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    SUFFIX: tl.constexpr,
):
    """dk, dv of BC keys of one block from one segment of the tokens that selected it.

    desc[pid] = (list, lo, hi, out): list = h * BR + block row (-1: no work), entries
    [lo, hi) of `toks` (global tokens, ascending; a token that lists the block twice appears
    twice), out = partial slot, or -1 to write dk/dv directly. A loop step gathers the rows
    of P tokens x GB query heads (M rows), so no row of a step is a token that did not
    select the block.
    """
    i_s, i_c = tl.program_id(0), tl.program_id(1)
    lst = tl.load(desc + i_s * 4)
    if lst < 0:
        return
    lo = tl.load(desc + i_s * 4 + 1)
    hi = tl.load(desc + i_s * 4 + 2)
    out = tl.load(desc + i_s * 4 + 3)
    i_h, s, nk = _list_block(lst, row_start, row_len, BR)
    if i_c * BC >= nk:
        return
    o_c = i_c * BC + tl.arange(0, BC)
    m_j = o_c < nk
    o_j = s + o_c  # [BC] global key tokens
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_kv = (s.to(tl.int64) * H + i_h)
    # [BC, BK], [BC, BV]
    b_k = tl.load(k + p_kv * K + (o_c * H)[:, None] * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.0)
    b_v = tl.load(v + p_kv * V + (o_c * H)[:, None] * V + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0.0)

    o_r = tl.arange(0, M)
    r_tok = o_r // GB
    r_gl = o_r % GB
    m_p = o_r < P * GB
    b_dk = tl.zeros([BC, BK], tl.float32)
    b_dv = tl.zeros([BC, BV], tl.float32)
    for i in range(lo, hi, P):
        m_t = m_p & (i + r_tok < hi)
        # [M] global query of each row, and the global key of its position
        t_r = tl.load(toks + i + r_tok, mask=m_t, other=0)
        if SUFFIX:
            k_r = tl.load(qkey + t_r, mask=m_t, other=0)
        else:
            k_r = t_r
        row0 = t_r.to(tl.int64) * HQ + i_h * G
        for i_g in range(NG):
            r_g = i_g * GB + r_gl
            m_r = m_t & (r_g < G)
            o_row = row0 + r_g
            # [M, BK], [M, BV], [M]
            b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
            b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
            b_lse = tl.load(lse + o_row, mask=m_r, other=float("inf")).to(tl.float32)
            b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * LOG2E
            b_delta = tl.load(delta + o_row, mask=m_r, other=0.0).to(tl.float32)
            # keys on the M side: [BC, M]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
            m_st = m_j[:, None] & (o_j[:, None] <= k_r[None, :]) & m_r[None, :]
            b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    b_dk = b_dk * scale
    if out < 0:
        tl.store(dk_direct + p_kv * K + (o_c * H)[:, None] * K + o_k[None, :], b_dk.to(dk_direct.dtype.element_ty),
                 mask=m_j[:, None] & m_k[None, :])
        tl.store(dv_direct + p_kv * V + (o_c * H)[:, None] * V + o_v[None, :], b_dv.to(dv_direct.dtype.element_ty),
                 mask=m_j[:, None] & m_v[None, :])
    else:
        o_p = out.to(tl.int64) * BS
        tl.store(part_k + (o_p + o_c[:, None]) * K + o_k[None, :], b_dk, mask=m_j[:, None] & m_k[None, :])
        tl.store(part_v + (o_p + o_c[:, None]) * V + o_v[None, :], b_dv, mask=m_j[:, None] & m_v[None, :])


@triton.jit
def selection_bwd_reduce_kernel(
    dk_direct, dv_direct, part_k, part_v, row_start, row_len, part_off, part_num,  # inputs
    BR,  # scalar
    dk, dv,  # outputs
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """dk, dv of BC keys of one block: its partials summed in order, or its direct rows copied."""
    lst, i_c = tl.program_id(0), tl.program_id(1)
    i_h, s, nk = _list_block(lst, row_start, row_len, BR)
    if i_c * BC >= nk:
        return
    o_c = i_c * BC + tl.arange(0, BC)
    m_j = o_c < nk
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_jk = m_j[:, None] & (o_k < K)[None, :]
    m_jv = m_j[:, None] & (o_v < V)[None, :]
    p_kv = (s.to(tl.int64) * H + i_h)
    o_dk = p_kv * K + (o_c * H)[:, None] * K + o_k[None, :]
    o_dv = p_kv * V + (o_c * H)[:, None] * V + o_v[None, :]
    n_p = tl.load(part_num + lst)
    if n_p == 0:
        tl.store(dk + o_dk, tl.load(dk_direct + o_dk, mask=m_jk), mask=m_jk)
        tl.store(dv + o_dv, tl.load(dv_direct + o_dv, mask=m_jv), mask=m_jv)
    else:
        off = tl.load(part_off + lst).to(tl.int64)
        b_dk = tl.zeros([BC, BK], tl.float32)
        b_dv = tl.zeros([BC, BV], tl.float32)
        for i in range(0, n_p):  # fixed order: bitwise reproducible
            o_p = (off + i) * BS
            b_dk += tl.load(part_k + (o_p + o_c[:, None]) * K + o_k[None, :], mask=m_jk, other=0.0)
            b_dv += tl.load(part_v + (o_p + o_c[:, None]) * V + o_v[None, :], mask=m_jv, other=0.0)
        tl.store(dk + o_dk, b_dk.to(dk.dtype.element_ty), mask=m_jk)
        tl.store(dv + o_dv, b_dv.to(dv.dtype.element_ty), mask=m_jv)


# ======================================================================================
# Launchers
# ======================================================================================


def _dims(query, key, value):
    batch, seq_len, hq, dk = query.shape
    heads, dv = key.shape[2], value.shape[3]
    return batch, seq_len, hq, heads, hq // heads, dk, dv


def rows_with_bad_keys(starts, block_size: int, query_keys, bad) -> tuple[jax.Array, jax.Array]:
    """(has, bad_rows), bool [B, TQ, H]: whether the query has a valid entry (`block_starts`
    [B, TQ, H, S] != SENT), and whether one of its selected keys (those of a block up to its
    own key query_keys [B, TQ], global) is flagged in `bad` ([B, TK, H], `bad_keys`): two
    lookups per entry in the running count."""
    valid = starts != SENT
    counts = bad_counts(bad)  # [B * TK + 1, H]
    first = jnp.where(valid, starts, 0)
    end = jnp.where(valid, jnp.minimum(starts + block_size, query_keys[:, :, None, None] + 1), 0)
    h = jnp.arange(starts.shape[2], dtype=jnp.int32)[None, None, :, None]
    return jnp.any(valid, axis=-1), jnp.any(valid & (counts[end, h] > counts[first, h]), axis=-1)


def _forward(query, key, value, qkey, tiles, plan: TilePlan, block_size: int, scale: float, cfg: SelectionFwdConfig):
    """(o, lse natural log) over the tile unions `tiles`; qkey: None (TQ == TK) or
    `_query_keys`."""
    union, count, mult = tiles
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    ntt = cdiv(seq_len, plan.bt)
    bv = min(cfg.block_v, head_tile(dv))
    return triton_call(
        query, key, value,
        count if qkey is None else qkey, union, count, mult,  # (count: a placeholder pointer, never read)
        seq_len, ntt, log2_scale(scale),
        kernel=selection_fwd_kernel,
        out_shape=(jax.ShapeDtypeStruct(query.shape[:3] + (dv,), query.dtype),
                   jax.ShapeDtypeStruct(query.shape[:3], jnp.float32)),
        grid=(batch * ntt, heads * plan.ng, cdiv(dv, bv)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_selection_fwd",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=union.shape[2],
        BS=block_size, BC=min(cfg.block_keys, block_size), BK=head_tile(dk), BV=bv,
        PREC=dot_precision(query.dtype), SUFFIX=qkey is not None,
    )


def _backward_dq(query, key, value, o, do, lse, qkey, tiles, plan: TilePlan, block_size: int, scale: float,
                 cfg: SelectionDqConfig):
    """(dq, delta = rowsum(o * do) in float32)."""
    union, count, mult = tiles
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    ntt = cdiv(seq_len, plan.bt)
    return triton_call(
        query, key, value, o, do, lse, lse if qkey is None else qkey, union, count, mult,
        seq_len, ntt, log2_scale(scale), np.float32(scale),
        kernel=selection_bwd_dq_kernel,
        out_shape=(jax.ShapeDtypeStruct(query.shape, query.dtype),
                   jax.ShapeDtypeStruct(query.shape[:3], jnp.float32)),
        grid=(batch * ntt, heads * plan.ng),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_selection_bwd_dq",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=union.shape[2],
        BS=block_size, BC=min(cfg.block_keys, block_size), BK=head_tile(dk), BV=head_tile(dv),
        PREC=dot_precision(query.dtype), SUFFIX=qkey is not None,
    )


def _backward_dkv(query, key, value, lse, delta, do, qkey, lists, rows, block_size: int, scale: float, seg: int,
                  cfg: SelectionDkvConfig, red: SelectionReduceConfig):
    """dk, dv: the segment programs over the token lists, then the reduce kernel, which
    writes every row once (summing its partials in order, or copying it)."""
    toks, desc, part_off, part_num = lists
    row_start, row_len = rows
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    plan = TilePlan.make(group, cfg.rows)
    br = row_start.shape[0]
    bc = min(cfg.block_keys, block_size)
    nparts = cdiv(2 * toks.shape[0], seg) + 1
    dk_direct, dv_direct, part_k, part_v = triton_call(
        query, key, value, do, lse, delta, toks, toks if qkey is None else qkey, desc, row_start, row_len,
        br, log2_scale(scale), np.float32(scale),
        kernel=selection_bwd_dkv_kernel,
        out_shape=(jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype),
                   jax.ShapeDtypeStruct((nparts, block_size, dk), jnp.float32),
                   jax.ShapeDtypeStruct((nparts, block_size, dv), jnp.float32)),
        grid=(desc.shape[0], cdiv(block_size, bc)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_selection_bwd_dkv",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, P=plan.bt, M=plan.rows,
        BS=block_size, BC=bc, BK=head_tile(dk), BV=head_tile(dv),
        PREC=dot_precision(query.dtype), SUFFIX=qkey is not None,
    )
    rbc = min(red.block_keys, block_size)
    return triton_call(
        dk_direct, dv_direct, part_k, part_v, row_start, row_len, part_off, part_num,
        br,
        kernel=selection_bwd_reduce_kernel,
        out_shape=(jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype)),
        grid=(heads * br, cdiv(block_size, rbc)),
        num_warps=red.num_warps, name="ejnsa_selection_bwd_reduce",
        H=heads, K=dk, V=dv, BS=block_size, BC=rbc, BK=head_tile(dk), BV=head_tile(dv),
    )


def dkv_segment(query, key, value, block_indices, block_size: int, cfg: SelectionDkvConfig) -> int:
    """Entries per dk/dv segment for these shapes (static; see `token_segment`)."""
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    num_entries = heads * batch * seq_len * block_indices.shape[3]
    if num_entries >= 2**31:
        raise ValueError(f"selected attention's dk/dv index holds H * B * T * S entries in int32; got "
                         f"{heads} * {batch} * {seq_len} * {block_indices.shape[3]} = {num_entries} >= 2**31")
    return token_segment(num_entries, TilePlan.make(group, cfg.rows).bt, block_size, dk, dv, cfg.min_segment,
                         cfg.partial_bytes)


def _query_keys(cu_seqlens, batch: int, num_queries: int, num_keys: int, block_size: int):
    """None when every query is its own key (TQ == TK, one cu_seqlens); else int32
    [B * TQ]: the global key (b * TK + j) of each global query's position (b * TQ + t)."""
    if cu_seqlens is None and num_queries == num_keys or cu_seqlens is not None and not isinstance(cu_seqlens, tuple):
        return None
    key = token_info(cu_seqlens, num_queries, block_size, num_keys).key
    return (jnp.arange(batch, dtype=jnp.int32)[:, None] * num_keys + key[None, :]).reshape(-1)


def _selected_forward(query, key, value, bad, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    """(o, lse, has keys, bad rows): the kernel's outputs and, from the same launcher (per
    shard: on a mesh the running count of flagged keys would otherwise gather across
    devices), the rows for `mark_rows_nan`, bool [B, TQ, HQ]."""
    group = query.shape[2] // key.shape[2]
    plan = TilePlan.make(group, cfg.fwd.rows)

    def launch(q, k, v, bad, bi, bc, cu):
        batch, num_queries, num_keys = q.shape[0], q.shape[1], k.shape[1]
        starts = block_starts(bi, bc, block_size, cu, num_keys)
        qkey = _query_keys(cu, batch, num_queries, num_keys, block_size)
        o, lse = _forward(q, k, v, qkey, tile_union(starts, plan.bt), plan, block_size, scale, cfg.fwd)
        keys = jnp.arange(batch * num_queries, dtype=jnp.int32) if qkey is None else qkey
        has, rows = rows_with_bad_keys(starts, block_size, keys.reshape(batch, -1), bad)
        return o, lse, per_query_head(has, group), per_query_head(rows, group)

    layouts = ("b.q.", "b.h.", "b.h.", "b.h", "b.h.", "b.h", None)
    return launcher(launch, layouts, ("b.q.", "b.q", "b.q", "b.q"))(query, key, value, bad, block_indices,
                                                                   block_counts, cu_seqlens)


def _selected_backward(query, key, value, block_indices, block_counts, cu_seqlens, o, lse, do, block_size, scale,
                       cfg):
    group = query.shape[2] // key.shape[2]
    plan = TilePlan.make(group, cfg.fwd.rows)

    def launch(q, k, v, bi, bc, cu, o, lse, do):
        batch, num_keys = q.shape[0], k.shape[1]
        qkey = _query_keys(cu, batch, q.shape[1], num_keys, block_size)
        # dq on the forward's tiles (XLA shares their metadata between forward and backward)
        with jax.named_scope("ejnsa_selection_dq"):
            tiles = tile_union(block_starts(bi, bc, block_size, cu, num_keys), plan.bt)
            dq, delta = _backward_dq(q, k, v, o, do, lse, qkey, tiles, plan, block_size, scale, cfg.dq)
        with jax.named_scope("ejnsa_selection_dkv"):
            seg = dkv_segment(q, k, v, bi, block_size, cfg.dkv)
            rows = block_rows(batch, num_keys, block_size, key_cu(cu))
            lists = token_lists(bi, bc, block_size, cu, rows[0], seg, num_keys)
            dk, dv = _backward_dkv(q, k, v, lse, delta, do, qkey, lists, rows, block_size, scale, seg, cfg.dkv,
                                   cfg.reduce)
        return dq, dk, dv

    layouts = ("b.q.", "b.h.", "b.h.", "b.h.", "b.h", None, "b.q.", "b.q", "b.q.")
    return launcher(launch, layouts, ("b.q.", "b.h.", "b.h."))(query, key, value, block_indices, block_counts,
                                                               cu_seqlens, o, lse, do.astype(query.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _selected(query, key, value, bad, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    """`_selected_forward`, differentiable through o (lse's cotangent is dropped: it leaves
    `selected_attention` only through a comparison, or stopped)."""
    return _selected_forward(query, key, value, bad, block_indices, block_counts, cu_seqlens, block_size, scale, cfg)


def _selected_fwd(query, key, value, bad, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    out = _selected_forward(query, key, value, bad, block_indices, block_counts, cu_seqlens, block_size, scale, cfg)
    return out, (query, key, value, block_indices, block_counts, cu_seqlens, out[0], out[1])


def _selected_bwd(block_size, scale, cfg, res, cotangents):
    query, key, value, block_indices, block_counts, cu_seqlens, o, lse = res
    dq, dk, dv = _selected_backward(query, key, value, block_indices, block_counts, cu_seqlens, o, lse, cotangents[0],
                                    block_size, scale, cfg)
    return dq, dk, dv, None, None, None, None


_selected.defvjp(_selected_fwd, _selected_bwd)


def selected_attention(query, key, value, block_indices, block_counts, block_size: int, softmax_scale: float,
                       cu_seqlens=None, config: SelectionConfig | None = None, return_lse: bool = False):
    """Selected attention with an explicit configuration (tests, tuning).

    query [B, TQ, HQ, Dk], key [B, TK, H, Dk], value [B, TK, H, Dv] (TQ <= TK), block_indices
    [B, TQ, H, S] int, block_counts None (all S) or int [B, TQ, H] in [0, S], cu_seqlens None,
    int32 [N+1] or a pair (cu_q, cu_k). Returns o_slc [B, TQ, HQ, Dv] in query's dtype (and
    lse [B, TQ, HQ] float32, not differentiable, with return_lse).
    """
    if config is None:
        config = SelectionConfig.default(query.shape[3], value.shape[3], query.shape[2] // key.shape[2], block_size,
                                         query.dtype)
    block_indices = block_indices.astype(jnp.int32)
    if block_counts is not None:
        block_counts = block_counts.astype(jnp.int32)
    if cu_seqlens is not None:
        cu_seqlens = jax.tree.map(lambda cu: cu.astype(jnp.int32), cu_seqlens)
    # The kernels compute with the finite parts of key and value; the rows that attend a
    # non-finite one are marked NaN after them (docs/semantics.md, "Bad values").
    o, lse, has, bad_rows = _selected(query, finite_part(key), finite_part(value), bad_keys(key, value),
                                      block_indices, block_counts, cu_seqlens, block_size, float(softmax_scale),
                                      config)
    o, lse = mark_rows_nan(o, lse, bad_rows, has)
    return (o, jax.lax.stop_gradient(lse)) if return_lse else o


@kernel_registry.register("apply_native_sparse_attention", Platform.TRITON, Backend.GPU)
def apply_native_sparse_attention(query, key, value, block_indices, block_counts, block_size, softmax_scale, cu_seqlens):
    """o_slc [B, T, HQ, Dv] in query's dtype; block_counts None (all S) or int32 [B, T, H] in [0, S]."""
    return selected_attention(query, key, value, block_indices, block_counts, block_size, softmax_scale, cu_seqlens)
