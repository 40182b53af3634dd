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
main tiling never loads more than a smaller one: it is used whatever the pattern. dk/dv is
the other way round: it streams the *query* rows of every tile that selected a block past
resident K/V, and big tiles stream the rows of tokens that did not select it. So the
backward computes a second, small-tile tiling (rows_fallback rows: one token for G >= 16)
and picks per call, with `lax.cond` on the actual union sizes, the one that streams less
(`TileConfig`, `_dkv_cost`). All tilings run the same kernels.

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
delta = rowsum(o * do) in XLA. dq mirrors the forward (tile x union loop, p recomputed from
the saved lse). dk/dv are KEY-major, with no atomics: the (tile, union slot) pairs of each
KV head are stable-sorted by block start, so each block of keys has the list of tiles that
selected it, in tile order. A program owns one block's dk/dv [l, D] and walks its list. A
block everybody selects (block 0) has a list of T/BT tiles, so lists are cut into segments
of at most `seg` tiles; segments of a multi-segment list write float32 partials, which the
reduce kernel sums in segment order (bitwise reproducible). Every dk/dv row is written once
by the reduce kernel (which copies single-segment rows). `seg` is chosen statically so that
the partials fit in `DkvConfig.partial_bytes` for ANY selection: the number of partial slots
is < 2 * pairs / seg and pairs <= B * T * H * S. Segment programs run longest list first.

Extra memory at T = 64K, HQ = 64, H = 4, S = 16, l = 64 (bf16, D = 128), all linear in T:
forward: union + mult of the main tiles (BT = 4) 32 MB. Backward: both tilings' union +
mult 52 MB, the inverse index (sorted keys + pairs) 32 MB, partials <= 128 MiB
(`DkvConfig.partial_bytes`), direct dk/dv 128 MB, delta 16 MB: ~0.35 GB, against ~4.3 GB
for q, k, v, o, do, dq, dk, dv themselves.
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
    dkv_step_rows: fixed cost of one dk/dv loop step, in streamed query rows.
    variant: "auto" (cost model), "main" or "fallback" (forced, for tests and benchmarks).
    """

    rows_main: int = 64
    rows_fallback: int = 16
    knee_rows: int = 128
    dkv_step_rows: int = 32
    variant: str = "auto"

    @staticmethod
    def default(dk: int = 128, dv: int = 128, dtype=jnp.bfloat16) -> "TileConfig":
        # float32 dots run as three TF32 passes (tf32x3), which triples the registers and
        # shared memory of the operands: with head dims > 128 only 16-row tiles fit.
        if _is_f32(dtype) and max(dk, dv) > 128:
            return TileConfig(rows_main=16)
        return TileConfig()


def _is_f32(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32


# Kernel configurations below were checked with tools/hopper_compile.py-style compiles for
# sm_90 (Triton 3.6): shared memory under 227 KiB everywhere, no register spills for 16-bit
# inputs (wgmma in every dot with 64 rows on the M side), small spills only for float32 with
# head dims > 128. See the report in benchmarks/bench_kernels.py --hopper.


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
            return DqConfig(min(block_size, 32), 8, 2)
        return DqConfig(min(block_size, 64), 8 if rows >= 64 else 4, 2)


@dataclasses.dataclass(frozen=True)
class DkvConfig:
    """dk/dv kernel: keys per program (<= l), warps, stages; list splitting.

    min_segment: the shortest segment (tiles) a list is cut into.
    partial_bytes: memory the float32 partials may take; the segment length grows with the
      problem so that they always fit.
    """

    block_keys: int
    num_warps: int
    num_stages: int
    min_segment: int = 64
    partial_bytes: int = 128 << 20

    @staticmethod
    def default(dk: int, dv: int, rows: int, block_size: int, dtype) -> "DkvConfig":
        big = max(dk, dv) > 128
        if _is_f32(dtype):
            return DkvConfig(min(block_size, 16), 8, 1) if big else DkvConfig(min(block_size, 32), 8, 1)
        if big:
            return DkvConfig(min(block_size, 32), 8, 2)
        return DkvConfig(min(block_size, 64), 8, 2)


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    """Reduction of the dk/dv partials: keys per program, warps."""

    block_keys: int
    num_warps: int

    @staticmethod
    def default(dk: int, dv: int, block_size: int) -> "ReduceConfig":
        return ReduceConfig(min(block_size, 32 if max(dk, dv) <= 128 else 16), 4)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Every tunable of selected attention; `default` is tuned for Hopper.

    `main_*` configure the kernels of the main tiling, `fallback_*` those of the small one.
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
    def default(dk: int, dv: int, group: int, block_size: int, dtype, tile: TileConfig | None = None) -> "SelectionConfig":
        tile = tile or TileConfig.default(dk, dv, dtype)
        m = _Plan.make(group, tile.rows_main).rows
        f = _Plan.make(group, tile.rows_fallback).rows
        return SelectionConfig(
            tile,
            FwdConfig.default(dk, dv, m, block_size, dtype),
            DqConfig.default(dk, dv, m, block_size, dtype),
            DkvConfig.default(dk, dv, m, block_size, dtype),
            FwdConfig.default(dk, dv, f, block_size, dtype),
            DqConfig.default(dk, dv, f, block_size, dtype),
            DkvConfig.default(dk, dv, f, block_size, dtype),
            ReduceConfig.default(dk, dv, block_size),
        )


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
    q, k, v, do, lse, delta, union, count, mult,  # inputs
    T, NTT, qk_scale, scale,  # scalars
    dq,  # output
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    GB: tl.constexpr, NG: tl.constexpr, BT: tl.constexpr, M: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq [B*T, HQ, K] of one tile: the forward's loop with p recomputed from lse."""
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
    # [M]; an empty row (lse = -inf) gets +inf so that every p of it is exp2(-inf) = 0
    b_lse = tl.load(lse + row0 + o_row, mask=m_r, other=float("inf")).to(tl.float32)
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
    b_delta = tl.load(delta + row0 + o_row, mask=m_r, other=0.0).to(tl.float32)

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


