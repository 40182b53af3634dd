"""Queries that are a suffix of the keys (docs/semantics.md, "Queries as a suffix of the keys").

query [B, TQ, HQ, Dk] with TQ <= TK: query i stands at key position TK - TQ + i; packed,
cu_seqlens=(cu_q, cu_k) and each sequence's queries are the last positions of its keys.
Every public function must return the last TQ rows (per sequence) of the call with every
position a query, and its gradients must be those of that call with a loss on those rows
only. Both platforms (the Triton kernels in the interpreter), against the full call of
the same platform; the full call itself is checked against the float64 reference
elsewhere.
"""

from __future__ import annotations

import os

if os.environ.get("EJNSA_TEST_GPU") != "1":  # conftest does the same; kernels must see it before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ejnsa  # noqa: E402

try:
    from . import reference as ref
    from ._util import cu_from_lengths, rand, rand_gate
except ImportError:
    import reference as ref
    from _util import cu_from_lengths, rand, rand_gate

PLATFORMS = ["xla", "triton"]
L, S, W = 16, 3, 8


def _inputs(seed, T, HQ, H, Dk, Dv):
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, (1, T, HQ, Dk)), rand(rng, (1, T, H, Dk)), rand(rng, (1, T, H, Dv))
    gates = tuple(rand_gate(rng, (1, T, HQ)) for _ in range(3))
    return q, k, v, gates


def _nsa(P, cu, bi, window):
    def f(q, k, v, g1, g2, g3):
        return ejnsa.native_sparse_attention(q, k, v, g1, g2, g3 if window else None, block_indices=bi,
                                             block_counts=S, block_size=L, window_size=W if window else 0,
                                             cu_seqlens=cu, platform=P)
    return f


def _grads(fn, args, cot, wrt):
    """(out, grads w.r.t. args[i] for i in wrt) of sum(fn(*args) * cot), under jit."""
    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) * cot)
    out = jax.jit(fn)(*args)
    return out, jax.jit(jax.grad(loss, argnums=wrt))(*args)


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-5, atol=2e-6,
                               err_msg=what)


CASES = {  # T, HQ, H, Dk, Dv, TQ, window
    "G1_TQ1": (80, 2, 2, 16, 16, 1, True),
    "G1_TQ7": (80, 2, 2, 16, 16, 7, True),
    "G3_TQ64_DkDv_nowindow": (80, 6, 2, 24, 16, 64, False),
    "G16_TQ7": (64, 16, 1, 16, 16, 7, True),
    "G2_TQ_eq_TK": (48, 4, 2, 16, 16, 48, True),
}


@pytest.mark.parametrize("P", PLATFORMS)
@pytest.mark.parametrize("case", list(CASES))
def test_nsa_suffix_equals_last_rows(P, case):
    """The whole NSA, with the blocks the full call's top-k chose (selection is a discrete
    choice: top-k's own suffix test is below), outputs and gradients."""
    T, HQ, H, Dk, Dv, TQ, window = CASES[case]
    q, k, v, gates = _inputs(1, T, HQ, H, Dk, Dv)
    kc = ejnsa.mean_pooling(k, L)
    bi = ejnsa.nsa_topk(q, kc, S, L, platform="xla")
    cot = rand(np.random.default_rng(2), (1, TQ, HQ, Dv))
    full_cot = jnp.zeros((1, T, HQ, Dv)).at[:, T - TQ:].set(cot)
    o, g = _grads(_nsa(P, None, bi, window), (q, k, v, *gates), full_cot, (0, 1, 2, 3, 4, 5))
    sl = lambda x: x[:, T - TQ:]  # noqa: E731
    o_s, g_s = _grads(_nsa(P, None, sl(bi), window), (sl(q), k, v, *(sl(x) for x in gates)), cot, (0, 1, 2, 3, 4, 5))
    _close(o_s, sl(o), f"{case} o")
    for name, a, b in zip(("q", "g_cmp", "g_slc", "g_swa"), (g_s[0], *g_s[3:]), (g[0], *g[3:])):
        if name == "g_swa" and not window:
            continue
        _close(a, sl(b), f"{case} d{name}")
    _close(g_s[1], g[1], f"{case} dk")
    _close(g_s[2], g[2], f"{case} dv")
    if case == "G1_TQ7":  # top-k inside the pipeline too (forward; no selection here is a near-tie)
        f = lambda *a: ejnsa.native_sparse_attention(*a, block_counts=S, block_size=L, window_size=W,  # noqa: E731
                                                     platform=P)
        _close(jax.jit(f)(sl(q), k, v, *(sl(x) for x in gates)), sl(jax.jit(f)(q, k, v, *gates)), f"{case} o (top-k)")


