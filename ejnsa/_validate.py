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


def check_window_gate(window_size, g_swa) -> int:
    """window_size (checked) with the gate it needs: g_swa exactly when window_size > 0."""
    window_size = check_window_size(window_size)
    if window_size > 0 and g_swa is None:
        raise ValueError(f"window_size={window_size} > 0 needs the gate g_swa [B, TQ, HQ], got g_swa=None")
    if window_size == 0 and g_swa is not None:
        raise ValueError("g_swa was given but window_size is 0; pass window_size > 0 to use the sliding-window branch")
    return window_size


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
    """query [B, TQ, HQ, Dk], key [B, TK, H, Dk], value [B, TK, H, Dv], one float dtype,
    TQ <= TK (the queries are the last TQ positions of the keys)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        _require_float(name, x)
    expect = {"query": "[B, TQ, HQ, Dk]", "key": "[B, TK, H, Dk]", "value": "[B, TK, H, Dv]"}
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape {expect[name]} (rank 4), got shape {tuple(x.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"query, key and value must share one dtype, got query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    b, t, hq, dk = query.shape
    if b < 1 or t < 1:
        raise ValueError(f"query must have B >= 1 and TQ >= 1, got shape {tuple(query.shape)}")
    if key.shape[0] != b:
        raise ValueError(f"key must have shape [B, TK, H, Dk] with B = {b} of query, got {tuple(key.shape)}")
    if key.shape[1] < t:
        raise ValueError(
            f"query has more tokens (TQ={t}) than key (TK={key.shape[1]}): the queries must be the last TQ "
            f"positions of the keys, TQ <= TK (query {tuple(query.shape)}, key {tuple(key.shape)})"
        )
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must have shape [B, TK, H, Dv] with B, TK, H = {tuple(key.shape[:3])} of key, got {tuple(value.shape)}")
    h = key.shape[2]
    if h < 1 or hq % h:
        raise ValueError(f"query heads HQ={hq} must be a multiple of key/value heads H={h} (query {tuple(query.shape)}, key {tuple(key.shape)})")
    if key.shape[3] != dk:
        raise ValueError(f"key head dim must equal query head dim Dk={dk}, got key shape {tuple(key.shape)}")
    for name, d in (("query/key head dim Dk", dk), ("value head dim Dv", value.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}], got {d}")


def check_key_length(key_length, query) -> int:
    """TK of the functions that see only compressed keys: None means TK = TQ."""
    if key_length is None:
        return query.shape[1]
    key_length = _require_int("key_length", key_length)
    if key_length < query.shape[1]:
        raise ValueError(
            f"key_length must be >= the query's TQ={query.shape[1]} (the queries are the last TQ of "
            f"key_length positions), got {key_length}"
        )
    return key_length


def check_gate(name: str, gate, query):
    """Gates are [B, TQ, HQ] floats; None passes through."""
    if gate is None:
        return None
    _require_float(name, gate)
    if tuple(gate.shape) != tuple(query.shape[:3]):
        raise ValueError(f"{name} must have shape [B, TQ, HQ] = {tuple(query.shape[:3])}, got {tuple(gate.shape)}")
    return gate


def _check_cu(name: str, cu):
    _require_int_array(name, cu)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N+1] with N >= 1, got {tuple(cu.shape)}")
    return jnp.asarray(cu).astype(jnp.int32)


def check_cu_seqlens(cu_seqlens, batch: int, num_queries: int | None = None, num_keys: int | None = None):
    """None, one int array [N+1] (queries and keys packed alike: TQ == TK), or a pair
    (cu_q, cu_k) of int arrays [N+1] (sequence i's queries are the last cu_q[i+1] - cu_q[i]
    positions of its cu_k[i+1] - cu_k[i] keys; where the values can be seen, no sequence
    may have more queries than keys)."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size B == 1 (sequences are packed along T), got B={batch}")
    if isinstance(cu_seqlens, (tuple, list)):
        if len(cu_seqlens) != 2:
            raise ValueError(f"cu_seqlens must be one array [N+1] or a pair (cu_q, cu_k), got {len(cu_seqlens)} items")
        cu_q, cu_k = _check_cu("cu_seqlens[0] (cu_q)", cu_seqlens[0]), _check_cu("cu_seqlens[1] (cu_k)", cu_seqlens[1])
        if cu_q.shape != cu_k.shape:
            raise ValueError(f"cu_q and cu_k must have the same shape [N+1], got {tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
        _check_cu_values(cu_q, cu_k)
        return cu_q, cu_k
    if not hasattr(cu_seqlens, "shape"):
        raise TypeError(f"cu_seqlens must be an integer array [N+1] or a pair (cu_q, cu_k), got {type(cu_seqlens).__name__}")
    cu = _check_cu("cu_seqlens", cu_seqlens)
    if num_queries is not None and num_keys is not None and num_queries != num_keys:
        raise ValueError(
            f"one cu_seqlens array packs queries and keys alike, which needs TQ == TK (got TQ={num_queries}, "
            f"TK={num_keys}); pass cu_seqlens=(cu_q, cu_k)"
        )
    return cu


def _check_cu_values(cu_q, cu_k) -> None:
    """A sequence with more queries than keys, where the values can be seen (outside jit).
    Other malformed values are read as docs/semantics.md ("Bad values") says, as under jit."""
    try:
        q, k = np.asarray(cu_q), np.asarray(cu_k)
    except Exception:  # a tracer: the values are not known here
        return
    bad = np.flatnonzero(np.diff(q) > np.diff(k))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"cu_seqlens: sequence {i} has more queries ({int(q[i + 1] - q[i])}) than keys "
                         f"({int(k[i + 1] - k[i])}); cu_q {q.tolist()}, cu_k {k.tolist()}")


