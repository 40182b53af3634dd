"""Band attention: the Triton kernels of both FlashAttention-style branches of NSA.

Query token t attends the keys of ONE contiguous interval [klo[t], khi[t]) of its KV head,
and both ends never decrease with t:

- sliding window (ejnsa.triton.window): klo[t] = max(bos_t, t - w + 1), khi[t] = t + 1
  (keys are tokens);
- compressed attention (ejnsa.triton.compression): klo[t] = boc_t,
  khi[t] = boc_t + (pos_t + 1) // l (keys are packed compressed rows).

The backward's key-major kernel needs the same relation seen from the key side: key j is
attended by the query tokens of the interval [qf[j], ql[j]] (also nondecreasing in j).
The op files compute all four int32 arrays in XLA (from ejnsa._varlen, so packed
sequences are just other intervals), and `clip_intervals` forces them into range, so the
kernels never read out of bounds, whatever `cu_seqlens` holds. This file holds the
kernels, their launchers, the intervals type, the tile configurations and the
custom_vjp wiring (`band_attention`) that both op files register.

Rows = tokens x heads
---------------------
A program's query tile holds BM consecutive ROWS r = t * G + g of one KV head h: the G
query heads that share K/V, for BM / G consecutive tokens (any G >= 1; a tile need not
start at a token boundary). Compared with BM tokens of one head this keeps the key band
of a tile short (BM / G + w - 1 keys instead of BM + w - 1), so fewer masked entries are
computed, and in the backward one program accumulates dK/dV of its keys over all G heads
in registers: no atomics, no [.., HQ, ..] partial gradients to reduce.

Three loop phases
-----------------
Because both interval ends are monotone, the keys every row of a tile sees are
[klo[t_last], khi[t_first]). A tile walks the keys [klo[t_first], khi[t_last]) in steps
of BN: masked steps up to the start of the shared range, then unmasked steps while a
whole step fits in it, then masked steps to the end. Only the (at most a few) boundary
steps pay for the mask; for w = 512 and G = 16 a BM = 128 tile takes 9 steps of 64 keys
of which 2 are masked. The dK/dV kernel walks its query rows the same way.

Backward
--------
delta = rowsum(dO * O) in XLA; `band_bwd_dq_kernel` per query tile (the forward's loop,
recomputing P from the saved log-sum-exp); `band_bwd_dkv_kernel` per (key tile, KV head)
over the query rows that see the tile, accumulating in float32 registers. The dK/dV
kernel can split the query axis into NS parts written as float32 partials [NS, ...] and
summed in a fixed order in XLA (compressed attention needs this: its first keys are seen
by every query); the window needs no split. Every reduction has a fixed order, so reruns
are bitwise identical.

Numerics: scores are scaled into log2 units (scale * log2(e)) so that exp2 does the
softmax; P is cast to the input dtype for the P @ V and dS @ K products (tensor cores),
accumulation is float32, float32 inputs use `dot_precision` (tf32x3).

lse is an output and differentiable: with cotangent dlse, dS = P * (dP - (delta - dlse))
(d lse / d s = P), so the backward only shifts delta.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from ._call import triton_call
from .._varlen import segment_tiles
from ._common import (bad_counts, bad_keys, dot_precision, finite_part, head_tile, log2_scale, mark_rows_nan,
                      per_query_head)
from ._shard import launcher

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- configs


def _is_wide(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 4


@dataclasses.dataclass(frozen=True)
class _QueryTiles:
    """BM query rows (tokens x heads) resident per program, BN keys per loop step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BandFwdConfig(_QueryTiles):
    """Tiles of `band_fwd_kernel`."""

    @classmethod
    def default(cls, dk: int, dv: int, dtype) -> BandFwdConfig:
        """Hopper tiles. 128 rows = two warpgroups of wgmma; wide heads halve BM
        so that Q, the accumulator and the pipelined K/V stages fit registers and 227 KiB."""
        d = max(head_tile(dk), head_tile(dv))
        wide = _is_wide(dtype)
        if d <= 64:
            return cls(block_m=128, block_n=64, num_warps=4, num_stages=3)
        if d <= 128 and not wide:
            return cls(block_m=128, block_n=64, num_warps=8, num_stages=3)
        if d <= 128:
            return cls(block_m=128, block_n=32, num_warps=8, num_stages=2)
        # float32 operands of tf32x3 dots take twice the shared memory: narrow key steps.
        if wide:
            return cls(block_m=64, block_n=16, num_warps=4, num_stages=2)
        return cls(block_m=64, block_n=64, num_warps=4, num_stages=2)


