"""Per-token and per-sequence metadata for packed (varlen) batches.

A packed batch has B == 1 and `cu_seqlens` [N+1] (FlashAttention convention). Every
implementation needs the same facts about it: where a token's sequence starts, the
token's position inside it, and where the sequence's compressed blocks start in the
packed `k_cmp`. They are computed here once, in jnp, so they work under `jit` with
traced `cu_seqlens` and serve the XLA code and the Triton launchers alike.

Malformed `cu_seqlens` cannot be detected under `jit`; the arithmetic below clips so
that every derived index stays inside the arrays (garbage in, bounded garbage out).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_compressed_rows(seq_len: int, block_size: int, num_seqs: int | None) -> int:
    """Static number of rows of `mean_pooling`'s output.

    Without cu_seqlens: ceil(T / l). With N packed sequences the true count,
    sum_i ceil(len_i / l), depends on values, so the static shape is its upper bound
    min(T, T // l + N) (each sequence adds at most one partial block) and the rows past
    the true count are zero.
    """
    if num_seqs is None:
        return cdiv(seq_len, block_size)
    return max(1, min(seq_len, seq_len // block_size + num_seqs))


class TokenInfo(NamedTuple):
    """Per-token facts, each int32 [T]."""

    pos: jax.Array  # position of the token inside its sequence
    bos: jax.Array  # index (in the packed T axis) of its sequence's first token
    seq_len: jax.Array  # length of its sequence
    boc: jax.Array  # row of its sequence's first compressed block in packed k_cmp


class SeqInfo(NamedTuple):
    """Per-sequence facts, each int32 [N]."""

    bos: jax.Array
    seq_len: jax.Array
    boc: jax.Array  # first compressed row
    num_blocks: jax.Array  # ceil(len / l)


def sequence_info(cu_seqlens: jax.Array | None, seq_len: int, block_size: int) -> SeqInfo:
    """Facts per sequence; without cu_seqlens a single sequence of length T."""
    if cu_seqlens is None:
        one = lambda x: jnp.full((1,), x, jnp.int32)
        return SeqInfo(one(0), one(seq_len), one(0), one(cdiv(seq_len, block_size)))
    cu = jnp.clip(cu_seqlens.astype(jnp.int32), 0, seq_len)
    bos = cu[:-1]
    lens = jnp.maximum(cu[1:] - bos, 0)
    nblk = (lens + block_size - 1) // block_size
    boc = jnp.cumsum(nblk) - nblk
    return SeqInfo(bos, lens, boc.astype(jnp.int32), nblk.astype(jnp.int32))


def token_info(cu_seqlens: jax.Array | None, seq_len: int, block_size: int) -> TokenInfo:
    """Facts per token of the T axis (shared by all batch rows when cu_seqlens is None)."""
    t = jnp.arange(seq_len, dtype=jnp.int32)
    if cu_seqlens is None:
        zeros = jnp.zeros_like(t)
        return TokenInfo(t, zeros, jnp.full_like(t, seq_len), zeros)
    seqs = sequence_info(cu_seqlens, seq_len, block_size)
    n = seqs.bos.shape[0]
    # side="right" puts a token at a boundary into the sequence that starts there, and
    # skips empty sequences (whose start equals the next one's).
    sid = jnp.searchsorted(cu_seqlens[1:].astype(jnp.int32), t, side="right")
    sid = jnp.clip(sid, 0, n - 1)
    bos = seqs.bos[sid]
    return TokenInfo(jnp.maximum(t - bos, 0), bos, seqs.seq_len[sid], seqs.boc[sid])
