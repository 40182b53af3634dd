"""Top-k block selection (semantics.md piece 3) as one Triton kernel (two schemes of it).

For token t (position p in its sequence) and KV head h the candidates are exactly the
local blocks c <= p // l: every c <= p // l - 1 is complete and in the past (visible),
and c = p // l is forced. Visible blocks score the mean over the G query heads of h of
the compressed softmax probability exp(scale * q.k_cmp[c] - lse); forced blocks
{0, p // l, p // l - 1} score 1.0, which no probability mean exceeds.

Design (one program per tile of BT tokens of one sequence and one KV head):
  - The tile's BT x G query rows form one [BT * GP, BK] operand loaded once, so each
    chunk of BC compressed keys feeds a single tl.dot and is read once for the G heads
    of all BT tokens.
  - lse comes from the compression forward when given; otherwise a first pass over the
    visible blocks computes it with an online max/sum, like the compression kernel.
  - A second pass streams the candidate blocks in chunks of BC: probabilities by exp2,
    importance = mean over the G heads ([BT, BC]), forced blocks set to 1.0. Nothing of
    size [T, H, T / l] is ever written; the score of a chunk lives only in registers.
  - Each (score, block) pair is packed into one int64 key that sorts like the rule of
    the spec: float32 bits of a score >= 0 are monotone as integers (high word), and
    the low word holds 2^31 - 1 - c, so equal scores prefer the smaller block. Every
    candidate key is > 0 and non-candidates are 0, which also encodes the -1 padding.
  - Running top-SP lists absorb each chunk: a bitonic top-k takes the chunk's best SP in
    the opposite order to the list; the element-wise maximum of the two is a bitonic
    sequence holding the SP best of both, and one bitonic merge sorts it again. The
    networks run in registers (in-thread exchanges and warp shuffles).

Two schemes (TopkConfig.scheme), same selection:
  - "qk" (nsa_topk_fwd_kernel, the first kernel): scores Q @ K_cmp^T with the (token,
    head) pairs on the dot's rows. A token's heads then lie on 8 lanes of a warp, so the
    head mean is a cross-lane reduction whose result every one of those 8 lanes holds:
    each thread keeps 16 keys and runs the networks on them, 8 times the work of the
    1 key per (token, block) there is. One running list per token.
  - "kq" (nsa_topk_kq_fwd_kernel, the default where it fits): scores K_cmp @ Q^T with
    the (token, head) pairs on the dot's columns, ordered so that heads sit on the
    columns a thread holds in registers and tokens on those spread over lanes: the head
    mean is a sum inside each thread and the keys are spread over the threads without
    copies. Blocks are on the dot's rows, 16 per warp, so each (token, 16-block part of
    the chunk) keeps its own running list and no network crosses warps; the parts' lists
    are folded into one per token at the end. At G = 16, D = 128, S = 16 the chunk loop
    issues 5.7 warp-instructions per (token, block) on Hopper against "qk"'s 31.6 (SASS
    from tools/hopper_compile.py), and each chunk of keys read from L2 serves 8 tokens
    instead of 4.
  The head mean of "kq" is an explicit pairwise tree in the order in which "qk"'s tl.sum
  reduces on Hopper, so both give the same float32 scores (up to G = 16), whatever
  layouts the compiler picks.

Keys are unique per token (the block index is in them), so the result is exact: the
same selection and order as sorting the float32 scores, independent of chunking and of
the launch; reruns are bitwise identical.

Limits: SP = next_power_of_2(S) <= MAX_SLOTS keeps the running lists in registers. The
pipeline asks for S = ceil(T / l) slots when block_counts is an array; above MAX_SLOTS the
registered function raises `Unsupported`, and the resolver (ejnsa._registry) runs the next
implementation, XLA's (same result, slower).
"""


from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from .._registry import Backend, Platform, Unsupported, kernel_registry
from .._varlen import cdiv, query_cu, sanitize_cu_seqlens, segment_tiles, sequence_info, token_info
from ._call import triton_call
from ._common import LOG2E, dot_precision, head_tile, log2_scale
from ._shard import launcher

# Largest running list (next_power_of_2(S)) the kernel keeps in registers.
MAX_SLOTS = 128


