"""ejnsa's XLA implementation against the independent float64 reference (tests/reference.py).

Outputs, log-sum-exp, top-k selections and gradients of every public function, over odd
sizes, G in {1, 2, 4, 16}, Dk != Dv, every block size class, varlen with empty and one-token
sequences, messy block_indices, every input dtype, and under jit / grad / vmap.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejnsa

try:
    from . import reference as ref
    from ._util import (DTYPES, TOL_GRAD, TOL_OUT, assert_close, assert_finite,
                        assert_grads_close, check_topk, cu_from_lengths, f64, impl_grads,
                        make_qkv, messy_block_indices, rand, rand_gate, ref_grads,
                        rounding_error, selection_margin)
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref
    from _util import (DTYPES, TOL_GRAD, TOL_OUT, assert_close, assert_finite,
                       assert_grads_close, check_topk, cu_from_lengths, f64, impl_grads,
                       make_qkv, messy_block_indices, rand, rand_gate, ref_grads,
                       rounding_error, selection_margin)

P = "xla"

# Varlen layouts with empty and one-token sequences (T = sum of lengths).
VARLEN = {
    "mixed": [0, 1, 37, 0, 64, 1, 25],       # T = 128, partial and exact blocks
    "short": [1, 1, 0, 3],                   # T = 5: nobody sees a compressed block
    "single": [63],                          # one sequence == no cu_seqlens
    "edges": [0, 33, 0, 0, 16, 1, 0],       # empty first/last, one exact block
}


# =============================================================================== reference
# The reference itself, against hand-written loops: it must be right before it judges.


def _manual_softmax(q, ks, vs, scale):
    logits = [scale * float(np.dot(q, k)) for k in ks]
    if not logits:
        return None, -np.inf
    m = max(logits)
    e = [math.exp(s - m) for s in logits]
    z = sum(e)
    return sum(w * v for w, v in zip(e, vs)) / z, m + math.log(z)


def test_reference_pieces_match_hand_written_loops():
    rng = np.random.default_rng(0)
    B, T, HQ, H, Dk, Dv, l = 2, 41, 4, 2, 8, 5, 16
    G = HQ // H
    q = rng.standard_normal((B, T, HQ, Dk))
    k = rng.standard_normal((B, T, H, Dk))
    v = rng.standard_normal((B, T, H, Dv))
    scale = 0.37
    # mean pooling
    kc = ref.ref_mean_pooling(k, l)
    want = np.stack([k[:, c * l: min((c + 1) * l, T)].mean(1) for c in range(3)], 1)
    np.testing.assert_allclose(kc, want, rtol=1e-14, atol=1e-14)
    vc = ref.ref_mean_pooling(v, l)
    # compression
    o, lse = ref.ref_compression(q, kc, vc, l, scale)
    # window
    w = 6
    o_w = ref.ref_window(q, k, v, w, scale)
    # selected, with duplicates, negatives, future and out-of-range blocks
    bi = rng.integers(-3, 5, size=(B, T, H, 4))
    bi[..., 1] = bi[..., 0]
    bc = rng.integers(-1, 6, size=(B, T, H))
    o_s_int = ref.ref_selected(q, k, v, bi, 4, l, scale)
    o_s_ten = ref.ref_selected(q, k, v, bi, bc, l, scale)
    for b in range(B):
        for t in range(T):
            for hq in range(HQ):
                h = hq // G
                cs = [c for c in range(3) if (c + 1) * l - 1 <= t]
                om, lm = _manual_softmax(q[b, t, hq], kc[b, cs, h], vc[b, cs, h], scale)
                if om is None:
                    assert np.all(o[b, t, hq] == 0) and lse[b, t, hq] == -np.inf
                else:
                    np.testing.assert_allclose(o[b, t, hq], om, rtol=1e-12, atol=1e-12)
                    np.testing.assert_allclose(lse[b, t, hq], lm, rtol=1e-12)
                js = [j for j in range(T) if t - w < j <= t]
                om, _ = _manual_softmax(q[b, t, hq], k[b, js, h], v[b, js, h], scale)
                np.testing.assert_allclose(o_w[b, t, hq], om, rtol=1e-12, atol=1e-12)
                for counts, got in ((4, o_s_int), (min(max(bc[b, t, h], 0), 4), o_s_ten)):
                    js = [j for blk in bi[b, t, h, :counts] if blk >= 0
                          for j in range(blk * l, min((blk + 1) * l, T)) if j <= t]
                    om, _ = _manual_softmax(q[b, t, hq], k[b, js, h], v[b, js, h], scale)
                    if om is None:
                        assert np.all(got[b, t, hq] == 0)
                    else:
                        np.testing.assert_allclose(got[b, t, hq], om, rtol=1e-12, atol=1e-12)


def test_reference_topk_by_hand():
    rng = np.random.default_rng(1)
    B, T, HQ, H, Dk, l = 1, 100, 4, 2, 8, 16
    q = rng.standard_normal((B, T, HQ, Dk))
    kc = ref.ref_mean_pooling(rng.standard_normal((B, T, H, Dk)), l)
    score = ref.ref_topk_scores(q, kc, l)
    _, _, p = ref._compression_full(q, kc, kc, l, None, None, np)
    for t in (0, 14, 15, 16, 47, 99):
        cur = t // l
        visible = [c for c in range(kc.shape[1]) if (c + 1) * l - 1 <= t]
        for h in range(H):
            want = np.full(score.shape[-1], -np.inf)
            want[visible] = p[0, t, 2 * h: 2 * h + 2][:, visible].mean(0)
            for c in {0, cur, cur - 1} - {-1}:
                want[c] = 1.0
            np.testing.assert_allclose(score[0, t, h], want, rtol=1e-12)
            idx, val = ref.ref_topk(q, kc, 3, l)
            order = sorted(np.flatnonzero(want > -np.inf), key=lambda c: (-want[c], c))[:3]
            assert idx[0, t, h].tolist() == order + [-1] * (3 - len(order))


def test_reference_varlen_is_concatenation_of_sequences():
    rng = np.random.default_rng(2)
    lengths = VARLEN["mixed"]
    cu = cu_from_lengths(lengths)
    T, HQ, H, Dk, Dv, l, w = int(cu[-1]), 4, 2, 8, 6, 16, 5
    q = rng.standard_normal((1, T, HQ, Dk))
    k = rng.standard_normal((1, T, H, Dk))
    v = rng.standard_normal((1, T, H, Dv))
    gates = [rng.standard_normal((1, T, HQ)) for _ in range(3)]
    bc = rng.integers(-1, 5, size=(1, T, H))
    for counts in (2, bc):
        got = ref.ref_nsa(q, k, v, *gates, None, counts, l, w, None, cu)
        parts = []
        for s, e in zip(cu[:-1], cu[1:]):
            if e > s:
                sl = slice(s, e)
                c = counts if isinstance(counts, int) else counts[:, sl]
                parts.append(ref.ref_nsa(q[:, sl], k[:, sl], v[:, sl],
                                         *[g[:, sl] for g in gates], None, c, l, w))
        np.testing.assert_allclose(got, np.concatenate(parts, 1), rtol=1e-12, atol=1e-12)


def test_reference_full_selection_is_causal_attention():
    rng = np.random.default_rng(3)
    B, T, HQ, H, l = 1, 45, 2, 1, 16
    q = rng.standard_normal((B, T, HQ, 8))
    k = rng.standard_normal((B, T, H, 8))
    v = rng.standard_normal((B, T, H, 4))
    every = np.broadcast_to(np.arange(3), (B, T, H, 3))
    np.testing.assert_allclose(ref.ref_selected(q, k, v, every, 3, l),
                               ref.ref_window(q, k, v, 10_000), rtol=1e-12, atol=1e-12)


def test_reference_jax_path_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    B, T, HQ, H, Dk, Dv, l, w = 1, 37, 2, 1, 4, 3, 16, 5
    q = rng.standard_normal((B, T, HQ, Dk))
    k = rng.standard_normal((B, T, H, Dk))
    v = rng.standard_normal((B, T, H, Dv))
    g = [rng.standard_normal((B, T, HQ)) for _ in range(3)]
    bi, _ = ref.ref_topk(q, ref.ref_mean_pooling(k, l), 2, l)
    r = rng.standard_normal((B, T, HQ, Dv))
    fn = functools.partial(ref.ref_nsa, block_indices=bi, block_counts=2, block_size=l,
                           window_size=w)
    args = dict(q=q, k=k, v=v, g_cmp=g[0], g_slc=g[1], g_swa=g[2])
    grads = ref_grads(fn, args, r)
    # The NumPy path agrees with the jax path, and central differences with its gradient.
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(fn(xp=jnp, **args)), fn(**args), rtol=1e-12)
    eps = 1e-6
    for name in args:
        for _ in range(3):
            i = tuple(rng.integers(0, n) for n in args[name].shape)
            hi = dict(args, **{name: args[name].copy()})
            lo = dict(args, **{name: args[name].copy()})
            hi[name][i] += eps
            lo[name][i] -= eps
            fd = (np.sum(fn(**hi) * r) - np.sum(fn(**lo) * r)) / (2 * eps)
            np.testing.assert_allclose(grads[name][i], fd, rtol=1e-5, atol=1e-7)


# =============================================================================== helpers


def _case_id(values):
    def one(v):
        if isinstance(v, tuple) and len(v) == 7:  # a SHAPES entry
            return "B{}T{}H{}G{}K{}V{}l{}".format(*v)
        return str(v)
    return "-".join(one(v) for v in values)


def fast(*values):
    """A case of the core set, run by plain `pytest`."""
    return pytest.param(*values, id=_case_id(values))


def slow(*values):
    """A case beyond the core set: more coverage for `pytest -m slow` (each call compiles)."""
    return pytest.param(*values, id=_case_id(values), marks=pytest.mark.slow)


def _cu(lengths):
    return None if lengths is None else jnp.asarray(cu_from_lengths(lengths))


def _ref_cu(cu):
    return None if cu is None else np.asarray(cu)


def _selection(q, k, block_counts, l, scale, cu, margin=1e-5):
    """The reference's top-k of the full NSA, or, where two scores are closer than the
    implementation's rounding, the implementation's own (checked as a tie-tolerant set)."""
    kc = ref.ref_mean_pooling(f64(k), l, _ref_cu(cu))
    idx, _ = ref.ref_topk(f64(q), kc, block_counts, l, scale, _ref_cu(cu))
    score = ref.ref_topk_scores(f64(q), kc, l, scale, _ref_cu(cu))
    if selection_margin(score, idx) > margin:
        return idx
    got = ejnsa.nsa_topk(q, ejnsa.mean_pooling(k, l, cu), block_counts, l, scale, cu, P)
    check_topk(got, score, block_counts)
    return np.asarray(got)


# =============================================================================== mean pooling


@pytest.mark.parametrize("T,l,dtype", [
    fast(63, 16, "fp32"), fast(200, 64, "bf16"),
    slow(1, 16, "fp32"), slow(64, 32, "fp32"), slow(200, 32, "fp32"), slow(63, 64, "bf16"),
    slow(200, 16, "fp16"),
])
def test_mean_pooling(T, l, dtype):
    rng = np.random.default_rng(T * 7 + l)
    x = rand(rng, (2, T, 3, 24), DTYPES[dtype])
    got = ejnsa.mean_pooling(x, l)
    want = ref.ref_mean_pooling(f64(x), l)
    assert got.shape == (2, math.ceil(T / l), 3, 24) and got.dtype == x.dtype
    assert_close(got, want, 3e-6 if dtype == "fp32" else 4e-3, "x_cmp")


@pytest.mark.parametrize("layout,l", [
    fast("mixed", 16), fast("edges", 32),
    slow("short", 16), slow("mixed", 32), slow("edges", 16), slow("single", 16),
    slow("single", 32),
])
def test_mean_pooling_varlen(layout, l):
    rng = np.random.default_rng(l)
    cu = _cu(VARLEN[layout])
    T = int(cu[-1])
    x = rand(rng, (1, T, 2, 16))
    got = ejnsa.mean_pooling(x, l, cu)
    want = ref.ref_mean_pooling(f64(x), l, np.asarray(cu))
    TC = min(T, T // l + len(VARLEN[layout]))
    assert got.shape == want.shape == (1, TC, 2, 16)
    assert_close(got, want, 3e-6, "x_cmp")
    n_real = len(ref.cmp_rows(T, l, np.asarray(cu)))
    assert np.all(np.asarray(got)[:, n_real:] == 0), "rows past the packed blocks must be zero"


# =============================================================================== compression

# (B, T, H, G, Dk, Dv, l)
SHAPES = [
    (2, 63, 2, 1, 40, 24, 16),
    (1, 200, 1, 16, 32, 16, 32),
    (1, 200, 2, 4, 32, 32, 64),
    (2, 1, 1, 2, 16, 16, 16),
    (1, 130, 2, 2, 64, 40, 16),
]


def _check_lse(got, want, name="lse"):
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{name} must be float32, got {got.dtype}"
    assert not np.any(np.isnan(got)), f"{name}: NaN"
    none = np.isneginf(want)
    assert np.array_equal(np.isneginf(got), none), f"{name}: -inf exactly where no block is seen"
    if np.any(~none):
        assert_close(got[~none], want[~none], 1e-6, name)


@pytest.mark.parametrize("shape", [fast(SHAPES[0]), fast(SHAPES[1]), fast(SHAPES[3]),
                                   slow(SHAPES[2]), slow(SHAPES[4])])
def test_compression(shape):
    B, T, H, G, Dk, Dv, l = shape
    rng = np.random.default_rng(T + G)
    q = rand(rng, (B, T, H * G, Dk))
    kc = rand(rng, (B, math.ceil(T / l), H, Dk))
    vc = rand(rng, (B, math.ceil(T / l), H, Dv))
    o, lse = ejnsa.nsa_compression(q, kc, vc, l, platform=P)
    o_ref, lse_ref = ref.ref_compression(f64(q), f64(kc), f64(vc), l)
    assert o.shape == (B, T, H * G, Dv) and o.dtype == q.dtype
    assert lse.shape == (B, T, H * G)
    assert_close(o, o_ref, TOL_OUT[jnp.float32], "o_cmp")
    _check_lse(lse, lse_ref)


@pytest.mark.parametrize("dtype", [fast("bf16"), slow("fp16")])
def test_compression_low_precision_and_scale(dtype):
    rng = np.random.default_rng(5)
    B, T, H, G, Dk, Dv, l = 1, 150, 2, 2, 40, 24, 16
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv, DTYPES[dtype])
    kc, vc = ejnsa.mean_pooling(k, l), ejnsa.mean_pooling(v, l)
    o, lse = ejnsa.nsa_compression(q, kc, vc, l, softmax_scale=0.3, platform=P)
    o_ref, lse_ref = ref.ref_compression(f64(q), f64(kc), f64(vc), l, 0.3)
    assert o.dtype == q.dtype
    assert_close(o, o_ref, TOL_OUT[DTYPES[dtype]], "o_cmp")
    _check_lse(lse, lse_ref)


@pytest.mark.parametrize("layout", [fast("mixed"), slow("edges"), slow("short")])
def test_compression_varlen_reads_only_real_rows(layout):
    rng = np.random.default_rng(6)
    cu = _cu(VARLEN[layout])
    T, H, G, Dk, Dv, l = int(cu[-1]), 2, 2, 32, 24, 16
    q = rand(rng, (1, T, H * G, Dk))
    TC = min(T, T // l + len(VARLEN[layout]))
    n_real = len(ref.cmp_rows(T, l, np.asarray(cu)))
    # Random rows, with large garbage past the real packed blocks: never to be read.
    kc = np.asarray(rand(rng, (1, TC, H, Dk))).copy()
    vc = np.asarray(rand(rng, (1, TC, H, Dv))).copy()
    kc[:, n_real:] *= 50.0
    vc[:, n_real:] *= 50.0
    kc, vc = jnp.asarray(kc), jnp.asarray(vc)
    o, lse = ejnsa.nsa_compression(q, kc, vc, l, cu_seqlens=cu, platform=P)
    o_ref, lse_ref = ref.ref_compression(f64(q), f64(kc), f64(vc), l, None, np.asarray(cu))
    assert_close(o, o_ref, TOL_OUT[jnp.float32], "o_cmp")
    _check_lse(lse, lse_ref)


def test_compression_gradients_including_lse():
    rng = np.random.default_rng(7)
    B, T, H, G, Dk, Dv, l = 1, 100, 2, 2, 40, 24, 16
    q = rand(rng, (B, T, H * G, Dk))
    kc = rand(rng, (B, math.ceil(T / l), H, Dk))
    vc = rand(rng, (B, math.ceil(T / l), H, Dv))
    _, lse_ref = ref.ref_compression(f64(q), f64(kc), f64(vc), l)
    seen = np.isfinite(lse_ref)
    r_o, r_lse = rand(rng, (B, T, H * G, Dv)), rand(rng, (B, T, H * G))

    def impl(query, k_cmp, v_cmp):
        o, lse = ejnsa.nsa_compression(query, k_cmp, v_cmp, l, platform=P)
        return o, jnp.where(seen, lse, 0.0)

    def reference(query, k_cmp, v_cmp, xp):
        o, lse = ref.ref_compression(query, k_cmp, v_cmp, l, xp=xp)
        return o, xp.where(seen, lse, 0.0)

    args = dict(query=q, k_cmp=kc, v_cmp=vc)
    got = impl_grads(impl, args, (r_o, r_lse))
    for g in got.values():
        assert_finite(g)
    assert_grads_close(got, ref_grads(reference, args, (r_o, r_lse)), TOL_GRAD[jnp.float32],
                       "compression")


# =============================================================================== top-k


@pytest.mark.parametrize("shape,S", [
    fast(SHAPES[0], 3), fast(SHAPES[1], 16), fast(SHAPES[3], 2),
    slow(SHAPES[2], 1), slow(SHAPES[4], 4), slow(SHAPES[0], 1), slow(SHAPES[1], 2),
    slow(SHAPES[2], 16), slow(SHAPES[4], 16),
])
def test_topk_int(shape, S):
    B, T, H, G, Dk, _, l = shape
    rng = np.random.default_rng(T + S)
    q = rand(rng, (B, T, H * G, Dk))
    kc = ejnsa.mean_pooling(rand(rng, (B, T, H, Dk)), l)
    idx = ejnsa.nsa_topk(q, kc, S, l, platform=P)
    assert idx.shape == (B, T, H, S) and idx.dtype == jnp.int32
    check_topk(idx, ref.ref_topk_scores(f64(q), f64(kc), l), S)
    # With a clear margin the selection is the reference's, slot by slot.
    want, _ = ref.ref_topk(f64(q), f64(kc), S, l)
    if selection_margin(ref.ref_topk_scores(f64(q), f64(kc), l), want) > 1e-5:
        np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(want, -1))


@pytest.mark.parametrize("shape", [fast(SHAPES[1]), slow(SHAPES[0]), slow(SHAPES[2])])
def test_topk_tensor_counts(shape):
    B, T, H, G, Dk, _, l = shape
    rng = np.random.default_rng(T)
    NB = math.ceil(T / l)
    q = rand(rng, (B, T, H * G, Dk))
    kc = ejnsa.mean_pooling(rand(rng, (B, T, H, Dk)), l)
    counts = jnp.asarray(rng.integers(-2, NB + 3, size=(B, T, H)).astype(np.int32))
    idx = ejnsa.nsa_topk(q, kc, counts, l, softmax_scale=0.2, platform=P)
    assert idx.shape == (B, T, H, NB) and idx.dtype == jnp.int32
    check_topk(idx, ref.ref_topk_scores(f64(q), f64(kc), l, 0.2), np.asarray(counts))


@pytest.mark.parametrize("layout,counts", [
    fast("mixed", "tensor"), fast("edges", "int"),
    slow("mixed", "int"), slow("edges", "tensor"), slow("short", "int"), slow("short", "tensor"),
])
def test_topk_varlen(layout, counts):
    rng = np.random.default_rng(8)
    cu = _cu(VARLEN[layout])
    T, H, G, Dk, l = int(cu[-1]), 2, 4, 32, 16
    q = rand(rng, (1, T, H * G, Dk))
    kc = ejnsa.mean_pooling(rand(rng, (1, T, H, Dk)), l, cu)
    bc = 3 if counts == "int" else jnp.asarray(
        rng.integers(0, math.ceil(T / l) + 2, size=(1, T, H)).astype(np.int32))
    idx = ejnsa.nsa_topk(q, kc, bc, l, cu_seqlens=cu, platform=P)
    bc_np = bc if counts == "int" else np.asarray(bc)
    check_topk(idx, ref.ref_topk_scores(f64(q), f64(kc), l, None, np.asarray(cu)), bc_np)


@pytest.mark.parametrize("dtype", [fast("bf16"), slow("fp16")])
def test_topk_low_precision(dtype):
    rng = np.random.default_rng(9)
    B, T, H, G, Dk, l = 1, 200, 2, 2, 32, 16
    q = rand(rng, (B, T, H * G, Dk), DTYPES[dtype])
    kc = rand(rng, (B, math.ceil(T / l), H, Dk), DTYPES[dtype], scale=0.5)
    idx = ejnsa.nsa_topk(q, kc, 4, l, platform=P)
    check_topk(idx, ref.ref_topk_scores(f64(q), f64(kc), l), 4)


# =============================================================================== selected


@pytest.mark.parametrize("shape,counts", [
    fast(SHAPES[0], "tensor"), fast(SHAPES[1], "int"), fast(SHAPES[3], "int"),
    slow(SHAPES[2], "tensor"), slow(SHAPES[4], "int"), slow(SHAPES[0], "int"),
    slow(SHAPES[1], "tensor"), slow(SHAPES[2], "int"), slow(SHAPES[3], "tensor"),
    slow(SHAPES[4], "tensor"),
])
def test_selected_messy_indices(shape, counts):
    B, T, H, G, Dk, Dv, l = shape
    rng = np.random.default_rng(T + G + len(counts))
    S = 4
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv)
    bi = messy_block_indices(rng, B, T, H, S, l)
    bc = 16 if counts == "int" else jnp.asarray(
        rng.integers(-1, S + 3, size=(B, T, H)).astype(np.int32))
    o = ejnsa.apply_native_sparse_attention(q, k, v, bi, bc, l, platform=P)
    bc_np = bc if counts == "int" else np.asarray(bc)
    want = ref.ref_selected(f64(q), f64(k), f64(v), np.asarray(bi), bc_np, l)
    assert o.shape == (B, T, H * G, Dv) and o.dtype == q.dtype
    assert_close(o, want, TOL_OUT[jnp.float32], "o_slc")


def test_selected_int_counts_use_all_entries():
    # docs/semantics.md: with an int block_counts all S entries of given block_indices are used.
    rng = np.random.default_rng(10)
    B, T, H, G, Dk, Dv, l = 1, 100, 2, 2, 32, 16, 16
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv)
    bi = messy_block_indices(rng, B, T, H, 5, l)
    want = ref.ref_selected(f64(q), f64(k), f64(v), np.asarray(bi), 5, l)
    for bc in (1, 16):
        o = ejnsa.apply_native_sparse_attention(q, k, v, bi, bc, l, platform=P)
        assert_close(o, want, TOL_OUT[jnp.float32], f"o_slc(block_counts={bc})")


def test_selected_duplicates_count_twice():
    rng = np.random.default_rng(11)
    B, T, H, G, Dk, Dv, l = 1, 64, 1, 2, 16, 16, 16
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv)
    t = np.arange(T)
    bi = np.stack([t // l, t // l, np.maximum(t // l - 1, 0)], -1)[None, :, None, :]
    bi = jnp.asarray(bi.astype(np.int32))
    o = ejnsa.apply_native_sparse_attention(q, k, v, bi, 3, l, platform=P)
    want = ref.ref_selected(f64(q), f64(k), f64(v), np.asarray(bi), 3, l)
    once = ref.ref_selected(f64(q), f64(k), f64(v), np.asarray(bi)[..., 1:], 2, l)
    assert rel_gap(want, once) > 1e-2, "test is too weak: duplicates change nothing"
    assert_close(o, want, TOL_OUT[jnp.float32], "o_slc")


def rel_gap(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("layout,counts", [
    fast("mixed", "tensor"), fast("short", "tensor"),
    slow("edges", "int"), slow("mixed", "int"), slow("edges", "tensor"), slow("short", "int"),
    slow("single", "int"), slow("single", "tensor"),
])
def test_selected_varlen(layout, counts):
    rng = np.random.default_rng(12)
    cu = _cu(VARLEN[layout])
    T, H, G, Dk, Dv, l, S = int(cu[-1]), 2, 2, 40, 24, 16, 3
    q, k, v = make_qkv(rng, 1, T, H * G, H, Dk, Dv)
    bi = messy_block_indices(rng, 1, T, H, S, l, np.asarray(cu))
    bc = S if counts == "int" else jnp.asarray(
        rng.integers(-1, S + 2, size=(1, T, H)).astype(np.int32))
    o = ejnsa.apply_native_sparse_attention(q, k, v, bi, bc, l, cu_seqlens=cu, platform=P)
    bc_np = bc if counts == "int" else np.asarray(bc)
    want = ref.ref_selected(f64(q), f64(k), f64(v), np.asarray(bi), bc_np, l, None,
                            np.asarray(cu))
    assert_close(o, want, TOL_OUT[jnp.float32], "o_slc")


@pytest.mark.parametrize("dtype", [fast("bf16"), slow("fp16")])
def test_selected_low_precision(dtype):
    rng = np.random.default_rng(13)
    B, T, H, G, Dk, Dv, l = 2, 120, 2, 4, 32, 16, 32
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv, DTYPES[dtype])
    bi = messy_block_indices(rng, B, T, H, 3, l)
    o = ejnsa.apply_native_sparse_attention(q, k, v, bi, 3, l, softmax_scale=0.25, platform=P)
    want = ref.ref_selected(f64(q), f64(k), f64(v), np.asarray(bi), 3, l, 0.25)
    assert o.dtype == q.dtype
    assert_close(o, want, TOL_OUT[DTYPES[dtype]], "o_slc")


def test_selected_gradients_with_empty_rows():
    rng = np.random.default_rng(14)
    B, T, H, G, Dk, Dv, l = 1, 96, 2, 2, 32, 24, 32
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv)
    bi = np.asarray(messy_block_indices(rng, B, T, H, 3, l)).copy()
    bi[:, ::3] = -1  # every third token attends nothing
    bc = jnp.asarray(rng.integers(0, 4, size=(B, T, H)).astype(np.int32))
    r = rand(rng, (B, T, H * G, Dv))
    args = dict(query=q, key=k, value=v)
    got = impl_grads(lambda **a: ejnsa.apply_native_sparse_attention(
        **a, block_indices=jnp.asarray(bi), block_counts=bc, block_size=l, platform=P), args, r)
    want = ref_grads(lambda query, key, value, xp: ref.ref_selected(
        query, key, value, bi, np.asarray(bc), l, xp=xp), args, r)
    o = ejnsa.apply_native_sparse_attention(q, k, v, jnp.asarray(bi), bc, l, platform=P)
    assert np.all(np.asarray(o)[:, ::3] == 0), "tokens attending nothing must give 0"
    assert np.all(np.asarray(got["query"])[:, ::3] == 0)
    assert_grads_close(got, want, TOL_GRAD[jnp.float32], "selected")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_selected_gradients_accumulate_in_float32(dtype):
    # Every token selects block 0 (and its own): each key of block 0 collects T * G gradient
    # contributions. Summed in float32 and rounded once, dkey/dvalue are as close to the float64
    # gradient as rounding allows; summed in the input dtype they are ~10x further.
    rng = np.random.default_rng(21)
    B, T, H, G, Dk, Dv, l = 1, 256, 1, 4, 32, 32, 16
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv, DTYPES[dtype])
    r = rand(rng, (B, T, H * G, Dv), DTYPES[dtype])
    t = np.arange(T)
    bi = np.stack([np.zeros(T, int), t // l], -1)[None, :, None, :].astype(np.int32)
    args = dict(query=q, key=k, value=v)
    got = impl_grads(lambda **a: ejnsa.apply_native_sparse_attention(
        **a, block_indices=jnp.asarray(bi), block_counts=2, block_size=l, platform=P), args, r)
    want = ref_grads(lambda query, key, value, xp: ref.ref_selected(
        query, key, value, bi, 2, l, xp=xp), args, r)
    for name in args:
        assert got[name].dtype == args[name].dtype
        floor = rounding_error(want[name], DTYPES[dtype])
        assert_close(got[name], want[name], 4 * floor, f"d{name} (rounding alone: {floor:.1e})")


# =============================================================================== window


@pytest.mark.parametrize("shape,w", [
    fast(SHAPES[0], 17), fast(SHAPES[1], 64), fast(SHAPES[3], 1000),
    slow(SHAPES[2], 1), slow(SHAPES[4], 1000), slow(SHAPES[0], 1), slow(SHAPES[0], 64),
    slow(SHAPES[1], 17), slow(SHAPES[2], 1000), slow(SHAPES[4], 17),
])
def test_window(shape, w):
    B, T, H, G, Dk, Dv, _ = shape
    rng = np.random.default_rng(T + w)
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv)
    o = ejnsa.sliding_window_attention(q, k, v, w, platform=P)
    assert o.shape == (B, T, H * G, Dv) and o.dtype == q.dtype
    assert_close(o, ref.ref_window(f64(q), f64(k), f64(v), w), TOL_OUT[jnp.float32], "o_swa")


@pytest.mark.parametrize("layout", [fast("mixed"), slow("edges"), slow("short"),
                                    slow("single")])
def test_window_varlen(layout):
    rng = np.random.default_rng(15)
    cu = _cu(VARLEN[layout])
    T, H, G, Dk, Dv = int(cu[-1]), 1, 4, 24, 40
    q, k, v = make_qkv(rng, 1, T, H * G, H, Dk, Dv)
    o = ejnsa.sliding_window_attention(q, k, v, 20, 0.5, cu, platform=P)
    want = ref.ref_window(f64(q), f64(k), f64(v), 20, 0.5, np.asarray(cu))
    assert_close(o, want, TOL_OUT[jnp.float32], "o_swa")


@pytest.mark.parametrize("dtype", [slow("bf16"), fast("fp16")])
def test_window_low_precision(dtype):
    rng = np.random.default_rng(16)
    q, k, v = make_qkv(rng, 2, 77, 4, 2, 32, 16, DTYPES[dtype])
    o = ejnsa.sliding_window_attention(q, k, v, 9, platform=P)
    assert o.dtype == q.dtype
    assert_close(o, ref.ref_window(f64(q), f64(k), f64(v), 9), TOL_OUT[DTYPES[dtype]], "o_swa")


# =============================================================================== full NSA

# name: (B, T, H, G, Dk, Dv, l, S or "tensor", window, gates, given block_indices, varlen)
NSA_CASES = {
    "topk-all-gates-window": (1, 200, 2, 2, 40, 24, 32, 3, 17, "cmp slc swa", False, None),
    "topk-tensor-slc-only": (2, 63, 1, 4, 32, 16, 16, "tensor", 0, "slc", False, None),
    "topk-no-gates": (1, 130, 2, 1, 32, 32, 16, 2, 0, "", False, None),
    "given-cmp-window": (2, 100, 2, 2, 32, 16, 16, 4, 9, "cmp swa", True, None),
    "given-tensor-all": (1, 150, 1, 16, 16, 32, 64, "tensor", 33, "cmp slc swa", True, None),
    "t1": (2, 1, 2, 2, 16, 16, 16, 2, 4, "cmp slc swa", False, None),
    "varlen-topk": (1, None, 2, 2, 32, 24, 16, 2, 12, "cmp slc swa", False, "mixed"),
    "varlen-tensor": (1, None, 2, 4, 32, 16, 16, "tensor", 0, "cmp slc", False, "mixed"),
    "varlen-given": (1, None, 1, 2, 16, 16, 16, 3, 5, "cmp slc swa", True, "edges"),
    "varlen-short": (1, None, 1, 2, 16, 16, 16, 2, 2, "cmp slc swa", False, "short"),
    # Small enough to compile quickly: the gradient check of the core set.
    "small": (1, None, 1, 2, 40, 24, 16, 2, 6, "cmp slc swa", False, "edges"),
}


def _nsa_setup(case, dtype=jnp.float32, gate_dtype=None, seed=0):
    B, T, H, G, Dk, Dv, l, S, w, gates, given, layout = case
    rng = np.random.default_rng(seed)
    cu = _cu(VARLEN[layout]) if layout else None
    T = int(cu[-1]) if layout else T
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv, dtype)
    g = {f"g_{n}": rand_gate(rng, (B, T, H * G), gate_dtype or dtype) for n in gates.split()}
    if S == "tensor":
        counts = jnp.asarray(rng.integers(-1, 5, size=(B, T, H)).astype(np.int32))
        S_given = 4
    else:
        counts, S_given = S, S
    bi = messy_block_indices(rng, B, T, H, S_given, l, _ref_cu(cu)) if given else None
    kw = dict(block_indices=bi, block_counts=counts, block_size=l, window_size=w,
              cu_seqlens=cu)
    return q, k, v, g, kw, rng


def _ref_kw(q, k, kw, margin=1e-5):
    """The implementation's keyword arguments as the reference takes them."""
    counts = kw["block_counts"]
    counts = counts if isinstance(counts, int) else np.asarray(counts)
    bi = kw["block_indices"]
    cu = _ref_cu(kw["cu_seqlens"])
    if bi is None:
        bi = _selection(q, k, counts, kw["block_size"], None, kw["cu_seqlens"], margin)
    return dict(block_indices=np.asarray(bi), block_counts=counts,
                block_size=kw["block_size"], window_size=kw["window_size"], cu_seqlens=cu)