def _backward_dq(query, key, value, lse, delta, do, tiles, plan: _Plan, block_size: int, scale: float, cfg: DqConfig):
    union, count, mult = tiles
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    ntt = cdiv(seq_len, plan.bt)
    return triton_call(
        query, key, value, do, lse, delta, union, count, mult,
        seq_len, ntt, np.float32(scale * LOG2E), np.float32(scale),
        kernel=_slc_dq_kernel,
        out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),
        grid=(batch * ntt, heads * plan.ng),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="slc_dq",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=union.shape[2],
        BS=block_size, BC=min(cfg.block_keys, block_size), BK=_next_pow2(max(16, dk)), BV=_next_pow2(max(16, dv)),
        PREC=_dot_precision(query.dtype),
    )


def _backward_dkv(query, key, value, lse, delta, do, tiles, rows, plan: _Plan, block_size: int, scale: float,
                  cfg: DkvConfig, red_cfg: ReduceConfig):
    union, _, mult = tiles
    row_start, row_len = rows
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    w = union.shape[2]
    num_sel = w // plan.bt
    ntt = cdiv(seq_len, plan.bt)
    nt = batch * ntt
    bk, bv = _next_pow2(max(16, dk)), _next_pow2(max(16, dv))
    pairs_bound = batch * seq_len * heads * num_sel
    seg = _segment_length(pairs_bound, block_size, dk, dv, cfg)
    pairs, desc, part_off, part_num = _inverse_index(union, row_start, seg, pairs_bound)
    br = row_start.shape[0]
    nparts = cdiv(2 * pairs_bound, seg) + 1
    bc = min(cfg.block_keys, block_size)
    dk_direct, dv_direct, part_k, part_v = triton_call(
        query, key, value, do, lse, delta, pairs, mult, desc, row_start, row_len,
        seq_len, ntt, nt, br, nt * w, np.float32(scale * LOG2E), np.float32(scale),
        kernel=_slc_dkv_kernel,
        out_shape=(jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype),
                   jax.ShapeDtypeStruct((nparts, block_size, dk), jnp.float32),
                   jax.ShapeDtypeStruct((nparts, block_size, dv), jnp.float32)),
        grid=(desc.shape[0], cdiv(block_size, bc)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="slc_dkv",
        H=heads, HQ=hq, G=group, K=dk, V=dv, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=w,
        BS=block_size, BC=bc, BK=bk, BV=bv, PREC=_dot_precision(query.dtype),
    )
    rbc = min(red_cfg.block_keys, block_size)
    return triton_call(
        dk_direct, dv_direct, part_k, part_v, row_start, row_len, part_off, part_num,
        br,
        kernel=_slc_reduce_kernel,
        out_shape=(jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype)),
        grid=(heads * br, cdiv(block_size, rbc)),
        num_warps=red_cfg.num_warps, name="slc_reduce",
        H=heads, K=dk, V=dv, BS=block_size, BC=rbc, BK=bk, BV=bv,
    )


# --------------------------------------------------------------------------------------
# Choosing the tiling
#
# Forward and dq stream K/V blocks past resident query rows: one loop step costs about one
# block load while the rows stay under the knee (the step is load bound), and a tile's
# union is never longer than the sum of its sub-tiles' unions. So the main tiling never
# loads more than the fallback, and the fallback can only win there when steps are compute
# bound (knee_rows < rows of the main tiling); otherwise it is not even considered.
# dk/dv streams query rows past a resident K/V block: a step costs a fixed overhead plus
# its rows, and a large tile streams the rows of tokens that did not select the block.
# With shared selections the main tiling needs few, full steps; with random ones the
# fallback streams ~BT times fewer rows. That choice is made per call, with lax.cond.
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


