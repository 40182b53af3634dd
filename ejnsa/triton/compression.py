"""Compressed attention (semantics.md piece 2) in Triton: the band kernels of ejnsa.triton.band
over the compressed intervals.

Token t at position p of its sequence sees the packed compressed rows
[boc_t, boc_t + (p + 1) // l): the complete blocks of its own sequence. Both ends never
decrease with t, so this is band attention:

- forward: one program per 128 rows (8 tokens x 16 heads at G = 16) streams the visible
  compressed keys in steps of BN; K_cmp / V_cmp (T / l rows) stay in L2. Tiles are
  launched last-token-first so that the longest rows start early.
- dQ: the same loop, recomputing P from the saved log-sum-exp.
- dK_cmp / dV_cmp: key-major. The first compressed rows are seen by every later token,
  so the query axis is cut into parts of `split_tokens` tokens; program (key tile, part,
  KV head) writes float32 partials [NS, B, TC, H, D] (zeros when its part sees no key of
  its tile), summed in a fixed order in XLA. Enough parts are used to give ~1024
  programs, filling the GPU's SMs several times over despite the triangle of empty ones.
  dK/dV then flow through mean pooling in XLA: k_cmp and v_cmp are this op's inputs.

lse_cmp is an output and differentiable (see ejnsa.triton.band). A token that sees no
block gets o = 0, lse = -inf, and zero gradients (its P is 0 everywhere, never NaN).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from .._varlen import query_cu, sanitize_cu_seqlens, sequence_info, token_info
from .band import BandConfigs, Intervals, band_attention, clip_intervals

# dK/dV programs to aim for (key tiles x query parts x B x H) and the fewest query
# tokens a part may have (below that the K/V tile load is not amortised).
TARGET_DKV_PROGRAMS = 1024
MIN_SPLIT_TOKENS = 256


def split_tokens(seq_len: int, num_rows: int, batch: int, kv_heads: int, block_n: int) -> int:
    """Query tokens per dK/dV part: enough parts for TARGET_DKV_PROGRAMS programs. It
    depends on the problem's size (T, TC, B, H), never on the block size l."""
    programs = -(-num_rows // block_n) * batch * kv_heads
    parts = max(1, -(-TARGET_DKV_PROGRAMS // programs))
    return max(MIN_SPLIT_TOKENS, -(-seq_len // parts))


def default_configs(query, k_cmp, v_cmp) -> BandConfigs:
    """Hopper tiles of the band kernels, with the dK/dV split of `split_tokens`."""
    batch, seq_len, _, dk = query.shape
    num_rows, kv_heads, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    configs = BandConfigs.default(dk, dv, query.dtype)
    split = split_tokens(seq_len, num_rows, batch, kv_heads, configs.dkv.block_n)
    return configs._replace(dkv=dataclasses.replace(configs.dkv, split_tokens=split))


@dataclasses.dataclass(frozen=True)
class CompressionIntervals:
    """The compressed band for `band_attention`: a query at key position p sees the rows
    [boc, boc + (p + 1) // l) of its sequence; row c (block c_loc of sequence s) is seen by
    the queries of s at key positions from (c_loc + 1) * l - 1 on (query index = key index
    - the sequence's offset); rows past the packed total by none. key_length: TK."""

    block_size: int
    key_length: int

    def __call__(self, cu_seqlens, num_queries: int, num_rows: int) -> Intervals:
        size, tk = self.block_size, self.key_length
        info = token_info(cu_seqlens, num_queries, size, tk)
        klo = info.boc
        khi = info.boc + (info.pos + 1) // size
        seqs = sequence_info(cu_seqlens, tk, size)
        ends = seqs.boc + seqs.num_blocks
        c = jnp.arange(num_rows, dtype=jnp.int32)
        s = jnp.clip(jnp.searchsorted(ends, c, side="right"), 0, ends.shape[0] - 1)
        valid = c < ends[-1]
        # The queries of sequence s: the last len_q of its keys, query index = key index - off.
        if cu_seqlens is None:
            eos, len_q, q_end = jnp.full_like(s, tk), jnp.full_like(s, num_queries), jnp.full_like(s, num_queries)
        else:
            cu_q = sanitize_cu_seqlens(query_cu(cu_seqlens), num_queries)
            eos, len_q, q_end = seqs.bos[s] + seqs.seq_len[s], cu_q[s + 1] - cu_q[s], cu_q[s + 1]
        off = eos - q_end
        seen_from = jnp.maximum(seqs.bos[s] + (c - seqs.boc[s] + 1) * size - 1, eos - len_q)
        qf = jnp.where(valid, seen_from - off, num_queries)
        ql = jnp.where(valid, eos - 1 - off, num_queries - 1)
        bounds = None
        if cu_seqlens is not None:
            # A query outside every sequence sees no row: an empty interval at its
            # sequence's first row (at the total after the last), so both ends never decrease.
            khi = jnp.where(info.inside, khi, jnp.where(info.after, ends[-1], info.boc))
            klo = jnp.where(info.inside, klo, khi)
            bounds = jnp.concatenate([seqs.boc, ends[-1:], jnp.full((1,), num_rows, jnp.int32)])
        return clip_intervals(Intervals(klo, khi, qf, ql, bounds), num_queries, num_rows)


def nsa_compression_with(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens, configs: BandConfigs,
                         key_length: int | None = None):
    """`nsa_compression` with explicit tiles (tests, tuning); key_length None: TK = TQ."""
    key_length = query.shape[1] if key_length is None else key_length
    return band_attention(CompressionIntervals(int(block_size), int(key_length)), float(softmax_scale), configs, query,
                          k_cmp, v_cmp, cu_seqlens)


@kernel_registry.register("nsa_compression", Platform.TRITON, Backend.GPU)
def nsa_compression(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens, num_keys=None):
    """(o_cmp [B, TQ, HQ, Dv] in query's dtype, lse_cmp float32 [B, TQ, HQ]).

    query [B, TQ, HQ, Dk]; k_cmp [B, TC, H, Dk], v_cmp [B, TC, H, Dv] (mean-pooled blocks of
    num_keys = TK keys (None: TQ), packed per sequence with cu_seqlens). A query at key position p sees
    block c iff (c + 1) * l - 1 <= p; none: o = 0, lse = -inf. Differentiable in query,
    k_cmp, v_cmp, through both outputs.
    """
    configs = default_configs(query, k_cmp, v_cmp)
    return nsa_compression_with(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens, configs, num_keys)
