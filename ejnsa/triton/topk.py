"""Top-k block selection (SPEC step 3) as one Triton kernel.

For token t (position p in its sequence) and KV head h the candidates are exactly the
local blocks c <= p // l: every c <= p // l - 1 is complete and in the past (visible),
and c = p // l is forced. Visible blocks score the mean over the G query heads of h of
the compressed softmax probability exp(scale * q.k_cmp[c] - lse); forced blocks
{0, p // l, p // l - 1} score 1.0, which no probability mean exceeds.

Design (one program per tile of BT tokens of one sequence and one KV head):
  - The tile's BT x G query rows form one [BT * GP, BK] operand loaded once, so each
    chunk of BC compressed keys feeds a single tl.dot (M = BT * GP >= 16 rows) and is
    read once for the G heads of all BT tokens.
  - lse comes from the compression forward when given; otherwise a first pass over the
    visible blocks computes it with an online max/sum, like the compression kernel.
  - A second pass streams the candidate blocks in chunks of BC: probabilities by exp2,
    importance = mean over the G heads ([BT, BC]), forced blocks set to 1.0. Nothing of
    size [T, H, T / l] is ever written; the score of a chunk lives only in registers.
  - Each (score, block) pair is packed into one int64 key that sorts like the rule of
    the spec: float32 bits of a score >= 0 are monotone as integers (high word), and
    the low word holds 2^31 - 1 - c, so equal scores prefer the smaller block. Every
    candidate key is > 0 and non-candidates are 0, which also encodes the -1 padding.
  - A running top-SP list per token (sorted descending, [BT, SP] in registers) absorbs
    each chunk: a bitonic top-k takes the chunk's best SP in ascending order; the
    element-wise maximum of that and the descending running list is a bitonic sequence
    holding the SP best of both, and one bitonic merge sorts it again. A chunk none of
    whose keys beats any token's current SP-th key skips the merge.
  - Keys and lists stay in registers: with BT * BC <= 2048 keys per program the
    networks are in-thread exchanges and warp shuffles (Triton's linear layouts), the
    key loads are cp.async-pipelined (num_stages), and only the skip test crosses warps.

Keys are unique per token (the block index is in them), so the result is exact: the
same selection and order as sorting the float32 scores, independent of chunking and of
the launch; reruns are bitwise identical.

Limits: SP = next_power_of_2(S) <= MAX_SLOTS keeps the running list in registers. The
pipeline asks for S = ceil(T / l) slots when block_counts is an array; above MAX_SLOTS
the registered function falls back to the XLA implementation (same result, slower).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from .._registry import Backend, Platform, kernel_registry
from .._varlen import cdiv, sequence_info
from ..xla import topk as xla_topk
from ._call import triton_call

# Largest running list (next_power_of_2(S)) the kernel keeps in registers.
MAX_SLOTS = 128
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class TopkConfig:
    """Tiles of the top-k kernel. Model parameters (S, block_size) are never tuned here.

    block_t: tokens per program (BT); the dot has BT * next_power_of_2(G) rows.
    block_c: compressed blocks per chunk (BC); raised to the slot count SP if smaller.
    skip: test each chunk against the running lists and skip the merge when no key of
      the chunk would enter any of them (one cross-warp reduction per chunk).
    prefetch: load the next chunk's keys into registers before this chunk's softmax and
      sort, instead of Triton's cp.async pipelining (num_stages); kept as an alternative
      to time (it costs registers and disables the pipelining).
    precision: tl.dot input precision for float32 inputs. "tf32x3" (about float32
      accuracy on tensor cores) or "ieee"; plain TF32 would perturb logits by ~1e-3 and
      change selections against the float32 definition.
    """

    block_t: int
    block_c: int
    num_warps: int = 4
    num_stages: int = 2
    skip: bool = True
    prefetch: bool = False
    precision: str = "tf32x3"

    @staticmethod
    def default(head_dim: int, group: int, num_slots: int, dtype) -> "TopkConfig":
        """Hopper defaults (checked with tools/hopper_compile.py: no spills, wgmma).

        64 dot rows (BT * GP) when possible, 64 blocks per chunk, and at most 2048 int64
        keys ([BT, BC]) per program, which the bitonic networks keep in registers.
        """
        gp = triton.next_power_of_2(group)
        sp = triton.next_power_of_2(num_slots)
        block_t = max(1, 64 // gp)
        block_c = max(sp, min(64, 2048 // block_t))
        block_t = max(min(block_t, 2048 // block_c), triton.cdiv(16, gp))
        num_warps = 8 if block_t * gp >= 128 or head_dim > 128 else 4
        num_stages = 2
        if jnp.dtype(dtype) == jnp.float32 and head_dim > 128:
            # tf32x3 keeps split copies of both operands in shared memory: 227 KiB allow
            # one stage of [64, 256] x [256, 32] float32 tiles.
            block_c, num_stages = max(sp, 32), 1
        return TopkConfig(block_t=block_t, block_c=block_c, num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------
# Bitonic networks on int64 keys, on the hypercube view of a tile: a [BT, N] tile
# reshaped to [2] * log2(BT * N), so that "axis i from the inside" pairs elements whose
# column index differs in bit i. Partners are found with a sum over the size-2 axis
# (pair sum minus oneself, exact even if int64 wrapped around): on the GPU this
# is the same in-register / shuffle pattern as Triton's xor-based sort, and in the CPU
# interpreter it stays a NumPy reduction (a custom combine function would run element by
# element in Python).
# --------------------------------------------------------------------------------------


@triton.jit
def _bit(N: tl.constexpr, i: tl.constexpr):
    """[1, .., 2, .., 1] (N axes): 1 where bit i (from the inside) of the index is set."""
    return tl.reshape(tl.arange(0, 2), [1] * (N - 1 - i) + [2] + [1] * i)


@triton.jit
def _compare_swap(h, flip, N: tl.constexpr, i: tl.constexpr):
    """One compare-exchange layer along axis i: ascending pairs where flip is 0."""
    y = tl.sum(h, axis=N - 1 - i, keep_dims=True) - h
    return tl.where((h > y) != (flip ^ _bit(N, i)), y, h)


@triton.jit
def _merge_cube(h, N: tl.constexpr, STAGE: tl.constexpr, ORDER: tl.constexpr):
    """Sorts every bitonic run of 2^STAGE elements; ORDER 0 up, 1 down, 2 alternating runs."""
    if ORDER == 2:
        flip = _bit(N, STAGE)
    else:
        flip = ORDER
    for i in tl.static_range(STAGE):
        h = _compare_swap(h, flip, N, STAGE - 1 - i)
    return h


@triton.jit
def _topk_ascending(x, LOG_T: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """[2^LOG_T, 2^LOG_N] -> its 2^LOG_K largest per row, in ascending order.

    Bitonic top-k: sort runs of 2^LOG_K alternately up and down; the element-wise maximum
    of two neighbouring runs (one up, one down) is a bitonic run holding the best 2^LOG_K
    of both; merge and repeat until one run per row is left.
    """
    N: tl.constexpr = LOG_T + LOG_N
    h = tl.reshape(x, [2] * N)
    for i in tl.static_range(1, LOG_K + 1):
        h = _merge_cube(h, N, i, 2 if i < LOG_N else 0)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        # h has N - (i - LOG_K - 1) axes; fold the two halves of each 2^i run together.
        h = tl.max(h, axis=N - i)
        h = _merge_cube(h, N - i + LOG_K, LOG_K, 2 if i < LOG_N else 0)
    return tl.reshape(h, [2**LOG_T, 2**LOG_K])


@triton.jit
def _merge_descending(x, LOG_T: tl.constexpr, LOG_K: tl.constexpr):
    """[2^LOG_T, 2^LOG_K] rows that are bitonic -> sorted descending."""
    h = tl.reshape(x, [2] * (LOG_T + LOG_K))
    h = _merge_cube(h, LOG_T + LOG_K, LOG_K, 1)
    return tl.reshape(h, [2**LOG_T, 2**LOG_K])


@triton.jit
def _load_keys(p_k0, i_c, n_vis, boc, TC, o_k, m_k, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr):
    """[BK, BC] compressed keys i_c .. i_c + BC - 1 of the sequence (0 past the visible ones)."""
    o_c = i_c + tl.arange(0, BC)
    m_c = (o_c < n_vis) & (boc + o_c < TC)
    return tl.load(p_k0 + o_c[None, :].to(tl.int64) * (H * K) + o_k[:, None], mask=m_k[:, None] & m_c[None, :], other=0)


@triton.jit
def nsa_topk_fwd_kernel(
    q,  # [B, T, HQ, K] query
    k,  # [B, TC, H, K] compressed keys
    lse,  # [B, T, HQ] float32 log-sum-exp of the compressed softmax (read iff USE_LSE)
    tiles,  # [NT, 4] int32 (first token, first position, tokens, first compressed row); iff USE_TILES
    qk_scale,  # fp32 softmax_scale * log2(e)
    T,  # tokens per batch row
    TC,  # compressed rows per batch row
    o,  # [B, T, H, S] int32 block indices (output)
    H: tl.constexpr,
    HQ: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,  # next_power_of_2(G): rows per token in the dot operand
    K: tl.constexpr,
    BK: tl.constexpr,  # next_power_of_2(K)
    S: tl.constexpr,
    SP: tl.constexpr,  # next_power_of_2(S): running list length
    BS: tl.constexpr,  # block_size l
    BT: tl.constexpr,
    BC: tl.constexpr,
    NT: tl.constexpr,  # tiles in the grid
    LOG_BT: tl.constexpr,  # log2(BT), log2(BC), log2(SP): the bitonic networks' depths
    LOG_BC: tl.constexpr,
    LOG_SP: tl.constexpr,
    USE_LSE: tl.constexpr,
    USE_TILES: tl.constexpr,
    SKIP: tl.constexpr,
    PREFETCH: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    # Late tiles see the most blocks: launch them first so the tail of the grid is short.
    i_tile = NT - 1 - i_tile
    if USE_TILES:
        tok0 = tl.load(tiles + i_tile * 4)
        pos0 = tl.load(tiles + i_tile * 4 + 1)
        n_tok = tl.load(tiles + i_tile * 4 + 2)
        boc = tl.load(tiles + i_tile * 4 + 3)
    else:
        tok0 = i_tile * BT
        pos0 = tok0
        n_tok = tl.minimum(T - tok0, BT)
        boc = i_tile * 0

    # Dot rows r = token (r // GP) x head (r % GP) of the tile; padded heads are masked.
    o_r = tl.arange(0, BT * GP)
    o_rt = o_r // GP
    o_rg = o_r % GP
    m_r = (o_rt < n_tok) & (o_rg < G)
    o_rq = (i_b * T + tok0 + o_rt).to(tl.int64) * HQ + i_h * G + o_rg  # [BT*GP] row of q / lse
    nvis_r = (pos0 + o_rt + 1) // BS  # [BT*GP] blocks visible to the row's token
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # [BT*GP, BK]
    b_q = tl.load(q + o_rq[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0)

    o_t = tl.arange(0, BT)
    m_t = o_t < n_tok
    cur_t = (pos0 + o_t) // BS  # [BT] the token's own (forced) block
    last = pos0 + n_tok - 1  # position of the tile's last token
    n_vis = tl.where(n_tok > 0, (last + 1) // BS, 0)  # blocks visible to some token
    n_cand = tl.where(n_tok > 0, last // BS + 1, 0)  # candidates of some token: [0, n_cand)
    # Compressed row c of this sequence and head: k + ((i_b * TC + boc + c) * H + i_h) * K.
    p_k0 = k + ((i_b * TC + boc).to(tl.int64) * H + i_h) * K

    if USE_LSE:
        b_lse = tl.load(lse + o_rq, mask=m_r, other=0).to(tl.float32)
        # -inf (no visible block) or garbage: p is never used for such a row.
        b_lse = tl.where((b_lse > float("-inf")) & (b_lse < float("inf")), b_lse, 0.0)
        b_lse2 = b_lse * 1.4426950408889634  # log2 units
    else:
        b_m = tl.full([BT * GP], float("-inf"), dtype=tl.float32)
        b_acc = tl.zeros([BT * GP], dtype=tl.float32)
        if PREFETCH:
            b_k = _load_keys(p_k0, 0, n_vis, boc, TC, o_k, m_k, H, K, BC)  # [BK, BC]
        for i_c in range(0, n_vis, BC):
            o_c = i_c + tl.arange(0, BC)
            if not PREFETCH:
                b_k = _load_keys(p_k0, i_c, n_vis, boc, TC, o_k, m_k, H, K, BC)
            # [BT*GP, BC] logits in log2 units
            b_s = tl.dot(b_q, b_k, input_precision=PRECISION) * qk_scale
            if PREFETCH:
                # The next chunk's load is in flight while this chunk's softmax runs.
                b_k = _load_keys(p_k0, i_c + BC, n_vis, boc, TC, o_k, m_k, H, K, BC)
            b_s = tl.where(o_c[None, :] < nvis_r[:, None], b_s, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            b_ms = tl.where(b_mn > float("-inf"), b_mn, 0.0)
            b_acc = b_acc * tl.exp2(b_m - b_ms) + tl.sum(tl.exp2(b_s - b_ms[:, None]), 1)
            b_m = b_mn
        b_lse2 = tl.where(b_acc > 0, b_m + tl.log2(tl.where(b_acc > 0, b_acc, 1.0)), 0.0)

    # Running list: SP best keys per token, descending; 0 = empty slot.
    b_run = tl.zeros([BT, SP], dtype=tl.int64)
    if PREFETCH:
        b_k = _load_keys(p_k0, 0, n_vis, boc, TC, o_k, m_k, H, K, BC)  # [BK, BC]
    for i_c in range(0, n_cand, BC):
        o_c = i_c + tl.arange(0, BC)
        if not PREFETCH:
            b_k = _load_keys(p_k0, i_c, n_vis, boc, TC, o_k, m_k, H, K, BC)
        # [BT*GP, BC]
        b_s = tl.dot(b_q, b_k, input_precision=PRECISION) * qk_scale
        if PREFETCH:
            # The next chunk's load is in flight while this chunk's scores are sorted.
            b_k = _load_keys(p_k0, i_c + BC, n_vis, boc, TC, o_k, m_k, H, K, BC)
        # Blocks c <= cur of a token are visible except c == cur, which is forced below, and
        # blocks past cur are no candidates: no visibility mask is needed here. Masked rows
        # (padding heads, tokens past the tile) must not enter the head sum.
        b_p = tl.where(m_r[:, None], tl.exp2(b_s - b_lse2[:, None]), 0.0)
        # [BT, BC] mean over the G heads of each token
        b_imp = tl.sum(tl.reshape(b_p, [BT, GP, BC]), 1) / G
        m_forced = (o_c[None, :] == 0) | (o_c[None, :] == cur_t[:, None]) | (o_c[None, :] == cur_t[:, None] - 1)
        m_cand = (o_c[None, :] <= cur_t[:, None]) & m_t[:, None]
        b_score = tl.where(m_forced, 1.0, b_imp)
        # [BT, BC] keys: score bits high, (2^31 - 1 - c) low; 0 for non-candidates
        b_low = (2147483647 - o_c).to(tl.int64)
        b_key = tl.where(m_cand, (b_score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | b_low[None, :], 0)
        if SKIP:
            # Any key above a token's worst kept key changes that token's list.
            b_thr = tl.min(b_run, 1)  # [BT]
            n_hit = tl.sum(tl.where(b_key > b_thr[:, None], 1, 0))
            if n_hit > 0:
                b_top = _topk_ascending(b_key, LOG_BT, LOG_BC, LOG_SP)  # [BT, SP]
                b_run = _merge_descending(tl.maximum(b_run, b_top), LOG_BT, LOG_SP)
        else:
            b_top = _topk_ascending(b_key, LOG_BT, LOG_BC, LOG_SP)  # [BT, SP]
            b_run = _merge_descending(tl.maximum(b_run, b_top), LOG_BT, LOG_SP)

    # [BT, SP]
    b_idx = tl.where(b_run > 0, 2147483647 - (b_run & 2147483647).to(tl.int32), -1)
    o_s = tl.arange(0, SP)
    p_o = o + ((i_b * T + tok0 + o_t).to(tl.int64) * H + i_h) * S
    tl.store(p_o[:, None] + o_s[None, :], b_idx, mask=m_t[:, None] & (o_s < S)[None, :])


def _log2(n: int) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"expected a power of two, got {n}")
    return n.bit_length() - 1


def _tile_table(cu_seqlens, seq_len: int, block_size: int, block_t: int):
    """int32 [NT, 4] (first token, its position, tokens in the tile, first compressed row).

    Tiles never straddle sequences (a tile shares one run of compressed keys). The count
    sum_i ceil(len_i / BT) depends on values; NT = ceil(T / BT) + N bounds it statically
    and the tiles past the true count have 0 tokens (they write nothing).
    """
    seqs = sequence_info(cu_seqlens, seq_len, block_size)
    n = seqs.bos.shape[0]
    num_tiles = cdiv(seq_len, block_t) + n
    per_seq = (seqs.seq_len + block_t - 1) // block_t
    ends = jnp.cumsum(per_seq)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    sid = jnp.clip(jnp.searchsorted(ends, i, side="right"), 0, n - 1)
    j = i - (ends[sid] - per_seq[sid])  # tile within its sequence
    pos0 = j * block_t
    n_tok = jnp.where(i < ends[-1], jnp.clip(seqs.seq_len[sid] - pos0, 0, block_t), 0)
    table = jnp.stack([seqs.bos[sid] + pos0, pos0, n_tok, seqs.boc[sid]], axis=1)
    return table.astype(jnp.int32), num_tiles


def nsa_topk_fwd(query, k_cmp, lse, num_selected, block_size, softmax_scale, cu_seqlens, config=None):
    """int32 [B, T, H, S] block indices via the kernel (no fallback; SP <= MAX_SLOTS)."""
    batch, seq_len, hq, dk = query.shape
    tc, h = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // h
    if config is None:
        config = TopkConfig.default(dk, g, num_selected, query.dtype)
    sp = triton.next_power_of_2(num_selected)
    block_c = max(config.block_c, sp)
    if cu_seqlens is None:
        tiles = jnp.zeros((1, 4), jnp.int32)  # never read
        num_tiles = cdiv(seq_len, config.block_t)
    else:
        tiles, num_tiles = _tile_table(cu_seqlens, seq_len, block_size, config.block_t)
    use_lse = lse is not None
    precision = config.precision if query.dtype == jnp.float32 else "tf32"
    return triton_call(
        query,
        k_cmp,
        lse if use_lse else query,  # a placeholder pointer when lse is computed in the kernel
        tiles,
        np.float32(softmax_scale * LOG2E),
        seq_len,
        tc,
        kernel=nsa_topk_fwd_kernel,
        out_shape=jax.ShapeDtypeStruct((batch, seq_len, h, num_selected), jnp.int32),
        grid=(num_tiles, batch * h),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        name="nsa_topk_fwd",
        H=h,
        HQ=hq,
        G=g,
        GP=triton.next_power_of_2(g),
        K=dk,
        BK=max(16, triton.next_power_of_2(dk)),
        S=num_selected,
        SP=sp,
        BS=block_size,
        BT=config.block_t,
        BC=block_c,
        NT=num_tiles,
        LOG_BT=_log2(config.block_t),
        LOG_BC=_log2(block_c),
        LOG_SP=_log2(sp),
        USE_LSE=use_lse,
        USE_TILES=cu_seqlens is not None,
        SKIP=config.skip,
        PREFETCH=config.prefetch,
        PRECISION=precision,
    )


@kernel_registry.register("nsa_topk", Platform.TRITON, Backend.GPU)
def nsa_topk(query, k_cmp, lse, num_selected, block_size, softmax_scale, cu_seqlens):
    """int32 [B, T, H, S] block indices (local to each sequence), -1 padded; no gradient.

    `lse` [B, T, HQ] float32 from the compression forward, or None to compute it in the
    kernel. S with next_power_of_2(S) > MAX_SLOTS (array block_counts on long sequences)
    runs the XLA implementation instead, which gives the same result.
    """
    if triton.next_power_of_2(num_selected) > MAX_SLOTS:
        return xla_topk.nsa_topk(query, k_cmp, lse, num_selected, block_size, softmax_scale, cu_seqlens)
    query, k_cmp = jax.lax.stop_gradient(query), jax.lax.stop_gradient(k_cmp)
    if lse is not None:
        lse = jax.lax.stop_gradient(lse).astype(jnp.float32)
    return nsa_topk_fwd(query, k_cmp, lse, num_selected, block_size, float(softmax_scale), cu_seqlens)