def _fwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, cfg):
    group = query.shape[2] // key.shape[2]
    main, fb = _plans(group, cfg.tile)
    forced_fb = cfg.tile.variant == "fallback"
    starts = _block_starts(block_indices, block_counts, block_size, cu_seqlens)
    tiles_m = _tile_union(starts, main.bt)
    fwd_m = functools.partial(_forward, query, key, value, tiles_m, main, block_size, scale,
                              _kernel_cfgs(cfg, forced_fb)[0])
    if not _fwd_may_fall_back(main, fb, cfg.tile):
        o, lse = fwd_m()
        return o, lse, None
    tiles_f = _tile_union(starts, fb.bt)
    use_fb = _fwd_cost(tiles_f[1], fb, cfg.tile) < _fwd_cost(tiles_m[1], main, cfg.tile)
    fwd_f = functools.partial(_forward, query, key, value, tiles_f, fb, block_size, scale, cfg.fallback_fwd)
    o, lse = lax.cond(use_fb, fwd_f, fwd_m)
    return o, lse, use_fb


def _bwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, o, lse, fwd_fb, do, block_size, scale, cfg):
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    main, fb = _plans(group, cfg.tile)
    forced_fb = cfg.tile.variant == "fallback"
    do = do.astype(query.dtype)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, T, HQ]
    starts = _block_starts(block_indices, block_counts, block_size, cu_seqlens)
    rows = _block_rows(batch, seq_len, block_size, cu_seqlens)
    tiles_m = _tile_union(starts, main.bt)
    _, dq_m, dkv_m = _kernel_cfgs(cfg, forced_fb)
    dq_main = functools.partial(_backward_dq, query, key, value, lse, delta, do, tiles_m, main, block_size, scale, dq_m)
    dkv_main = functools.partial(_backward_dkv, query, key, value, lse, delta, do, tiles_m, rows, main, block_size,
                                 scale, dkv_m, cfg.reduce)
    if fb is None:
        return (dq_main(), *dkv_main())
    tiles_f = _tile_union(starts, fb.bt)
    dq_fb = functools.partial(_backward_dq, query, key, value, lse, delta, do, tiles_f, fb, block_size, scale,
                              cfg.fallback_dq)
    dkv_fb = functools.partial(_backward_dkv, query, key, value, lse, delta, do, tiles_f, rows, fb, block_size,
                               scale, cfg.fallback_dkv, cfg.reduce)
    # dq follows the forward's tiling (same cost model); dk/dv makes its own choice.
    dq = dq_main() if fwd_fb is None else lax.cond(fwd_fb, dq_fb, dq_main)
    use_fb = _dkv_cost(tiles_f[1], fb, cfg.tile) < _dkv_cost(tiles_m[1], main, cfg.tile)
    dk, dv = lax.cond(use_fb, dkv_fb, dkv_main)
    return dq, dk, dv


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


def selected_attention(query, key, value, block_indices, block_counts, block_size: int, softmax_scale: float,
                       cu_seqlens=None, config: SelectionConfig | None = None, return_lse: bool = False):
    """Selected attention with an explicit configuration (tests, benchmarks).

    query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv], block_indices [B, T, H, S]
    int, block_counts None (all S) or int [B, T, H] in [0, S], cu_seqlens None or int32 [N+1].
    Returns o_slc [B, T, HQ, Dv] in query's dtype (and lse [B, T, HQ] float32, not
    differentiable, with return_lse).
    """
    batch, seq_len, hq, heads, group, dk, dv = _dims(query, key, value)
    if config is None:
        config = SelectionConfig.default(dk, dv, group, block_size, query.dtype)
    if block_indices.dtype != jnp.int32:
        block_indices = block_indices.astype(jnp.int32)
    if block_counts is not None:
        block_counts = block_counts.astype(jnp.int32)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.astype(jnp.int32)
    scale = float(softmax_scale)
    if return_lse:
        o, lse, _ = _fwd_impl(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, config)
        return o, lse
    return _selected(query, key, value, block_indices, block_counts, cu_seqlens, block_size, scale, config)


@kernel_registry.register("apply_native_sparse_attention", Platform.TRITON, Backend.GPU)
def apply_native_sparse_attention(query, key, value, block_indices, block_counts, block_size, softmax_scale, cu_seqlens):
    """o_slc [B, T, HQ, Dv] in query's dtype; block_counts None (all S) or int32 [B, T, H] in [0, S]."""
    return selected_attention(query, key, value, block_indices, block_counts, block_size, softmax_scale, cu_seqlens)
