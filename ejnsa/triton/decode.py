"""The decode step (docs/decode.md) in Triton: one new token per row against the KV cache.

With one query token, the G query heads of a KV head are the only rows of every dot, so
each (row, KV head) is split over its keys across programs and the pieces are combined
at the end (flash-decoding). Each key is read once, for all G heads. Five launches:

1. `decode_cmp_kernel`, grid (splits, H, B): one split of the row's cached compressed
   keys: the scores (kept for top-k) and the split's partial softmax (max, sum and, with
   g_cmp, the weighted sum of the compressed values).
2. `decode_topk_split_kernel`, grid (splits, H, B): every head's lse from all splits'
   partials, the importance of the split's blocks (mean over the G heads of the
   compressed probability; forced blocks 1.0; the rule of `nsa_topk`) and the split's S
   best blocks, as packed keys (score bits, then the inverted block index: one int64
   compare orders by score and breaks ties toward the smaller block, as the spec says).
3. `decode_topk_merge_kernel`, grid (H, B): the S best of all splits' lists.
4. `decode_attend_kernel`, grid (units, H, B): partial softmax over one unit of keys: a
   group of selected blocks, or a piece of the window.
5. `decode_combine_kernel`, grid (value chunks, H, B): the three branches from their
   partials, each rounded to the query's dtype as the full call's branches are, gated and
   summed.

Bad values follow the full call (docs/semantics.md, "Bad values"): every head of a
program attends every key the program loads, so keys and values enter the dots as they
are, and the rows that attend a non-finite one (found on the loaded bits) are NaN; a
token that sees no compressed block gets o_cmp = 0, padding tokens (num_new = 0) output 0,
and every buffer of every launch is written whatever the inputs hold.

The step serves TN = 1 (one token per row per call) and up to MAX_SLOTS selected blocks;
other calls raise `Unsupported`, and the registry runs the XLA step (the reference).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from .._registry import Backend, Platform, Unsupported, kernel_registry
from .._varlen import cdiv
from ._call import triton_call
from ._common import dot_precision, head_tile, log2_scale
from ._shard import launcher

MAX_SLOTS = 128  # S rounds of a max over the candidates: beyond this, XLA's sort serves
MAX_SPLITS = 256  # splits of the compressed keys per (row, KV head)
SPLIT_ROWS = 512  # most compressed rows per split (top-k keeps a split's scores in registers)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles, warps and stages of the decode launches (tools/tuning/sweep_decode.py).

    cmp_programs / attend_programs: programs to aim for in the two launches that stream
    keys (a step is bound by its loads, and many short programs keep the most loads in
    flight); they set the splits of the compressed keys (min_split_rows to SPLIT_ROWS rows
    each) and the selected blocks per attend program. cmp_rows: compressed rows per step
    of a split (BC); slot_tile: selected blocks loaded together by an attend program;
    window_step: window keys per step (BW); combine_cols / combine_partials: value
    columns per combine program (BVC) and partials merged per step (BP)."""

    cmp_programs: int = 1024
    min_split_rows: int = 128
    cmp_rows: int = 64
    cmp_warps: int = 4
    cmp_stages: int = 3
    attend_programs: int = 2048
    slot_tile: int = 1
    window_step: int = 64
    attend_warps: int = 4
    attend_stages: int = 3
    combine_cols: int = 32
    combine_partials: int = 8
    combine_warps: int = 4

    @staticmethod
    def default(block_size: int) -> "DecodeConfig":
        return DecodeConfig(attend_warps=8 if block_size >= 128 else 4)