@pytest.mark.parametrize("name", [
    fast("topk-all-gates-window"), fast("varlen-topk"), fast("varlen-given"), fast("t1"),
    fast("topk-no-gates"), slow("given-tensor-all"), slow("topk-tensor-slc-only"),
    slow("given-cmp-window"), slow("varlen-tensor"), slow("varlen-short"),
])
def test_nsa(name):
    q, k, v, g, kw, _ = _nsa_setup(NSA_CASES[name])
    o = ejnsa.native_sparse_attention(q, k, v, **g, **kw, platform=P)
    assert o.shape == q.shape[:3] + (v.shape[-1],) and o.dtype == q.dtype
    want = ref.ref_nsa(f64(q), f64(k), f64(v), **{n: f64(x) for n, x in g.items()},
                       **_ref_kw(q, k, kw))
    assert_close(o, want, TOL_OUT[jnp.float32], f"o[{name}]")


@pytest.mark.parametrize("name,dtype,gate_dtype", [
    fast("topk-all-gates-window", "bf16", "bf16"), fast("given-tensor-all", "fp16", "fp16"),
    fast("varlen-given", "bf16", "fp32"),
    slow("topk-all-gates-window", "fp16", "fp16"), slow("topk-all-gates-window", "fp32", "bf16"),
    slow("given-tensor-all", "bf16", "bf16"), slow("given-tensor-all", "bf16", "fp32"),
    slow("varlen-given", "fp16", "fp16"), slow("varlen-given", "fp32", "bf16"),
])
def test_nsa_dtypes(name, dtype, gate_dtype):
    case = list(NSA_CASES[name])
    if not case[10]:
        # Top-k from low-precision inputs: let S cover every candidate, so that the rounding of
        # the implementation's internal k_cmp cannot change which blocks are attended.
        T = case[1] or int(cu_from_lengths(VARLEN[case[11]])[-1])
        case[7] = math.ceil(T / case[6])
    q, k, v, g, kw, _ = _nsa_setup(tuple(case), DTYPES[dtype], DTYPES[gate_dtype], seed=1)
    o = ejnsa.native_sparse_attention(q, k, v, **g, **kw, platform=P)
    assert o.dtype == q.dtype
    want = ref.ref_nsa(f64(q), f64(k), f64(v), **{n: f64(x) for n, x in g.items()},
                       **_ref_kw(q, k, kw))
    tol = max(TOL_OUT[DTYPES[dtype]], TOL_OUT[DTYPES[gate_dtype]])
    assert_close(o, want, tol, f"o[{name}, {dtype}, gates {gate_dtype}]")


