"""Property tests over random small configurations (hypothesis, derandomized: reproducible).

Each example draws a whole configuration (batch or packed sequences with empty and one-token
ones, heads, G, head dims, block size, S as int or array, window, gates, given or top-k
indices, scale) and checks ejnsa's XLA path against the float64 reference or against
itself. Every example compiles, so the counts are modest.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ejnsa

try:
    from . import reference as ref
    from ._util import (TOL_GRAD, TOL_OUT, assert_close, assert_finite, assert_grads_close,
                        check_topk, cu_from_lengths, f64, impl_grads, make_qkv,
                        messy_block_indices, rand, rand_gate, ref_grads, selection_margin)
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref
    from _util import (TOL_GRAD, TOL_OUT, assert_close, assert_finite, assert_grads_close,
                       check_topk, cu_from_lengths, f64, impl_grads, make_qkv,
                       messy_block_indices, rand, rand_gate, ref_grads, selection_margin)

P = "xla"


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def configs(draw, max_T=100):
    l = draw(st.sampled_from([16, 32]))
    if draw(st.booleans()):
        lengths = draw(st.lists(st.sampled_from([0, 1, 2, 15, 16, 17, 31, 33, 48, 63]),
                                min_size=1, max_size=4).filter(lambda x: 1 <= sum(x) <= max_T))
        B, T = 1, sum(lengths)
    else:
        lengths = None
        B, T = draw(st.sampled_from([1, 2])), draw(st.integers(1, max_T))
    H = draw(st.sampled_from([1, 2]))
    return dict(
        B=B, T=T, lengths=lengths, l=l, H=H, G=draw(st.sampled_from([1, 2, 4])),
        Dk=draw(st.sampled_from([16, 24, 40])), Dv=draw(st.sampled_from([8, 16, 24])),
        S=draw(st.one_of(st.integers(1, 5), st.just("tensor"))),
        given=draw(st.booleans()), w=draw(st.sampled_from([0, 1, 7, 33])),
        gates=draw(st.sets(st.sampled_from(["g_cmp", "g_slc"]))),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 0.5))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(cfg, dtype=jnp.float32):
    """Implementation arguments for a configuration, and the reference's keyword arguments."""
    rng = np.random.default_rng(cfg["seed"])
    B, T, H, l = cfg["B"], cfg["T"], cfg["H"], cfg["l"]
    HQ = H * cfg["G"]
    cu = None if cfg["lengths"] is None else cu_from_lengths(cfg["lengths"])
    q, k, v = make_qkv(rng, B, T, HQ, H, cfg["Dk"], cfg["Dv"], dtype)
    gates = {n: rand_gate(rng, (B, T, HQ)) for n in sorted(cfg["gates"])}
    if cfg["w"] > 0:
        gates["g_swa"] = rand_gate(rng, (B, T, HQ))
    if cfg["S"] == "tensor":
        counts = jnp.asarray(rng.integers(-1, 6, size=(B, T, H)).astype(np.int32))
        S = 4
    else:
        counts = S = cfg["S"]
    bi = messy_block_indices(rng, B, T, H, S, l, cu) if cfg["given"] else None
    kw = dict(block_indices=bi, block_counts=counts, block_size=l, window_size=cfg["w"],
              softmax_scale=cfg["scale"], cu_seqlens=None if cu is None else jnp.asarray(cu))
    return q, k, v, gates, kw, rng


def ref_kwargs(q, k, kw):
    counts = kw["block_counts"]
    counts = counts if isinstance(counts, int) else np.asarray(counts)
    cu = None if kw["cu_seqlens"] is None else np.asarray(kw["cu_seqlens"])
    l, scale = kw["block_size"], kw["softmax_scale"]
    bi = kw["block_indices"]
    if bi is None:
        kc = ref.ref_mean_pooling(f64(k), l, cu)
        bi, _ = ref.ref_topk(f64(q), kc, counts, l, scale, cu)
        score = ref.ref_topk_scores(f64(q), kc, l, scale, cu)
        if selection_margin(score, bi) <= 1e-5:
            # A near tie: take the implementation's choice once it is a valid one.
            got = ejnsa.nsa_topk(q, ejnsa.mean_pooling(k, l, kw["cu_seqlens"]), counts, l,
                                 scale, kw["cu_seqlens"], P)
            check_topk(got, score, counts)
            bi = got
    return dict(block_indices=np.asarray(bi), block_counts=counts, block_size=l,
                window_size=kw["window_size"], scale=scale, cu_seqlens=cu)