@dataclasses.dataclass(frozen=True)
class TopkConfig:
    """Tiles of the top-k kernel. Model parameters (S, block_size) are never tuned here.

    scheme: "kq" (nsa_topk_kq_fwd_kernel: scores as K_cmp @ Q^T, heads summed inside
      each thread, one running list per token and 16-block part) or "qk" (the first
      kernel, nsa_topk_fwd_kernel: Q @ K_cmp^T, one running list per token). Both give
      the same selection; see the kernels' docstrings for why "kq" is cheaper.
    block_t: tokens per program (BT); the dot has BT * next_power_of_2(G) rows ("qk") or
      columns ("kq": BT >= 4 and BT * next_power_of_2(G) >= 16).
    block_c: compressed blocks per chunk (BC); raised to the slot count SP if smaller
      ("qk"), to the part size max(16, SP) ("kq"; 64 or more for wgmma with 4 warps).
    """

    block_t: int
    block_c: int
    num_warps: int = 4
    num_stages: int = 2
    scheme: str = "kq"

    @staticmethod
    def default(head_dim: int, group: int, num_slots: int, dtype) -> "TopkConfig":
        """Hopper defaults (checked with tools/hopper_compile.py: no spills, wgmma).

        "kq" when its running lists fit a warp's 16 rows (SP <= 16) and its dot operands
        fit shared memory; otherwise "qk" (TopkConfig.qk). "kq" aims at 128 dot columns
        (BT * GP: each [64, D] chunk of keys read from L2 serves 8 tokens at G = 16), fewer
        where operands are large (D > 128, float32's tf32x3), with 4 <= BT <= 16 (tokens
        sit on a column's 2 lane bits; keys and lists per thread grow with BT).
        """
        gp = triton.next_power_of_2(group)
        sp = triton.next_power_of_2(num_slots)
        f32 = jnp.dtype(dtype) == jnp.float32
        max_cols = (32 if head_dim > 128 else 64) if f32 else (64 if head_dim > 128 else 256)
        if sp > 16 or 4 * gp > max_cols:
            return TopkConfig.qk(head_dim, group, num_slots, dtype)
        block_t = min(16, max(4, min(128, max_cols) // gp))
        num_warps = 8 if block_t * gp > 128 else 4
        num_stages = 1 if f32 and head_dim > 128 else 2
        return TopkConfig(block_t=block_t, block_c=64, num_warps=num_warps, num_stages=num_stages, scheme="kq")

    @staticmethod
    def qk(head_dim: int, group: int, num_slots: int, dtype) -> "TopkConfig":
        """The "qk" kernel's defaults: 64 dot rows (BT * GP) when possible, 64 blocks per
        chunk, and at most 2048 int64 keys ([BT, BC]) per program."""
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
        return TopkConfig(block_t=block_t, block_c=block_c, num_warps=num_warps, num_stages=num_stages, scheme="qk")


# --------------------------------------------------------------------------------------
# Bitonic networks on int64 keys, shared by both kernels, on the hypercube view of a
# tile: a [BT, N] tile reshaped to [2] * log2(BT * N), so that "axis i from the inside"
# pairs elements whose column index differs in bit i. Partners are found with a sum over
# the size-2 axis (pair sum minus oneself, exact even if int64 wrapped around): on the GPU
# this is the same in-register / shuffle pattern as Triton's xor-based sort, and in the
# CPU interpreter it stays a NumPy reduction (a custom combine function would run element
# by element in Python). The direction of a compare-exchange is a boolean, so that the
# compare and the direction combine into one predicate. "kq"'s running lists alternate in
# direction (row bit 0: even rows descending, odd rows ascending), so that two
# neighbouring lists are already a bitonic pair: folding them at the end is one maximum
# and one merge per level, no sort.
# --------------------------------------------------------------------------------------


@triton.jit
def _bit(N: tl.constexpr, i: tl.constexpr):
    """[1, .., 2, .., 1] (N axes): 1 where bit i (from the inside) of the index is set."""
    return tl.reshape(tl.arange(0, 2), [1] * (N - 1 - i) + [2] + [1] * i)


@triton.jit
def _cx(h, flip, N: tl.constexpr, i: tl.constexpr):
    """One compare-exchange layer along axis i: ascending pairs where flip is 0."""
    y = tl.sum(h, axis=N - 1 - i, keep_dims=True) - h
    return tl.where((h > y) != ((flip ^ _bit(N, i)) != 0), y, h)


@triton.jit
def _cx_merge(h, N: tl.constexpr, STAGE: tl.constexpr, ORDER: tl.constexpr):
    """Sorts every bitonic run of 2^STAGE elements. ORDER 0 up, 1 down; 2: runs with bit
    STAGE of their index clear up, set down; 3: the reverse of 2."""
    if ORDER == 2:
        flip = _bit(N, STAGE)
    elif ORDER == 3:
        flip = 1 - _bit(N, STAGE)
    else:
        flip = ORDER
    for i in tl.static_range(STAGE):
        h = _cx(h, flip, N, STAGE - 1 - i)
    return h


@triton.jit
def _cx_topk(x, LOG_T: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr, LAST: tl.constexpr):
    """[2^LOG_T, 2^LOG_N] -> the 2^LOG_K largest of each row, sorted in the direction
    LAST (an ORDER of _cx_merge: 0 ascending; 2 ascending on even rows and descending on
    odd ones).

    Bitonic top-k: sort runs of 2^LOG_K alternately up and down; the element-wise maximum
    of two neighbouring runs (one up, one down) is a bitonic run holding the best 2^LOG_K
    of both; merge and repeat until one run per row is left.
    """
    N: tl.constexpr = LOG_T + LOG_N
    h = tl.reshape(x, [2] * N)
    for i in tl.static_range(1, LOG_K + 1):
        h = _cx_merge(h, N, i, 2 if i < LOG_N else LAST)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=N - i)
        h = _cx_merge(h, N - i + LOG_K, LOG_K, 2 if i < LOG_N else LAST)
    return tl.reshape(h, [2**LOG_T, 2**LOG_K])


@triton.jit
def _cx_rows(x, LOG_T: tl.constexpr, LOG_K: tl.constexpr, ORDER: tl.constexpr):
    """[2^LOG_T, 2^LOG_K] rows that are bitonic -> sorted in the direction ORDER."""
    h = tl.reshape(x, [2] * (LOG_T + LOG_K))
    h = _cx_merge(h, LOG_T + LOG_K, LOG_K, ORDER)
    return tl.reshape(h, [2**LOG_T, 2**LOG_K])


@triton.jit
def _cx_fold(x, LOG_T: tl.constexpr, LOG_P: tl.constexpr, LOG_K: tl.constexpr):
    """[2^LOG_T, 2^(LOG_P + LOG_K)]: 2^LOG_P lists per row, even ones descending and odd
    ones ascending -> [2^LOG_T, 2^LOG_K] the best 2^LOG_K of each row, descending.

    The maximum of a descending and an ascending list is a bitonic list holding the best
    of both; merging it in alternating directions keeps the pattern for the next level.
    """
    N: tl.constexpr = LOG_T + LOG_P + LOG_K
    h = tl.reshape(x, [2] * N)
    for i in tl.static_range(LOG_P):
        h = tl.max(h, axis=N - i - LOG_K - 1)
        h = _cx_merge(h, N - i - 1, LOG_K, 3 if i < LOG_P - 1 else 1)
    return tl.reshape(h, [2**LOG_T, 2**LOG_K])


@triton.jit
def _head_sum(b_p, BC: tl.constexpr, THI: tl.constexpr, TLO: tl.constexpr, LOG_HHI: tl.constexpr, H0: tl.constexpr):
    """[BC, BT * GP] -> [BC, BT]: sum over each token's heads as a fixed tree.

    Columns are n = h0 + H0 * (t_lo + TLO * (h_hi + HHI * t_hi)) for token t = t_hi * TLO
    + t_lo and head h = h_hi * H0 + h0. The tree adds pairs along head bit LOG_GP - 1
    first, then the lower bits down to bit 0: the order in which the "qk" kernel's
    tl.sum reduces a token's heads on Hopper (register bit, then lanes from the largest
    xor offset), so both give the same float32 bits (up to G = 16); and as every step
    adds two values, the result does not depend on the layout the compiler picks.
    """
    h = tl.reshape(b_p, [BC, THI] + [2] * LOG_HHI + [TLO, H0])
    for _ in tl.static_range(LOG_HHI):
        h = tl.sum(h, axis=2)
    h = tl.sum(h, axis=3)  # head bit 0 (a size-1 axis when GP = 1)
    return tl.reshape(h, [BC, THI * TLO])


# --------------------------------------------------------------------------------------
# What both kernels share: the tile, the query operand, the rows' lse, the candidates.
# --------------------------------------------------------------------------------------


@triton.jit
def _tile(tiles, i_tile, T, BT: tl.constexpr, USE_TILES: tl.constexpr):
    """(first token, its position, tokens, first compressed row, whether the tokens belong
    to a sequence) of tile i_tile."""
    if USE_TILES:
        p = tiles + i_tile * 5
        return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3), tl.load(p + 4) != 0
    tok0 = i_tile * BT
    return tok0, tok0, tl.minimum(T - tok0, BT), i_tile * 0, tok0 >= 0