@pytest.mark.parametrize("P", PLATFORMS)
def test_packed_suffix(P):
    """cu_seqlens=(cu_q, cu_k): sequences of different lengths, one with no query, one with
    a single key; outputs and gradients equal the packed full call's rows and gradients."""
    lens_k, lens_q = [30, 1, 0, 17, 32], [5, 1, 0, 17, 2]
    cu_k, cu_q = cu_from_lengths(lens_k), cu_from_lengths(lens_q)
    T, HQ, H, D = int(cu_k[-1]), 4, 2, 16
    q, k, v, gates = _inputs(3, T, HQ, H, D, D)
    rows = np.concatenate([np.arange(cu_k[i + 1] - lens_q[i], cu_k[i + 1]) for i in range(len(lens_k))])
    bi = ejnsa.nsa_topk(q, ejnsa.mean_pooling(k, L, jnp.asarray(cu_k)), S, L, cu_seqlens=jnp.asarray(cu_k),
                        platform="xla")
    cot = rand(np.random.default_rng(4), (1, len(rows), HQ, D))
    full_cot = jnp.zeros((1, T, HQ, D)).at[:, rows].set(cot)
    pair = (jnp.asarray(cu_q), jnp.asarray(cu_k))
    o, g = _grads(_nsa(P, jnp.asarray(cu_k), bi, True), (q, k, v, *gates), full_cot, (0, 1, 2, 3))
    pick = lambda x: x[:, rows]  # noqa: E731
    o_s, g_s = _grads(_nsa(P, pair, pick(bi), True), (pick(q), k, v, *(pick(x) for x in gates)), cot, (0, 1, 2, 3))
    _close(o_s, pick(o), "o")
    _close(g_s[0], pick(g[0]), "dq")
    _close(g_s[1], g[1], "dk")
    _close(g_s[2], g[2], "dv")
    _close(g_s[3], pick(g[3]), "dg_cmp")
    # the pieces: window, compression and top-k (with key_length), mean pooling of a pair
    kc, vc = ejnsa.mean_pooling(k, L, pair), ejnsa.mean_pooling(v, L, pair)
    np.testing.assert_array_equal(np.asarray(kc), np.asarray(ejnsa.mean_pooling(k, L, jnp.asarray(cu_k))))
    win = ejnsa.sliding_window_attention(q, k, v, W, cu_seqlens=jnp.asarray(cu_k), platform=P)
    _close(ejnsa.sliding_window_attention(pick(q), k, v, W, cu_seqlens=pair, platform=P), pick(win), "window")
    oc, lse = ejnsa.nsa_compression(q, kc, vc, L, cu_seqlens=jnp.asarray(cu_k), platform=P)
    oc_s, lse_s = ejnsa.nsa_compression(pick(q), kc, vc, L, cu_seqlens=pair, platform=P, key_length=T)
    _close(oc_s, pick(oc), "o_cmp")
    assert np.array_equal(np.isinf(np.asarray(lse_s)), np.isinf(np.asarray(pick(lse))))
    idx = ejnsa.nsa_topk(q, kc, S, L, cu_seqlens=jnp.asarray(cu_k), platform=P)
    idx_s = ejnsa.nsa_topk(pick(q), kc, S, L, cu_seqlens=pair, platform=P, key_length=T)
    np.testing.assert_array_equal(np.asarray(idx_s), np.asarray(pick(idx)))
    # a pair that packs queries and keys alike is today's single array
    same = (jnp.asarray(cu_k), jnp.asarray(cu_k))
    _close(jax.jit(_nsa(P, same, bi, True))(q, k, v, *gates), o, "pair (cu_k, cu_k)")


@pytest.mark.parametrize("P", PLATFORMS)
def test_pieces_suffix_unpacked(P):
    """Each public function alone, TQ = 9 of TK = 70 (TK no multiple of l), B = 2."""
    rng = np.random.default_rng(5)
    B, T, HQ, H, D, TQ = 2, 70, 4, 2, 16, 9
    q, k, v = rand(rng, (B, T, HQ, D)), rand(rng, (B, T, H, D)), rand(rng, (B, T, H, D))
    sl = lambda x: x[:, T - TQ:]  # noqa: E731
    kc, vc = ejnsa.mean_pooling(k, L), ejnsa.mean_pooling(v, L)
    win = ejnsa.sliding_window_attention(q, k, v, W, platform=P)
    _close(ejnsa.sliding_window_attention(sl(q), k, v, W, platform=P), sl(win), "window")
    oc, lse = ejnsa.nsa_compression(q, kc, vc, L, platform=P)
    oc_s, lse_s = ejnsa.nsa_compression(sl(q), kc, vc, L, platform=P, key_length=T)
    _close(oc_s, sl(oc), "o_cmp")
    _close(jnp.where(jnp.isinf(lse_s), 0, lse_s), jnp.where(jnp.isinf(sl(lse)), 0, sl(lse)), "lse_cmp")
    idx = ejnsa.nsa_topk(q, kc, S, L, platform=P)
    np.testing.assert_array_equal(np.asarray(ejnsa.nsa_topk(sl(q), kc, S, L, platform=P, key_length=T)),
                                  np.asarray(sl(idx)))
    counts = jnp.asarray(rng.integers(-1, 6, size=(B, T, H)), jnp.int32)
    idx_c = ejnsa.nsa_topk(q, kc, counts, L, platform=P)  # S = ceil(TK / l) slots
    np.testing.assert_array_equal(np.asarray(ejnsa.nsa_topk(sl(q), kc, sl(counts), L, platform=P, key_length=T)),
                                  np.asarray(sl(idx_c)))
    o = ejnsa.apply_native_sparse_attention(q, k, v, idx, S, L, platform=P)
    _close(ejnsa.apply_native_sparse_attention(sl(q), k, v, sl(idx), S, L, platform=P), sl(o), "selection")


