"""Compressed attention (SPEC step 2) in Triton: forward (o_cmp, lse_cmp) and backward.

Token t at position p of its sequence sees the packed compressed rows
[boc_t, boc_t + (p + 1) // l): the complete blocks of its own sequence. Both ends never
decrease with t, so this is band attention, and the kernels are the band kernels of
ejnsa.triton.window (rows = tokens x the G query heads of a KV head, masked steps only at
the band's edges) run with the compressed intervals below:

- forward: one program per 128 rows (8 tokens x 16 heads at G = 16) streams the visible
  compressed keys in steps of BN; K_cmp / V_cmp (T / l rows) stay in L2. Tiles are
  launched last-token-first so that the longest rows start early.
- dQ: the same loop, recomputing P from the saved log-sum-exp.
- dK_cmp / dV_cmp: key-major. The first compressed rows are seen by every later token,
  so the query axis is cut into parts of `split_tokens` tokens; program (key tile, part,
  KV head) writes float32 partials [NS, B, TC, H, D] (zeros when its part sees no key of
  its tile), summed in a fixed order in XLA. Enough parts are used to give ~1024
  programs, filling 132 SMs several times over despite the triangle of empty ones. dK/dV
  then flow through mean pooling in XLA: k_cmp and v_cmp are this op's inputs.

lse_cmp is an output and differentiable: with cotangent dlse, dS = P * (dP - (delta - dlse))
(d lse / d s = P), so the backward only shifts delta. A token that sees no block gets
o = 0, lse = -inf, and zero gradients (its P is 0 everywhere, never NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from .._varlen import sequence_info, token_info
from ._vmap import vmappable
from .window import (
    BandConfigs,
    DkvConfig,
    DqConfig,
    FwdConfig,
    Intervals,
    band_backward,
    band_forward,
    clip_intervals,
    row_delta,
)

LN2 = math.log(2.0)

# dK/dV programs to aim for (key tiles x query parts x B x H) and the fewest query
# tokens a part may have (below that the K/V tile load is not amortised).
TARGET_DKV_PROGRAMS = 1024
MIN_SPLIT_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class CompressionFwdConfig(FwdConfig):
    """Tiles of the forward (band_fwd_kernel) for compressed attention."""

    @classmethod
    def default(cls, dk: int, dv: int, dtype) -> CompressionFwdConfig:
        base = FwdConfig.default(dk, dv, dtype)
        return cls(base.block_m, base.block_n, base.num_warps, base.num_stages)


@dataclasses.dataclass(frozen=True)
class CompressionDqConfig(DqConfig):
    """Tiles of dQ (band_bwd_dq_kernel) for compressed attention."""

    @classmethod
    def default(cls, dk: int, dv: int, dtype) -> CompressionDqConfig:
        base = DqConfig.default(dk, dv, dtype)
        return cls(base.block_m, base.block_n, base.num_warps, base.num_stages)


@dataclasses.dataclass(frozen=True)
class CompressionDkvConfig(DkvConfig):
    """Tiles of dK_cmp/dV_cmp (band_bwd_dkv_kernel); split_tokens > 0 always."""

    split_tokens: int = 1024

    @classmethod
    def default(cls, dk: int, dv: int, dtype, seq_len: int, num_rows: int, batch: int, kv_heads: int) -> CompressionDkvConfig:
        """Hopper tiles; the split depends on the problem's size (T, TC, B, H), never on l."""
        base = DkvConfig.default(dk, dv, dtype)
        programs = -(-num_rows // base.block_n) * batch * kv_heads
        parts = max(1, -(-TARGET_DKV_PROGRAMS // programs))
        split = max(MIN_SPLIT_TOKENS, -(-seq_len // parts))
        return cls(base.block_n, base.block_m, base.num_warps, base.num_stages, split)


def default_configs(query, k_cmp, v_cmp) -> BandConfigs:
    batch, seq_len, _, dk = query.shape
    num_rows, kv_heads, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    return BandConfigs(
        CompressionFwdConfig.default(dk, dv, query.dtype),
        CompressionDqConfig.default(dk, dv, query.dtype),
        CompressionDkvConfig.default(dk, dv, query.dtype, seq_len, num_rows, batch, kv_heads),
    )


def compression_intervals(cu_seqlens, seq_len: int, num_rows: int, block_size: int) -> Intervals:
    """Token t sees rows [boc_t, boc_t + (pos_t + 1) // l); row c (block c_loc of sequence s)
    is seen by tokens bos_s + (c_loc + 1) * l - 1 .. eos_s - 1; rows past the packed
    total by none."""
    info = token_info(cu_seqlens, seq_len, block_size)
    klo = info.boc
    khi = info.boc + (info.pos + 1) // block_size
    seqs = sequence_info(cu_seqlens, seq_len, block_size)
    ends = seqs.boc + seqs.num_blocks
    c = jnp.arange(num_rows, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(ends, c, side="right"), 0, ends.shape[0] - 1)
    valid = c < ends[-1]
    qf = jnp.where(valid, seqs.bos[s] + (c - seqs.boc[s] + 1) * block_size - 1, seq_len)
    ql = jnp.where(valid, seqs.bos[s] + seqs.seq_len[s] - 1, seq_len - 1)
    return clip_intervals(Intervals(klo, khi, qf, ql), seq_len, num_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _compression(block_size, softmax_scale, configs, query, k_cmp, v_cmp, cu_seqlens):
    return _compression_fwd(block_size, softmax_scale, configs, query, k_cmp, v_cmp, cu_seqlens)[0]


def _compression_fwd(block_size, softmax_scale, configs, query, k_cmp, v_cmp, cu_seqlens):
    def launch(q, kc, vc, cu):
        iv = compression_intervals(cu, q.shape[1], kc.shape[1], block_size)
        return band_forward(q, kc, vc, iv, softmax_scale, configs.fwd)

    o, lse2 = vmappable(launch, "bbbv", "bb")(query, k_cmp, v_cmp, cu_seqlens)
    return (o, lse2 * LN2), (query, k_cmp, v_cmp, o, lse2, cu_seqlens)


def _compression_bwd(block_size, softmax_scale, configs, res, cotangents):
    query, k_cmp, v_cmp, o, lse2, cu_seqlens = res
    do, dlse = cotangents
    delta = row_delta(o, do) - dlse.astype(jnp.float32)

    def launch(q, kc, vc, do, lse2, delta, cu):
        iv = compression_intervals(cu, q.shape[1], kc.shape[1], block_size)
        return band_backward(q, kc, vc, do, lse2, delta, iv, softmax_scale, configs.dq, configs.dkv)

    dq, dk, dv = vmappable(launch, "bbbbbbv", "bbb")(query, k_cmp, v_cmp, do, lse2, delta, cu_seqlens)
    return dq, dk, dv, None


_compression.defvjp(_compression_fwd, _compression_bwd)


def nsa_compression_with(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens, configs: BandConfigs):
    """`nsa_compression` with explicit tiles (tests, tuning)."""
    return _compression(int(block_size), float(softmax_scale), configs, query, k_cmp, v_cmp, cu_seqlens)


@kernel_registry.register("nsa_compression", Platform.TRITON, Backend.GPU)
def nsa_compression(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens):
    """(o_cmp [B, T, HQ, Dv] in query's dtype, lse_cmp float32 [B, T, HQ]).

    query [B, T, HQ, Dk]; k_cmp [B, TC, H, Dk], v_cmp [B, TC, H, Dv] (mean-pooled blocks,
    packed per sequence with cu_seqlens). Token t sees block c iff (c + 1) * l - 1 <= its
    position; none: o = 0, lse = -inf. Differentiable in query, k_cmp, v_cmp, through
    both outputs.
    """
    configs = default_configs(query, k_cmp, v_cmp)
    return nsa_compression_with(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens, configs)