@_settings(6)
@given(configs())
def test_nsa_matches_reference(cfg):
    q, k, v, gates, kw, _ = build(cfg)
    o = ejnsa.native_sparse_attention(q, k, v, **gates, **kw, platform=P)
    assert o.shape == q.shape[:3] + (v.shape[-1],) and o.dtype == q.dtype
    want = ref.ref_nsa(f64(q), f64(k), f64(v), **{n: f64(g) for n, g in gates.items()},
                       **ref_kwargs(q, k, kw))
    assert_close(o, want, TOL_OUT[jnp.float32], f"o {cfg}")


@_settings(6)
@given(configs(max_T=160))
def test_topk_is_a_tie_tolerant_selection(cfg):
    q, k, _, _, kw, _ = build(cfg)
    l, cu, counts = kw["block_size"], kw["cu_seqlens"], kw["block_counts"]
    kc = ejnsa.mean_pooling(k, l, cu)
    idx = ejnsa.nsa_topk(q, kc, counts, l, kw["softmax_scale"], cu, P)
    assert idx.dtype == jnp.int32
    score = ref.ref_topk_scores(f64(q), f64(kc), l, kw["softmax_scale"],
                                None if cu is None else np.asarray(cu))
    check_topk(idx, score, counts if isinstance(counts, int) else np.asarray(counts))


@_settings(4)
@given(configs(), st.integers(0, 2**31 - 1))
def test_selected_ignores_entry_order(cfg, perm_seed):
    # With an int block_counts every entry is used, so their order cannot matter.
    cfg = dict(cfg, S=cfg["S"] if isinstance(cfg["S"], int) else 4, given=True)
    q, k, v, _, kw, _ = build(cfg)
    bi = np.asarray(kw["block_indices"])
    perm = np.random.default_rng(perm_seed).permuted(bi, axis=-1)
    args = (kw["block_counts"], kw["block_size"], kw["softmax_scale"], kw["cu_seqlens"], P)
    o = ejnsa.apply_native_sparse_attention(q, k, v, jnp.asarray(bi), *args)
    o_perm = ejnsa.apply_native_sparse_attention(q, k, v, jnp.asarray(perm), *args)
    cu = None if kw["cu_seqlens"] is None else np.asarray(kw["cu_seqlens"])
    want = ref.ref_selected(f64(q), f64(k), f64(v), bi, kw["block_counts"], kw["block_size"],
                            kw["softmax_scale"], cu)
    assert_close(o, want, TOL_OUT[jnp.float32], "o_slc")
    assert_close(o_perm, f64(o), 1e-6, "o_slc with permuted entries")


@_settings(2)
@given(configs(max_T=70))
def test_gradients_finite_and_match_reference(cfg):
    q, k, v, gates, kw, rng = build(cfg)
    r = rand(rng, q.shape[:3] + (v.shape[-1],))
    args = dict(query=q, key=k, value=v, **gates)
    got = impl_grads(lambda **a: ejnsa.native_sparse_attention(**a, **kw, platform=P), args, r)
    for name, d in got.items():
        assert_finite(d, f"d{name}")
    rkw = ref_kwargs(q, k, kw)
    want = ref_grads(lambda query, key, value, xp, **g: ref.ref_nsa(
        query, key, value, **g, **rkw, xp=xp), args, r)
    assert_grads_close(got, want, TOL_GRAD[jnp.float32], str(cfg))