def check_block_indices(block_indices, query, key):
    _require_int_array("block_indices", block_indices)
    b, t = query.shape[:2]
    h = key.shape[2]
    if block_indices.ndim != 4 or tuple(block_indices.shape[:3]) != (b, t, h) or block_indices.shape[3] < 1:
        raise ValueError(f"block_indices must have shape [B, TQ, H, S] = [{b}, {t}, {h}, S>=1], got {tuple(block_indices.shape)}")
    return jnp.asarray(block_indices)


def check_block_counts(block_counts, query, key):
    """An int S >= 1, or an integer array [B, TQ, H]."""
    if isinstance(block_counts, numbers.Integral) and not isinstance(block_counts, bool):
        return _require_int("block_counts", block_counts, minimum=1)
    if not hasattr(block_counts, "shape"):
        raise TypeError(f"block_counts must be an int or an integer array [B, TQ, H], got {type(block_counts).__name__}")
    _require_int_array("block_counts", block_counts)
    want = (query.shape[0], query.shape[1], key.shape[2])
    if tuple(block_counts.shape) != want:
        raise ValueError(f"block_counts array must have shape [B, TQ, H] = {list(want)}, got {tuple(block_counts.shape)}")
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
            f"k_cmp must have at least {min_rows} compressed rows (what mean_pooling returns for this key "
            f"length, block_size and cu_seqlens), got {k_cmp.shape[1]}"
        )
    if v_cmp is not None:
        if tuple(v_cmp.shape[:3]) != tuple(k_cmp.shape[:3]) or not 1 <= v_cmp.shape[3] <= MAX_HEAD_DIM:
            raise ValueError(f"v_cmp must have shape [B, TC, H, Dv] = {tuple(k_cmp.shape[:3])} + (Dv,), got {tuple(v_cmp.shape)}")
    if not 1 <= dk <= MAX_HEAD_DIM:
        raise ValueError(f"query head dim Dk must be in [1, {MAX_HEAD_DIM}], got {dk}")


def check_query(query):
    _require_float("query", query)
    if query.ndim != 4 or query.shape[0] < 1 or query.shape[1] < 1:
        raise ValueError(f"query must have shape [B, TQ, HQ, Dk] with B, TQ >= 1, got {tuple(query.shape)}")


def check_pooling_input(x):
    _require_float("x", x)
    if x.ndim != 4 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have shape [B, T, H, D] with B, T >= 1, got {tuple(x.shape)}")


def check_context(context_axis, context_layout, query, key, cu_seqlens) -> None:
    """Context parallelism: an axis name, a known layout, local blocks of one T (queries
    and keys alike), a single global cu_seqlens."""
    from ._context import LAYOUTS, axis_size

    if not isinstance(context_axis, str):
        raise TypeError(f"context_axis must be a mesh axis name (str) or None, got {type(context_axis).__name__}")
    if context_layout not in LAYOUTS:
        raise ValueError(f"context_layout must be one of {LAYOUTS}, got {context_layout!r}")
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"with context_axis, query and key are this shard's blocks of the same T (TQ == TK), got "
            f"TQ={query.shape[1]} and TK={key.shape[1]}"
        )
    if isinstance(cu_seqlens, tuple):
        raise ValueError("with context_axis, cu_seqlens is the global [N+1] array (a pair (cu_q, cu_k) is not supported)")
    axis_size(context_axis)  # bound by the enclosing shard_map
    if context_layout == "balanced" and query.shape[1] % 2:
        raise ValueError(f"context_layout='balanced' needs an even number of tokens per shard (two chunks), got "
                         f"{query.shape[1]}")
