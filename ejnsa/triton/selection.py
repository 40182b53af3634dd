"""Selected (block-sparse) attention (SPEC step 4) as Triton kernels, with its backward.

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
*multiplicity* for that block (0 masks it, 2 counts its keys twice), which is exactly SPEC's
rule for duplicates, plus the causal mask j <= t.

When tokens share little (random selections), a union is up to BT times longer than one
token's list, and the rows of the other tokens are masked work. In the forward and dq, a
loop step streams one K/V block past resident query rows; it is load bound up to ~128 rows
on an H100, and a tile's union is never longer than the sum of its sub-tiles' unions, so the
main tiling never loads more than a smaller one: it is used whatever the pattern.

Metadata, built in XLA once per call (`_tile_union`)
----------------------------------------------------
- Every valid entry (0 <= b <= pos_t // l, inside the token's count) becomes the global
  token index of its block's first key, `start = b_batch * T + bos_t + b * l`: with
  cu_seqlens the blocks of all sequences are numbered disjointly and every key token
  belongs to exactly one block. Invalid entries (-1, negative, future, out of range, past
  the count) become SENT and are never looked at again; `b * l` is formed only for valid b,
  so huge indices cannot overflow.
- Per tile: the sorted union of starts (`union` [H, NT, W], W = BT * S, SENT padded,
  `count` [H, NT]) and the multiplicity of every union slot for each token of the tile
  (`mult` [H, NT, W, BT], int8 while S < 128).

Backward
--------
dq mirrors the forward (tile x union loop, p recomputed from the saved lse) and forms
delta = rowsum(o * do) from the o and do rows it holds, for dk/dv (one read of o instead of
an XLA pass over o and do; the two measured the same on an H100, run 4 of
benchmarks/sweep_selection.py, and the fused form needs no extra [B, T, HQ] pass).

dk/dv are KEY-major, with no atomics: a program owns one block's dk/dv [l, D] and streams
the query rows that selected it past the resident K/V block. Two layouts
(`TileConfig.dkv_layout`):
- "tokens" (default): the list of a block holds the *tokens* that selected it, ascending
  (`_token_lists`: one 1-D stable sort of all H * B * T * S entries by (KV head, block),
  which XLA hands to CUB on GPUs, and no while loop). A loop step gathers P tokens x GB
  query heads (M = 64 rows by default, `DkvConfig.rows`), so every row of a step selected
  the block: the steps number about H * B * T * S / P whatever the pattern (1.04M at 64K,
  S = 16, P = 4; "tiles" streams 1.26M 64-row (tile, block) pairs for smooth selections
  and 4.2M 16-row ones for random selections), all with wgmma-sized dots. A token listing a
  block twice appears twice, which counts its keys twice.
- "tiles" (the first implementation, kept for comparison): the list holds the (tile, union
  slot) pairs of the main tiling, or of a second, small-tile tiling (rows_fallback rows: one
  token for G >= 16) chosen per call with `lax.cond` on the union sizes (`_dkv_cost`); a
  step streams a whole tile, with the rows of tokens that did not select the block masked.
A block everybody selects (block 0) has a list of B * T tokens, so lists are cut into
segments of at most `seg` entries; segments of a multi-segment list write float32 partials,
which the reduce kernel sums in segment order (bitwise reproducible). Every dk/dv row is
written once by the reduce kernel (which copies single-segment rows: 256 MB of traffic at
64K, ~0.1 ms; writing them in place would need input_output_aliases in `_call`). `seg` is
chosen statically so that the partials fit in `DkvConfig.partial_bytes` for ANY selection:
the number of partial slots is < 2 * entries / seg, entries <= B * T * H * S. Segment
programs run longest list first, or in block order (`DkvConfig.order`).

Extra memory at T = 64K, HQ = 64, H = 4, S = 16, l = 64 (bf16, D = 128), all linear in T:
forward: union + mult of the main tiles (BT = 4) 32 MB. Backward ("tokens"): the tiles of
the forward (shared in fwd+bwd) 32 MB, the token lists (keys + tokens) 32 MB, partials
<= 128 MiB (`DkvConfig.partial_bytes`), direct dk/dv 128 MB, delta 16 MB: ~0.3 GB, against
~4.3 GB for q, k, v, o, do, dq, dk, dv themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl
from jax import lax

from .._registry import Backend, Platform, kernel_registry
from .._varlen import cdiv, num_compressed_rows, token_info
from ._call import triton_call
from ._vmap import vmappable

# Start of a block that is not one (invalid entries, union padding). Larger than every real
# start (< B * T), so it sorts last.
SENT = np.iinfo(np.int32).max
LOG2E = math.log2(math.e)


def _next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _dot_precision(dtype) -> str:
    # float32 inputs: TF32 alone loses ~1e-3 relative; three TF32 passes keep ~1e-6 at
    # tensor-core speed. 16-bit inputs ignore the setting.
    return "tf32x3" if jnp.dtype(dtype) == jnp.float32 else "tf32"


# ======================================================================================
# Configurations
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """How queries are grouped into tiles, and the cost model that picks a tiling.

    rows_main / rows_fallback: target rows (tokens x query heads) of the two tilings.
    knee_rows: rows up to which a forward / dq loop step costs one K/V block load (the step
      is load bound). The fallback can only win the forward when this is below the main
      tiling's rows (see `_plans`); by default it is not, and the forward has one tiling.
    dkv_step_rows: fixed cost of one dk/dv loop step, in streamed query rows ("tiles" layout).
    variant: "auto" (cost model), "main" or "fallback" (forced, for tests and benchmarks).
      With dkv_layout "tokens" it only concerns the forward and dq.
    dkv_layout: how dk/dv streams the queries of a block ("Backward" in the module docstring):
      "tokens" packs the tokens that selected the block, `DkvConfig.rows` rows per step;
      "tiles" streams whole tiles of the main or fallback tiling (the first implementation).
    """

    rows_main: int = 64
    rows_fallback: int = 16
    knee_rows: int = 128
    dkv_step_rows: int = 32
    variant: str = "auto"
    dkv_layout: str = "tokens"

    @staticmethod
    def default(dk: int = 128, dv: int = 128, dtype=jnp.bfloat16) -> "TileConfig":
        # float32 dots run as three TF32 passes (tf32x3), which triples the registers and
        # shared memory of the operands: from head dims of 128 on, only dq's 16-row tiles
        # compile without spilling (dq follows the forward's tiling).
        if _is_f32(dtype) and max(dk, dv) >= 128:
            return TileConfig(rows_main=16)
        return TileConfig()


def _is_f32(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32


# Kernel configurations below were checked with tools/hopper_compile.py for sm_90 (Triton
# 3.6; report: `python benchmarks/sweep_selection.py --hopper`): shared memory under 227 KiB
# everywhere, wgmma in every dot with 64 rows on the M side; register spills only in dk/dv
# at head dim 128 with 16-bit inputs (40-80 bytes at 4 warps, measured fastest anyway) and
# small ones for float32 with head dims > 128.


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Forward kernel: keys per step (<= l), V columns per program, warps, stages."""

    block_keys: int
    block_v: int
    num_warps: int
    num_stages: int

    @staticmethod
    def default(dk: int, dv: int, rows: int, block_size: int, dtype) -> "FwdConfig":
        big = max(dk, dv) > 128
        bv = _next_pow2(max(16, dv))
        if _is_f32(dtype):
            return FwdConfig(min(block_size, 32), bv, 8 if big else 4, 2)
        if big:
            return FwdConfig(min(block_size, 32), bv, 8, 2)
        return FwdConfig(min(block_size, 64), bv, 8 if rows >= 128 else 4, 2)


