"""Every "Bad input" error of docs/semantics.md: ValueError (TypeError for dtypes) naming the argument.

Each case starts from valid arguments (checked once with jax.eval_shape, which traces without
compiling) and spoils one of them. Errors must come at trace time, also under jit, and never
as an AssertionError.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejnsa

B, T, HQ, H, DK, DV, L = 1, 40, 4, 2, 32, 16, 16
TC = 3  # ceil(T / L)


def _arrays():
    rng = np.random.default_rng(0)

    def r(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return dict(
        q=r(B, T, HQ, DK), k=r(B, T, H, DK), v=r(B, T, H, DV),
        g=r(B, T, HQ), kc=r(B, TC, H, DK), vc=r(B, TC, H, DV),
        bi=jnp.asarray(rng.integers(-1, 3, size=(B, T, H, 2)).astype(np.int32)),
        bc=jnp.asarray(rng.integers(0, 3, size=(B, T, H)).astype(np.int32)),
        cu=jnp.asarray([0, 10, 40], jnp.int32),
    )


A = _arrays()

# Valid keyword arguments per public function (positional names as in docs/semantics.md).
VALID = {
    "native_sparse_attention": dict(
        query=A["q"], key=A["k"], value=A["v"], g_cmp=A["g"], g_slc=A["g"], g_swa=A["g"],
        block_indices=None, block_counts=2, block_size=L, window_size=8, softmax_scale=None,
        cu_seqlens=None, platform="xla"),
    "apply_native_sparse_attention": dict(
        query=A["q"], key=A["k"], value=A["v"], block_indices=A["bi"], block_counts=A["bc"],
        block_size=L, softmax_scale=None, cu_seqlens=None, platform="xla"),
    "mean_pooling": dict(x=A["k"], block_size=L, cu_seqlens=None),
    "nsa_compression": dict(
        query=A["q"], k_cmp=A["kc"], v_cmp=A["vc"], block_size=L, softmax_scale=None,
        cu_seqlens=None, platform="xla"),
    "nsa_topk": dict(
        query=A["q"], k_cmp=A["kc"], block_counts=2, block_size=L, softmax_scale=None,
        cu_seqlens=None, platform="xla"),
    "sliding_window_attention": dict(
        query=A["q"], key=A["k"], value=A["v"], window_size=8, softmax_scale=None,
        cu_seqlens=None, platform="xla"),
}

ALL = sorted(VALID)
WITH_QKV = ["native_sparse_attention", "apply_native_sparse_attention",
            "sliding_window_attention"]
WITH_Q = WITH_QKV + ["nsa_compression", "nsa_topk"]
WITH_PLATFORM = [f for f in ALL if f != "mean_pooling"]
WITH_BLOCK_SIZE = [f for f in ALL if f != "sliding_window_attention"]


def _call(fn, **changes):
    kwargs = dict(VALID[fn], **changes)
    return getattr(ejnsa, fn)(**kwargs)


@pytest.mark.parametrize("fn", ALL)
def test_valid_baseline_traces(fn):
    # The spoiled cases below differ from these in exactly one argument.
    jax.eval_shape(lambda: _call(fn))


def _expect(exc, names, fn, **changes):
    """`fn(**changes)` raises `exc` whose message names one of `names` (a str or tuple)."""
    names = (names,) if isinstance(names, str) else names
    with pytest.raises(exc) as info:
        _call(fn, **changes)
    msg = str(info.value)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), (
        f"{type(info.value).__name__} does not name {' or '.join(names)}: {msg!r}")
    return msg


def _r(*shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape).astype(np.float32)
                       ).astype(dtype)


# =============================================================================== q, k, v shapes


@pytest.mark.parametrize("fn", WITH_Q)
def test_query_rank(fn):
    _expect(ValueError, "query", fn, query=A["q"][0])
    _expect(ValueError, "query", fn, query=A["q"][None])


@pytest.mark.parametrize("fn", WITH_Q)
def test_empty_sequence_T0(fn):
    changes = dict(query=_r(B, 0, HQ, DK))
    if fn in WITH_QKV:
        changes.update(key=_r(B, 0, H, DK), value=_r(B, 0, H, DV))
    if fn == "native_sparse_attention":
        changes.update(g_cmp=_r(B, 0, HQ), g_slc=_r(B, 0, HQ), g_swa=_r(B, 0, HQ))
    if fn == "apply_native_sparse_attention":
        changes.update(block_indices=jnp.zeros((B, 0, H, 2), jnp.int32),
                       block_counts=jnp.zeros((B, 0, H), jnp.int32))
    if fn in ("nsa_compression", "nsa_topk"):
        changes.update(k_cmp=_r(B, 0, H, DK))
        if fn == "nsa_compression":
            changes.update(v_cmp=_r(B, 0, H, DV))
    _expect(ValueError, ("query", "T"), fn, **changes)


@pytest.mark.parametrize("fn", WITH_QKV)
def test_key_value_rank(fn):
    _expect(ValueError, "key", fn, key=A["k"][0])
    _expect(ValueError, "value", fn, value=A["v"][..., None])


@pytest.mark.parametrize("fn", WITH_QKV)
def test_key_value_batch_and_length(fn):
    _expect(ValueError, ("key", "query"), fn, key=_r(2, T, H, DK))
    _expect(ValueError, ("key", "query"), fn, key=_r(B, T + 1, H, DK))
    _expect(ValueError, ("value", "key"), fn, value=_r(B, T - 1, H, DV))
    _expect(ValueError, ("value", "key"), fn, value=_r(B, T, H * 2, DV))


@pytest.mark.parametrize("fn", WITH_QKV)
def test_heads_must_divide(fn):
    # HQ = 4 query heads cannot share H = 3 KV heads.
    _expect(ValueError, ("query", "key"), fn, key=_r(B, T, 3, DK), value=_r(B, T, 3, DV))


@pytest.mark.parametrize("fn", WITH_QKV)
def test_head_dims(fn):
    _expect(ValueError, ("key", "query"), fn, key=_r(B, T, H, DK + 8))
    # Dk, Dv <= 256
    _expect(ValueError, ("query", "key"), fn, query=_r(B, T, HQ, 264), key=_r(B, T, H, 264))
    _expect(ValueError, "value", fn, value=_r(B, T, H, 264))


@pytest.mark.parametrize("fn", ["nsa_compression", "nsa_topk"])
def test_compressed_keys(fn):
    _expect(ValueError, "k_cmp", fn, k_cmp=A["kc"][0])
    _expect(ValueError, ("k_cmp", "query"), fn, k_cmp=_r(B, TC, 3, DK))  # HQ % 3 != 0
    _expect(ValueError, ("k_cmp", "query"), fn, k_cmp=_r(B, TC, H, DK + 8))
    _expect(ValueError, ("k_cmp", "query"), fn, k_cmp=_r(2, TC, H, DK))
    # docs/semantics.md: fewer rows than ceil(T/l) compressed blocks is rejected.
    _expect(ValueError, "k_cmp", fn, k_cmp=_r(B, TC - 1, H, DK))


def test_compressed_values():
    fn = "nsa_compression"
    _expect(ValueError, "v_cmp", fn, v_cmp=A["vc"][0])
    _expect(ValueError, ("v_cmp", "k_cmp"), fn, v_cmp=_r(B, TC - 1, H, DV))
    _expect(ValueError, ("v_cmp", "k_cmp"), fn, v_cmp=_r(B, TC, 1, DV))
    _expect(ValueError, "v_cmp", fn, v_cmp=_r(B, TC, H, 264))


def test_mean_pooling_shapes():
    _expect(ValueError, "x", "mean_pooling", x=A["k"][0])
    _expect(ValueError, "x", "mean_pooling", x=_r(B, 0, H, DK))


# =============================================================================== dtypes


@pytest.mark.parametrize("fn", WITH_Q)
@pytest.mark.parametrize("bad", ["float64", "int32", "float8"])
def test_query_dtype(fn, bad):
    q = {"float64": np.asarray(A["q"], np.float64), "int32": A["q"].astype(jnp.int32),
         "float8": A["q"].astype(jnp.float8_e4m3fn)}[bad]
    changes = dict(query=q)
    _expect(TypeError, "query", fn, **changes)


@pytest.mark.parametrize("fn", WITH_QKV)
def test_qkv_share_one_dtype(fn):
    _expect(TypeError, ("key", "query"), fn, key=A["k"].astype(jnp.bfloat16))
    _expect(TypeError, ("value", "query"), fn, value=A["v"].astype(jnp.float16))
    # Also when query itself is low precision.
    _expect(TypeError, ("key", "query"), fn, query=A["q"].astype(jnp.bfloat16),
            value=A["v"].astype(jnp.bfloat16))


@pytest.mark.parametrize("fn", ["nsa_compression", "nsa_topk"])
def test_compressed_dtype(fn):
    _expect(TypeError, ("k_cmp", "query"), fn, k_cmp=A["kc"].astype(jnp.int32))
    _expect(TypeError, ("k_cmp", "query"), fn, k_cmp=np.asarray(A["kc"], np.float64))


def test_mean_pooling_dtype():
    _expect(TypeError, "x", "mean_pooling", x=A["k"].astype(jnp.int32))
    _expect(TypeError, "x", "mean_pooling", x=np.asarray(A["k"], np.float64))


@pytest.mark.parametrize("gate", ["g_cmp", "g_slc", "g_swa"])
def test_gates(gate):
    fn = "native_sparse_attention"
    _expect(ValueError, gate, fn, **{gate: _r(B, T, H)})           # [B, T, H], not HQ
    _expect(ValueError, gate, fn, **{gate: _r(B, T, HQ, 1)})
    _expect(ValueError, gate, fn, **{gate: _r(B, T - 1, HQ)})
    _expect(TypeError, gate, fn, **{gate: A["g"].astype(jnp.int32)})
    _expect(TypeError, gate, fn, **{gate: np.asarray(A["g"], np.float64)})


def test_gates_may_use_another_float_dtype():
    out = jax.eval_shape(lambda: _call("native_sparse_attention",
                                       g_cmp=A["g"].astype(jnp.bfloat16),
                                       g_swa=A["g"].astype(jnp.float16)))
    assert out.dtype == jnp.float32 and out.shape == (B, T, HQ, DV)


# =============================================================================== indices, counts


@pytest.mark.parametrize("fn", ["native_sparse_attention", "apply_native_sparse_attention"])
def test_block_indices(fn):
    bi = A["bi"]
    _expect(ValueError, "block_indices", fn, block_indices=bi[..., 0])
    _expect(ValueError, "block_indices", fn, block_indices=jnp.zeros((B, T, 3, 2), jnp.int32))
    _expect(ValueError, "block_indices", fn, block_indices=jnp.zeros((B, T + 1, H, 2), jnp.int32))
    _expect(TypeError, "block_indices", fn, block_indices=bi.astype(jnp.float32))


@pytest.mark.parametrize("fn", ["native_sparse_attention", "apply_native_sparse_attention",
                                "nsa_topk"])
def test_block_counts(fn):
    extra = {"native_sparse_attention": dict(block_indices=A["bi"])}.get(fn, {})
    for bad in (0, -3):
        msg = _expect(ValueError, "block_counts", fn, block_counts=bad, **extra)
        assert str(bad) in msg, f"the message should say what came: {msg!r}"
    _expect(ValueError, "block_counts", fn, block_counts=A["bc"][..., None], **extra)
    _expect(ValueError, "block_counts", fn, block_counts=jnp.zeros((B, T, 3), jnp.int32), **extra)
    _expect(TypeError, "block_counts", fn, block_counts=A["bc"].astype(jnp.float32), **extra)
    _expect((TypeError, ValueError), "block_counts", fn, block_counts=2.0, **extra)


@pytest.mark.parametrize("fn", WITH_BLOCK_SIZE)
@pytest.mark.parametrize("bad", [0, 8, 48, 100, 512, -16])
def test_block_size(fn, bad):
    msg = _expect(ValueError, "block_size", fn, block_size=bad)
    assert str(bad) in msg, f"the message should say what came: {msg!r}"


@pytest.mark.parametrize("fn", WITH_BLOCK_SIZE)
def test_block_size_not_an_int(fn):
    _expect((TypeError, ValueError), "block_size", fn, block_size=16.0)


# =============================================================================== window, gates


def test_window_size():
    msg = _expect(ValueError, "window_size", "native_sparse_attention", window_size=-1)
    assert "-1" in msg
    _expect(ValueError, "window_size", "sliding_window_attention", window_size=-2)
    _expect((TypeError, ValueError), "window_size", "native_sparse_attention", window_size=8.0)


def test_window_needs_g_swa_and_g_swa_needs_window():
    fn = "native_sparse_attention"
    _expect(ValueError, ("g_swa", "window_size"), fn, g_swa=None, window_size=8)
    _expect(ValueError, ("g_swa", "window_size"), fn, window_size=0)


# =============================================================================== scale, platform


@pytest.mark.parametrize("fn", [f for f in ALL if f != "mean_pooling"])
def test_softmax_scale(fn):
    _expect((TypeError, ValueError), "softmax_scale", fn, softmax_scale="0.1")
    # docs/semantics.md: a JAX array is a TypeError (kernels take a compile-time constant).
    _expect(TypeError, "softmax_scale", fn, softmax_scale=jnp.float32(0.1))


@pytest.mark.parametrize("fn", WITH_PLATFORM)
def test_platform(fn):
    _expect(ValueError, "platform", fn, platform="cuda-ish")


# =============================================================================== cu_seqlens


def _packed(fn, batch=1):
    """k_cmp/v_cmp with the min(T, T // l + N) rows of the packed layout for A["cu"]."""
    n = min(T, T // L + len(A["cu"]) - 1)
    out = {}
    if fn in ("nsa_compression", "nsa_topk"):
        out["k_cmp"] = _r(batch, n, H, DK)
    if fn == "nsa_compression":
        out["v_cmp"] = _r(batch, n, H, DV)
    return out


@pytest.mark.parametrize("fn", ALL)
def test_cu_seqlens(fn):
    _expect(ValueError, "cu_seqlens", fn, cu_seqlens=A["cu"][None], **_packed(fn))  # rank 2
    _expect(TypeError, "cu_seqlens", fn, cu_seqlens=A["cu"].astype(jnp.float32), **_packed(fn))


@pytest.mark.parametrize("fn", ALL)
def test_cu_seqlens_needs_batch_one(fn):
    first = "x" if fn == "mean_pooling" else "query"
    changes = {first: jnp.concatenate([VALID[fn][first]] * 2)}
    for name in ("key", "value", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp", "block_indices",
                 "block_counts"):
        val = dict(VALID[fn], **_packed(fn)).get(name)
        if val is not None and not isinstance(val, int):
            changes[name] = jnp.concatenate([val] * 2)
    jax.eval_shape(lambda: _call(fn, **changes))  # B = 2 is fine without cu_seqlens
    _expect(ValueError, "cu_seqlens", fn, cu_seqlens=A["cu"], **changes)


def test_cu_seqlens_valid_baseline_traces():
    for fn in ALL:
        jax.eval_shape(lambda: _call(fn, cu_seqlens=A["cu"], **_packed(fn)))


# =============================================================================== under jit


def test_errors_under_jit():
    with pytest.raises(ValueError, match="block_size"):
        jax.jit(lambda q, k, v: ejnsa.native_sparse_attention(
            q, k, v, block_size=24, block_counts=2, platform="xla"))(A["q"], A["k"], A["v"])
    with pytest.raises(ValueError, match="g_cmp"):
        jax.jit(lambda q, k, v, g: ejnsa.native_sparse_attention(
            q, k, v, g_cmp=g, block_size=16, block_counts=2, platform="xla"))(
                A["q"], A["k"], A["v"], A["g"][..., :1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        jax.jit(lambda x, cu: ejnsa.mean_pooling(x, 16, cu))(jnp.concatenate([A["k"]] * 2),
                                                             A["cu"])