def test_suffix_matches_the_reference():
    """Independent of the full call: the XLA suffix against the float64 reference run on all
    positions (its last TQ rows)."""
    q, k, v, gates = _inputs(6, 64, 4, 2, 16, 16)
    TQ = 5
    want = ref.ref_nsa(q, k, v, *gates, block_counts=S, block_size=L, window_size=W)[:, -TQ:]
    got = ejnsa.native_sparse_attention(q[:, -TQ:], k, v, *(x[:, -TQ:] for x in gates), block_counts=S,
                                        block_size=L, window_size=W, platform="xla")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ bad input


def test_suffix_bad_input():
    q, k, v, gates = _inputs(7, 40, 4, 2, 16, 16)
    kc = ejnsa.mean_pooling(k, L)
    cu = jnp.asarray([0, 20, 40], jnp.int32)
    with pytest.raises(ValueError, match="more tokens .* than key"):
        ejnsa.sliding_window_attention(jnp.concatenate([q, q], 1), k, v, W)
    with pytest.raises(ValueError, match="g_cmp must have shape \\[B, TQ, HQ\\]"):
        ejnsa.native_sparse_attention(q[:, -5:], k, v, gates[0], platform="xla")
    with pytest.raises(ValueError, match="block_indices must have shape \\[B, TQ, H, S\\]"):
        ejnsa.apply_native_sparse_attention(q[:, -5:], k, v, jnp.zeros((1, 40, 2, 2), jnp.int32), 2, L)
    with pytest.raises(ValueError, match="block_counts array must have shape \\[B, TQ, H\\]"):
        ejnsa.apply_native_sparse_attention(q[:, -5:], k, v, jnp.zeros((1, 5, 2, 2), jnp.int32),
                                            jnp.zeros((1, 40, 2), jnp.int32), L)
    with pytest.raises(ValueError, match="needs TQ == TK .*pass cu_seqlens=\\(cu_q, cu_k\\)"):
        ejnsa.sliding_window_attention(q[:, -5:], k, v, W, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_q and cu_k must have the same shape"):
        ejnsa.sliding_window_attention(q[:, -5:], k, v, W, cu_seqlens=(jnp.asarray([0, 5]), cu))
    with pytest.raises(ValueError, match="one array \\[N\\+1\\] or a pair"):
        ejnsa.sliding_window_attention(q[:, -5:], k, v, W, cu_seqlens=(cu, cu, cu))
    with pytest.raises(TypeError, match="cu_seqlens\\[1\\] \\(cu_k\\) must have an integer dtype"):
        ejnsa.sliding_window_attention(q[:, -5:], k, v, W, cu_seqlens=(jnp.asarray([0, 2, 5]), cu.astype(jnp.float32)))
    with pytest.raises(ValueError, match="sequence 1 has more queries \\(4\\) than keys \\(3\\)"):
        ejnsa.sliding_window_attention(q[:, -5:], k[:, :23], v[:, :23], W,
                                       cu_seqlens=(jnp.asarray([0, 1, 5]), jnp.asarray([0, 20, 23])))
    with pytest.raises(ValueError, match="key_length must be >= the query's TQ=40"):
        ejnsa.nsa_compression(q, kc, kc, L, key_length=39)
    with pytest.raises(TypeError, match="key_length must be a Python int"):
        ejnsa.nsa_topk(q[:, -5:], kc, S, L, key_length=40.0)
    with pytest.raises(ValueError, match="k_cmp must have at least 4 compressed rows"):
        ejnsa.nsa_topk(q[:, -5:], kc, S, L, key_length=64)
    # under jit the values of a pair cannot be seen: no error, no crash
    f = jax.jit(lambda q, cq, ck: ejnsa.sliding_window_attention(q, k[:, :23], v[:, :23], W, cu_seqlens=(cq, ck),
                                                               platform="xla"))
    o = np.asarray(f(q[:, -5:], jnp.asarray([0, 1, 5]), jnp.asarray([0, 20, 23])))
    assert np.isfinite(o).all() and np.all(o[0, 1] == 0)  # sequence 1's first query has no key: outside
