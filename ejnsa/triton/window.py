"""Sliding-window attention (SPEC step 5) in Triton, and the band kernels it shares.

Band attention
--------------
Both FlashAttention-style branches of NSA are one pattern, which these kernels compute:
query token t attends the keys of ONE contiguous interval [klo[t], khi[t]) of its KV
head, and both ends never decrease with t.

- sliding window: klo[t] = max(bos_t, t - w + 1), khi[t] = t + 1 (keys are tokens);
- compressed attention (ejnsa.triton.compression): klo[t] = boc_t,
  khi[t] = boc_t + (pos_t + 1) // l (keys are packed compressed rows).

The backward's key-major kernel needs the same relation seen from the key side: key j is
attended by the query tokens of the interval [qf[j], ql[j]] (also nondecreasing in j).
The launchers compute all four int32 arrays in XLA (from ejnsa._varlen, so packed
sequences are just other intervals) and clip them into range, so the kernels never
read out of bounds, whatever `cu_seqlens` holds.

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
accumulation is float32. float32 inputs use tl.dot with input_precision="tf32x3"
(three TF32 products, about float32 accuracy, still on tensor cores): plain TF32 would
leave ~1e-3 relative error, which a float32 user does not expect.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from .._registry import Backend, Platform, kernel_registry
from .._varlen import token_info
from ._call import triton_call
from ._vmap import vmappable

LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------- configs


def _head_tile(d: int) -> int:
    # tl.dot needs every dimension >= 16; odd head dims are padded and masked.
    return max(16, triton.next_power_of_2(d))


def _precision(dtype) -> str | None:
    return "tf32x3" if jnp.dtype(dtype) == jnp.float32 else None


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Tiles of `band_fwd_kernel`: BM query rows (tokens x heads) per program, BN keys per step."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def default(cls, dk: int, dv: int, dtype) -> FwdConfig:
        """Hopper (H100) tiles. 128 rows = two warpgroups of wgmma; wide heads halve BM
        so that Q, the accumulator and the pipelined K/V stages fit registers and 227 KiB."""
        d = max(_head_tile(dk), _head_tile(dv))
        wide = jnp.dtype(dtype).itemsize == 4
        if d <= 64:
            return cls(128, 64, 4, 3)
        if d <= 128 and not wide:
            return cls(128, 64, 8, 3)
        if d <= 128:
            return cls(128, 32, 8, 2)
        # float32 operands of tf32x3 dots take twice the shared memory: narrow key steps.
        return cls(64, 16, 4, 2) if wide else cls(64, 64, 4, 2)


@dataclasses.dataclass(frozen=True)
class DqConfig:
    """Tiles of `band_bwd_dq_kernel` (same loop as the forward; carries dO and dQ too)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def default(cls, dk: int, dv: int, dtype) -> DqConfig:
        d = max(_head_tile(dk), _head_tile(dv))
        wide = jnp.dtype(dtype).itemsize == 4
        if d <= 64:
            return cls(128, 64, 4, 3)
        if d <= 128 and not wide:
            return cls(128, 64, 8, 2)
        if d <= 128:
            return cls(64, 32, 4, 2)
        # float32 wider than 128: 32-row tiles (mma.sync) keep tf32x3 operands in 227 KiB.
        return cls(64, 32, 4, 2) if not wide else cls(32, 32, 4, 2)


@dataclasses.dataclass(frozen=True)
class DkvConfig:
    """Tiles of `band_bwd_dkv_kernel`: BN keys per program, BM query rows per step.

    `split_tokens` > 0 cuts the query axis into parts of that many tokens, each program
    writing float32 partials of its part (summed in XLA); 0 means one part, written in
    the input dtype.
    """

    block_n: int = 128
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 2
    split_tokens: int = 0

    @classmethod
    def default(cls, dk: int, dv: int, dtype) -> DkvConfig:
        d = max(_head_tile(dk), _head_tile(dv))
        wide = jnp.dtype(dtype).itemsize == 4
        if d <= 64:
            return cls(128, 64, 4, 3)
        if d <= 128 and not wide:
            return cls(128, 64, 8, 2)
        if d <= 128:
            return cls(64, 32, 4, 2)
        return cls(64, 32, 4, 2) if not wide else cls(32, 32, 4, 2)