@triton.jit
def _load_rows(q, o_rows, m_rows, K: tl.constexpr, BK: tl.constexpr):
    """The query rows o_rows (masked by m_rows) as a [N, BK] dot operand, with the head-dim
    offsets and mask."""
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    return tl.load(q + o_rows[:, None] * K + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0), o_k, m_k


@triton.jit
def _tokens(pos0, n_tok, live, BT: tl.constexpr, BS: tl.constexpr):
    """The tile's tokens [BT], their mask (which slots to write), their current (forced)
    blocks and whether they have candidates at all (not for tokens outside every
    sequence), and the numbers of blocks visible to some token and of candidates of some
    token ([0, n_cand))."""
    o_t = tl.arange(0, BT)
    m_t = o_t < n_tok
    last = pos0 + n_tok - 1  # position of the tile's last token
    n_vis = tl.where((n_tok > 0) & live, (last + 1) // BS, 0)
    n_cand = tl.where((n_tok > 0) & live, last // BS + 1, 0)
    return o_t, m_t, (pos0 + o_t) // BS, m_t & live, n_vis, n_cand


@triton.jit
def _load_keys(p_k0, i_c, n_vis, boc, TC, o_k, m_k, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr):
    """[BK, BC] compressed keys i_c .. i_c + BC - 1 of the sequence (0 past the visible ones)."""
    o_c = i_c + tl.arange(0, BC)
    m_c = (o_c < n_vis) & (boc + o_c < TC)
    return tl.load(p_k0 + o_c[None, :].to(tl.int64) * (H * K) + o_k[:, None], mask=m_k[:, None] & m_c[None, :], other=0)


@triton.jit
def _rows_lse2(b_q, lse, o_nq, m_n, nvis_n, p_k0, n_vis, boc, TC, o_k, m_k, qk_scale,
               N: tl.constexpr, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
               USE_LSE: tl.constexpr, PRECISION: tl.constexpr):
    """[N] log-sum-exp (log2 units) of the compressed softmax of the dot operand's rows
    b_q [N, BK]: loaded from the compression forward, or computed by a first pass over
    the visible blocks with an online max/sum. A row that sees no block gets 0 (its p is
    never used)."""
    if USE_LSE:
        b_lse = tl.load(lse + o_nq, mask=m_n, other=0).to(tl.float32)
        b_lse = tl.where((b_lse > float("-inf")) & (b_lse < float("inf")), b_lse, 0.0)
        return b_lse * LOG2E
    b_m = tl.full([N], float("-inf"), dtype=tl.float32)
    b_acc = tl.zeros([N], dtype=tl.float32)
    for i_c in range(0, n_vis, BC):
        o_c = i_c + tl.arange(0, BC)
        b_k = _load_keys(p_k0, i_c, n_vis, boc, TC, o_k, m_k, H, K, BC)  # [BK, BC]
        b_s = tl.dot(b_q, b_k, input_precision=PRECISION) * qk_scale  # [N, BC] log2 units
        b_s = tl.where(o_c[None, :] < nvis_n[:, None], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_ms = tl.where(b_mn > float("-inf"), b_mn, 0.0)
        b_acc = b_acc * tl.exp2(b_m - b_ms) + tl.sum(tl.exp2(b_s - b_ms[:, None]), 1)
        b_m = b_mn
    return tl.where(b_acc > 0, b_m + tl.log2(tl.where(b_acc > 0, b_acc, 1.0)), 0.0)


@triton.jit
def _keys(b_imp, o_c, cur, m_tok):
    """int64 sort keys of importances b_imp for blocks o_c and tokens with current block
    cur (broadcast against each other): score bits high, (2^31 - 1 - c) low; forced blocks
    {0, cur, cur - 1} score 1.0; 0 for non-candidates (c > cur, or a masked token, or a token
    outside every sequence)."""
    m_forced = (o_c == 0) | (o_c == cur) | (o_c == cur - 1)
    # A non-finite importance (a NaN in the token's softmax) counts as 0, as in XLA.
    b_imp = tl.where((b_imp == b_imp) & (b_imp < float("inf")), b_imp, 0.0)
    b_score = tl.where(m_forced, 1.0, b_imp)
    b_low = (2147483647 - o_c).to(tl.int64)
    return tl.where((o_c <= cur) & m_tok, (b_score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | b_low, 0)


@triton.jit
def _store_indices(o, b_top, i_b, i_h, tok0, o_t, m_t, T, H: tl.constexpr, S: tl.constexpr, SP: tl.constexpr):
    """Writes the sorted keys b_top [BT, SP] as block indices (-1 for empty slots)."""
    b_idx = tl.where(b_top > 0, 2147483647 - (b_top & 2147483647).to(tl.int32), -1)
    o_s = tl.arange(0, SP)
    p_o = o + ((i_b * T + tok0 + o_t).to(tl.int64) * H + i_h) * S
    tl.store(p_o[:, None] + o_s[None, :], b_idx, mask=m_t[:, None] & (o_s < S)[None, :])


# Arguments of both kernels:
#   q [B, T, HQ, K] query; k [B, TC, H, K] compressed keys; lse [B, T, HQ] float32
#   log-sum-exp of the compressed softmax (read iff USE_LSE); tiles [NT, 5] int32 (first
#   token, first position, tokens, first compressed row, in a sequence; iff USE_TILES); qk_scale fp32
#   softmax_scale * log2(e); T tokens and TC compressed rows per batch row; o [B, T, H, S]
#   int32 block indices (the output). GP = next_power_of_2(G), BK = next_power_of_2(K),
#   SP = next_power_of_2(S) the running list length, BS = l, BT tokens per program, BC
#   compressed blocks per chunk; LOG_* the log2 of the sizes (the networks' depths).


@triton.jit
def nsa_topk_fwd_kernel(
    q, k, lse, tiles, qk_scale, T, TC,
    o,
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    LOG_BT: tl.constexpr, LOG_BC: tl.constexpr, LOG_SP: tl.constexpr,
    USE_LSE: tl.constexpr, USE_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """The "qk" scheme: scores as Q @ K_cmp^T, dot rows = (token, head) pairs, one running
    list per token."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    # Late tiles see the most blocks: launch them first so the tail of the grid is short.
    tok0, pos0, n_tok, boc, live = _tile(tiles, tl.num_programs(0) - 1 - i_tile, T, BT, USE_TILES)

    # Dot rows r = token (r // GP) x head (r % GP) of the tile; padded heads are masked.
    o_r = tl.arange(0, BT * GP)
    o_rt = o_r // GP
    o_rg = o_r % GP
    m_r = (o_rt < n_tok) & (o_rg < G)
    o_rq = (i_b * T + tok0 + o_rt).to(tl.int64) * HQ + i_h * G + o_rg  # [BT*GP] row of q / lse
    b_q, o_k, m_k = _load_rows(q, o_rq, m_r, K, BK)  # [BT*GP, BK]
    o_t, m_t, cur_t, m_cand, n_vis, n_cand = _tokens(pos0, n_tok, live, BT, BS)
    # Compressed row c of this sequence and head: k + ((i_b * TC + boc + c) * H + i_h) * K.
    p_k0 = k + ((i_b * TC + boc).to(tl.int64) * H + i_h) * K
    b_lse2 = _rows_lse2(b_q, lse, o_rq, m_r, (pos0 + o_rt + 1) // BS, p_k0, n_vis, boc, TC, o_k, m_k, qk_scale,
                        BT * GP, H, K, BC, USE_LSE, PRECISION)

    # Running list: SP best keys per token, descending; 0 = empty slot.
    b_run = tl.zeros([BT, SP], dtype=tl.int64)
    for i_c in range(0, n_cand, BC):
        o_c = i_c + tl.arange(0, BC)
        b_k = _load_keys(p_k0, i_c, n_vis, boc, TC, o_k, m_k, H, K, BC)
        # [BT*GP, BC]
        b_s = tl.dot(b_q, b_k, input_precision=PRECISION) * qk_scale
        # Blocks c <= cur of a token are visible except c == cur, which is forced below, and
        # blocks past cur are no candidates: no visibility mask is needed here. Masked rows
        # (padding heads, tokens past the tile) must not enter the head sum.
        b_p = tl.where(m_r[:, None], tl.exp2(b_s - b_lse2[:, None]), 0.0)
        # [BT, BC] mean over the G heads of each token
        b_imp = tl.sum(tl.reshape(b_p, [BT, GP, BC]), 1) / G
        b_key = _keys(b_imp, o_c[None, :], cur_t[:, None], m_cand[:, None])
        b_top = _cx_topk(b_key, LOG_BT, LOG_BC, LOG_SP, 0)  # [BT, SP] ascending
        b_run = _cx_rows(tl.maximum(b_run, b_top), LOG_BT, LOG_SP, 1)

    _store_indices(o, b_run, i_b, i_h, tok0, o_t, m_t, T, H, S, SP)


@triton.jit
def nsa_topk_kq_fwd_kernel(
    q, k, lse, tiles, qk_scale, T, TC,
    o,
    H: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BP: tl.constexpr,  # blocks per part: each part keeps its own running list
    THI: tl.constexpr, TLO: tl.constexpr, H0: tl.constexpr, LOG_HHI: tl.constexpr,  # column order of _head_sum
    LOG_BT: tl.constexpr, LOG_BP: tl.constexpr, LOG_NP: tl.constexpr, LOG_SP: tl.constexpr,  # LOG_NP: log2(BC // BP)
    USE_LSE: tl.constexpr, USE_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """The "kq" scheme: scores as K_cmp @ Q^T, so that a token's heads sit in registers.

    Dot rows are the BC blocks of a chunk, columns the BT x GP (token, head) pairs in the
    order of _head_sum. On Hopper a column's position is held by registers (bits 0, 3, 4,
    ...) or by the lane (bits 1, 2), so with heads on register bits and tokens on lane
    bits the head mean is a sum inside each thread, and the [BC, BT] keys are spread over
    the threads without copies (the "qk" kernel holds each key in the 8 lanes of its heads
    and runs the sorting networks 8 times over). The rows of a warp are 16 consecutive
    blocks: the chunk is cut into parts of BP blocks, each with its own running top-SP list
    per token, so the networks never cross warps; the parts' lists are merged once at the
    end (top-SP of a union = top-SP of the union of the parts' top-SP).
    """
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    tok0, pos0, n_tok, boc, live = _tile(tiles, tl.num_programs(0) - 1 - i_tile, T, BT, USE_TILES)

    N: tl.constexpr = BT * GP
    NP: tl.constexpr = BC // BP
    # Column n of the dot: token o_nt, head o_ng (see _head_sum); padded heads are masked.
    o_n = tl.arange(0, N)
    o_nt = (o_n // (H0 * TLO * (GP // H0))) * TLO + (o_n // H0) % TLO
    o_ng = ((o_n // (H0 * TLO)) % (GP // H0)) * H0 + o_n % H0
    m_n = (o_nt < n_tok) & (o_ng < G)
    o_nq = (i_b * T + tok0 + o_nt).to(tl.int64) * HQ + i_h * G + o_ng  # [N] row of q / lse
    b_q, o_k, m_k = _load_rows(q, o_nq, m_n, K, BK)  # [N, BK]
    o_t, m_t, cur_t, m_cand, n_vis, n_cand = _tokens(pos0, n_tok, live, BT, BS)
    p_k0 = k + ((i_b * TC + boc).to(tl.int64) * H + i_h) * K
    # The "qk" kernel's first pass on the same rows, same chunks: the same float32 bits.
    b_lse2 = _rows_lse2(b_q, lse, o_nq, m_n, (pos0 + o_nt + 1) // BS, p_k0, n_vis, boc, TC, o_k, m_k, qk_scale,
                        N, H, K, BC, USE_LSE, PRECISION)

    b_qt = tl.trans(b_q)  # [BK, N]
    # Running lists: the SP best keys of each (token, part), sorted descending in even
    # parts and ascending in odd ones (see _cx_fold); 0 = empty slot.
    b_run = tl.zeros([BT * NP, SP], dtype=tl.int64)
    LAST: tl.constexpr = 2 if LOG_NP > 0 else 0  # the chunk's best: even parts up, odd down
    MERGE: tl.constexpr = 3 if LOG_NP > 0 else 1  # the lists: even parts down, odd up
    for i_c in range(0, n_cand, BC):
        o_c = i_c + tl.arange(0, BC)
        m_c = (o_c < n_vis) & (boc + o_c < TC)
        # [BC, BK]
        b_k = tl.load(p_k0 + o_c[:, None].to(tl.int64) * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0)
        # [BC, N]
        b_s = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale
        b_p = tl.where(m_n[None, :], tl.exp2(b_s - b_lse2[None, :]), 0.0)
        # [BC, BT]
        b_imp = _head_sum(b_p, BC, THI, TLO, LOG_HHI, H0) / G
        b_key = _keys(b_imp, o_c[:, None], cur_t[None, :], m_cand[None, :])
        # [BT * NP, BP]: token-major, then part
        b_key = tl.reshape(tl.trans(b_key), [BT * NP, BP])
        # The chunk's best SP of each part, in the direction opposite to its list: their
        # maximum is a bitonic list holding the best SP of both.
        b_top = _cx_topk(b_key, LOG_BT + LOG_NP, LOG_BP, LOG_SP, LAST)  # [BT * NP, SP]
        b_run = _cx_rows(tl.maximum(b_run, b_top), LOG_BT + LOG_NP, LOG_SP, MERGE)

    # [BT, SP] descending: the best SP of each token's NP lists
    b_top = _cx_fold(tl.reshape(b_run, [BT, NP * SP]), LOG_BT, LOG_NP, LOG_SP)
    _store_indices(o, b_top, i_b, i_h, tok0, o_t, m_t, T, H, S, SP)


def _log2(n: int) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"expected a power of two, got {n}")
    return n.bit_length() - 1


def _tile_table(cu_seqlens, num_queries: int, num_keys: int, block_size: int, block_t: int):
    """int32 [NT, 5] (first query, its key position, queries in the tile, first compressed
    row, 1 when the queries belong to a sequence), and NT.

    Tiles never straddle sequences (a tile shares one run of compressed keys, and its
    queries' positions are consecutive); the queries before the first and after the last
    sequence, and those a malformed (cu_q, cu_k) gives more queries than its keys, get tiles
    too, which write -1 only. The count depends on values; `segment_tiles` bounds it
    statically, and the tiles past the true count have 0 queries (they write nothing).
    """
    if cu_seqlens is None:  # queries the last num_queries of the keys
        bounds, live = jnp.array([0, num_queries], jnp.int32), jnp.ones((1,), bool)
    else:
        cu_q = sanitize_cu_seqlens(query_cu(cu_seqlens), num_queries)
        len_k = sequence_info(cu_seqlens, num_keys, block_size).seq_len
        # Each sequence: its queries without keys (malformed pairs only), then the others.
        valid_from = cu_q[:-1] + jnp.maximum(cu_q[1:] - cu_q[:-1] - len_k, 0)
        inner = jnp.stack([cu_q[:-1], valid_from], axis=1).reshape(-1)
        bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), inner, cu_q[-1:], jnp.full((1,), num_queries, jnp.int32)])
        live = jnp.concatenate([jnp.zeros((1,), bool), jnp.tile(jnp.array([False, True]), cu_q.shape[0] - 1),
                                jnp.zeros((1,), bool)])
    first, count, sid, num_tiles = segment_tiles(bounds, num_queries, block_t)
    info = token_info(cu_seqlens, num_queries, block_size, num_keys)
    at = jnp.minimum(first, num_queries - 1)
    is_seq = live[sid]
    table = jnp.stack([first, jnp.where(is_seq, info.pos[at], 0), count, jnp.where(is_seq, info.boc[at], 0),
                       is_seq.astype(jnp.int32)], axis=1)
    return table.astype(jnp.int32), num_tiles


def kernel_constexprs(config: TopkConfig, h: int, hq: int, dk: int, num_selected: int, block_size: int, use_lse: bool,
                      use_tiles: bool, dtype):
    """(kernel, constexprs) of a launch: the launcher's and tools/hopper_compile.py's."""
    if config.scheme not in ("qk", "kq"):
        raise ValueError(f"TopkConfig.scheme must be 'qk' or 'kq', got {config.scheme!r}")
    g = hq // h
    gp = triton.next_power_of_2(g)
    sp = triton.next_power_of_2(num_selected)
    if config.block_t == 1:
        sp = max(sp, 2)  # [1, 1] lists would be 0-d hypercubes, which the networks cannot take
    if config.scheme == "kq":
        block_p = max(16, sp)
        block_c = max(config.block_c, block_p)
        if config.block_t * gp < 16 or config.block_t < 4:
            raise ValueError(f"scheme 'kq' needs block_t >= 4 and block_t * next_power_of_2(G) >= 16, got {config}")
    else:
        block_c = max(config.block_c, sp)
    cx = dict(
        H=h, HQ=hq, G=g, GP=gp, K=dk, BK=head_tile(dk), S=num_selected, SP=sp, BS=block_size, BT=config.block_t,
        BC=block_c, LOG_BT=_log2(config.block_t), LOG_SP=_log2(sp), USE_LSE=use_lse, USE_TILES=use_tiles,
        PRECISION=dot_precision(dtype),
    )
    if config.scheme == "qk":
        return nsa_topk_fwd_kernel, dict(cx, LOG_BC=_log2(block_c))
    tlo, h0 = min(config.block_t, 4), min(gp, 2)
    return nsa_topk_kq_fwd_kernel, dict(
        cx, BP=block_p, THI=config.block_t // tlo, TLO=tlo, H0=h0, LOG_HHI=_log2(gp // h0), LOG_BP=_log2(block_p),
        LOG_NP=_log2(block_c // block_p),
    )


def nsa_topk_fwd(query, k_cmp, lse, num_selected, block_size, softmax_scale, cu_seqlens, config=None,
                 num_keys: int | None = None):
    """int32 [B, TQ, H, S] block indices via the kernel (SP <= MAX_SLOTS); num_keys: TK
    (None: TK = TQ)."""
    _, seq_len, hq, dk = query.shape
    tc, h = k_cmp.shape[1], k_cmp.shape[2]
    num_keys = seq_len if num_keys is None else num_keys
    if config is None:
        config = TopkConfig.default(dk, hq // h, num_selected, query.dtype)
    use_lse = lse is not None
    # Tiles from a table when they follow packed sequences or the queries' key positions
    # differ from their indices (a suffix of the keys).
    use_tiles = cu_seqlens is not None or num_keys != seq_len

    def launch(query, k_cmp, lse, cu_seqlens):  # shapes here are a device's shard (ejnsa.triton._shard)
        h, hq = k_cmp.shape[2], query.shape[2]
        kernel, cx = kernel_constexprs(config, h, hq, dk, num_selected, block_size, use_lse, use_tiles, query.dtype)
        if not use_tiles:
            tiles = jnp.zeros((1, 5), jnp.int32)  # never read
            num_tiles = cdiv(seq_len, config.block_t)
        else:
            tiles, num_tiles = _tile_table(cu_seqlens, seq_len, num_keys, block_size, config.block_t)
        batch = query.shape[0]
        return triton_call(
            query, k_cmp,
            lse if use_lse else query,  # a placeholder pointer when lse is computed in the kernel
            tiles, log2_scale(softmax_scale), seq_len, tc,
            kernel=kernel,
            out_shape=jax.ShapeDtypeStruct((batch, seq_len, h, num_selected), jnp.int32),
            grid=(num_tiles, batch * h),
            num_warps=config.num_warps, num_stages=config.num_stages,
            name="ejnsa_topk_kq_fwd" if config.scheme == "kq" else "ejnsa_topk_fwd",
            **cx,
        )

    return launcher(launch, ("b.q.", "b.h.", "b.q", None), "b.h.")(query, k_cmp, lse, cu_seqlens)


@kernel_registry.register("nsa_topk", Platform.TRITON, Backend.GPU)
def nsa_topk(query, k_cmp, lse, num_selected, block_size, softmax_scale, cu_seqlens, num_keys=None):
    """int32 [B, TQ, H, S] block indices (local to each sequence), -1 padded; no gradient;
    num_keys = TK (None: TQ).

    `lse` [B, TQ, HQ] float32 from the compression forward, or None to compute it in the
    kernel. Raises Unsupported when next_power_of_2(S) > MAX_SLOTS (array block_counts
    on long sequences): the resolver then runs the XLA implementation, same result.
    """
    if triton.next_power_of_2(num_selected) > MAX_SLOTS:
        raise Unsupported(f"the Triton top-k keeps at most {MAX_SLOTS} slots in registers; "
                          f"{num_selected} were asked for (next power of two {triton.next_power_of_2(num_selected)})")
    query, k_cmp = jax.lax.stop_gradient(query), jax.lax.stop_gradient(k_cmp)
    if lse is not None:
        lse = jax.lax.stop_gradient(lse).astype(jnp.float32)
    return nsa_topk_fwd(query, k_cmp, lse, num_selected, block_size, float(softmax_scale), cu_seqlens,
                        num_keys=num_keys)
