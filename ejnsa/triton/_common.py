"""What every Triton kernel file of ejnsa shares: the base-2 softmax constant, head-dim
tile padding, the dot precision, and the flags of non-finite keys.

One definition each, so that every kernel agrees on them (fla's ops/utils plays this part).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

# log2(e). Kernels run the softmax in base 2 (exp2 is one instruction): scores are scaled
# by softmax_scale * LOG2E, and a natural-log lse is multiplied by LOG2E to compare with
# them. A tl.constexpr so that kernels may read it as a global; `.value` on the host.
LOG2E = tl.constexpr(math.log2(math.e))


def log2_scale(softmax_scale: float) -> np.float32:
    """softmax_scale in log2 units, as the fp32 scalar a kernel takes."""
    return np.float32(softmax_scale * LOG2E.value)


def head_tile(d: int) -> int:
    """The tile a head dim is padded to: a power of two, and >= 16 because tl.dot needs it."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`.

    float32: "tf32x3" (three TF32 products, about float32 accuracy, still on tensor cores);
    plain TF32 would leave ~1e-3 relative error, which a float32 user does not expect.
    16-bit operands ignore the setting ("tf32" is Triton's default).
    """
    return "tf32x3" if jnp.dtype(dtype) == jnp.float32 else "tf32"



def finite_part(x: jax.Array) -> jax.Array:
    """x with its NaN and Inf entries set to 0: what the kernels compute with, so that a
    masked weight of 0 never meets a NaN in a product (bitwise x for finite x)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def bad_keys(key: jax.Array, value: jax.Array) -> jax.Array:
    """int32 [B, TK, H]: 1 where the key or the value vector of (b, j, h) holds a NaN or Inf."""
    return (jnp.any(~jnp.isfinite(key), axis=-1) | jnp.any(~jnp.isfinite(value), axis=-1)).astype(jnp.int32)


def bad_counts(bad: jax.Array) -> jax.Array:
    """Running count of `bad_keys` [B, TK, H] over the global keys g = b * TK + j:
    int32 [B * TK + 1, H], entry (g, h) counting the flagged keys before g, so that two
    lookups tell whether a run of keys [g0, g1) holds one (the rows that attend a
    non-finite key are found this way in XLA, in the forward launchers beside the kernels)."""
    flat = bad.reshape(-1, bad.shape[-1])
    return jnp.concatenate([jnp.zeros((1, flat.shape[1]), jnp.int32), jnp.cumsum(flat, axis=0, dtype=jnp.int32)])


def mark_rows_nan(o: jax.Array, lse: jax.Array, bad_rows: jax.Array, has_keys: jax.Array):
    """A forward kernel's o [B, T, HQ, V] and lse [B, T, HQ] with NaN where the row is NaN
    (docs/semantics.md, "Bad values"): `bad_rows` (bool [B, T, HQ]: it attends a non-finite
    key or value, which the kernel saw as 0) or `has_keys` (bool [B, T, HQ]: it sees at
    least one key) while the kernel found no weight (lse = -inf: an infinite query entry).
    A `jnp.where` after the kernel, not in it: XLA fuses it into whatever reads o next (the
    gates' sum), the kernel stays that of finite inputs, and a marked row passes no
    gradient back."""
    nan = bad_rows | (has_keys & (lse == -jnp.inf))
    return jnp.where(nan[..., None], jnp.asarray(jnp.nan, o.dtype), o), jnp.where(nan, jnp.nan, lse)


def per_query_head(rows: jax.Array, group: int) -> jax.Array:
    """[B, T, H] -> [B, T, H * group]: each KV head's entry for its query heads. Inside a
    launcher only (on a shard, heads agree); outside, the reshape would tie query heads to
    KV heads and let a query-head sharding that H does not divide propagate as sub-axes."""
    return jnp.repeat(rows, group, axis=2)
