"""Mean pooling of keys/values into compressed blocks (semantics.md piece 1), in XLA.

Both Triton and XLA pipelines use this one: it is a cheap gather-and-mean that XLA
fuses well, and its gradient (a scatter back to the tokens) comes from autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from .._varlen import num_compressed_rows, sequence_info


@kernel_registry.register("mean_pooling", Platform.XLA, Backend.ANY)
@functools.partial(jax.jit, static_argnums=(1,))
def mean_pooling(x: jax.Array, block_size: int, cu_seqlens: jax.Array | None) -> jax.Array:
    """x [B, T, H, D] -> [B, TC, H, D]; TC per `num_compressed_rows`."""
    batch, seq_len = x.shape[:2]
    num_seqs = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
    rows = num_compressed_rows(seq_len, block_size, num_seqs)
    seqs = sequence_info(cu_seqlens, seq_len, block_size)

    r = jnp.arange(rows, dtype=jnp.int32)
    # Which sequence each compressed row belongs to, and which of its blocks it is.
    sid = jnp.clip(jnp.searchsorted(seqs.boc + seqs.num_blocks, r, side="right"), 0, seqs.bos.shape[0] - 1)
    real = r < jnp.sum(seqs.num_blocks)
    start = seqs.bos[sid] + (r - seqs.boc[sid]) * block_size
    end = jnp.minimum(start + block_size, seqs.bos[sid] + seqs.seq_len[sid])
    count = jnp.where(real, jnp.clip(end - start, 1, block_size), 1)

    # Gather each row's tokens ([rows, l]) and average the valid ones in float32.
    tok = start[:, None] + jnp.arange(block_size, dtype=jnp.int32)[None, :]
    valid = real[:, None] & (tok < end[:, None])
    tok = jnp.clip(tok, 0, seq_len - 1)
    g = jnp.take(x, tok.reshape(-1), axis=1).reshape(batch, rows, block_size, *x.shape[2:])
    g = jnp.where(valid[None, :, :, None, None], g.astype(jnp.float32), 0.0)
    mean = g.sum(axis=2) / count[None, :, None, None].astype(jnp.float32)
    return mean.astype(x.dtype)
