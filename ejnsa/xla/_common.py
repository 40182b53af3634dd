"""Pieces shared by the XLA implementations: query chunking and a masked softmax.

Every implementation is wrapped in `jax.jit` (static: the Python ints and floats), so
that eager calls reuse the compiled loops instead of re-tracing them on every call.

Memory rule of the XLA path: nothing of size [T, T] or [T, HQ, T/l] ever exists. Each
operation walks the queries in chunks with `lax.map`; the chunk body is wrapped in
`jax.checkpoint`, so reverse mode stores only each chunk's inputs and recomputes the
per-chunk score tiles, and memory grows linearly in T.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# float32 matmuls at full precision: this path is the reference the kernels are checked
# against, and on GPUs XLA's default for float32 would be TF32.
HIGHEST = lax.Precision.HIGHEST


def einsum(spec: str, *ops: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *ops, precision=HIGHEST, preferred_element_type=jnp.float32)


def map_query_chunks(body: Callable, chunk: int, batched: tuple, per_token: tuple, seq_len: int):
    """Applies `body(*batched_chunk, *per_token_chunk)` to consecutive chunks of tokens.

    `batched` arrays have T on axis 1 ([B, T, ...]); `per_token` arrays have T on axis 0
    ([T]). T is padded up to a multiple of `chunk` (padded tokens are computed and then
    dropped; bodies must stay finite on them). The outputs (a pytree of [B, chunk, ...]
    arrays) are stitched back to [B, T, ...].
    """
    chunk = max(1, min(chunk, seq_len))
    n = -(-seq_len // chunk)
    pad = n * chunk - seq_len

    def split(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
        shape = x.shape[:axis] + (n, chunk) + x.shape[axis + 1 :]
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    xs = tuple(split(x, 1) for x in batched) + tuple(split(x, 0) for x in per_token)
    outs = lax.map(jax.checkpoint(lambda args: body(*args)), xs)

    def join(y):
        y = jnp.moveaxis(y, 0, 1)  # [B, n, chunk, ...]
        y = y.reshape((y.shape[0], n * chunk) + y.shape[3:])
        return y[:, :seq_len]

    return jax.tree.map(join, outs)


def masked_softmax_stats(s: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax weights over the last axis where `mask`, safe when nothing is unmasked.

    Returns (p, denom, lse): p unnormalised weights (0 where masked), their sum, and the
    log-sum-exp (-inf for an empty row). Every branch stays finite, so gradients through
    `jnp.where` never see inf * 0.
    """
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    # The max only keeps exp() in range; the result does not depend on it, so no
    # gradient needs to flow through it.
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1)
    has = denom > 0
    lse = jnp.where(has, m[..., 0] + jnp.log(jnp.where(has, denom, 1.0)), -jnp.inf)
    return p, denom, lse


def normalise(o: jax.Array, denom: jax.Array) -> jax.Array:
    """o / denom on the row axis, 0 for empty rows (denom == 0)."""
    has = denom > 0
    return jnp.where(has[..., None], o / jnp.where(has, denom, 1.0)[..., None], 0.0)