def test_nsa_given_indices_with_g_cmp_and_scale():
    # block_indices given and g_cmp given: no top-k, and o_cmp is still added.
    q, k, v, g, kw, _ = _nsa_setup(NSA_CASES["given-cmp-window"], seed=3)
    g["g_slc"] = rand(np.random.default_rng(3), q.shape[:3])  # any real values
    o = ejnsa.native_sparse_attention(q, k, v, **g, **kw, softmax_scale=0.21, platform=P)
    want = ref.ref_nsa(f64(q), f64(k), f64(v), **{n: f64(x) for n, x in g.items()},
                       **_ref_kw(q, k, kw), scale=0.21)
    assert_close(o, want, TOL_OUT[jnp.float32], "o")


@pytest.mark.slow
def test_nsa_is_the_gated_sum_of_its_pieces():
    # With block_indices given, o = g_slc*o_slc + g_cmp*o_cmp + g_swa*o_swa from the pieces.
    q, k, v, g, kw, _ = _nsa_setup(NSA_CASES["given-cmp-window"], seed=3)
    g["g_slc"] = rand(np.random.default_rng(3), q.shape[:3])  # any real values
    o = ejnsa.native_sparse_attention(q, k, v, **g, **kw, softmax_scale=0.21, platform=P)
    l, w, bi = kw["block_size"], kw["window_size"], kw["block_indices"]
    kc, vc = ejnsa.mean_pooling(k, l), ejnsa.mean_pooling(v, l)
    pieces = (f64(g["g_slc"])[..., None] * f64(ejnsa.apply_native_sparse_attention(
                  q, k, v, bi, kw["block_counts"], l, 0.21, platform=P))
              + f64(g["g_cmp"])[..., None] * f64(ejnsa.nsa_compression(
                  q, kc, vc, l, 0.21, platform=P)[0])
              + f64(g["g_swa"])[..., None] * f64(ejnsa.sliding_window_attention(
                  q, k, v, w, 0.21, platform=P)))
    want = ref.ref_nsa(f64(q), f64(k), f64(v), **{n: f64(x) for n, x in g.items()},
                       **_ref_kw(q, k, kw), scale=0.21)
    assert_close(o, want, TOL_OUT[jnp.float32], "o")
    assert_close(o, pieces, TOL_OUT[jnp.float32], "o vs its pieces")


