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

from .._varlen import segment_tiles

# float32 matmuls at full precision: this path is the reference the kernels are checked
# against, and on GPUs XLA's default for float32 would be TF32.
HIGHEST = lax.Precision.HIGHEST


def einsum(spec: str, *ops: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *ops, precision=HIGHEST, preferred_element_type=jnp.float32)


def map_query_chunks(body: Callable, chunk: int, batched: tuple, per_token: tuple, seq_len: int,
                     bounds: jax.Array | None = None):
    """Applies `body(*batched_chunk, *per_token_chunk)` to chunks of tokens.

    `batched` arrays have T on axis 1 ([B, T, ...]); `per_token` arrays have T on axis 0
    ([T]). The outputs (a pytree of [B, chunk, ...] arrays) are stitched back to [B, T, ...].

    Without `bounds` the chunks are consecutive (T padded up to a multiple of `chunk`;
    padded tokens are computed and then dropped, so bodies must stay finite on them).
    With `bounds` (segment boundaries, `_varlen.token_segments`) no chunk straddles a
    segment: a chunk holds tokens of one packed sequence (or of the span outside them),
    its padding rows repeat its first token, and the body may mask the keys of every other
    sequence, which keeps a NaN in one sequence (even in a cotangent) out of the others'
    gradients: autodiff's products then never pair two sequences.
    """
    chunk = max(1, min(chunk, seq_len))
    if bounds is None:
        return _consecutive_chunks(body, chunk, batched, per_token, seq_len)
    first, count, _, n = segment_tiles(bounds, seq_len, chunk)
    i = jnp.arange(chunk, dtype=jnp.int32)[None, :]
    first = jnp.minimum(first, seq_len - 1)[:, None]
    tok = jnp.where(i < count[:, None], first + i, first)  # [n, chunk]
    dest = jnp.where(i < count[:, None], first + i, seq_len).reshape(-1)  # seq_len: dropped
    xs = tuple(jnp.moveaxis(jnp.take(x, tok, axis=1), 1, 0) for x in batched)  # [n, B, chunk, ...]
    xs += tuple(jnp.take(x, tok, axis=0) for x in per_token)  # [n, chunk]
    outs = lax.map(jax.checkpoint(lambda args: body(*args)), xs)

    def join(y):  # [n, B, chunk, ...] -> [B, T, ...]
        y = jnp.moveaxis(y, 0, 1).reshape((y.shape[1], n * chunk) + y.shape[3:])
        return jnp.zeros((y.shape[0], seq_len) + y.shape[2:], y.dtype).at[:, dest].set(y, mode="drop")

    return jax.tree.map(join, outs)


def _consecutive_chunks(body: Callable, chunk: int, batched: tuple, per_token: tuple, seq_len: int):
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


def masked_softmax_stats(s: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Softmax weights over the last axis where `mask`, safe when nothing is unmasked.

    Returns (p, denom, lse, has): p unnormalised weights (0 where masked, selected, never
    multiplied), their sum, the log-sum-exp (-inf for an empty row) and whether the row
    sees anything. `has` comes from the mask, not from the values, so that a NaN score
    gives a NaN row rather than an "empty" one (docs/semantics.md, "Bad values").
    """
    has = jnp.any(mask, axis=-1)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    # The max only keeps exp() in range; the result does not depend on it, so no
    # gradient needs to flow through it.
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1)
    lse = jnp.where(has, m[..., 0] + jnp.log(jnp.where(has, denom, 1.0)), -jnp.inf)
    return p, denom, lse, has


def normalise(o: jax.Array, denom: jax.Array, has: jax.Array) -> jax.Array:
    """o / denom on the row axis, 0 for rows that see nothing."""
    return jnp.where(has[..., None], o / jnp.where(has, denom, 1.0)[..., None], 0.0)


def finite_part(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x with its non-finite entries set to 0, which vectors x[..., :] held one).

    The branches whose keys are shared by a chunk of queries (window, compression) compute
    with the finite part of the keys and values, so that a masked weight of 0 never meets a
    NaN in a product, in the forward or in autodiff's backward; `mark_bad` then gives NaN
    to the rows that did attend a non-finite one. Finite inputs come back unchanged, bit
    for bit.
    """
    ok = jnp.isfinite(x)
    return jnp.where(ok, x, 0.0), ~jnp.all(ok, axis=-1)


def mark_bad(o, lse, has, mask, kv_bad):
    """NaN where the contract says: o and lse of a row that attends a key whose key or
    value holds a non-finite value (a NaN query gives NaN by itself). The other rows are
    untouched (select, not multiply).

    o [B, C, H, G, Dv], lse / has [B, C, H, G], mask [C, J] (the same for every head and
    batch row), kv_bad [B, J, H].
    """
    hits = jnp.einsum("cj,bjh->bch", mask.astype(jnp.float32), kv_bad.astype(jnp.float32)) > 0
    bad = has & hits[..., None]
    return jnp.where(bad[..., None], jnp.nan, o), jnp.where(bad, jnp.nan, lse)