@dataclasses.dataclass(frozen=True)
class DqConfig:
    """dq kernel: keys per step (<= l), warps, stages."""

    block_keys: int
    num_warps: int
    num_stages: int

    @staticmethod
    def default(dk: int, dv: int, rows: int, block_size: int, dtype) -> "DqConfig":
        big = max(dk, dv) > 128
        if _is_f32(dtype):
            return DqConfig(min(block_size, 16), 8, 1) if big else DqConfig(min(block_size, 32), 8, 2)
        if big:
            # the o tile that delta is formed from needs registers too
            return DqConfig(min(block_size, 32), 4 if rows < 64 else 8, 2)
        # One warpgroup per 64 rows: every wgmma gets its full M = 64. Measured on an H100
        # (benchmarks/sweep_selection.py, T = 64K, bf16, D = 128): dq 8.6 ms with 4 warps
        # against 20.7 ms with 8 (realistic indices), 22.3 against 50.7 (random).
        return DqConfig(min(block_size, 64), 8 if rows > 64 else 4, 2)


@dataclasses.dataclass(frozen=True)
class DkvConfig:
    """dk/dv kernel: keys per program (<= l), warps, stages; list splitting.

    min_segment: the shortest segment (loop steps) a list is cut into.
    partial_bytes: memory the float32 partials may take; the segment length grows with the
      problem so that they always fit.
    rows: "tokens" layout: target query rows per loop step (tokens x query heads, like
      `TileConfig.rows_main`); the "tiles" layout streams the rows of its tiling instead.
    order: "tokens" layout: the order of the segment programs. "longest": longest list
      first (load balance); "block": blocks in key order, KV heads inside, a list's segments
      together (neighbouring blocks share the tokens that select them as their current or
      previous block, so concurrent programs re-read those queries from L2).
    """

    block_keys: int
    num_warps: int
    num_stages: int
    min_segment: int = 64
    partial_bytes: int = 128 << 20
    rows: int = 64
    order: str = "longest"

    @staticmethod
    def default(dk: int, dv: int, rows: int, block_size: int, dtype, layout: str = "tiles") -> "DkvConfig":
        big = max(dk, dv) > 128
        if _is_f32(dtype):
            if big:
                return DkvConfig(min(block_size, 16), 8, 1, rows=16)
            # tf32x3 operands: 64 gathered rows x 32 keys x D = 128 spill; 16 keys do not
            keys = 16 if layout == "tokens" and max(dk, dv) >= 128 else 32
            return DkvConfig(min(block_size, keys), 8, 1)
        if big:
            return DkvConfig(min(block_size, 32), 8, 2)
        # One warpgroup: the dots have the block's (up to) 64 keys on the M side; 8 warps
        # lay them out 8 warps along M and pass every p / ds tile between the warpgroups
        # through shared memory (seen in the TTGIR). Measured on an H100
        # (benchmarks/sweep_selection.py, T = 64K, bf16, D = 128): dk/dv 13.1 ms with 4
        # warps against 23.7 ms with 8 (realistic indices), 12.7 against 26.1 (random).
        return DkvConfig(min(block_size, 64), 4, 2)


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    """Reduction of the dk/dv partials: keys per program, warps."""

    block_keys: int
    num_warps: int

    @staticmethod
    def default(dk: int, dv: int, block_size: int, dtype=jnp.bfloat16) -> "ReduceConfig":
        # float32 rows of 128+ columns spill with 4 warps
        warps = 8 if _is_f32(dtype) and max(dk, dv) >= 128 else 4
        return ReduceConfig(min(block_size, 32 if max(dk, dv) <= 128 else 16), warps)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Every tunable of selected attention; `default` is tuned for Hopper.

    `main_*` configure the kernels of the main tiling, `fallback_*` those of the small one;
    the "tokens" dk/dv layout uses `main_dkv` whatever the tiling.
    `legacy` is the first dk/dv layout ("tiles"), kept for comparison.
    """

    tile: TileConfig
    main_fwd: FwdConfig
    main_dq: DqConfig
    main_dkv: DkvConfig
    fallback_fwd: FwdConfig
    fallback_dq: DqConfig
    fallback_dkv: DkvConfig
    reduce: ReduceConfig

    @staticmethod
    def default(dk: int, dv: int, group: int, block_size: int, dtype,
                tile: TileConfig | None = None) -> "SelectionConfig":
        tile = tile or TileConfig.default(dk, dv, dtype)
        layout = _dkv_layout(tile)
        m = _Plan.make(group, tile.rows_main).rows
        f = _Plan.make(group, tile.rows_fallback).rows
        return SelectionConfig(
            tile,
            FwdConfig.default(dk, dv, m, block_size, dtype),
            DqConfig.default(dk, dv, m, block_size, dtype),
            DkvConfig.default(dk, dv, m, block_size, dtype, layout),
            FwdConfig.default(dk, dv, f, block_size, dtype),
            DqConfig.default(dk, dv, f, block_size, dtype),
            DkvConfig.default(dk, dv, f, block_size, dtype, layout),
            ReduceConfig.default(dk, dv, block_size, dtype),
        )

    @staticmethod
    def legacy(dk: int, dv: int, group: int, block_size: int, dtype) -> "SelectionConfig":
        """The first dk/dv layout: "tiles", with its per-call choice between two tilings."""
        tile = dataclasses.replace(TileConfig.default(dk, dv, dtype), dkv_layout="tiles")
        return SelectionConfig.default(dk, dv, group, block_size, dtype, tile)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One tiling: BT tokens x GB query heads per program, M rows (>= 16, a power of two)."""

    bt: int  # tokens per tile
    gb: int  # query heads per program (G split into NG chunks of GB when G is large)
    ng: int
    rows: int  # M

    @staticmethod
    def make(group: int, target_rows: int) -> "_Plan":
        ng = cdiv(group, max(1, target_rows))
        gb = cdiv(group, ng)
        bt = max(1, target_rows // gb)
        return _Plan(bt, gb, ng, max(16, _next_pow2(bt * gb)))


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
def _slc_fwd_kernel(
    q, k, v, union, count, mult,  # inputs
    T, NTT, qk_scale,  # scalars
    o, lse,  # outputs
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, BT: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """o [B*T, HQ, V] and lse [B*T, HQ] (natural log, -inf for rows with no key) of one tile."""
    NC: tl.constexpr = BS // BC
    i_tile, i_hg, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.num_programs(0)
    i_h, i_g = i_hg // NG, i_hg % NG
    i_b, t0 = i_tile // NTT, (i_tile % NTT) * BT
    t_end = tl.minimum(t0 + BT, T)
    t_hi = i_b * T + t_end - 1  # last token of the tile: no key past it is ever needed

    o_r = tl.arange(0, M)
    r_tok = o_r // GB
    r_g = i_g * GB + o_r % GB
    m_r = (o_r < BT * GB) & (t0 + r_tok < T) & (r_g < G)
    t_r = i_b * T + t0 + r_tok  # [M] global token of each row
    # rows of q / o / lse relative to the tile's first (token, head): small, int32
    o_row = r_tok * HQ + r_g
    row0 = (i_b * T + t0).to(tl.int64) * HQ + i_h * G

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    # [M, BK]
    b_q = tl.load(q + row0 * K + o_row[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)

    i_ht = (i_h * NT + i_tile).to(tl.int64)
    p_u = union + i_ht * W
    p_w = mult + i_ht * W * BT
    n_u = tl.load(count + i_ht)
    o_c = tl.arange(0, BC)

    b_m = tl.full([M], float("-inf"), tl.float32)
    b_l = tl.zeros([M], tl.float32)
    b_o = tl.zeros([M, BV], tl.float32)
    for i in range(0, n_u * NC):
        i_u = i // NC
        i_c = i % NC
        s = tl.load(p_u + i_u)  # global token of the block's first key
        # [M] multiplicity of this block for each row's token (0: not selected)
        b_w = tl.load(p_w + i_u * BT + r_tok, mask=m_r, other=0).to(tl.float32)
        o_j = s + i_c * BC + o_c  # [BC] global key tokens
        m_j = o_j <= t_hi
        p_kv = (s.to(tl.int64) * H + i_h)
        o_kv = (i_c * BC + o_c) * H
        # [BC, BK], [BC, BV]
        b_k = tl.load(k + p_kv * K + o_kv[:, None] * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + p_kv * V + o_kv[:, None] * V + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0.0)
        # [M, BC] scores in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        m_s = (o_j[None, :] <= t_r[:, None]) & (b_w[:, None] > 0)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        # a row that has seen no key keeps m = -inf; shift by 0 so that nothing is NaN
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_a = tl.exp2(b_m - b_ms)
        b_p = tl.exp2(b_s - b_ms[:, None]) * b_w[:, None]
        b_l = b_l * b_a + tl.sum(b_p, 1)
        b_o = b_o * b_a[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_mn

    b_has = b_l > 0
    b_o = b_o / tl.where(b_has, b_l, 1.0)[:, None]
    tl.store(o + row0 * V + o_row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_r[:, None] & m_v[None, :])
    if i_v == 0:
        b_lse = tl.where(b_has, (b_m + tl.log2(tl.where(b_has, b_l, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(lse + row0 + o_row, b_lse, mask=m_r)


@triton.jit
def _slc_dq_kernel(
    q, k, v, o, do, lse, union, count, mult,  # inputs
    T, NTT, qk_scale, scale,  # scalars
    dq, delta,  # outputs
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, BT: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq [B*T, HQ, K] and delta = rowsum(o * do) [B*T, HQ] of one tile.

    The forward's loop with p recomputed from lse. delta is formed from the o and do rows of
    the tile (each row belongs to exactly one program, so it is written once); dk/dv read it.
    """
    NC: tl.constexpr = BS // BC
    i_tile, i_hg = tl.program_id(0), tl.program_id(1)
    NT = tl.num_programs(0)
    i_h, i_g = i_hg // NG, i_hg % NG
    i_b, t0 = i_tile // NTT, (i_tile % NTT) * BT
    t_end = tl.minimum(t0 + BT, T)
    t_hi = i_b * T + t_end - 1

    o_r = tl.arange(0, M)
    r_tok = o_r // GB
    r_g = i_g * GB + o_r % GB
    m_r = (o_r < BT * GB) & (t0 + r_tok < T) & (r_g < G)
    t_r = i_b * T + t0 + r_tok
    o_row = r_tok * HQ + r_g
    row0 = (i_b * T + t0).to(tl.int64) * HQ + i_h * G

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
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634

    i_ht = (i_h * NT + i_tile).to(tl.int64)
    p_u = union + i_ht * W
    p_w = mult + i_ht * W * BT
    n_u = tl.load(count + i_ht)
    o_c = tl.arange(0, BC)

    b_dq = tl.zeros([M, BK], tl.float32)
    for i in range(0, n_u * NC):
        i_u = i // NC
        i_c = i % NC
        s = tl.load(p_u + i_u)
        b_w = tl.load(p_w + i_u * BT + r_tok, mask=m_r, other=0).to(tl.float32)
        o_j = s + i_c * BC + o_c
        m_j = o_j <= t_hi
        p_kv = (s.to(tl.int64) * H + i_h)
        o_kv = (i_c * BC + o_c) * H
        b_k = tl.load(k + p_kv * K + o_kv[:, None] * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + p_kv * V + o_kv[:, None] * V + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0.0)
        # [M, BC]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        m_s = (o_j[None, :] <= t_r[:, None]) & (b_w[:, None] > 0)
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0) * b_w[:, None]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq = b_dq * scale
    tl.store(dq + row0 * K + o_row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_r[:, None] & m_k[None, :])


@triton.jit
def _slc_dkv_kernel(
    q, k, v, do, lse, delta, pairs, mult, desc, row_start, row_len,  # inputs
    T, NTT, NT, BR, PW, qk_scale, scale,  # scalars
    dk_direct, dv_direct, part_k, part_v,  # outputs
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, BT: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dk, dv of BC keys of one block from one segment of the tiles that selected it.

    desc[pid] = (list, lo, hi, out): list = h * BR + block row (-1: no work), pairs
    [lo, hi) of head h, out = partial slot, or -1 to write dk/dv directly.
    """
    i_s, i_c = tl.program_id(0), tl.program_id(1)
    lst = tl.load(desc + i_s * 4)
    if lst < 0:
        return
    lo = tl.load(desc + i_s * 4 + 1)
    hi = tl.load(desc + i_s * 4 + 2)
    out = tl.load(desc + i_s * 4 + 3)
    i_h = lst // BR
    rho = lst % BR
    s = tl.load(row_start + rho)
    nk = tl.load(row_len + rho)
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
    b_dk = tl.zeros([BC, BK], tl.float32)
    b_dv = tl.zeros([BC, BV], tl.float32)
    p_pairs = pairs + i_h.to(tl.int64) * PW
    for i_p in range(lo, hi):
        e = tl.load(p_pairs + i_p)  # tile * W + union slot
        i_tile = e // W
        i_b, t0 = i_tile // NTT, (i_tile % NTT) * BT
        t_r = i_b * T + t0 + r_tok
        m_t = (o_r < BT * GB) & (t0 + r_tok < T)
        # [M] multiplicity of this block for each row's token
        b_w = tl.load(mult + ((i_h * NT).to(tl.int64) * W + e) * BT + r_tok, mask=m_t, other=0).to(tl.float32)
        row0 = (i_b * T + t0).to(tl.int64) * HQ + i_h * G
        for i_g in range(NG):
            r_g = i_g * GB + o_r % GB
            m_r = m_t & (r_g < G)
            o_row = r_tok * HQ + r_g
            # [M, BK], [M, BV], [M]
            b_q = tl.load(q + row0 * K + o_row[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
            b_do = tl.load(do + row0 * V + o_row[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
            b_lse = tl.load(lse + row0 + o_row, mask=m_r, other=float("inf")).to(tl.float32)
            b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
            b_delta = tl.load(delta + row0 + o_row, mask=m_r, other=0.0).to(tl.float32)
            # keys on the M side: [BC, M]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
            m_st = m_j[:, None] & (o_j[:, None] <= t_r[None, :]) & ((b_w > 0) & m_r)[None, :]
            b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0) * b_w[None, :]
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
def _slc_dkv_tokens_kernel(
    q, k, v, do, lse, delta, toks, desc, row_start, row_len,  # inputs
    BR, qk_scale, scale,  # scalars
    dk_direct, dv_direct, part_k, part_v,  # outputs
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, P: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
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
    i_h = lst // BR
    rho = lst % BR
    s = tl.load(row_start + rho)
    nk = tl.load(row_len + rho)
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
        # [M] global token of each row
        t_r = tl.load(toks + i + r_tok, mask=m_t, other=0)
        row0 = t_r.to(tl.int64) * HQ + i_h * G
        for i_g in range(NG):
            r_g = i_g * GB + r_gl
            m_r = m_t & (r_g < G)
            o_row = row0 + r_g
            # [M, BK], [M, BV], [M]
            b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
            b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
            b_lse = tl.load(lse + o_row, mask=m_r, other=float("inf")).to(tl.float32)
            b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
            b_delta = tl.load(delta + o_row, mask=m_r, other=0.0).to(tl.float32)
            # keys on the M side: [BC, M]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
            m_st = m_j[:, None] & (o_j[:, None] <= t_r[None, :]) & m_r[None, :]
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
def _slc_reduce_kernel(
    dk_direct, dv_direct, part_k, part_v, row_start, row_len, part_off, part_num,  # inputs
    BR,  # scalar
    dk, dv,  # outputs
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """dk, dv of BC keys of one block: its partials summed in order, or its direct rows copied."""
    lst, i_c = tl.program_id(0), tl.program_id(1)
    i_h = lst // BR
    rho = lst % BR
    s = tl.load(row_start + rho)
    nk = tl.load(row_len + rho)
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
# Metadata (XLA)
# ======================================================================================


def _block_starts(block_indices, block_counts, block_size: int, cu_seqlens):
    """Global start token of every valid entry, SENT elsewhere: int32 [B, T, H, S]."""
    batch, seq_len, _, num_sel = block_indices.shape
    info = token_info(cu_seqlens, seq_len, block_size)
    idx = block_indices.astype(jnp.int32)
    cur = (info.pos // block_size)[None, :, None, None]
    # Compare the index itself with the current block: b * l is formed only for valid b.
    valid = (idx >= 0) & (idx <= cur)
    if block_counts is not None:
        valid &= jnp.arange(num_sel, dtype=jnp.int32) < block_counts.astype(jnp.int32)[..., None]
    base = jnp.arange(batch, dtype=jnp.int32)[:, None] * seq_len + info.bos[None, :]  # [B, T]
    start = base[:, :, None, None] + jnp.where(valid, idx, 0) * block_size
    return jnp.where(valid, start, SENT)


def _mult_dtype(num_sel: int):
    if num_sel <= 127:
        return jnp.int8
    if num_sel <= 32767:
        return jnp.int16
    return jnp.int32


def _tile_union(starts, bt: int):
    """Per tile of bt tokens (and KV head): union [H, NT, W], count [H, NT], mult [H, NT, W, bt].

    union holds the distinct block starts ascending (SENT padded); mult[h, tile, u, i] is
    how many of token i's entries name block union[h, tile, u].
    """
    batch, seq_len, heads, num_sel = starts.shape
    ntt = cdiv(seq_len, bt)
    nt, w = batch * ntt, bt * num_sel
    x = jnp.pad(starts, ((0, 0), (0, ntt * bt - seq_len), (0, 0), (0, 0)), constant_values=SENT)
    x = x.reshape(batch, ntt, bt, heads, num_sel).transpose(3, 0, 1, 2, 4).reshape(heads, nt, w)
    tok = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32) // num_sel, x.shape)
    xs, toks = lax.sort((x, tok), dimension=2, num_keys=1, is_stable=True)
    valid = xs != SENT
    prev = jnp.concatenate([jnp.full((heads, nt, 1), -1, jnp.int32), xs[:, :, :-1]], axis=2)
    new = valid & (xs != prev)
    slot = jnp.cumsum(new.astype(jnp.int32), axis=2) - 1
    count = jnp.sum(new, axis=2, dtype=jnp.int32)
    hh = jnp.arange(heads, dtype=jnp.int32)[:, None, None]
    tt = jnp.arange(nt, dtype=jnp.int32)[None, :, None]
    union = jnp.full((heads, nt, w), SENT, jnp.int32).at[hh, tt, jnp.where(new, slot, w)].set(xs, mode="drop")
    mdt = _mult_dtype(num_sel)
    # Integer adds: the result does not depend on their order.
    mult = jnp.zeros((heads, nt, w, bt), mdt).at[hh, tt, jnp.where(valid, slot, 0), toks].add(valid.astype(mdt))
    return union, count, mult


def _block_rows(batch: int, seq_len: int, block_size: int, cu_seqlens):
    """Blocks of keys: row_start (global token, -1 for padding rows), row_len; int32 [B * R].

    Rows are numbered like the packed compressed rows (b * R + boc + block); every key token
    belongs to exactly one row, so writing every row writes every dk/dv token once.
    """
    if cu_seqlens is None:
        nr = cdiv(seq_len, block_size)
        blk = jnp.arange(nr, dtype=jnp.int32)
        start = (jnp.arange(batch, dtype=jnp.int32)[:, None] * seq_len + blk * block_size).reshape(-1)
        length = jnp.tile(jnp.minimum(block_size, seq_len - blk * block_size), batch)
        return start, length.astype(jnp.int32)
    nr = num_compressed_rows(seq_len, block_size, cu_seqlens.shape[0] - 1)
    info = token_info(cu_seqlens, seq_len, block_size)
    t = jnp.arange(seq_len, dtype=jnp.int32)
    first = (info.pos % block_size == 0) & (t - info.bos < info.seq_len)
    row = jnp.where(first, info.boc + info.pos // block_size, nr)
    start = jnp.full((nr,), -1, jnp.int32).at[row].set(t, mode="drop")
    length = jnp.zeros((nr,), jnp.int32).at[row].set(jnp.minimum(block_size, info.seq_len - info.pos), mode="drop")
    return start, length


def _segment_length(num_pairs_bound: int, block_size: int, dk: int, dv: int, cfg: DkvConfig) -> int:
    """Tiles per segment such that the partials fit in cfg.partial_bytes for any selection."""
    slot_bytes = block_size * (dk + dv) * 4
    max_slots = max(1, cfg.partial_bytes // slot_bytes)
    return max(1, cfg.min_segment, cdiv(2 * num_pairs_bound, max_slots))


def _inverse_index(union, row_start, seg: int, num_pairs_bound: int):
    """For dk/dv: which (tile, slot) pairs selected each block, cut into segments of <= seg.

    Returns
      pairs [H, NT * W] int32: per KV head, tile * W + slot sorted by block start (stable,
        so each block's tiles come in tile order);
      desc [NSEG, 4] int32: (list = h * BR + row or -1, lo, hi, partial slot or -1), the
        longest lists first;
      part_off, part_num [H * BR] int32: a multi-segment list's first partial slot and its
        number of segments (0 for a list written directly).
    """
    heads, nt, w = union.shape
    br = row_start.shape[0]
    keys = union.reshape(heads, nt * w)
    vals = jnp.broadcast_to(jnp.arange(nt * w, dtype=jnp.int32), keys.shape)
    skeys, pairs = lax.sort((keys, vals), dimension=1, num_keys=1, is_stable=True)
    # Padding rows have start -1, which no key equals: their lists are empty.
    lo = jax.vmap(lambda a: jnp.searchsorted(a, row_start, side="left"))(skeys).astype(jnp.int32)
    hi = jax.vmap(lambda a: jnp.searchsorted(a, row_start, side="right"))(skeys).astype(jnp.int32)
    lo, n = lo.reshape(-1), (hi - lo).reshape(-1)  # [H * BR]
    nseg = jnp.maximum(1, (n + seg - 1) // seg)
    multi = nseg > 1
    part_num = jnp.where(multi, nseg, 0)
    part_off = jnp.cumsum(part_num) - part_num

    nlists = heads * br
    nseg_total = nlists + cdiv(num_pairs_bound, seg)
    perm = jnp.argsort(-n, stable=True).astype(jnp.int32)  # longest list first
    nseg_p = nseg[perm]
    end = jnp.cumsum(nseg_p)
    s = jnp.arange(nseg_total, dtype=jnp.int32)
    kk = jnp.minimum(jnp.searchsorted(end, s, side="right"), nlists - 1).astype(jnp.int32)
    lst = perm[kk]
    j = s - (end[kk] - nseg_p[kk])
    seg_lo = lo[lst] + j * seg
    seg_hi = jnp.minimum(seg_lo + seg, lo[lst] + n[lst])
    out = jnp.where(multi[lst], part_off[lst] + j, -1)
    ok = s < end[-1]
    desc = jnp.stack([jnp.where(ok, lst, -1), seg_lo, seg_hi, out], axis=1).astype(jnp.int32)
    return pairs, desc, part_off.astype(jnp.int32), part_num.astype(jnp.int32)


def _token_segment(num_entries: int, tokens_per_step: int, block_size: int, dk: int, dv: int, cfg: DkvConfig) -> int:
    """Entries per segment ("tokens" layout): a whole number of steps, at least
    cfg.min_segment of them, and long enough that the partials fit in cfg.partial_bytes for
    ANY selection (partial slots < 2 * entries / segment)."""
    slot_bytes = block_size * (dk + dv) * 4
    max_slots = max(1, cfg.partial_bytes // slot_bytes)
    steps = max(1, cfg.min_segment, cdiv(cdiv(2 * num_entries, max_slots), tokens_per_step))
    return steps * tokens_per_step


def _segments(lo, n, seg: int, nseg_total: int, perm):
    """Cuts list i ([lo[i], lo[i] + n[i]) of a sorted array) into segments of <= seg and
    lays them out in the list order `perm`, a list's segments together.

    Returns desc [nseg_total, 4] int32 (list or -1, lo, hi, partial slot or -1), part_off,
    part_num (a multi-segment list's first partial slot and number of segments, 0 for a
    list written directly). Built from scatters and scans only: no while loop (searchsorted)
    and no sort but `perm`'s.
    """
    nlists = n.shape[0]
    nseg = jnp.maximum(1, (n + seg - 1) // seg)
    multi = nseg > 1
    part_num = jnp.where(multi, nseg, 0)
    part_off = jnp.cumsum(part_num) - part_num
    nseg_p = nseg[perm]
    end = jnp.cumsum(nseg_p)
    first = end - nseg_p  # strictly increasing: every list has >= 1 segment
    s = jnp.arange(nseg_total, dtype=jnp.int32)
    # kk[s]: position in perm of the list that segment s belongs to
    kk = lax.cummax(jnp.zeros((nseg_total,), jnp.int32).at[first].set(
        jnp.arange(nlists, dtype=jnp.int32), mode="drop"), axis=0)
    lst = perm[kk]
    j = s - first[kk]
    seg_lo = lo[lst] + j * seg
    seg_hi = jnp.minimum(seg_lo + seg, lo[lst] + n[lst])
    out = jnp.where(multi[lst], part_off[lst] + j, -1)
    ok = s < end[-1]
    desc = jnp.stack([jnp.where(ok, lst, -1), seg_lo, seg_hi, out], axis=1).astype(jnp.int32)
    return desc, part_off.astype(jnp.int32), part_num.astype(jnp.int32)


def _token_lists(block_indices, block_counts, block_size: int, cu_seqlens, row_start, seg: int, order: str):
    """For dk/dv ("tokens" layout): the tokens that selected each block, cut into segments.

    Every valid entry (as in `_block_starts`) gets the list of its block, h * BR + row
    (rows as in `_block_rows`); ONE stable sort of all H * B * T * S entries by list (a 1-D
    key-value sort, which XLA hands to CUB's radix sort on GPUs) groups them, tokens
    ascending within a list because entries are laid out token-major per head.

    Returns
      toks [E] int32, E = H * B * T * S: the global token (b * T + t) of every entry,
        grouped by list, invalid entries last;
      desc [NSEG, 4] int32 (list or -1, lo, hi, partial slot or -1): entries [lo, hi) of
        toks, NSEG = H * BR + cdiv(E, seg); part_off, part_num [H * BR] (see `_segments`).
    """
    batch, seq_len, heads, num_sel = block_indices.shape
    br = row_start.shape[0]
    nr = br // batch
    nlists = heads * br
    info = token_info(cu_seqlens, seq_len, block_size)
    idx = block_indices.astype(jnp.int32)
    cur = (info.pos // block_size)[None, :, None, None]
    valid = (idx >= 0) & (idx <= cur)
    if block_counts is not None:
        valid &= jnp.arange(num_sel, dtype=jnp.int32) < block_counts.astype(jnp.int32)[..., None]
    b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
    bidx = jnp.where(valid, idx, 0)  # b * l is formed only for valid b
    row = b * nr + info.boc[None, :, None, None] + bidx
    start = b * seq_len + info.bos[None, :, None, None] + bidx * block_size
    # The row must exist and start at the entry's block (always, unless cu_seqlens is
    # malformed; then the entry is ignored, as an entry matching no row always was).
    valid &= (row < br) & (row_start[jnp.minimum(row, br - 1)] == start)
    h = jnp.arange(heads, dtype=jnp.int32)[None, None, :, None]
    key = jnp.where(valid, h * br + row, nlists)  # nlists: no list, sorts last
    tok = jnp.broadcast_to(b * seq_len + jnp.arange(seq_len, dtype=jnp.int32)[None, :, None, None], key.shape)
    key = key.transpose(2, 0, 1, 3).reshape(-1)
    tok = tok.transpose(2, 0, 1, 3).reshape(-1)
    skey, toks = lax.sort((key, tok), num_keys=1, is_stable=True)
    # [lo, hi) of every list from the places where the key changes (lists with no entry
    # keep lo = hi = 0).
    e = skey.shape[0]
    pos = jnp.arange(e, dtype=jnp.int32)
    change = skey[1:] != skey[:-1]
    first = jnp.concatenate([jnp.ones((1,), bool), change])
    last = jnp.concatenate([change, jnp.ones((1,), bool)])
    lo = jnp.zeros((nlists,), jnp.int32).at[jnp.where(first, skey, nlists)].set(pos, mode="drop")
    hi = jnp.zeros((nlists,), jnp.int32).at[jnp.where(last, skey, nlists)].set(pos + 1, mode="drop")
    n = hi - lo
    if order == "longest":
        perm = jnp.argsort(-n, stable=True).astype(jnp.int32)
    elif order == "block":
        k = jnp.arange(nlists, dtype=jnp.int32)
        perm = (k % heads) * br + k // heads
    else:
        raise ValueError(f"DkvConfig.order must be 'longest' or 'block', got {order!r}")
    desc, part_off, part_num = _segments(lo, n, seg, nlists + cdiv(e, seg), perm)
    return toks, desc, part_off, part_num


# ======================================================================================
# Launchers
# ======================================================================================


def _dims(query, key, value):
    batch, seq_len, hq, dk = query.shape
    heads, dv = key.shape[2], value.shape[3]
    return batch, seq_len, hq, heads, hq // heads, dk, dv


def _forward(query, key, value, tiles, plan: _Plan, block_size: int, scale: float, cfg: FwdConfig):
    union, count, mult = tiles
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    ntt = cdiv(seq_len, plan.bt)
    nt = batch * ntt
    w = union.shape[2]
    bv = min(cfg.block_v, _next_pow2(max(16, dv)))
    o, lse = triton_call(
        query, key, value, union, count, mult,
        seq_len, ntt, np.float32(scale * LOG2E),
        kernel=_slc_fwd_kernel,
        out_shape=(jax.ShapeDtypeStruct(query.shape[:3] + (dv,), query.dtype),
                   jax.ShapeDtypeStruct(query.shape[:3], jnp.float32)),
        grid=(nt, heads * plan.ng, cdiv(dv, bv)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="slc_fwd",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=w,
        BS=block_size, BC=min(cfg.block_keys, block_size), BK=_next_pow2(max(16, dk)), BV=bv,
        PREC=_dot_precision(query.dtype),
    )
    return o, lse


def _backward_dq(query, key, value, o, do, lse, tiles, plan: _Plan, block_size: int, scale: float, cfg: DqConfig):
    """(dq, delta = rowsum(o * do) in float32)."""
    union, count, mult = tiles
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    ntt = cdiv(seq_len, plan.bt)
    return triton_call(
        query, key, value, o, do, lse, union, count, mult,
        seq_len, ntt, np.float32(scale * LOG2E), np.float32(scale),
        kernel=_slc_dq_kernel, name="slc_dq",
        out_shape=(jax.ShapeDtypeStruct(query.shape, query.dtype),
                   jax.ShapeDtypeStruct(query.shape[:3], jnp.float32)),
        grid=(batch * ntt, heads * plan.ng), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=union.shape[2],
        BS=block_size, BC=min(cfg.block_keys, block_size), BK=_next_pow2(max(16, dk)), BV=_next_pow2(max(16, dv)),
        PREC=_dot_precision(query.dtype),
    )


def _dkv_outputs(key, value, nparts: int, block_size: int):
    dk, dv = key.shape[3], value.shape[3]
    return (jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype),
            jax.ShapeDtypeStruct((nparts, block_size, dk), jnp.float32),
            jax.ShapeDtypeStruct((nparts, block_size, dv), jnp.float32))


def _dkv_tiles_meta(union, row_start, plan: _Plan, num_sel: int, batch: int, seq_len: int, block_size: int,
                    dk: int, dv: int, cfg: DkvConfig):
    """"tiles" layout: the inverse index (pairs, desc, part_off, part_num) and its segment length."""
    heads = union.shape[0]
    pairs_bound = batch * seq_len * heads * num_sel
    seg = _segment_length(pairs_bound, block_size, dk, dv, cfg)
    return _inverse_index(union, row_start, seg, pairs_bound), seg


def _dkv_tiles_kernel(query, key, value, lse, delta, do, mult, index, rows, plan: _Plan, block_size: int,
                      scale: float, seg: int, cfg: DkvConfig):
    pairs, desc, _, _ = index
    row_start, row_len = rows
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    ntt = cdiv(seq_len, plan.bt)
    nt = batch * ntt
    w = mult.shape[2]
    pairs_bound = batch * seq_len * heads * (w // plan.bt)
    br = row_start.shape[0]
    bc = min(cfg.block_keys, block_size)
    return triton_call(
        query, key, value, do, lse, delta, pairs, mult, desc, row_start, row_len,
        seq_len, ntt, nt, br, nt * w, np.float32(scale * LOG2E), np.float32(scale),
        kernel=_slc_dkv_kernel,
        out_shape=_dkv_outputs(key, value, cdiv(2 * pairs_bound, seg) + 1, block_size),
        grid=(desc.shape[0], cdiv(block_size, bc)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="slc_dkv",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=w,
        BS=block_size, BC=bc, BK=_next_pow2(max(16, dk)), BV=_next_pow2(max(16, dv)),
        PREC=_dot_precision(query.dtype),
    )


def _dkv_tokens_kernel(query, key, value, lse, delta, do, lists, rows, plan: _Plan, block_size: int, scale: float,
                       seg: int, cfg: DkvConfig):
    toks, desc, _, _ = lists
    row_start, row_len = rows
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    br = row_start.shape[0]
    bc = min(cfg.block_keys, block_size)
    return triton_call(
        query, key, value, do, lse, delta, toks, desc, row_start, row_len,
        br, np.float32(scale * LOG2E), np.float32(scale),
        kernel=_slc_dkv_tokens_kernel,
        out_shape=_dkv_outputs(key, value, cdiv(2 * toks.shape[0], seg) + 1, block_size),
        grid=(desc.shape[0], cdiv(block_size, bc)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="slc_dkv_tokens",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, P=plan.bt, M=plan.rows,
        BS=block_size, BC=bc, BK=_next_pow2(max(16, dk)), BV=_next_pow2(max(16, dv)),
        PREC=_dot_precision(query.dtype),
    )


def _reduce(key, value, parts, index, rows, block_size: int, cfg: ReduceConfig):
    """dk, dv: every row written once, by summing its partials in order or copying it."""
    dk_direct, dv_direct, part_k, part_v = parts
    _, _, part_off, part_num = index
    row_start, row_len = rows
    heads, dk, dv = key.shape[2], key.shape[3], value.shape[3]
    br = row_start.shape[0]
    rbc = min(cfg.block_keys, block_size)
    return triton_call(
        dk_direct, dv_direct, part_k, part_v, row_start, row_len, part_off, part_num,
        br,
        kernel=_slc_reduce_kernel,
        out_shape=(jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype)),
        grid=(heads * br, cdiv(block_size, rbc)),
        num_warps=cfg.num_warps, name="slc_reduce",
        H=heads, K=dk, V=dv, BS=block_size, BC=rbc, BK=_next_pow2(max(16, dk)), BV=_next_pow2(max(16, dv)),
    )


def _backward_dkv(query, key, value, lse, delta, do, tiles, rows, plan: _Plan, block_size: int, scale: float,
                  cfg: DkvConfig, red_cfg: ReduceConfig):
    """"tiles" layout, whole: inverse index, segment programs, reduce."""
    union, _, mult = tiles
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    index, seg = _dkv_tiles_meta(union, rows[0], plan, union.shape[2] // plan.bt, batch, seq_len, block_size,
                                 dk, dv, cfg)
    parts = _dkv_tiles_kernel(query, key, value, lse, delta, do, mult, index, rows, plan, block_size, scale, seg, cfg)
    return _reduce(key, value, parts, index, rows, block_size, red_cfg)


# --------------------------------------------------------------------------------------
# Choosing the tiling
#
# Forward and dq stream K/V blocks past resident query rows: one loop step costs about one
# block load while the rows stay under the knee (the step is load bound), and a tile's
# union is never longer than the sum of its sub-tiles' unions. So the main tiling never
# loads more than the fallback, and the fallback can only win there when steps are compute
# bound (knee_rows < rows of the main tiling); otherwise it is not even considered.
# "tiles" dk/dv streams query rows past a resident K/V block: a step costs a fixed overhead
# plus its rows, and a large tile streams the rows of tokens that did not select the block.
# With shared selections the main tiling needs few, full steps; with random ones the
# fallback streams ~BT times fewer rows. That choice is made per call, with lax.cond.
# ("tokens" dk/dv needs no choice: its steps hold only rows that selected the block.)
# --------------------------------------------------------------------------------------


def _plans(group: int, tile: TileConfig):
    """(main, fallback or None): None when both tilings are the same or one is forced."""
    if tile.variant not in ("auto", "main", "fallback"):
        raise ValueError(f"TileConfig.variant must be 'auto', 'main' or 'fallback', got {tile.variant!r}")
    main = _Plan.make(group, tile.rows_main)
    fb = _Plan.make(group, tile.rows_fallback)
    if tile.variant == "fallback":
        return fb, None
    if tile.variant == "main" or fb == main:
        return main, None
    return main, fb


def _fwd_cost(count, plan: _Plan, tile: TileConfig):
    return jnp.sum(count.astype(jnp.float32)) * max(1.0, plan.rows / tile.knee_rows)


def _dkv_cost(count, plan: _Plan, tile: TileConfig):
    return jnp.sum(count.astype(jnp.float32)) * (tile.dkv_step_rows + plan.rows)


def _fwd_may_fall_back(main: _Plan, fb: _Plan | None, tile: TileConfig) -> bool:
    return fb is not None and tile.knee_rows < main.rows


def _kernel_cfgs(cfg: SelectionConfig, fallback: bool):
    if fallback:
        return cfg.fallback_fwd, cfg.fallback_dq, cfg.fallback_dkv
    return cfg.main_fwd, cfg.main_dq, cfg.main_dkv


def tiling_choices(block_indices, block_counts, block_size: int, cu_seqlens, group: int, tile: TileConfig | None = None):
    """(forward uses the fallback, dk/dv uses the fallback): traced bools, or None where no
    choice is made (a single tiling, or the forward's provably never-cheaper fallback).
    For tests and benchmarks."""
    tile = tile or TileConfig.default()
    main, fb = _plans(group, tile)
    if fb is None:
        return None, None
    starts = _block_starts(block_indices, block_counts, block_size, cu_seqlens)
    cm, cf = _tile_union(starts, main.bt)[1], _tile_union(starts, fb.bt)[1]
    fwd = _fwd_cost(cf, fb, tile) < _fwd_cost(cm, main, tile) if _fwd_may_fall_back(main, fb, tile) else None
    return fwd, _dkv_cost(cf, fb, tile) < _dkv_cost(cm, main, tile)


def _dkv_layout(tile: TileConfig) -> str:
    if tile.dkv_layout not in ("tokens", "tiles"):
        raise ValueError(f"TileConfig.dkv_layout must be 'tokens' or 'tiles', got {tile.dkv_layout!r}")
    return tile.dkv_layout


# The forward and the backward are written as sequences of stages, each a pure function of
# arrays run through `run(name, fn, *arrays)`. The custom_vjp runs them inline (`_now`);
# `forward_stages` / `backward_stages` let a benchmark jit and time every stage alone on
# its real inputs. Names are unique within a pass and name what the stage depends on.


def _now(name, fn, *args):
    del name
    return fn(*args)


def _fwd_run(run, query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    group = query.shape[2] // key.shape[2]
    main, fb = _plans(group, cfg.tile)
    forced_fb = cfg.tile.variant == "fallback"
    may_fb = _fwd_may_fall_back(main, fb, cfg.tile)
    fcfg = _kernel_cfgs(cfg, forced_fb)[0]
    tile, fb_fwd = cfg.tile, cfg.fallback_fwd

    def meta(bi, bc, cu):
        starts = _block_starts(bi, bc, block_size, cu)
        return _tile_union(starts, main.bt), (_tile_union(starts, fb.bt) if may_fb else None)

    tiles_m, tiles_f = run("meta_fwd", meta, block_indices, block_counts, cu_seqlens)
    if not may_fb:
        o, lse = run("fwd", lambda q, k, v, tm: _forward(q, k, v, tm, main, block_size, scale, fcfg),
                     query, key, value, tiles_m)
        return o, lse, None

    def fwd(q, k, v, tm, tf):
        use_fb = _fwd_cost(tf[1], fb, tile) < _fwd_cost(tm[1], main, tile)
        fwd_m = functools.partial(_forward, q, k, v, tm, main, block_size, scale, fcfg)
        fwd_f = functools.partial(_forward, q, k, v, tf, fb, block_size, scale, fb_fwd)
        o, lse = lax.cond(use_fb, fwd_f, fwd_m)
        return o, lse, use_fb

    return run("fwd", fwd, query, key, value, tiles_m, tiles_f)


def _bwd_run(run, query, key, value, block_indices, block_counts, cu_seqlens, o, lse, fwd_fb, do, block_size, scale,
             cfg, dkv_fb=None):
    """fwd_fb: the forward's tiling choice (a bool array, or None: no choice was made).
    dkv_fb: "tiles" layout with two tilings only: None chooses per call with lax.cond (one
    stage then holds index, kernel and reduce); a Python bool forces the choice."""
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    num_sel = block_indices.shape[3]
    main, fb = _plans(group, cfg.tile)
    forced_fb = cfg.tile.variant == "fallback"
    _, dq_cfg, dkv_cfg = _kernel_cfgs(cfg, forced_fb)
    tokens = _dkv_layout(cfg.tile) == "tokens"
    need_f = fb is not None and (fwd_fb is not None or not tokens)
    do = do.astype(query.dtype)
    # Stage closures capture only the static values they use (benchmarks share the
    # compilations of identical stages between configurations).
    tile, fb_dq, red = cfg.tile, cfg.fallback_dq, cfg.reduce

    # dq: the forward's tiling (its metadata is the forward's: XLA shares it in fwd+bwd)
    def meta_tiles(bi, bc, cu):
        starts = _block_starts(bi, bc, block_size, cu)
        return _tile_union(starts, main.bt), (_tile_union(starts, fb.bt) if need_f else None)

    tiles_m, tiles_f = run("meta_tiles", meta_tiles, block_indices, block_counts, cu_seqlens)

    def dq_fn(q, k, v, o, do, lse, tm, tf, fwd_fb):
        dq_m = functools.partial(_backward_dq, q, k, v, o, do, lse, tm, main, block_size, scale, dq_cfg)
        if fwd_fb is None:
            return dq_m()
        dq_f = functools.partial(_backward_dq, q, k, v, o, do, lse, tf, fb, block_size, scale, fb_dq)
        return lax.cond(fwd_fb, dq_f, dq_m)

    dq, delta = run("dq", dq_fn, query, key, value, o, do, lse, tiles_m, tiles_f, fwd_fb)

    if tokens:
        kcfg = cfg.main_dkv
        plan = _Plan.make(group, kcfg.rows)
        num_entries = heads * batch * seq_len * num_sel
        if num_entries >= 2**31:
            raise ValueError(f"selected attention's dk/dv index holds H * B * T * S entries in int32; got "
                             f"{heads} * {batch} * {seq_len} * {num_sel} = {num_entries} >= 2**31")
        seg = _token_segment(num_entries, plan.bt, block_size, dk, dv, kcfg)

        order = kcfg.order

        def meta_dkv(bi, bc, cu):
            rows = _block_rows(batch, seq_len, block_size, cu)
            return _token_lists(bi, bc, block_size, cu, rows[0], seg, order), rows

        index, rows = run("meta_dkv", meta_dkv, block_indices, block_counts, cu_seqlens)
        parts = run("dkv", lambda q, k, v, lse, delta, do, index, rows: _dkv_tokens_kernel(
            q, k, v, lse, delta, do, index, rows, plan, block_size, scale, seg, kcfg),
            query, key, value, lse, delta, do, index, rows)
    elif fb is not None and dkv_fb is None:
        main_dkv, fb_dkv = cfg.main_dkv, cfg.fallback_dkv

        def dkv_fn(q, k, v, lse, delta, do, tm, tf, cu):
            rows = _block_rows(batch, seq_len, block_size, cu)
            dkv_m = functools.partial(_backward_dkv, q, k, v, lse, delta, do, tm, rows, main, block_size, scale,
                                      main_dkv, red)
            dkv_f = functools.partial(_backward_dkv, q, k, v, lse, delta, do, tf, rows, fb, block_size, scale,
                                      fb_dkv, red)
            use_fb = _dkv_cost(tf[1], fb, tile) < _dkv_cost(tm[1], main, tile)
            return lax.cond(use_fb, dkv_f, dkv_m)

        dk, dv = run("dkv_index_reduce[cond]", dkv_fn, query, key, value, lse, delta, do, tiles_m, tiles_f,
                     cu_seqlens)
        return dq, dk, dv
    else:
        use_f = fb is not None and bool(dkv_fb)
        plan, tiles = (fb, tiles_f) if use_f else (main, tiles_m)
        kcfg = cfg.fallback_dkv if use_f else dkv_cfg
        tag = "[fallback]" if (use_f or forced_fb) else "[main]"
        seg = _segment_length(batch * seq_len * heads * num_sel, block_size, dk, dv, kcfg)

        def meta_dkv(union, cu):
            rows = _block_rows(batch, seq_len, block_size, cu)
            return _dkv_tiles_meta(union, rows[0], plan, num_sel, batch, seq_len, block_size, dk, dv, kcfg)[0], rows

        index, rows = run("meta_dkv" + tag, meta_dkv, tiles[0], cu_seqlens)
        parts = run("dkv" + tag, lambda q, k, v, lse, delta, do, mult, index, rows: _dkv_tiles_kernel(
            q, k, v, lse, delta, do, mult, index, rows, plan, block_size, scale, seg, kcfg),
            query, key, value, lse, delta, do, tiles[2], index, rows)
    dk, dv = run("reduce", lambda k, v, parts, index, rows: _reduce(k, v, parts, index, rows, block_size, red),
                 key, value, parts, index, rows)
    return dq, dk, dv


def _fwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    def launch(q, k, v, bi, bc, cu):
        return _fwd_run(_now, q, k, v, bi, bc, cu, block_size, scale, cfg)

    # outputs o, lse and the forward's tiling choice (one per call)
    return vmappable(launch, "bbbbbv", "bbs")(query, key, value, block_indices, block_counts, cu_seqlens)


def _bwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, o, lse, fwd_fb, do, block_size, scale, cfg):
    def launch(q, k, v, bi, bc, cu, o, lse, fwd_fb, do):
        return _bwd_run(_now, q, k, v, bi, bc, cu, o, lse, fwd_fb, do, block_size, scale, cfg)

    return vmappable(launch, "bbbbbvbbsb", "bbb")(query, key, value, block_indices, block_counts, cu_seqlens, o,
                                                  lse, fwd_fb, do)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _selected(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    o, _, _ = _fwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, cfg)
    return o


def _selected_fwd(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    o, lse, use_fb = _fwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, cfg)
    return o, (query, key, value, block_indices, block_counts, cu_seqlens, o, lse, use_fb)


def _selected_bwd(block_size, scale, cfg, res, do):
    query, key, value, block_indices, block_counts, cu_seqlens, o, lse, use_fb = res
    dq, dk, dv = _bwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, o, lse, use_fb, do,
                           block_size, scale, cfg)
    return dq, dk, dv, None, None, None


_selected.defvjp(_selected_fwd, _selected_bwd)


def _normalize(query, key, value, block_indices, block_counts, block_size, cu_seqlens, config):
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    if config is None:
        config = SelectionConfig.default(dk, dv, group, block_size, query.dtype)
    if block_indices.dtype != jnp.int32:
        block_indices = block_indices.astype(jnp.int32)
    if block_counts is not None:
        block_counts = block_counts.astype(jnp.int32)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.astype(jnp.int32)
    return block_indices, block_counts, cu_seqlens, config


def selected_attention(query, key, value, block_indices, block_counts, block_size: int, softmax_scale: float,
                       cu_seqlens=None, config: SelectionConfig | None = None, return_lse: bool = False):
    """Selected attention with an explicit configuration (tests, benchmarks).

    query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv], block_indices [B, T, H, S]
    int, block_counts None (all S) or int [B, T, H] in [0, S], cu_seqlens None or int32 [N+1].
    Returns o_slc [B, T, HQ, Dv] in query's dtype (and lse [B, T, HQ] float32, not
    differentiable, with return_lse).
    """
    block_indices, block_counts, cu_seqlens, config = _normalize(
        query, key, value, block_indices, block_counts, block_size, cu_seqlens, config)
    scale = float(softmax_scale)
    if return_lse:
        o, lse, _ = _fwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, config)
        return o, lse
    return _selected(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, config)


def forward_stages(run, query, key, value, block_indices, block_counts, block_size: int, softmax_scale: float,
                   cu_seqlens=None, config: SelectionConfig | None = None):
    """The forward, stage by stage, for benchmarks: `run(name, fn, *arrays)` must return
    `fn(*arrays)` (jitting and timing it as it likes). Returns (o, lse, fwd_choice), the
    residuals `backward_stages` takes."""
    block_indices, block_counts, cu_seqlens, config = _normalize(
        query, key, value, block_indices, block_counts, block_size, cu_seqlens, config)
    return _fwd_run(run, query, key, value, block_indices, block_counts, cu_seqlens, block_size,
                    float(softmax_scale), config)


def backward_stages(run, query, key, value, block_indices, block_counts, block_size: int, softmax_scale: float,
                    o, lse, fwd_choice, do, cu_seqlens=None, config: SelectionConfig | None = None):
    """The backward, stage by stage, for benchmarks (see `forward_stages`); returns (dq, dk, dv).

    The "tiles" layout's per-call dk/dv tiling choice is made here on the host (concrete
    inputs only) so that its index, kernel and reduce can be timed apart.
    """
    block_indices, block_counts, cu_seqlens, config = _normalize(
        query, key, value, block_indices, block_counts, block_size, cu_seqlens, config)
    dkv_fb = None
    if _dkv_layout(config.tile) == "tiles":
        choice = tiling_choices(block_indices, block_counts, block_size, cu_seqlens,
                                query.shape[2] // key.shape[2], config.tile)[1]
        dkv_fb = None if choice is None else bool(choice)
    return _bwd_run(run, query, key, value, block_indices, block_counts, cu_seqlens, o, lse, fwd_choice, do,
                    block_size, float(softmax_scale), config, dkv_fb)


@kernel_registry.register("apply_native_sparse_attention", Platform.TRITON, Backend.GPU)
def apply_native_sparse_attention(query, key, value, block_indices, block_counts, block_size, softmax_scale, cu_seqlens):
    """o_slc [B, T, HQ, Dv] in query's dtype; block_counts None (all S) or int32 [B, T, H] in [0, S]."""
    return selected_attention(query, key, value, block_indices, block_counts, block_size, softmax_scale, cu_seqlens)