def _backward_tiles(dk: int, dv: int, dtype) -> tuple[int, int, int, int]:
    """(resident tile, streamed step, warps, stages) of both backward kernels on Hopper:
    dq keeps query rows resident and streams keys, dK/dV the other way round."""
    d = max(head_tile(dk), head_tile(dv))
    wide = _is_wide(dtype)
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128 and not wide:
        return 128, 64, 8, 2
    if d <= 128:
        return 64, 32, 4, 2
    # float32 wider than 128: 32-row tiles (mma.sync) keep tf32x3 operands in 227 KiB.
    return (32, 32, 4, 2) if wide else (64, 32, 4, 2)


@dataclasses.dataclass(frozen=True)
class BandDqConfig(_QueryTiles):
    """Tiles of `band_bwd_dq_kernel` (the forward's loop; carries dO and dQ too)."""

    @classmethod
    def default(cls, dk: int, dv: int, dtype) -> BandDqConfig:
        rows, keys, warps, stages = _backward_tiles(dk, dv, dtype)
        return cls(block_m=rows, block_n=keys, num_warps=warps, num_stages=stages)


@dataclasses.dataclass(frozen=True)
class BandDkvConfig:
    """Tiles of `band_bwd_dkv_kernel`: BN keys per program, BM query rows per step.

    `split_tokens` > 0 cuts the query axis into parts of that many tokens, each program
    writing float32 partials of its part (summed in XLA); 0 means one part, written in
    the input dtype.
    """

    block_n: int
    block_m: int
    num_warps: int
    num_stages: int
    split_tokens: int = 0

    @classmethod
    def default(cls, dk: int, dv: int, dtype, split_tokens: int = 0) -> BandDkvConfig:
        keys, rows, warps, stages = _backward_tiles(dk, dv, dtype)
        return cls(block_n=keys, block_m=rows, num_warps=warps, num_stages=stages, split_tokens=split_tokens)


class BandConfigs(NamedTuple):
    """The tiles of one band operation's three kernels."""

    fwd: BandFwdConfig
    dq: BandDqConfig
    dkv: BandDkvConfig

    @staticmethod
    def default(dk: int, dv: int, dtype, split_tokens: int = 0) -> BandConfigs:
        """Hopper tiles for head dims dk, dv and input dtype; dK/dV split as given."""
        return BandConfigs(
            fwd=BandFwdConfig.default(dk, dv, dtype),
            dq=BandDqConfig.default(dk, dv, dtype),
            dkv=BandDkvConfig.default(dk, dv, dtype, split_tokens),
        )


# ----------------------------------------------------------------------------- kernels
#
# Shape constants (constexpr): HQ query heads, H KV heads, G = HQ / H, K / V head dims,
# BK / BV their padded tiles (powers of two >= 16), BM rows per query tile, BN keys per
# key tile. Runtime ints: T query tokens, TK key rows (T for the window, the packed
# compressed rows for compression), QS query tokens per split.


@triton.jit
def _load_2d(p, m_a, m_b, MASK_A: tl.constexpr, MASK_B: tl.constexpr):
    """Loads tile `p` masking axis 0 by `m_a` [N, 1] and axis 1 by `m_b` [1, M] when asked."""
    if MASK_A and MASK_B:
        return tl.load(p, mask=m_a & m_b, other=0.0)
    elif MASK_A:
        return tl.load(p, mask=m_a, other=0.0)
    elif MASK_B:
        return tl.load(p, mask=m_b, other=0.0)
    else:
        return tl.load(p)