# =============================================================================== gradients


def _nsa_grad_check(case, dtype=jnp.float32, seed=0, margin=1e-5):
    q, k, v, g, kw, rng = _nsa_setup(case, dtype, seed=seed)
    r = rand(rng, q.shape[:3] + (v.shape[-1],), dtype)
    args = dict(query=q, key=k, value=v, **g)

    @jax.jit
    def grads(args):
        def loss(a):
            o = ejnsa.native_sparse_attention(**a, **kw, platform=P)
            return jnp.sum(o.astype(jnp.float32) * r.astype(jnp.float32))
        return jax.grad(loss)(args)

    got = grads(args)
    again = grads(args)  # deterministic: the same compiled backward gives the same bits
    for name in got:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(again[name]))
    for name, x in args.items():
        assert got[name].dtype == x.dtype and got[name].shape == x.shape, name
    rkw = _ref_kw(q, k, kw, margin)
    want = ref_grads(lambda query, key, value, xp, **gates: ref.ref_nsa(
        query, key, value, **gates, **rkw, xp=xp), args, r)
    assert_grads_close(got, want, TOL_GRAD[dtype])


@pytest.mark.parametrize("name", [
    fast("small"), slow("topk-all-gates-window"), slow("given-tensor-all"), slow("varlen-topk"),
    slow("varlen-short"), slow("t1"),
])
def test_nsa_gradients(name):
    _nsa_grad_check(NSA_CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_nsa_gradients_low_precision(dtype):
    case = list(NSA_CASES["given-cmp-window"])
    _nsa_grad_check(tuple(case), DTYPES[dtype], seed=4)


def test_window_gradients_varlen():
    rng = np.random.default_rng(17)
    cu = _cu(VARLEN["mixed"])
    T = int(cu[-1])
    q, k, v = make_qkv(rng, 1, T, 4, 1, 40, 24)
    r = rand(rng, (1, T, 4, 24))
    args = dict(query=q, key=k, value=v)
    got = impl_grads(lambda **a: ejnsa.sliding_window_attention(
        **a, window_size=7, cu_seqlens=cu, platform=P), args, r)
    want = ref_grads(lambda query, key, value, xp: ref.ref_window(
        query, key, value, 7, None, np.asarray(cu), xp=xp), args, r)
    assert_grads_close(got, want, TOL_GRAD[jnp.float32], "window")


# =============================================================================== transforms


def test_nsa_under_jit_with_traced_cu_seqlens_and_counts():
    case = NSA_CASES["varlen-tensor"]
    q, k, v, g, kw, _ = _nsa_setup(case, seed=5)
    static = dict(block_size=kw["block_size"], window_size=kw["window_size"])

    @jax.jit
    def f(q, k, v, g, counts, cu):
        return ejnsa.native_sparse_attention(q, k, v, **g, block_counts=counts, cu_seqlens=cu,
                                             **static, platform=P)

    o = f(q, k, v, g, kw["block_counts"], kw["cu_seqlens"])
    eager = ejnsa.native_sparse_attention(q, k, v, **g, **kw, platform=P)
    want = ref.ref_nsa(f64(q), f64(k), f64(v), **{n: f64(x) for n, x in g.items()},
                       **_ref_kw(q, k, kw))
    assert_close(o, want, TOL_OUT[jnp.float32], "jit o")
    assert_close(o, f64(eager), 1e-6, "jit vs eager")

    topk = jax.jit(lambda q, kc, c, cu: ejnsa.nsa_topk(q, kc, c, kw["block_size"],
                                                       cu_seqlens=cu, platform=P))
    kc = ejnsa.mean_pooling(k, kw["block_size"], kw["cu_seqlens"])
    idx = topk(q, kc, kw["block_counts"], kw["cu_seqlens"])
    check_topk(idx, ref.ref_topk_scores(f64(q), f64(kc), kw["block_size"], None,
                                        _ref_cu(kw["cu_seqlens"])), np.asarray(kw["block_counts"]))


@pytest.mark.slow
def test_nsa_grad_under_jit():
    q, k, v, g, kw, rng = _nsa_setup(NSA_CASES["given-cmp-window"], seed=6)
    r = rand(rng, q.shape[:3] + (v.shape[-1],))
    args = dict(query=q, key=k, value=v, **g)

    @jax.jit
    def grads(args, bi):
        def loss(a):
            o = ejnsa.native_sparse_attention(**a, **dict(kw, block_indices=bi), platform=P)
            return jnp.sum(o * r)
        return jax.grad(loss)(args)

    got = grads(args, kw["block_indices"])
    rkw = _ref_kw(q, k, kw)
    want = ref_grads(lambda query, key, value, xp, **gates: ref.ref_nsa(
        query, key, value, **gates, **rkw, xp=xp), args, r)
    assert_grads_close(got, want, TOL_GRAD[jnp.float32], "jit grad")


@pytest.mark.parametrize("given", [fast(False), slow(True)])
def test_nsa_vmap_over_leading_axis(given):
    rng = np.random.default_rng(18)
    V, B, T, H, G, Dk, Dv, l, S, w = 2, 2, 40, 2, 2, 32, 16, 16, 2, 9
    q, k, v = (rand(rng, (V, B, T, H * G, Dk)), rand(rng, (V, B, T, H, Dk)),
               rand(rng, (V, B, T, H, Dv)))
    g_cmp, g_slc, g_swa = (rand_gate(rng, (V, B, T, H * G)) for _ in range(3))
    bi = jnp.stack([messy_block_indices(rng, B, T, H, S, l) for _ in range(V)]) if given else None

    def f(q, k, v, a, b, c, bi):
        return ejnsa.native_sparse_attention(q, k, v, a, b, c, block_indices=bi, block_counts=S,
                                             block_size=l, window_size=w, platform=P)

    o = jax.vmap(f)(q, k, v, g_cmp, g_slc, g_swa, bi)
    assert o.shape == (V, B, T, H * G, Dv)
    for i in range(V):
        kw = dict(block_indices=None if bi is None else bi[i], block_counts=S, block_size=l,
                  window_size=w, cu_seqlens=None)
        want = ref.ref_nsa(f64(q[i]), f64(k[i]), f64(v[i]), f64(g_cmp[i]), f64(g_slc[i]),
                           f64(g_swa[i]), **_ref_kw(q[i], k[i], kw))
        assert_close(o[i], want, TOL_OUT[jnp.float32], f"vmap o[{i}]")
    idx = jax.vmap(lambda q, kc: ejnsa.nsa_topk(q, kc, S, l, platform=P))(
        q, jax.vmap(lambda k: ejnsa.mean_pooling(k, l))(k))
    for i in range(V):
        check_topk(idx[i], ref.ref_topk_scores(f64(q[i]), ref.ref_mean_pooling(f64(k[i]), l), l),
                   S)


# =============================================================================== no NaN


def test_no_nan_when_no_token_sees_a_compressed_block():
    # T < l: o_cmp = 0 and lse = -inf, and the whole NSA (top-k path) finite and right.
    # (Gradients there: NSA_CASES["small"] has such tokens in every sequence.)
    rng = np.random.default_rng(19)
    B, T, H, G, Dk, Dv, l = 1, 10, 2, 2, 16, 16, 16
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv)
    g = {n: rand_gate(rng, (B, T, H * G)) for n in ("g_cmp", "g_slc", "g_swa")}
    o_cmp, lse = ejnsa.nsa_compression(q, ejnsa.mean_pooling(k, l), ejnsa.mean_pooling(v, l), l,
                                       platform=P)
    assert np.all(np.asarray(o_cmp) == 0) and np.all(np.isneginf(np.asarray(lse)))
    kw = dict(block_counts=2, block_size=l, window_size=4)
    o = ejnsa.native_sparse_attention(q, k, v, **g, **kw, platform=P)
    want = ref.ref_nsa(*(f64(a) for a in (q, k, v)), **{n: f64(x) for n, x in g.items()}, **kw)
    assert_close(o, want, TOL_OUT[jnp.float32], "o")