class BandConfigs(NamedTuple):
    fwd: FwdConfig
    dq: DqConfig
    dkv: DkvConfig


def default_configs(dk: int, dv: int, dtype) -> BandConfigs:
    """The window's tiles for head dims dk, dv and input dtype (Hopper)."""
    return BandConfigs(FwdConfig.default(dk, dv, dtype), DqConfig.default(dk, dv, dtype), DkvConfig.default(dk, dv, dtype))


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
def band_fwd_kernel(
    q, k, v, klo, khi, scale_log2, T, TK,
    o, lse,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """q [B, T, HQ, K], k [B, TK, H, K], v [B, TK, H, V], klo / khi int32 [T]
    -> o [B, T, HQ, V] (q's dtype), lse float32 [B, T, HQ] in log2 units (-inf: no key).
    Grid (cdiv(T * G, BM), H, B)."""
    # Later tiles see more keys under compression's causal band: start them first.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_r = i_m * BM + tl.arange(0, BM)  # [BM] rows t * G + g
    m_r = o_r < T * G
    o_t = o_r // G
    o_row = (i_b * T + o_t) * HQ + i_h * G + o_r % G  # [BM] int64 (b, t, hq)
    t_a = (i_m * BM) // G
    t_b = tl.minimum((i_m * BM + BM - 1) // G, T - 1)
    b_klo = tl.load(klo + o_t, mask=m_r, other=0)  # rows past T: empty interval
    b_khi = tl.load(khi + o_t, mask=m_r, other=0)
    lo = tl.load(klo + t_a)
    hi = tl.load(khi + t_b)
    n1, s2, n2, s3, n3 = _phases(lo, hi, tl.load(klo + t_b), tl.load(khi + t_a), BN)

    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    # [BM, BK]
    b_q = _load_2d(q + o_row[:, None] * K + o_k[None, :], m_r[:, None], (o_k < K)[None, :], True, BK != K)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    i_bk = i_b * TK
    for i in range(n1):
        b_acc, b_m, b_l = _fwd_step(b_q, b_acc, b_m, b_l, b_klo, b_khi, k, v, i_bk, i_h, lo + i * BN, hi,
                                    scale_log2, H, K, V, BN, BK, BV, True, PREC)
    for i in range(n2):
        b_acc, b_m, b_l = _fwd_step(b_q, b_acc, b_m, b_l, b_klo, b_khi, k, v, i_bk, i_h, s2 + i * BN, hi,
                                    scale_log2, H, K, V, BN, BK, BV, False, PREC)
    for i in range(n3):
        b_acc, b_m, b_l = _fwd_step(b_q, b_acc, b_m, b_l, b_klo, b_khi, k, v, i_bk, i_h, s3 + i * BN, hi,
                                    scale_log2, H, K, V, BN, BK, BV, True, PREC)

    has = b_l > 0
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
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_r = i_m * BM + tl.arange(0, BM)  # [BM]
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
    b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PREC)  # [BN, BK]
    return b_dk, b_dv


@triton.jit
def band_bwd_dkv_kernel(
    q, k, v, do, lse, delta, qf, ql, scale_log2, scale, T, TK, QS,
    dk, dv,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """qf / ql int32 [TK]: key j is seen by the query tokens [qf[j], ql[j]]
    -> dk [NS, B, TK, H, K], dv [NS, B, TK, H, V]: part s from the query tokens
    [s * QS, (s + 1) * QS). Grid (cdiv(TK, BN), NS, B * H)."""
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    i_h = tl.program_id(2) % H
    i_b = (tl.program_id(2) // H).to(tl.int64)
    B = tl.num_programs(2) // H
    j_a = i_n * BN
    j_b = tl.minimum(j_a + BN, TK) - 1
    o_j = j_a + tl.arange(0, BN)  # [BN]
    m_j = o_j < TK
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
    [qf[j], ql[j]]. int32, [T] and [TK]; the same for every batch row."""

    klo: jax.Array
    khi: jax.Array
    qf: jax.Array
    ql: jax.Array


def clip_intervals(iv: Intervals, seq_len: int, num_keys: int) -> Intervals:
    """Forces every interval into range, so that malformed cu_seqlens (invisible under
    jit) can give wrong numbers but never an out-of-bounds access."""
    klo = jnp.clip(iv.klo, 0, num_keys).astype(jnp.int32)
    khi = jnp.clip(iv.khi, klo, num_keys).astype(jnp.int32)
    qf = jnp.clip(iv.qf, 0, seq_len).astype(jnp.int32)
    ql = jnp.clip(iv.ql, -1, seq_len - 1).astype(jnp.int32)
    return Intervals(klo, khi, qf, ql)


def band_forward(q, k, v, iv: Intervals, softmax_scale: float, cfg: FwdConfig):
    """-> o [B, T, HQ, V] (q's dtype), lse float32 [B, T, HQ] in log2 units."""
    B, T, HQ, K = q.shape
    TK, H, V = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // H
    return triton_call(
        q, k, v, iv.klo, iv.khi, np.float32(softmax_scale * LOG2E), T, TK,
        kernel=band_fwd_kernel,
        out_shape=(jax.ShapeDtypeStruct((B, T, HQ, V), q.dtype), jax.ShapeDtypeStruct((B, T, HQ), jnp.float32)),
        grid=(triton.cdiv(T * G, cfg.block_m), H, B),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_band_fwd",
        HQ=HQ, H=H, G=G, K=K, V=V, BM=cfg.block_m, BN=cfg.block_n, BK=_head_tile(K), BV=_head_tile(V),
        PREC=_precision(q.dtype),
    )


def band_backward_dq(q, k, v, do, lse, delta, iv: Intervals, softmax_scale: float, cfg: DqConfig):
    """-> dq [B, T, HQ, K] in q's dtype."""
    B, T, HQ, K = q.shape
    TK, H, V = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // H
    return triton_call(
        q, k, v, do, lse, delta, iv.klo, iv.khi, np.float32(softmax_scale * LOG2E), np.float32(softmax_scale), T, TK,
        kernel=band_bwd_dq_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(triton.cdiv(T * G, cfg.block_m), H, B),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_band_bwd_dq",
        HQ=HQ, H=H, G=G, K=K, V=V, BM=cfg.block_m, BN=cfg.block_n, BK=_head_tile(K), BV=_head_tile(V),
        PREC=_precision(q.dtype),
    )


def band_backward_dkv(q, k, v, do, lse, delta, iv: Intervals, softmax_scale: float, cfg: DkvConfig):
    """-> dK [B, TK, H, K], dV [B, TK, H, V] in k's dtype when cfg.split_tokens == 0,
    else float32 partials [NS, B, TK, H, D] (NS = cdiv(T, split_tokens))."""
    B, T, HQ, K = q.shape
    TK, H, V = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // H
    split = cfg.split_tokens
    qs = T if split <= 0 else min(split, T)
    ns = triton.cdiv(T, qs)
    part_dtype = k.dtype if split <= 0 else jnp.float32
    dk, dv = triton_call(
        q, k, v, do, lse, delta, iv.qf, iv.ql, np.float32(softmax_scale * LOG2E), np.float32(softmax_scale), T, TK, qs,
        kernel=band_bwd_dkv_kernel,
        out_shape=(jax.ShapeDtypeStruct((ns, B, TK, H, K), part_dtype), jax.ShapeDtypeStruct((ns, B, TK, H, V), part_dtype)),
        grid=(triton.cdiv(TK, cfg.block_n), ns, B * H),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="ejnsa_band_bwd_dkv",
        HQ=HQ, H=H, G=G, K=K, V=V, BN=cfg.block_n, BM=cfg.block_m, BK=_head_tile(K), BV=_head_tile(V),
        PREC=_precision(q.dtype),
    )
    if split <= 0:
        return dk[0], dv[0]
    return dk, dv


def band_backward(q, k, v, do, lse, delta, iv: Intervals, softmax_scale: float, dq_cfg: DqConfig, dkv_cfg: DkvConfig):
    """-> dq, and dK, dV in k's dtype (float32 partials summed in a fixed order when split)."""
    dq = band_backward_dq(q, k, v, do, lse, delta, iv, softmax_scale, dq_cfg)
    dk, dv = band_backward_dkv(q, k, v, do, lse, delta, iv, softmax_scale, dkv_cfg)
    if dk.ndim == 5:
        dk, dv = sum_parts(dk, k.dtype), sum_parts(dv, v.dtype)
    return dq, dk, dv


def sum_parts(parts: jax.Array, dtype) -> jax.Array:
    """Sum over axis 0 in a fixed left-to-right order (elementwise adds, no reduction
    whose order a compiler may choose), cast to dtype."""
    total = parts[0]
    for i in range(1, parts.shape[0]):
        total = total + parts[i]
    return total.astype(dtype)


def row_delta(o, do) -> jax.Array:
    """rowsum(dO * O) float32 [B, T, HQ]: the softmax backward's correction term."""
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------- window op


def window_intervals(cu_seqlens, seq_len: int, window_size: int) -> Intervals:
    """Token t sees keys max(bos_t, t - w + 1) .. t; key j is seen by j .. min(j + w - 1, eos_j - 1)."""
    info = token_info(cu_seqlens, seq_len, 16)  # the block size plays no part here
    w = min(window_size, seq_len)  # a window past T sees the same keys as one of T
    t = jnp.arange(seq_len, dtype=jnp.int32)
    eos = info.bos + info.seq_len
    iv = Intervals(jnp.maximum(info.bos, t - w + 1), t + 1, t, jnp.minimum(t + w - 1, eos - 1))
    return clip_intervals(iv, seq_len, seq_len)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _window(window_size, softmax_scale, configs, query, key, value, cu_seqlens):
    return _window_fwd(window_size, softmax_scale, configs, query, key, value, cu_seqlens)[0]


def _window_fwd(window_size, softmax_scale, configs, query, key, value, cu_seqlens):
    def launch(q, k, v, cu):
        iv = window_intervals(cu, q.shape[1], window_size)
        return band_forward(q, k, v, iv, softmax_scale, configs.fwd)

    o, lse = vmappable(launch, "bbbv", "bb")(query, key, value, cu_seqlens)
    return o, (query, key, value, o, lse, cu_seqlens)


def _window_bwd(window_size, softmax_scale, configs, res, do):
    query, key, value, o, lse, cu_seqlens = res
    delta = row_delta(o, do)

    def launch(q, k, v, do, lse, delta, cu):
        iv = window_intervals(cu, q.shape[1], window_size)
        return band_backward(q, k, v, do, lse, delta, iv, softmax_scale, configs.dq, configs.dkv)

    dq, dk, dv = vmappable(launch, "bbbbbbv", "bbb")(query, key, value, do, lse, delta, cu_seqlens)
    return dq, dk, dv, None


_window.defvjp(_window_fwd, _window_bwd)


def sliding_window_attention_with(query, key, value, window_size, softmax_scale, cu_seqlens, configs: BandConfigs):
    """`sliding_window_attention` with explicit tiles (tests, tuning)."""
    return _window(int(window_size), float(softmax_scale), configs, query, key, value, cu_seqlens)


@kernel_registry.register("sliding_window_attention", Platform.TRITON, Backend.GPU)
def sliding_window_attention(query, key, value, window_size, softmax_scale, cu_seqlens):
    """o_swa [B, T, HQ, Dv] in query's dtype: keys j with max(bos, t - w + 1) <= j <= t.

    query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv]; cu_seqlens None or
    int32 [N + 1] (B == 1). Differentiable in query, key and value.
    """
    configs = default_configs(query.shape[-1], value.shape[-1], query.dtype)
    return sliding_window_attention_with(query, key, value, window_size, softmax_scale, cu_seqlens, configs)
