"""Argument checks for the public functions (docs/semantics.md, "Bad input").

Everything visible at trace time (ranks, shapes, dtypes, static ints) is checked here
and reported as ValueError (TypeError for a wrong dtype or Python type) naming the
argument, what was expected and what was given. Values hidden under `jit` (index
contents, cu_seqlens contents) are made harmless by the implementations instead.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_HEAD_DIM = 256


def _dtype_name(x) -> str:
    return str(getattr(x, "dtype", type(x).__name__))


def _require_array(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a jax or numpy array, got {type(x).__name__}")


def _require_float(name: str, x) -> None:
    _require_array(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype bfloat16, float16 or float32, got {_dtype_name(x)}")


def _require_int_array(name: str, x) -> None:
    _require_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {_dtype_name(x)}")


def _require_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_block_size(block_size) -> int:
    block_size = _require_int("block_size", block_size)
    if not (16 <= block_size <= 256) or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    return block_size


def check_window_size(window_size) -> int:
    return _require_int("window_size", window_size, minimum=0)


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return float(head_dim) ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(
            f"softmax_scale must be a Python float or None, got {type(softmax_scale).__name__} "
            "(it is a static kernel parameter, not an array)"
        )
    scale = float(softmax_scale)
    if not np.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {scale}")
    return scale


def check_attention_inputs(query, key, value) -> None:
    """query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv], one float dtype."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        _require_float(name, x)
    expect = {"query": "[B, T, HQ, Dk]", "key": "[B, T, H, Dk]", "value": "[B, T, H, Dv]"}
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape {expect[name]} (rank 4), got shape {tuple(x.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"query, key and value must share one dtype, got query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    b, t, hq, dk = query.shape
    if b < 1 or t < 1:
        raise ValueError(f"query must have B >= 1 and T >= 1, got shape {tuple(query.shape)}")
    if key.shape[:2] != (b, t):
        raise ValueError(f"key must have shape [B, T, H, Dk] with B, T = {(b, t)} of query, got {tuple(key.shape)}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must have shape [B, T, H, Dv] with B, T, H = {tuple(key.shape[:3])} of key, got {tuple(value.shape)}")
    h = key.shape[2]
    if h < 1 or hq % h:
        raise ValueError(f"query heads HQ={hq} must be a multiple of key/value heads H={h} (query {tuple(query.shape)}, key {tuple(key.shape)})")
    if key.shape[3] != dk:
        raise ValueError(f"key head dim must equal query head dim Dk={dk}, got key shape {tuple(key.shape)}")
    for name, d in (("query/key head dim Dk", dk), ("value head dim Dv", value.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}], got {d}")


def check_gate(name: str, gate, query):
    """Gates are [B, T, HQ] floats; None passes through."""
    if gate is None:
        return None
    _require_float(name, gate)
    if tuple(gate.shape) != tuple(query.shape[:3]):
        raise ValueError(f"{name} must have shape [B, T, HQ] = {tuple(query.shape[:3])}, got {tuple(gate.shape)}")
    return gate


def check_cu_seqlens(cu_seqlens, batch: int):
    if cu_seqlens is None:
        return None
    _require_int_array("cu_seqlens", cu_seqlens)
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size B == 1 (sequences are packed along T), got B={batch}")
    return jnp.asarray(cu_seqlens).astype(jnp.int32)


def check_block_indices(block_indices, query, key):
    _require_int_array("block_indices", block_indices)
    b, t = query.shape[:2]
    h = key.shape[2]
    if block_indices.ndim != 4 or tuple(block_indices.shape[:3]) != (b, t, h) or block_indices.shape[3] < 1:
        raise ValueError(f"block_indices must have shape [B, T, H, S] = [{b}, {t}, {h}, S>=1], got {tuple(block_indices.shape)}")
    return jnp.asarray(block_indices)


def check_block_counts(block_counts, query, key):
    """An int S >= 1, or an integer array [B, T, H]."""
    if isinstance(block_counts, numbers.Integral) and not isinstance(block_counts, bool):
        return _require_int("block_counts", block_counts, minimum=1)
    if not hasattr(block_counts, "shape"):
        raise TypeError(f"block_counts must be an int or an integer array [B, T, H], got {type(block_counts).__name__}")
    _require_int_array("block_counts", block_counts)
    want = (query.shape[0], query.shape[1], key.shape[2])
    if tuple(block_counts.shape) != want:
        raise ValueError(f"block_counts array must have shape [B, T, H] = {list(want)}, got {tuple(block_counts.shape)}")
    return jnp.asarray(block_counts)


def check_compressed(k_cmp, v_cmp, query, min_rows: int):
    """k_cmp [B, TC, H, Dk] (and v_cmp [B, TC, H, Dv]) as mean_pooling returns them."""
    names = (("k_cmp", k_cmp),) if v_cmp is None else (("k_cmp", k_cmp), ("v_cmp", v_cmp))
    for name, x in names:
        _require_float(name, x)
        if x.dtype != query.dtype:
            raise TypeError(f"{name} must have query's dtype {query.dtype}, got {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, TC, H, D] (rank 4), got {tuple(x.shape)}")
    b, _, hq, dk = query.shape
    h = k_cmp.shape[2]
    if k_cmp.shape[0] != b or h < 1 or hq % h or k_cmp.shape[3] != dk:
        raise ValueError(
            f"k_cmp must have shape [B={b}, TC, H, Dk={dk}] with HQ={hq} a multiple of H, got {tuple(k_cmp.shape)}"
        )
    if k_cmp.shape[1] < min_rows:
        raise ValueError(
            f"k_cmp must have at least {min_rows} compressed rows (what mean_pooling returns for this T, "
            f"block_size and cu_seqlens), got {k_cmp.shape[1]}"
        )
    if v_cmp is not None:
        if tuple(v_cmp.shape[:3]) != tuple(k_cmp.shape[:3]) or not 1 <= v_cmp.shape[3] <= MAX_HEAD_DIM:
            raise ValueError(f"v_cmp must have shape [B, TC, H, Dv] = {tuple(k_cmp.shape[:3])} + (Dv,), got {tuple(v_cmp.shape)}")
    if not 1 <= dk <= MAX_HEAD_DIM:
        raise ValueError(f"query head dim Dk must be in [1, {MAX_HEAD_DIM}], got {dk}")


def check_query(query):
    _require_float("query", query)
    if query.ndim != 4 or query.shape[0] < 1 or query.shape[1] < 1:
        raise ValueError(f"query must have shape [B, T, HQ, Dk] with B, T >= 1, got {tuple(query.shape)}")


def check_pooling_input(x):
    _require_float("x", x)
    if x.ndim != 4 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have shape [B, T, H, D] with B, T >= 1, got {tuple(x.shape)}")