@triton.jit
def _fwd_step(
    b_q, b_acc, b_m, b_l, b_klo, b_khi,  # [BM, BK], [BM, BV], [BM], [BM], [BM], [BM]
    k, v, i_bk, i_h, i_j, j_hi, scale_log2,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MASKED: tl.constexpr, PREC: tl.constexpr,
):
    """One online-softmax step over the keys [i_j, i_j + BN) (masked: clipped to j_hi and
    to each row's interval)."""
    o_j = i_j + tl.arange(0, BN)  # [BN]
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_kv = (i_bk + o_j) * H + i_h  # [BN] int64 row of k / v
    m_j = o_j < j_hi
    # [BK, BN]
    b_kt = _load_2d(k + o_kv[None, :] * K + o_k[:, None], (o_k < K)[:, None], m_j[None, :], BK != K, MASKED)
    # [BM, BN], log2 units
    b_s = tl.dot(b_q, b_kt, input_precision=PREC) * scale_log2
    if MASKED:
        m_s = (o_j[None, :] >= b_klo[:, None]) & (o_j[None, :] < b_khi[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        # A row with nothing visible yet keeps max -inf; shift by 0 so exp2 gives 0, not NaN.
        b_sh = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    else:
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_sh = b_mn
    b_alpha = tl.exp2(b_m - b_sh)  # [BM]
    b_p = tl.exp2(b_s - b_sh[:, None])  # [BM, BN]
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    # [BN, BV]
    b_v = _load_2d(v + o_kv[:, None] * V + o_v[None, :], m_j[:, None], (o_v < V)[None, :], MASKED, BV != V)
    b_acc = b_acc * b_alpha[:, None]
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=PREC)
    return b_acc, b_mn, b_l


@triton.jit
def _phases(lo, hi, f_lo, f_hi, BS: tl.constexpr):
    """Splits [lo, hi) into masked steps from lo, unmasked steps inside [f_lo, f_hi) (the
    range every row sees), masked steps to hi: returns (n1, s2, n2, s3, n3)."""
    n_all = tl.cdiv(tl.maximum(hi - lo, 0), BS)
    n1 = tl.where(f_lo < f_hi, tl.cdiv(tl.maximum(f_lo - lo, 0), BS), n_all)
    s2 = lo + n1 * BS
    n2 = tl.maximum(f_hi - s2, 0) // BS
    s3 = s2 + n2 * BS
    n3 = tl.cdiv(tl.maximum(hi - s3, 0), BS)
    return n1, s2, n2, s3, n3


@triton.jit
def _query_tile(klo, khi, T, HQ: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """This program's query tile (grid (cdiv(T * G, BM), H, B)): its KV head and batch row,
    per row [BM] (rows t * G + g) the mask, int64 (b, t, hq) row and key interval (empty past
    T); the tile's key range [lo, hi) and its phases."""
    # Later tiles see more keys under compression's causal band: start them first.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_r = i_m * BM + tl.arange(0, BM)
    m_r = o_r < T * G
    o_t = o_r // G
    o_row = (i_b * T + o_t) * HQ + i_h * G + o_r % G
    t_a = (i_m * BM) // G
    t_b = tl.minimum((i_m * BM + BM - 1) // G, T - 1)
    b_klo = tl.load(klo + o_t, mask=m_r, other=0)
    b_khi = tl.load(khi + o_t, mask=m_r, other=0)
    lo = tl.load(klo + t_a)
    hi = tl.load(khi + t_b)
    n1, s2, n2, s3, n3 = _phases(lo, hi, tl.load(klo + t_b), tl.load(khi + t_a), BN)
    return i_h, i_b, m_r, o_row, b_klo, b_khi, lo, hi, n1, s2, n2, s3, n3


@triton.jit
def band_fwd_kernel(
    q, k, v, klo, khi, scale_log2, T, TK,
    o, lse,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """q [B, T, HQ, K], k [B, TK, H, K], v [B, TK, H, V] (finite parts), klo / khi int32 [T]
    -> o [B, T, HQ, V] (q's dtype), lse float32 [B, T, HQ] in log2 units (-inf: no key).
    Grid (cdiv(T * G, BM), H, B)."""
    i_h, i_b, m_r, o_row, b_klo, b_khi, lo, hi, n1, s2, n2, s3, n3 = _query_tile(klo, khi, T, HQ, G, BM, BN)

    i_bk = i_b * TK
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    # [BM, BK]
    b_q = _load_2d(q + o_row[:, None] * K + o_k[None, :], m_r[:, None], (o_k < K)[None, :], True, BK != K)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    for i in range(n1):
        b_acc, b_m, b_l = _fwd_step(b_q, b_acc, b_m, b_l, b_klo, b_khi, k, v, i_bk, i_h, lo + i * BN, hi,
                                    scale_log2, H, K, V, BN, BK, BV, True, PREC)
    for i in range(n2):
        b_acc, b_m, b_l = _fwd_step(b_q, b_acc, b_m, b_l, b_klo, b_khi, k, v, i_bk, i_h, s2 + i * BN, hi,
                                    scale_log2, H, K, V, BN, BK, BV, False, PREC)
    for i in range(n3):
        b_acc, b_m, b_l = _fwd_step(b_q, b_acc, b_m, b_l, b_klo, b_khi, k, v, i_bk, i_h, s3 + i * BN, hi,
                                    scale_log2, H, K, V, BN, BK, BV, True, PREC)

    # Keys and values are finite parts, so a row that sees no key keeps l = 0 (o = 0, lse =
    # -inf) whatever the values hold, and a NaN query makes l NaN (o and lse NaN). The rows
    # that see a non-finite key or value are marked NaN after the kernel (`mark_rows_nan`):
    # any work here, even a flag load in this epilogue, costs the forward ~4% at 64K.
    has = b_l != 0
    b_o = b_acc / tl.where(has, b_l, 1.0)[:, None]
    b_lse = tl.where(has, b_m + tl.log2(tl.where(has, b_l, 1.0)), float("-inf"))
    m_o = m_r[:, None] & (o_v < V)[None, :]
    tl.store(o + o_row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_o)
    tl.store(lse + o_row, b_lse, mask=m_r)


@triton.jit
def _load_row_stats(lse, delta, o_row, m_r):
    """log2-unit lse and delta of rows [BM]; an empty row (lse -inf) gets +inf so that
    exp2(s - lse) = 0 for it."""
    b_lse = tl.load(lse + o_row, mask=m_r, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)
    return b_lse, b_delta


@triton.jit
def _dq_step(
    b_q, b_do, b_dq, b_lse, b_delta, b_klo, b_khi,  # [BM, BK], [BM, BV], [BM, BK], [BM] x 4
    k, v, i_bk, i_h, i_j, j_hi, scale_log2,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MASKED: tl.constexpr, PREC: tl.constexpr,
):
    o_j = i_j + tl.arange(0, BN)  # [BN]
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_kv = (i_bk + o_j) * H + i_h
    m_j = o_j < j_hi
    b_k = _load_2d(k + o_kv[:, None] * K + o_k[None, :], m_j[:, None], (o_k < K)[None, :], MASKED, BK != K)  # [BN, BK]
    b_v = _load_2d(v + o_kv[:, None] * V + o_v[None, :], m_j[:, None], (o_v < V)[None, :], MASKED, BV != V)  # [BN, BV]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2  # [BM, BN]
    b_p = tl.exp2(b_s - b_lse[:, None])
    if MASKED:
        m_s = (o_j[None, :] >= b_klo[:, None]) & (o_j[None, :] < b_khi[:, None])
        b_p = tl.where(m_s, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=PREC)
    return b_dq


@triton.jit
def band_bwd_dq_kernel(
    q, k, v, do, lse, delta, klo, khi, scale_log2, scale, T, TK,
    dq,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """do [B, T, HQ, V], lse / delta float32 [B, T, HQ] (delta = rowsum(dO * O) - dlse)
    -> dq [B, T, HQ, K] (q's dtype). Grid (cdiv(T * G, BM), H, B)."""
    i_h, i_b, m_r, o_row, b_klo, b_khi, lo, hi, n1, s2, n2, s3, n3 = _query_tile(klo, khi, T, HQ, G, BM, BN)

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    b_q = _load_2d(q + o_row[:, None] * K + o_k[None, :], m_r[:, None], (o_k < K)[None, :], True, BK != K)  # [BM, BK]
    b_do = _load_2d(do + o_row[:, None] * V + o_v[None, :], m_r[:, None], (o_v < V)[None, :], True, BV != V)  # [BM, BV]
    b_lse, b_delta = _load_row_stats(lse, delta, o_row, m_r)
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)
    i_bk = i_b * TK
    for i in range(n1):
        b_dq = _dq_step(b_q, b_do, b_dq, b_lse, b_delta, b_klo, b_khi, k, v, i_bk, i_h, lo + i * BN, hi,
                        scale_log2, H, K, V, BN, BK, BV, True, PREC)
    for i in range(n2):
        b_dq = _dq_step(b_q, b_do, b_dq, b_lse, b_delta, b_klo, b_khi, k, v, i_bk, i_h, s2 + i * BN, hi,
                        scale_log2, H, K, V, BN, BK, BV, False, PREC)
    for i in range(n3):
        b_dq = _dq_step(b_q, b_do, b_dq, b_lse, b_delta, b_klo, b_khi, k, v, i_bk, i_h, s3 + i * BN, hi,
                        scale_log2, H, K, V, BN, BK, BV, True, PREC)
    b_dq = b_dq * scale
    tl.store(dq + o_row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_r[:, None] & (o_k < K)[None, :])


@triton.jit
def _dkv_step(
    b_k, b_v, b_dk, b_dv, b_qf, b_ql,  # [BN, BK], [BN, BV], [BN, BK], [BN, BV], [BN], [BN]
    q, do, lse, delta, i_b, i_h, i_r, r_hi, T, scale_log2,
    HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MASKED: tl.constexpr, PREC: tl.constexpr,
):
    """Adds the query rows [i_r, i_r + BM) (masked: clipped to r_hi and to each key's
    query interval) to dK, dV of the program's keys."""
    o_r = i_r + tl.arange(0, BM)  # [BM]
    m_r = o_r < r_hi
    o_t = o_r // G
    o_row = (i_b * T + o_t) * HQ + i_h * G + o_r % G
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    b_q = _load_2d(q + o_row[:, None] * K + o_k[None, :], m_r[:, None], (o_k < K)[None, :], MASKED, BK != K)  # [BM, BK]
    b_do = _load_2d(do + o_row[:, None] * V + o_v[None, :], m_r[:, None], (o_v < V)[None, :], MASKED, BV != V)  # [BM, BV]
    if MASKED:
        b_lse, b_delta = _load_row_stats(lse, delta, o_row, m_r)
    else:
        # Rows of an unmasked step see every key of the tile: never empty, lse finite.
        b_lse = tl.load(lse + o_row)
        b_delta = tl.load(delta + o_row)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale_log2  # [BN, BM]
    b_pt = tl.exp2(b_st - b_lse[None, :])
    if MASKED:
        m_s = (o_t[None, :] >= b_qf[:, None]) & (o_t[None, :] <= b_ql[:, None]) & m_r[None, :]
        b_pt = tl.where(m_s, b_pt, 0.0)
    b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PREC)  # [BN, BV]
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)  # [BN, BM]
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    if MASKED:
        # A masked dS is 0 even where the row's delta is NaN (a select, not a product).
        b_dst = tl.where(m_s, b_dst, 0.0)
    b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PREC)  # [BN, BK]
    return b_dk, b_dv


@triton.jit
def band_bwd_dkv_kernel(
    q, k, v, do, lse, delta, qf, ql, tiles, scale_log2, scale, T, TK, QS,
    dk, dv,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    USE_TILES: tl.constexpr,
):
    """qf / ql int32 [TK]: key j is seen by the query tokens [qf[j], ql[j]]; tiles int32
    [NT, 2] (first key, keys <= BN) when USE_TILES, else tile i holds keys [i * BN, ..)
    -> dk [NS, B, TK, H, K], dv [NS, B, TK, H, V]: part s from the query tokens
    [s * QS, (s + 1) * QS). Grid (NT, NS, B * H).

    With packed sequences the key tiles never straddle a sequence boundary, so the query
    rows a tile streams belong to its keys' sequence: a NaN in one sequence's queries or
    cotangents, multiplied by a masked 0, cannot reach another sequence's dK/dV."""
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    i_h = tl.program_id(2) % H
    i_b = (tl.program_id(2) // H).to(tl.int64)
    B = tl.num_programs(2) // H
    if USE_TILES:
        j_a = tl.load(tiles + 2 * i_n)
        n_j = tl.load(tiles + 2 * i_n + 1)
        if n_j == 0:  # past the true number of tiles
            return
    else:
        j_a = i_n * BN
        n_j = tl.minimum(BN, TK - j_a)
    j_b = j_a + n_j - 1
    o_j = j_a + tl.arange(0, BN)  # [BN]
    m_j = o_j <= j_b
    b_qf = tl.load(qf + o_j, mask=m_j, other=1)  # keys past TK: empty query interval
    b_ql = tl.load(ql + o_j, mask=m_j, other=0)
    # This part's tokens, intersected with the tile's query range and the range that
    # sees every key of the tile; as rows t * G + g.
    t_lo = i_s * QS
    t_hi = tl.minimum(t_lo + QS, T) - 1
    r_lo = tl.maximum(tl.load(qf + j_a), t_lo) * G
    r_hi = (tl.minimum(tl.load(ql + j_b), t_hi) + 1) * G
    f_lo = tl.maximum(tl.load(qf + j_b), t_lo) * G
    f_hi = (tl.minimum(tl.load(ql + j_a), t_hi) + 1) * G
    n1, s2, n2, s3, n3 = _phases(r_lo, r_hi, f_lo, f_hi, BM)

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_kv = (i_b * TK + o_j) * H + i_h  # [BN] int64
    b_k = _load_2d(k + o_kv[:, None] * K + o_k[None, :], m_j[:, None], (o_k < K)[None, :], True, BK != K)  # [BN, BK]
    b_v = _load_2d(v + o_kv[:, None] * V + o_v[None, :], m_j[:, None], (o_v < V)[None, :], True, BV != V)  # [BN, BV]
    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)
    for i in range(n1):
        b_dk, b_dv = _dkv_step(b_k, b_v, b_dk, b_dv, b_qf, b_ql, q, do, lse, delta, i_b, i_h, r_lo + i * BM, r_hi,
                               T, scale_log2, HQ, G, K, V, BM, BK, BV, True, PREC)
    for i in range(n2):
        b_dk, b_dv = _dkv_step(b_k, b_v, b_dk, b_dv, b_qf, b_ql, q, do, lse, delta, i_b, i_h, s2 + i * BM, r_hi,
                               T, scale_log2, HQ, G, K, V, BM, BK, BV, False, PREC)
    for i in range(n3):
        b_dk, b_dv = _dkv_step(b_k, b_v, b_dk, b_dv, b_qf, b_ql, q, do, lse, delta, i_b, i_h, s3 + i * BM, r_hi,
                               T, scale_log2, HQ, G, K, V, BM, BK, BV, True, PREC)
    b_dk = b_dk * scale
    # Every program writes its whole tile (zeros when no query of its part sees it):
    # outputs are not zeroed beforehand.
    o_out = ((i_s * B + i_b) * TK + o_j) * H + i_h  # [BN] int64
    tl.store(dk + o_out[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_j[:, None] & (o_k < K)[None, :])
    tl.store(dv + o_out[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_j[:, None] & (o_v < V)[None, :])


# ----------------------------------------------------------------------------- launchers


class Intervals(NamedTuple):
    """The band: query token t sees keys [klo[t], khi[t]); key j is seen by the tokens
    [qf[j], ql[j]]. int32, [T] and [TK]; the same for every batch row. key_bounds: None
    for one sequence per batch row, else the boundaries of the key segments (one per packed
    sequence, and the keys that belong to none) that dK/dV tiles must not straddle."""

    klo: jax.Array
    khi: jax.Array
    qf: jax.Array
    ql: jax.Array
    key_bounds: jax.Array | None = None


def clip_intervals(iv: Intervals, seq_len: int, num_keys: int) -> Intervals:
    """Forces every interval into range, so that malformed cu_seqlens (invisible under
    jit) can give wrong numbers but never an out-of-bounds access."""
    klo = jnp.clip(iv.klo, 0, num_keys).astype(jnp.int32)
    khi = jnp.clip(iv.khi, klo, num_keys).astype(jnp.int32)
    qf = jnp.clip(iv.qf, 0, seq_len).astype(jnp.int32)
    ql = jnp.clip(iv.ql, -1, seq_len - 1).astype(jnp.int32)
    bounds = None if iv.key_bounds is None else jnp.clip(iv.key_bounds, 0, num_keys).astype(jnp.int32)
    return Intervals(klo, khi, qf, ql, bounds)


def _dims(q, k, v):
    B, T, HQ, K = q.shape
    TK, H, V = k.shape[1], k.shape[2], v.shape[3]
    return B, T, HQ, H, HQ // H, K, V, TK


def rows_seeing_bad_keys(bad: jax.Array, iv: Intervals) -> jax.Array:
    """bool [B, T, H]: where query t's interval of KV head h holds a key flagged in `bad`
    ([B, TK, H], `bad_keys`): two lookups per row in the running count."""
    batch, num_keys = bad.shape[:2]
    counts = bad_counts(bad)  # [B * TK + 1, H]
    base = jnp.arange(batch, dtype=jnp.int32)[:, None] * num_keys
    return counts[base + iv.khi[None, :]] > counts[base + iv.klo[None, :]]


def band_forward(q, k, v, iv: Intervals, softmax_scale: float, cfg: BandFwdConfig):
    """-> o [B, T, HQ, V] (q's dtype), lse float32 [B, T, HQ] in log2 units; k and v finite
    (the rows that see a non-finite one are marked by the caller, `band_attention`)."""
    B, T, HQ, H, G, K, V, TK = _dims(q, k, v)
    return triton_call(
        q, k, v, iv.klo, iv.khi, log2_scale(softmax_scale), T, TK,
        kernel=band_fwd_kernel,
        out_shape=(jax.ShapeDtypeStruct((B, T, HQ, V), q.dtype), jax.ShapeDtypeStruct((B, T, HQ), jnp.float32)),
        grid=(triton.cdiv(T * G, cfg.block_m), H, B),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_band_fwd",
        HQ=HQ, H=H, G=G, K=K, V=V, BM=cfg.block_m, BN=cfg.block_n, BK=head_tile(K), BV=head_tile(V),
        PREC=dot_precision(q.dtype),
    )


def band_backward_dq(q, k, v, do, lse, delta, iv: Intervals, softmax_scale: float, cfg: BandDqConfig):
    """-> dq [B, T, HQ, K] in q's dtype."""
    B, T, HQ, H, G, K, V, TK = _dims(q, k, v)
    return triton_call(
        q, k, v, do, lse, delta, iv.klo, iv.khi, log2_scale(softmax_scale), np.float32(softmax_scale), T, TK,
        kernel=band_bwd_dq_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(triton.cdiv(T * G, cfg.block_m), H, B),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_band_bwd_dq",
        HQ=HQ, H=H, G=G, K=K, V=V, BM=cfg.block_m, BN=cfg.block_n, BK=head_tile(K), BV=head_tile(V),
        PREC=dot_precision(q.dtype),
    )


def band_backward_dkv(q, k, v, do, lse, delta, iv: Intervals, softmax_scale: float, cfg: BandDkvConfig):
    """-> dK [B, TK, H, K], dV [B, TK, H, V] in k's dtype, the query parts of
    cfg.split_tokens tokens summed in a fixed order (float32 partials) when it is > 0."""
    B, T, HQ, H, G, K, V, TK = _dims(q, k, v)
    split = cfg.split_tokens
    qs = T if split <= 0 else min(split, T)
    ns = triton.cdiv(T, qs)
    part_dtype = k.dtype if ns == 1 else jnp.float32
    if iv.key_bounds is None:
        tiles, num_tiles = jnp.zeros((1, 2), jnp.int32), triton.cdiv(TK, cfg.block_n)  # tiles: never read
    else:
        first, count, _, num_tiles = segment_tiles(iv.key_bounds, TK, cfg.block_n)
        tiles = jnp.stack([first, count], axis=1)
    dk, dv = triton_call(
        q, k, v, do, lse, delta, iv.qf, iv.ql, tiles, log2_scale(softmax_scale), np.float32(softmax_scale), T, TK, qs,
        kernel=band_bwd_dkv_kernel,
        out_shape=(jax.ShapeDtypeStruct((ns, B, TK, H, K), part_dtype), jax.ShapeDtypeStruct((ns, B, TK, H, V), part_dtype)),
        grid=(num_tiles, ns, B * H),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_band_bwd_dkv",
        HQ=HQ, H=H, G=G, K=K, V=V, BN=cfg.block_n, BM=cfg.block_m, BK=head_tile(K), BV=head_tile(V),
        PREC=dot_precision(q.dtype), USE_TILES=iv.key_bounds is not None,
    )
    return _sum_parts(dk, k.dtype), _sum_parts(dv, v.dtype)


def _sum_parts(parts: jax.Array, dtype) -> jax.Array:
    """Sum over axis 0 in a fixed left-to-right order (elementwise adds, no reduction
    whose order a compiler may choose), cast to dtype."""
    total = parts[0]
    for i in range(1, parts.shape[0]):
        total = total + parts[i]
    return total.astype(dtype)


# ----------------------------------------------------------------------------- the op


# Builds the Intervals of one call: (cu_seqlens or None, T, TK) -> Intervals. A hashable
# value (a frozen dataclass), because it is a static argument of the custom_vjp.
IntervalsFn = Callable[[jax.Array | None, int, int], Intervals]


def band_attention(intervals: IntervalsFn, softmax_scale: float, configs: BandConfigs, query, key, value, cu_seqlens):
    """(o [B, T, HQ, V] in query's dtype, lse float32 [B, T, HQ], natural log, -inf for a
    token that sees no key) of attention over the band `intervals` builds; differentiable
    in query, key and value, through both outputs.

    Keys and values enter the kernels as their finite parts (non-finite entries 0, and no
    gradient to them), so that no masked weight of 0 ever meets a NaN in a product, in the
    forward or the backward; the rows that see a non-finite one (`bad_keys` of the
    originals) are then marked NaN (docs/semantics.md, "Bad values").
    """
    o, lse, bad_rows, has_keys = _band(intervals, softmax_scale, configs, query, finite_part(key),
                                       finite_part(value), bad_keys(key, value), cu_seqlens)
    return mark_rows_nan(o, lse, bad_rows, has_keys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _band(intervals, softmax_scale, configs, query, key, value, bad, cu_seqlens):
    """(o, lse, bad rows, has keys) of the kernels; the rows (bool [B, T, HQ], for
    `mark_rows_nan`) are found in the same launcher, per shard (on a mesh the running
    count of flagged keys would otherwise gather across devices)."""
    return _band_fwd(intervals, softmax_scale, configs, query, key, value, bad, cu_seqlens)[0]


def _band_fwd(intervals, softmax_scale, configs, query, key, value, bad, cu_seqlens):
    group = query.shape[2] // key.shape[2]

    def launch(q, k, v, bad, cu):
        iv = intervals(cu, q.shape[1], k.shape[1])
        o, lse2 = band_forward(q, k, v, iv, softmax_scale, configs.fwd)
        rows = rows_seeing_bad_keys(bad, iv)
        has = jnp.broadcast_to((iv.khi > iv.klo)[None, :, None], rows.shape)
        return o, lse2, per_query_head(rows, group), per_query_head(has, group)

    layouts = ("b.q.", "b.h.", "b.h.", "b.h", None)
    o, lse2, rows, has = launcher(launch, layouts, ("b.q.", "b.q", "b.q", "b.q"))(query, key, value, bad, cu_seqlens)
    return (o, lse2 * LN2, rows, has), (query, key, value, o, lse2, cu_seqlens)


def _band_bwd(intervals, softmax_scale, configs, res, cotangents):
    query, key, value, o, lse2, cu_seqlens = res
    do, dlse = cotangents[:2]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.astype(jnp.float32)

    def launch(q, k, v, do, lse2, delta, cu):
        iv = intervals(cu, q.shape[1], k.shape[1])
        dq = band_backward_dq(q, k, v, do, lse2, delta, iv, softmax_scale, configs.dq)
        dk, dv = band_backward_dkv(q, k, v, do, lse2, delta, iv, softmax_scale, configs.dkv)
        return dq, dk, dv

    layouts = ("b.q.", "b.h.", "b.h.", "b.q.", "b.q", "b.q", None)
    dq, dk, dv = launcher(launch, layouts, ("b.q.", "b.h.", "b.h."))(query, key, value, do.astype(query.dtype), lse2,
                                                                   delta, cu_seqlens)
    return dq, dk, dv, None, None


_band.defvjp(_band_fwd, _band_bwd)