@triton.jit
def _bad_rows(x):
    """[N] whether each row of the tile x [N, D] (float32, bfloat16 or float16, as loaded)
    holds a NaN or Inf: an all-ones exponent, tested on the bits, so that the tile is
    neither widened to float32 nor copied (registers a load-bound step needs for its
    loads in flight)."""
    if x.dtype == tl.float32:
        bad = (x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    elif x.dtype == tl.bfloat16:
        bad = (x.to(tl.int16, bitcast=True) & 0x7F80) == 0x7F80
    else:
        bad = (x.to(tl.int16, bitcast=True) & 0x7C00) == 0x7C00
    return tl.max(tl.where(bad, 1, 0), 1) > 0


@triton.jit
def _query_rows(q, i_b, i_h, HQ: tl.constexpr, G: tl.constexpr, K: tl.constexpr, GP: tl.constexpr,
                BK: tl.constexpr):
    """The G query heads of KV head i_h of row i_b ([B, 1, HQ, K]) as [GP, BK] in q's dtype,
    the dots' operand dtype (rows past G and columns past K are 0), and [GP] whether each
    head's query holds a non-finite value."""
    o_g = tl.arange(0, GP)
    o_k = tl.arange(0, BK)
    m = (o_g < G)[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q + (i_b * HQ + i_h * G + o_g)[:, None] * K + o_k[None, :], mask=m, other=0.0)
    return b_q, _bad_rows(b_q)


@triton.jit
def _row_state(start, num_new, i_b, NB, L: tl.constexpr):
    """(position of row i_b's new token, whether it is real, its visible compressed rows)."""
    pos = tl.load(start + i_b)
    real = tl.load(num_new + i_b) > 0
    nvis = tl.where(real, tl.minimum((pos + 1) // L, NB), 0)
    return pos, real, nvis


@triton.jit
def _online_step(b_q, b_m, b_l, b_acc, b_k, b_v, m_j, scale_log2, WITH_V: tl.constexpr, PREC: tl.constexpr):
    """One step of the online softmax over keys b_k [N, BK] (masked rows m_j [N], loaded
    as 0, are ignored) for the rows of b_q [GP, BK]; the dots take q's dtype. Returns
    (m, l, acc, s) with s the step's [GP, N] scores in log2 units (-inf where masked)."""
    dt = b_q.dtype
    s = tl.dot(b_q, tl.trans(b_k.to(dt)), input_precision=PREC) * scale_log2
    s = tl.where(m_j[None, :], s, float("-inf"))
    # A NaN or +inf score (a non-finite query, or raw keys) is left out of the running
    # softmax; the caller flags the row.
    sc = tl.where((s == s) & (s != float("inf")), s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(b_m - m_safe)
    p = tl.math.exp2(sc - m_safe[:, None])
    b_l = b_l * alpha + tl.sum(p, 1)
    if WITH_V:
        b_acc = tl.dot(p.to(dt), b_v.to(dt), b_acc * alpha[:, None], input_precision=PREC)
    return m_new, b_l, b_acc, s


@triton.jit
def decode_cmp_kernel(
    q, kc, vc, start, num_new, scale_log2, NB,
    s_out, m_out, l_out, acc_out, flag_out,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    CS: tl.constexpr, BC: tl.constexpr, GP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    WITH_V: tl.constexpr, PREC: tl.constexpr,
):
    """q [B, 1, HQ, K], kc [B, NB, H, K], vc [B, NB, H, V], start / num_new int32 [B] ->
    s_out f32 [B, H, G, NS * CS] (scores in log2 units, -inf where not visible), m_out /
    l_out f32 [B, H, NS, GP], acc_out f32 [B, H, NS, GP, V] (0 without WITH_V), flag_out
    int32 [B, H, NS, GP]: bit 0 a NaN or +inf score, bit 1 a visible row with a non-finite
    key or value. The scores come from the raw keys: with g_cmp a row that sees a
    non-finite one is NaN whatever top-k picks, and without it top-k's rule scores the raw
    keys."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    NS = tl.num_programs(0)
    pos, real, nvis = _row_state(start, num_new, i_b, NB, L)
    b_q, _ = _query_rows(q, i_b, i_h, HQ, G, K, GP, BK)
    o_g = tl.arange(0, GP)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    b_m = tl.full([GP], float("-inf"), tl.float32)
    b_l = tl.zeros([GP], tl.float32)
    b_acc = tl.zeros([GP, BV], tl.float32)
    b_nf = tl.zeros([GP], tl.int32)
    b_bad = tl.zeros([BC], tl.int32)
    head = i_b * H + i_h
    for i in range(0, CS, BC):
        o_c = i_s * CS + i + tl.arange(0, BC)
        m_c = o_c < nvis
        rows = (i_b * NB + o_c) * H + i_h
        b_k = tl.load(kc + rows[:, None] * K + o_k[None, :], mask=m_c[:, None] & (o_k < K)[None, :], other=0.0)
        bad = _bad_rows(b_k)
        b_v = b_k
        if WITH_V:
            b_v = tl.load(vc + rows[:, None] * V + o_v[None, :], mask=m_c[:, None] & (o_v < V)[None, :], other=0.0)
            bad = bad | _bad_rows(b_v)
        b_bad = tl.maximum(b_bad, tl.where(m_c & bad, 1, 0))
        # The dots take the raw rows: a visible non-finite one makes the heads of this row
        # NaN in the end (bit 1) whatever it does to the running softmax, which leaves NaN
        # and +inf scores out; masked rows are loaded as 0.
        b_m, b_l, b_acc, s = _online_step(b_q, b_m, b_l, b_acc, b_k, b_v, m_c, scale_log2, WITH_V, PREC)
        nf = (s != s) | (s == float("inf"))
        b_nf = tl.maximum(b_nf, tl.max(tl.where(nf, 1, 0), 1))
        tl.store(s_out + (head * G + o_g)[:, None] * (NS * CS) + o_c[None, :], s, mask=(o_g < G)[:, None])
    part = head * NS + i_s
    tl.store(m_out + part * GP + o_g, b_m)
    tl.store(l_out + part * GP + o_g, b_l)
    tl.store(acc_out + (part * GP + o_g)[:, None] * V + o_v[None, :], b_acc, mask=(o_v < V)[None, :])
    tl.store(flag_out + part * GP + o_g, b_nf + 2 * tl.max(b_bad, 0))


@triton.jit
def _lse_for_topk(m_out, l_out, flag_out, head, nvis, NS, GP: tl.constexpr, NSP: tl.constexpr,
                  RAW: tl.constexpr):
    """[GP] the lse (log2 units) that top-k scores with: 0 where the full call's lse is not
    finite (no visible block, a NaN or +inf score, or, with g_cmp, a visible block holding
    a non-finite value, whose lse is NaN), as `nsa_topk` counts it."""
    o_s = tl.arange(0, NSP)
    o_g = tl.arange(0, GP)
    p = (head * NS + o_s)[:, None] * GP + o_g[None, :]
    m_s = (o_s < NS)[:, None]
    b_m = tl.load(m_out + p, mask=m_s, other=float("-inf"))
    b_l = tl.load(l_out + p, mask=m_s, other=0.0)
    b_f = tl.load(flag_out + p, mask=m_s, other=0)
    m = tl.max(b_m, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(b_l * tl.math.exp2(b_m - m_safe[None, :]), 0)
    f = tl.max(b_f, 0)
    ok = ((f & 1) == 0) & (l > 0)
    if not RAW:
        ok = ok & ((f & 2) == 0)
    return tl.where(nvis > 0, tl.where(ok, m_safe + tl.log2(tl.where(ok, l, 1.0)), 0.0), 0.0)


@triton.jit
def _take_best(keys, prev):
    """The largest of `keys` below `prev` (0 if none): packed keys are unique, so S calls,
    each below the last, give the S best in order."""
    return tl.max(tl.where(keys < prev, keys, 0), 0)


@triton.jit
def decode_topk_split_kernel(
    s_in, m_out, l_out, flag_out, start, num_new, NB,
    score_out, idx_out,
    H: tl.constexpr, G: tl.constexpr, L: tl.constexpr, S: tl.constexpr, CS: tl.constexpr, GP: tl.constexpr,
    NSP: tl.constexpr, RAW: tl.constexpr,
):
    """-> score_out f32 / idx_out int32 [B, H, NS, S]: the split's S best blocks (-1 and
    score 0 past its candidates)."""
    i_s = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    NS = tl.num_programs(0)
    pos, real, nvis = _row_state(start, num_new, i_b, NB, L)
    head = i_b * H + i_h
    lse = _lse_for_topk(m_out, l_out, flag_out, head, nvis, NS, GP, NSP, RAW)
    o_g = tl.arange(0, GP)
    o_c = i_s * CS + tl.arange(0, CS)
    vis = o_c < nvis
    b_s = tl.load(s_in + (head * G + o_g)[:, None] * (NS * CS) + o_c[None, :], mask=(o_g < G)[:, None],
                  other=float("-inf"))
    p = tl.where((o_g < G)[:, None] & vis[None, :], tl.math.exp2(b_s - lse[:, None]), 0.0)
    score = tl.sum(p, 0) / G
    score = tl.where((score == score) & (score != float("inf")), score, 0.0)
    cur = pos // L
    # (Triton's interpreter cannot AND a scalar bool with a vector: masks are built from
    # vector compares against scalar bounds, here and below.)
    forced = ((o_c == 0) | (o_c == cur) | (o_c == cur - 1)) & (o_c <= tl.where(real, cur, -1))
    score = tl.where(forced, 1.0, score)
    cand = (forced | vis) & (o_c < NB)
    keys = tl.where(cand, (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - o_c).to(tl.int64), 0)
    out = (head * NS + i_s) * S
    best = tl.full([], 9223372036854775807, tl.int64)
    for r in tl.static_range(S):
        best = _take_best(keys, best)
        tl.store(score_out + out + r, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True))
        tl.store(idx_out + out + r, tl.where(best > 0, 2147483647 - (best & 2147483647).to(tl.int32), -1))


@triton.jit
def decode_topk_merge_kernel(
    score_in, idx_in, NS,
    block_out,
    H: tl.constexpr, S: tl.constexpr, NSSP: tl.constexpr,
):
    """-> block_out int32 [B, H, S]: the S best of the NS lists of S (-1 padded)."""
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    head = i_b * H + i_h
    o = tl.arange(0, NSSP)
    m = o < NS * S
    b_s = tl.load(score_in + head * NS * S + o, mask=m, other=0.0)
    b_i = tl.load(idx_in + head * NS * S + o, mask=m, other=-1)
    keys = tl.where(b_i >= 0, (b_s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - b_i).to(tl.int64), 0)
    best = tl.full([], 9223372036854775807, tl.int64)
    for r in tl.static_range(S):
        best = _take_best(keys, best)
        tl.store(block_out + head * S + r, tl.where(best > 0, 2147483647 - (best & 2147483647).to(tl.int32), -1))


@triton.jit
def _attend_keys(b_q, b_m, b_l, b_acc, b_flag, k, v, o_j, m_j, i_b, i_h, CAP, scale_log2,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 PREC: tl.constexpr):
    """The online softmax over the cached keys o_j [N] where m_j; b_flag: bit 0 a key was
    seen, bit 1 a seen key or value held a non-finite value."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    rows = (i_b * CAP + tl.where(m_j, o_j, 0)) * H + i_h
    b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_j[:, None] & (o_k < K)[None, :], other=0.0)
    b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_j[:, None] & (o_v < V)[None, :], other=0.0)
    # Raw rows into the dots: every head of the program attends every key it loads, so a
    # non-finite one makes all of them NaN in the end (bit 1); masked rows are loaded as 0.
    seen = tl.max(tl.where(m_j, 1, 0), 0)
    bad = tl.max(tl.where(m_j & (_bad_rows(b_k) | _bad_rows(b_v)), 2, 0), 0)
    b_m, b_l, b_acc, _ = _online_step(b_q, b_m, b_l, b_acc, b_k, b_v, m_j, scale_log2, True, PREC)
    return b_m, b_l, b_acc, b_flag | seen | bad


@triton.jit
def decode_attend_kernel(
    q, k, v, blocks, counts, start, num_new, scale_log2, CAP, W,
    m_out, l_out, acc_out, flag_out,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    S: tl.constexpr, SPP: tl.constexpr, ST: tl.constexpr, NSEL: tl.constexpr, WU: tl.constexpr, BW: tl.constexpr, GP: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_COUNTS: tl.constexpr, PREC: tl.constexpr,
):
    """q [B, 1, HQ, K], k [B, CAP, H, K], v [B, CAP, H, V], blocks int32 [B, H, S], counts
    int32 [B, 1, H] (HAS_COUNTS) -> partials of unit u: m_out / l_out f32 [B, H, NU, GP],
    acc_out f32 [B, H, NU, GP, V], flag_out int32 [B, H, NU] (bits of `_attend_keys`).
    Units u < NSEL hold the selected slots [u * SPP, (u + 1) * SPP), ST per step; the
    others pieces of WU window keys, pos - W + 1 + (u - NSEL) * WU + [0, WU) up to pos, in
    steps of BW."""
    i_u = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    NU = tl.num_programs(0)
    pos, real, _ = _row_state(start, num_new, i_b, CAP // L, L)
    b_q, _ = _query_rows(q, i_b, i_h, HQ, G, K, GP, BK)
    o_g = tl.arange(0, GP)
    o_v = tl.arange(0, BV)
    b_m = tl.full([GP], float("-inf"), tl.float32)
    b_l = tl.zeros([GP], tl.float32)
    b_acc = tl.zeros([GP, BV], tl.float32)
    b_flag = tl.zeros([], tl.int32)
    head = i_b * H + i_h
    if i_u < NSEL:
        cnt = S
        if HAS_COUNTS:
            cnt = tl.load(counts + head)
        cur = pos // L
        o_r = tl.arange(0, ST)
        o_l = tl.arange(0, L)
        for r in tl.static_range(0, SPP, ST):
            # ST blocks per step: their keys are loaded as one [ST * L] tile.
            slot = i_u * SPP + r + o_r
            idx = tl.load(blocks + head * S + slot, mask=slot < S, other=-1)
            use = (idx >= 0) & (idx <= cur) & (slot < cnt)
            o_j = tl.reshape(idx[:, None] * L + o_l[None, :], [ST * L])
            m_j = tl.reshape(use[:, None] & (o_l >= 0)[None, :], [ST * L])
            b_m, b_l, b_acc, b_flag = _attend_keys(b_q, b_m, b_l, b_acc, b_flag, k, v, o_j,
                                                   m_j & (o_j >= 0) & (o_j <= tl.where(real, pos, -1)),
                                                   i_b, i_h, CAP, scale_log2, H, K, V, BK, BV, PREC)
    else:
        for i in range(0, WU, BW):
            o_j = pos - W + 1 + (i_u - NSEL) * WU + i + tl.arange(0, BW)
            b_m, b_l, b_acc, b_flag = _attend_keys(b_q, b_m, b_l, b_acc, b_flag, k, v, o_j,
                                                   (o_j >= 0) & (o_j <= tl.where(real, pos, -1)), i_b, i_h, CAP,
                                                   scale_log2,
                                                   H, K, V, BK, BV, PREC)
    part = head * NU + i_u
    tl.store(m_out + part * GP + o_g, b_m)
    tl.store(l_out + part * GP + o_g, b_l)
    tl.store(acc_out + (part * GP + o_g)[:, None] * V + o_v[None, :], b_acc, mask=(o_v < V)[None, :])
    tl.store(flag_out + part, b_flag)


@triton.jit
def _merge(m_in, l_in, acc_in, head, n0, n1, NP, c0, V: tl.constexpr, GP: tl.constexpr, BVC: tl.constexpr,
           BP: tl.constexpr):
    """(sum [GP], weighted sum [GP, BVC] of value columns c0 + [0, BVC)) of the softmax
    partials n0 .. n1 - 1 of the NP per (row, KV head), brought to one scale: one pass,
    rescaled as the running max grows (a pass is a round trip to memory, and the combine
    launch is a chain of them)."""
    o_g = tl.arange(0, GP)
    o_c = c0 + tl.arange(0, BVC)
    o_p = tl.arange(0, BP)
    m = tl.full([GP], float("-inf"), tl.float32)
    b_l = tl.zeros([GP], tl.float32)
    b_acc = tl.zeros([GP, BVC], tl.float32)
    for i in range(n0, n1, BP):
        m_i = i + o_p < n1
        p = (head * NP + i + o_p)[:, None] * GP + o_g[None, :]
        b_m = tl.load(m_in + p, mask=m_i[:, None], other=float("-inf"))  # [BP, GP]
        l_i = tl.load(l_in + p, mask=m_i[:, None], other=0.0)
        a = tl.load(acc_in + p[:, :, None] * V + o_c[None, None, :],
                    mask=m_i[:, None, None] & (o_c < V)[None, None, :], other=0.0)  # [BP, GP, BVC]
        m_new = tl.maximum(m, tl.max(b_m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)  # 0 while nothing was seen (m = -inf)
        w = tl.math.exp2(b_m - m_safe[None, :])
        b_l = b_l * alpha + tl.sum(w * l_i, 0)
        b_acc = b_acc * alpha[:, None] + tl.sum(w[:, :, None] * a, 0)
        m = m_new
    return b_l, b_acc


@triton.jit
def _branch(b_l, b_acc, seen, bad, qbad, dtype):
    """A branch's output: acc / sum; NaN for every head if `bad` (a seen key or value held
    a non-finite value) and for the heads of qbad [GP] (a non-finite query); 0 if nothing
    was seen (scalar `seen`); rounded to the output dtype as the full call's branches are."""
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    b_o = tl.where(qbad[:, None], float("nan"), b_o)
    b_o = tl.where(bad, float("nan"), b_o)
    return tl.where(seen, b_o, 0.0).to(dtype).to(tl.float32)


@triton.jit
def _unit_flags(flags, head, n0, n1, NP, BP: tl.constexpr):
    """OR of the flags of units n0 .. n1 - 1 (of NP per (row, KV head))."""
    o_p = tl.arange(0, BP)
    flag = tl.zeros([], tl.int32)
    for i in range(n0, n1, BP):
        flag = flag | tl.reduce_or(tl.load(flags + head * NP + i + o_p, mask=i + o_p < n1, other=0), 0)
    return flag


@triton.jit
def decode_combine_kernel(
    q, g_cmp, g_slc, g_swa, start, num_new, NB,
    cm, cl, cacc, cflag, am, al, aacc, aflag, NS, NU,
    o,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    NSEL: tl.constexpr, GP: tl.constexpr, BK: tl.constexpr, BVC: tl.constexpr, BP: tl.constexpr,
    NSP: tl.constexpr, WITH_CMP: tl.constexpr, GATED_SLC: tl.constexpr, WINDOW: tl.constexpr,
):
    """-> o [B, 1, HQ, V] (q's dtype), value columns program_id(0) * BVC + [0, BVC): the
    sum over the branches of gate * branch output, 0 for a padding token. Compressed
    partials cm/cl/cacc/cflag from `decode_cmp_kernel` (NS per head); selected and window
    partials am/al/aacc/aflag from `decode_attend_kernel` (NU per head, the first NSEL
    selected)."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    pos, real, nvis = _row_state(start, num_new, i_b, NB, L)
    _, qbad = _query_rows(q, i_b, i_h, HQ, G, K, GP, BK)
    head = i_b * H + i_h
    c0 = i_c * BVC
    o_g = tl.arange(0, GP)
    o_c = c0 + tl.arange(0, BVC)
    rows = i_b * HQ + i_h * G + o_g
    m_g = o_g < G
    dtype = o.dtype.element_ty
    out = tl.zeros([GP, BVC], tl.float32)
    if WITH_CMP:
        # Seen: any visible block. NaN: a visible block held a non-finite key or value
        # (bit 1 of the splits' flags), or the query is non-finite.
        o_s = tl.arange(0, NSP)
        f = tl.load(cflag + (head * NS + o_s)[:, None] * GP + o_g[None, :], mask=(o_s < NS)[:, None], other=0)
        bad = (tl.max(tl.max(f, 1), 0) & 2) != 0
        b_l, b_acc = _merge(cm, cl, cacc, head, 0, NS, NS, c0, V, GP, BVC, BP)
        b_cmp = _branch(b_l, b_acc, nvis > 0, bad, qbad, dtype)
        out += b_cmp * tl.load(g_cmp + rows, mask=m_g, other=0.0).to(tl.float32)[:, None]
    flag = _unit_flags(aflag, head, 0, NSEL, NU, BP)
    b_l, b_acc = _merge(am, al, aacc, head, 0, NSEL, NU, c0, V, GP, BVC, BP)
    b_slc = _branch(b_l, b_acc, (flag & 1) != 0, (flag & 2) != 0, qbad, dtype)
    if GATED_SLC:
        out += b_slc * tl.load(g_slc + rows, mask=m_g, other=0.0).to(tl.float32)[:, None]
    else:
        out += b_slc
    if WINDOW:
        flag = _unit_flags(aflag, head, NSEL, NU, NU, BP)
        b_l, b_acc = _merge(am, al, aacc, head, NSEL, NU, NU, c0, V, GP, BVC, BP)
        b_swa = _branch(b_l, b_acc, (flag & 1) != 0, (flag & 2) != 0, qbad, dtype)
        out += b_swa * tl.load(g_swa + rows, mask=m_g, other=0.0).to(tl.float32)[:, None]
    out = tl.where(real, out, 0.0)
    tl.store(o + rows[:, None] * V + o_c[None, :], out.to(dtype), mask=m_g[:, None] & (o_c < V)[None, :])


# ----------------------------------------------------------------------------- the op


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def compressed_splits(num_rows: int, batch: int, kv_heads: int, chunk: int, config: DecodeConfig) -> tuple[int, int]:
    """(rows per split, splits) of a row's compressed keys: enough programs to fill the GPU
    (config.cmp_programs over batch x KV heads), min_split_rows to SPLIT_ROWS rows each."""
    want = max(1, cdiv(config.cmp_programs, batch * kv_heads))
    rows = min(max(_pow2(cdiv(num_rows, want)), chunk, config.min_split_rows), SPLIT_ROWS)
    return rows, cdiv(num_rows, rows)


def slots_per_unit(num_slots: int, batch: int, kv_heads: int, config: DecodeConfig) -> int:
    """Selected blocks per program of the attend launch: one each while there are few
    programs, more (fewer partials to write and combine) while config.attend_programs
    still run."""
    spp = 1
    while spp < num_slots and batch * kv_heads * cdiv(num_slots, 2 * spp) >= config.attend_programs:
        spp *= 2
    return spp


def _launch(q, k, v, kc, vc, gc, gs, gw, start, num_new, counts, *, num_slots, block_size, window_size, scale,
            dtype, out_dtype, with_cmp, gated_slc, has_counts, config: DecodeConfig):
    f32, i32 = jnp.float32, jnp.int32
    sds = jax.ShapeDtypeStruct
    B, _, HQ, K = q.shape
    cap, H, V = k.shape[1], k.shape[2], v.shape[3]
    NB, G, S, L = kc.shape[1], HQ // H, num_slots, block_size
    GP, BK, BV = head_tile(G), head_tile(K), head_tile(V)
    prec = dot_precision(dtype)
    scale2 = log2_scale(scale)
    q = q.astype(dtype)
    heads = dict(HQ=HQ, H=H, G=G, K=K, V=V, L=L)

    BC = min(config.cmp_rows, max(16, _pow2(NB)))
    CS, NS = compressed_splits(NB, B, H, BC, config)
    s, cm, cl, cacc, cflag = triton_call(
        q, kc, vc, start, num_new, scale2, NB,
        kernel=decode_cmp_kernel,
        out_shape=(sds((B, H, G, NS * CS), f32), sds((B, H, NS, GP), f32), sds((B, H, NS, GP), f32),
                   sds((B, H, NS, GP, V), f32), sds((B, H, NS, GP), i32)),
        grid=(NS, H, B), num_warps=config.cmp_warps, num_stages=config.cmp_stages, name="ejnsa_decode_cmp",
        CS=CS, BC=BC, GP=GP, BK=BK, BV=BV, WITH_V=with_cmp, PREC=prec, **heads,
    )
    top_s, top_i = triton_call(
        s, cm, cl, cflag, start, num_new, NB,
        kernel=decode_topk_split_kernel,
        out_shape=(sds((B, H, NS, S), f32), sds((B, H, NS, S), i32)),
        grid=(NS, H, B), num_warps=4, name="ejnsa_decode_topk_split",
        H=H, G=G, L=L, S=S, CS=CS, GP=GP, NSP=_pow2(NS), RAW=not with_cmp,
    )
    blocks = triton_call(
        top_s, top_i, NS,
        kernel=decode_topk_merge_kernel,
        out_shape=sds((B, H, S), i32),
        grid=(1, H, B), num_warps=8 if NS * S > 1024 else 4, name="ejnsa_decode_topk_merge",
        H=H, S=S, NSSP=_pow2(NS * S),
    )

    spp = slots_per_unit(S, B, H, config)
    nsel = cdiv(S, spp)
    w = min(window_size, cap)
    wu = max(16, min(_pow2(w), max(64, L * spp)))  # window keys per unit; tl.dot needs >= 16
    bw = min(config.window_step, wu)  # <= wu: the steps of a unit never reach into the next
    nu = nsel + (cdiv(w, wu) if w > 0 else 0)
    am, al, aacc, aflag = triton_call(
        q, k, v, blocks, counts, start, num_new, scale2, cap, w,
        kernel=decode_attend_kernel,
        out_shape=(sds((B, H, nu, GP), f32), sds((B, H, nu, GP), f32), sds((B, H, nu, GP, V), f32),
                   sds((B, H, nu), i32)),
        grid=(nu, H, B), num_warps=config.attend_warps, num_stages=config.attend_stages, name="ejnsa_decode_attend",
        S=S, SPP=spp, ST=min(config.slot_tile, spp), NSEL=nsel, WU=wu, BW=bw, GP=GP, BK=BK, BV=BV, HAS_COUNTS=has_counts, PREC=prec, **heads,
    )
    BVC = min(config.combine_cols, BV)
    # The combine is a chain of round trips to memory: occupancy hides them. Eight partials
    # of 32 columns per step keep it at 128 registers (sm_90, four programs per SM; sixteen
    # took 200).
    return triton_call(
        q, gc, gs, gw, start, num_new, NB, cm, cl, cacc, cflag, am, al, aacc, aflag, NS, nu,
        kernel=decode_combine_kernel,
        out_shape=sds((B, 1, HQ, V), out_dtype),
        grid=(cdiv(V, BVC), H, B), num_warps=config.combine_warps, name="ejnsa_decode_combine",
        NSEL=nsel, GP=GP, BK=BK, BVC=BVC, BP=min(config.combine_partials, _pow2(max(NS, nu))), NSP=_pow2(NS), WITH_CMP=with_cmp,
        GATED_SLC=gated_slc, WINDOW=w > 0, **heads,
    )


@kernel_registry.register("nsa_decode", Platform.TRITON, Backend.GPU)
def nsa_decode(query, key, value, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start, num_new, block_counts, num_slots,
               block_size, window_size, softmax_scale):
    """o [B, 1, HQ, Dv] in query's dtype for the new token of each row: the contract of
    the XLA step (ejnsa.xla.decode.nsa_decode), for TN = 1 and num_slots <= MAX_SLOTS."""
    return nsa_decode_with(DecodeConfig.default(int(block_size)), query, key, value, k_cmp, v_cmp, g_cmp, g_slc, g_swa,
                           start, num_new, block_counts, num_slots, block_size, window_size, softmax_scale)


def nsa_decode_with(config: DecodeConfig, query, key, value, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start, num_new,
                    block_counts, num_slots, block_size, window_size, softmax_scale):
    """`nsa_decode` with explicit tiles (tests, tuning)."""
    batch, tn, hq, _ = query.shape
    if tn != 1:
        raise Unsupported(f"the Triton decode step takes one new token per row (TN = 1), got TN = {tn}; "
                          f"prefill chunks run on the XLA step")
    if not 1 <= num_slots <= MAX_SLOTS:
        raise Unsupported(f"the Triton decode step keeps 1 to {MAX_SLOTS} top-k slots, got {num_slots}")
    if cdiv(k_cmp.shape[1], SPLIT_ROWS) > MAX_SPLITS:
        raise Unsupported(f"the Triton decode step serves up to {MAX_SPLITS * SPLIT_ROWS} compressed blocks per row, "
                          f"the cache holds {k_cmp.shape[1]}")
    h = key.shape[2]
    # Placeholders for what the call lacks (never read: the constexprs say so), with the
    # shapes their layouts name.
    zeros = jnp.zeros((batch, 1, hq), query.dtype)
    gc, gs, gw = (zeros if g is None else g.astype(query.dtype) for g in (g_cmp, g_slc, g_swa))
    counts = jnp.zeros((batch, 1, h), jnp.int32) if block_counts is None else block_counts.astype(jnp.int32)
    fn = functools.partial(
        _launch, num_slots=int(num_slots), block_size=int(block_size), window_size=int(window_size),
        scale=float(softmax_scale), dtype=jnp.promote_types(query.dtype, key.dtype), out_dtype=query.dtype,
        with_cmp=g_cmp is not None, gated_slc=g_slc is not None, has_counts=block_counts is not None, config=config,
    )
    layouts = ("b.q.", "b.h.", "b.h.", "b.h.", "b.h.", "b.q", "b.q", "b.q", "b", "b", "b.h")
    return launcher(fn, layouts, "b.q.")(query, key, value, k_cmp, v_cmp, gc, gs, gw, start.astype(jnp.int32),
                                         num_new.astype(jnp.int32), counts)