@pytest.mark.slow
def test_no_nan_when_block_indices_are_all_minus_one():
    rng = np.random.default_rng(20)
    B, T, H, G, Dk, Dv, l = 1, 40, 2, 2, 16, 16, 16
    q, k, v = make_qkv(rng, B, T, H * G, H, Dk, Dv)
    g = {n: rand_gate(rng, (B, T, H * G)) for n in ("g_cmp", "g_slc")}
    none = jnp.full((B, T, H, 3), -1, jnp.int32)
    r = rand(rng, (B, T, H * G, Dv))
    args = dict(query=q, key=k, value=v, **g)
    fn = lambda **a: ejnsa.native_sparse_attention(**a, block_indices=none, block_counts=3,
                                                   block_size=l, platform=P)
    got = impl_grads(fn, args, r)
    for name, d in got.items():
        assert_finite(d, f"d{name}")
    assert np.all(np.asarray(got["g_slc"]) == 0), "o_slc = 0: no gradient to g_slc"
    assert_grads_close(got, ref_grads(lambda query, key, value, xp, **gates: ref.ref_nsa(
        query, key, value, **gates, block_indices=np.asarray(none), block_counts=3,
        block_size=l, xp=xp), args, r), TOL_GRAD[jnp.float32], "all -1")


@pytest.mark.slow
def test_deterministic():
    # Forward twice (the backward's determinism: _nsa_grad_check).
    q, k, v, g, kw, _ = _nsa_setup(NSA_CASES["small"], seed=7)
    f = jax.jit(lambda q, k, v, g: ejnsa.native_sparse_attention(q, k, v, **g, **kw, platform=P))
    np.testing.assert_array_equal(np.asarray(f(q, k, v, g)), np.asarray(f(q, k, v, g)))
