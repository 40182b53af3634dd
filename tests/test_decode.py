"""Decoding with a KV cache (docs/decode.md): `init_nsa_cache`, `nsa_decode`, the NNX cache.

A prefill chunk followed by single-token steps must give, row by row, the rows of the full
call (`native_sparse_attention` on the row's whole sequence) with the same arguments, over
many steps and across block boundaries; rows of different lengths decode together
(`num_new`); the compressed cache equals mean pooling of the cached keys. The full call
itself is checked against the float64 reference elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejnsa

try:
    from ._util import rand, rand_gate
except ImportError:
    from _util import rand, rand_gate

L, S, W = 16, 3, 8


def _seq(seed, B, T, HQ, H, Dk, Dv, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, (B, T, HQ, Dk), dtype), rand(rng, (B, T, H, Dk), dtype), rand(rng, (B, T, H, Dv), dtype)
    return q, k, v, tuple(rand_gate(rng, (B, T, HQ), dtype) for _ in range(3))


def _full(q, k, v, gates, window, counts=S, cmp=True):
    g1, g2, g3 = gates
    return ejnsa.native_sparse_attention(q, k, v, g1 if cmp else None, g2, g3 if window else None, block_counts=counts,
                                         block_size=L, window_size=W if window else 0, platform="xla")


def _decode_fn(window, cmp=True):
    def step(cache, q, k, v, g1, g2, g3, counts, num_new):  # counts: an array, or S for None
        return ejnsa.nsa_decode(cache, q, k, v, g1 if cmp else None, g2, g3 if window else None,
                                block_counts=S if counts is None else counts, block_size=L,
                                window_size=W if window else 0, num_new=num_new, platform="xla")
    return jax.jit(step)


def _close(a, b, what, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), f"{what}: non-finite"
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err < tol, f"{what}: relative error {err:.2e}"


CASES = {  # name: (HQ, H, Dk, Dv, window, prompt, cmp)
    "G1": (2, 2, 16, 16, True, 20, True),
    "G3_DkDv": (6, 2, 16, 24, True, 1, True),
    "G16_nowindow": (16, 1, 16, 16, False, 33, True),
    "G2_no_gcmp": (4, 2, 16, 16, True, 16, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_steps_equal_full_call(case):
    """B = 2, T = 70 (past four block boundaries of l = 16), a prompt then one token per step."""
    HQ, H, Dk, Dv, window, prompt, cmp = CASES[case]
    B, T = 2, 70
    q, k, v, gates = _seq(1, B, T, HQ, H, Dk, Dv)
    want = _full(q, k, v, gates, window, cmp=cmp)
    step = _decode_fn(window, cmp)
    cache = ejnsa.init_nsa_cache(B, 80, H, Dk, Dv, block_size=L)
    outs = []
    for a, b in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:
        sl = lambda x: x[:, a:b]  # noqa: E731
        o, cache = step(cache, sl(q), sl(k), sl(v), *map(sl, gates), None, None)
        outs.append(o)
    _close(jnp.concatenate(outs, axis=1), want, case, 1e-5)
    # One compilation for the prompt's TN and one for TN = 1: the growing context never recompiles.
    assert step._cache_size() == (1 if prompt == 1 else 2)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [T, T])
    np.testing.assert_array_equal(np.asarray(cache.key[:, :T]), np.asarray(k))
    _close(cache.key_cmp[:, : T // L], ejnsa.mean_pooling(k, L)[:, : T // L], "key_cmp", 1e-6)
    _close(cache.value_cmp[:, : T // L], ejnsa.mean_pooling(v, L)[:, : T // L], "value_cmp", 1e-6)


def test_rows_of_different_lengths_and_chunks():
    """Three rows prefilled together with prompts of 37, 5 and 0 tokens (num_new; padding
    outputs 0), then chunks of 3 tokens and single tokens, some rows idle (num_new = 0):
    each row's outputs are its own full call's rows. Array block_counts too."""
    B, T, HQ, H, D = 3, 64, 4, 2, 16
    q, k, v, gates = _seq(2, B, T, HQ, H, D, D)
    counts = jnp.asarray(np.random.default_rng(3).integers(0, S + 2, (B, T, H)), jnp.int32)
    want = np.asarray(_full(q, k, v, gates, True, counts=counts))
    step = _decode_fn(True)
    cache = ejnsa.init_nsa_cache(B, T, H, D, block_size=L)
    done = np.zeros(B, int)
    got = np.full(want.shape, np.nan)
    plan = [(37, [37, 5, 0])] + [(3, [3, 3, 3])] * 5 + [(1, [1, 0, 1])] * 6 + [(1, [1, 1, 1])] * 50
    for tn, n in plan:
        if np.all(done == T):
            break
        n = np.minimum(n, T - done)
        idx = np.minimum(done[:, None] + np.arange(tn)[None, :], T - 1)  # rows' next tokens (past n: padding)
        take = lambda x: jnp.take_along_axis(x, jnp.asarray(idx).reshape(B, tn, *([1] * (x.ndim - 2))), axis=1)  # noqa: E731
        o, cache = step(cache, take(q), take(k), take(v), *map(take, gates), take(counts), jnp.asarray(n, jnp.int32))
        o = np.asarray(o)
        for b in range(B):
            got[b, done[b] : done[b] + n[b]] = o[b, : n[b]]
            assert np.all(o[b, n[b]:] == 0), "padding tokens output 0"
        done += n
    assert np.all(done == np.asarray(cache.lengths)) and np.all(done == T), done
    _close(got, want, "rows of different lengths", 1e-5)


def test_prefill_chunks_and_edge_sizes(monkeypatch):
    """The step walks its new tokens in chunks (here 3 at a time: a small GATHERED_KEYS), and
    a window longer than the cache and more selected blocks than the cache holds are fine."""
    import ejnsa.xla.decode as xla_decode

    monkeypatch.setattr(xla_decode, "GATHERED_KEYS", 3 * (5 * L + 40))  # chunk = 3 tokens
    B, T, HQ, H, D = 2, 48, 4, 2, 16
    q, k, v, (g1, g2, g3) = _seq(9, B, T, HQ, H, D, D)
    kw = dict(block_counts=5, block_size=L, window_size=40)  # S = 5 > 3 blocks, w = 40 ~ T
    want = ejnsa.native_sparse_attention(q, k, v, g1, g2, g3, platform="xla", **kw)
    cache = ejnsa.init_nsa_cache(B, T, H, D, block_size=L)
    o1, cache = ejnsa.nsa_decode(cache, q[:, :35], k[:, :35], v[:, :35], g1[:, :35], g2[:, :35], g3[:, :35], **kw)
    o2, cache = ejnsa.nsa_decode(cache, q[:, 35:], k[:, 35:], v[:, 35:], g1[:, 35:], g2[:, 35:], g3[:, 35:], **kw)
    _close(jnp.concatenate([o1, o2], axis=1), want, "chunked prefill", 1e-5)


def test_bf16_steps():
    B, T, HQ, H, D = 1, 40, 4, 1, 32
    q, k, v, gates = _seq(4, B, T, HQ, H, D, D, jnp.bfloat16)
    want = _full(q, k, v, gates, True)
    step = _decode_fn(True)
    cache = ejnsa.init_nsa_cache(B, T, H, D, block_size=L, dtype=jnp.bfloat16)
    outs = []
    for t in range(T):
        o, cache = step(cache, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1],
                        *(g[:, t : t + 1] for g in gates), None, None)
        assert o.dtype == jnp.bfloat16
        outs.append(o)
    _close(jnp.concatenate(outs, 1), want, "bf16", 1e-2)


def test_full_cache_gives_nan_and_keeps_its_tokens():
    """A token that does not fit the capacity is not stored and outputs NaN (never a silent 0)."""
    B, H, D = 2, 1, 16
    q, k, v, gates = _seq(5, B, 40, 2, H, D, D)
    step = _decode_fn(True)
    cache = ejnsa.init_nsa_cache(B, 32, H, D, block_size=L)
    o, cache = step(cache, q[:, :30], k[:, :30], v[:, :30], *(g[:, :30] for g in gates), None,
                    jnp.asarray([30, 10], jnp.int32))
    o, cache2 = step(cache, q[:, 30:35], k[:, 30:35], v[:, 30:35], *(g[:, 30:35] for g in gates), None, None)
    o = np.asarray(o)
    assert np.all(np.isfinite(o[0, :2])) and np.all(np.isnan(o[0, 2:])), "row 0 holds 2 more tokens"
    assert np.all(np.isfinite(o[1])), "row 1 has room"
    np.testing.assert_array_equal(np.asarray(cache2.lengths), [32, 15])
    np.testing.assert_array_equal(np.asarray(cache2.key[0, :32]), np.asarray(jnp.concatenate([k[0, :30], k[0, 30:32]])))


def test_bad_value_stays_in_its_row():
    """A NaN in one row's new key changes no other row's output or cache."""
    B, T, H, D = 2, 24, 1, 16
    q, k, v, gates = _seq(6, B, T, 2, H, D, D)
    step = _decode_fn(True)
    runs = []
    for kk in (k, k.at[1, 20].set(jnp.nan)):
        cache = ejnsa.init_nsa_cache(B, T, H, D, block_size=L)
        o1, cache = step(cache, q[:, :20], kk[:, :20], v[:, :20], *(g[:, :20] for g in gates), None, None)
        o2, cache = step(cache, q[:, 20:], kk[:, 20:], v[:, 20:], *(g[:, 20:] for g in gates), None, None)
        runs.append((np.asarray(o1), np.asarray(o2), cache))
    np.testing.assert_array_equal(runs[0][1][0], runs[1][1][0])
    np.testing.assert_array_equal(np.asarray(runs[0][2].key_cmp[0]), np.asarray(runs[1][2].key_cmp[0]))
    assert np.all(np.isnan(runs[1][1][1, 0])), "token 20 attends its own NaN key (window)"


def test_bad_input():
    B, H, D = 2, 2, 16
    q, k, v, (g1, g2, g3) = _seq(8, B, 4, 4, H, D, D)
    cache = ejnsa.init_nsa_cache(B, 64, H, D, block_size=L)
    kw = dict(block_counts=S, block_size=L)
    with pytest.raises(TypeError, match="cache must be an ejnsa.NSACache"):
        ejnsa.nsa_decode((cache.key, cache.value), q, k, v, **kw)
    with pytest.raises(ValueError, match="cache.key .* does not fit"):
        ejnsa.nsa_decode(ejnsa.init_nsa_cache(B, 64, 1, D, block_size=L), q, k, v, **kw)
    with pytest.raises(ValueError, match="cache.key .* does not fit"):
        ejnsa.nsa_decode(ejnsa.init_nsa_cache(3, 64, H, D, block_size=L), q, k, v, **kw)
    with pytest.raises(ValueError, match="made for block_size=16"):
        ejnsa.nsa_decode(cache, q, k, v, block_counts=S, block_size=32)
    with pytest.raises(ValueError, match="same new tokens"):
        ejnsa.nsa_decode(cache, q[:, :3], k, v, **kw)
    with pytest.raises(ValueError, match="num_new must be an integer array"):
        ejnsa.nsa_decode(cache, q, k, v, num_new=jnp.ones((3,), jnp.int32), **kw)
    with pytest.raises(TypeError, match="num_new"):
        ejnsa.nsa_decode(cache, q, k, v, num_new=jnp.ones((B,), jnp.float32), **kw)
    with pytest.raises(ValueError, match="needs the gate g_swa"):
        ejnsa.nsa_decode(cache, q, k, v, g1, g2, window_size=8, **kw)
    with pytest.raises(ValueError, match="g_cmp must have shape"):
        ejnsa.nsa_decode(cache, q, k, v, g1[:, :2], **kw)
    with pytest.raises(ValueError, match="block_counts"):
        ejnsa.nsa_decode(cache, q, k, v, block_counts=jnp.ones((B, 5, H), jnp.int32), block_size=L)
    with pytest.raises(ValueError, match="max_length must be"):
        ejnsa.init_nsa_cache(B, 0, H, D)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        ejnsa.init_nsa_cache(B, 64, H, D, dtype=jnp.int32)
    with pytest.raises(ValueError, match="block_size"):
        ejnsa.init_nsa_cache(B, 64, H, D, block_size=24)
    cache = ejnsa.init_nsa_cache(B, 50, H, D, block_size=L)
    assert cache.capacity == 64 and cache.block_size == L and cache.key_cmp.shape == (B, 4, H, D)


# --------------------------------------------------------------------------- NNX layer


def test_nnx_prefill_then_steps_equal_full_forward():
    from flax import nnx

    from ejnsa.nnx import NativeSparseAttention

    C, B, T = 32, 2, 70
    layer = NativeSparseAttention(C, 4, 2, block_size=L, block_counts=S, window_size=W, platform="xla",
                                  rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, T, C))
    # float32 projections (a GPU's default would be TF32, whose rounding differs between the
    # full forward's [B, T] matmuls and the steps' [B, 1] ones): this checks the cache logic.
    with jax.default_matmul_precision("float32"):
        want = nnx.jit(lambda m, x: m(x))(layer, x)
        layer.init_cache((B, 96, C))
        step = nnx.jit(lambda m, x: m(x, decode=True))
        outs = [step(layer, x[:, :20])] + [step(layer, x[:, t : t + 1]) for t in range(20, T)]
        _close(jnp.concatenate(outs, axis=1), want, "nnx decode", 1e-5)
        np.testing.assert_array_equal(np.asarray(layer.cache_index[...]), [T, T])
        # A new cache starts over.
        layer.init_cache((B, 96, C))
        _close(step(layer, x[:, :33]), want[:, :33], "nnx decode after init_cache", 1e-5)


def test_nnx_decode_bad_input():
    from flax import nnx

    from ejnsa.nnx import NativeSparseAttention

    C = 32
    layer = NativeSparseAttention(C, 4, 2, block_size=L, block_counts=S, window_size=W, platform="xla",
                                  rngs=nnx.Rngs(0))
    x = jnp.ones((2, 3, C))
    with pytest.raises(ValueError, match="call layer.init_cache"):
        layer(x, decode=True)
    with pytest.raises(ValueError, match="num_new is for decode=True"):
        layer(x, num_new=jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="input_shape must be"):
        layer.init_cache((2, 64))
    layer.init_cache((2, 64, C))
    with pytest.raises(ValueError, match="batch 1 but the cache was made for batch 2"):
        layer(x[:1], decode=True)
    with pytest.raises(ValueError, match="takes no cu_seqlens"):
        layer(x[:1], decode=True, cu_seqlens=jnp.asarray([0, 3], jnp.int32))
    window_only = NativeSparseAttention(C, 4, 2, block_size=L, window_size=W, use_selection=False,
                                        use_compression=False, platform="xla", rngs=nnx.Rngs(0))
    window_only.init_cache((2, 64, C))
    with pytest.raises(NotImplementedError, match="use_selection=True"):
        window_only(x, decode=True)
