"""Triton top-k block selection (ejnsa/triton/topk.py) against semantics.md piece 3.

Selections are checked against the float64 reference scores as sets: a block may be
exchanged for another only when their reference scores are within TIE_TOL (1e-6, about
the float32 rounding of a score in [0, 1]); exact ties (the forced blocks, all 1.0) go to
the smaller index, and the order must be descending. The XLA implementation is checked
the same way, and where the two agree they must agree exactly.

On a CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so
the shapes are tiny; `pytest --gpu` adds the large cases marked gpu.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton

import ejnsa
from ejnsa.triton import topk as triton_topk
from ejnsa.xla import topk as xla_topk

try:
    from . import reference as ref
    from ._util import TIE_TOL, check_topk, cu_from_lengths, f64, rand
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref
    from _util import TIE_TOL, check_topk, cu_from_lengths, f64, rand

T_FN = triton_topk.nsa_topk  # the registered (TRITON, GPU) function: positional signature of XLA's
X_FN = xla_topk.nsa_topk


def _inputs(seed, B, T, HQ, H, D, l, dtype=jnp.float32, lengths=None):
    rng = np.random.default_rng(seed)
    cu = None if lengths is None else jnp.asarray(cu_from_lengths(lengths))
    q = rand(rng, (B, T, HQ, D), dtype)
    # Keys scaled up so that probabilities spread (a real selection, not near-uniform scores).
    k = rand(rng, (B, T, H, D), dtype, scale=4.0)
    kc = ejnsa.mean_pooling(k, l, cu)
    return q, kc, cu


def _check(idx, q, kc, S, l, scale, cu, xla_idx=None):
    idx = np.asarray(idx)
    assert idx.dtype == np.int32
    assert not np.any(idx == np.iinfo(np.int32).min), "an output element was never written"
    score = ref.ref_topk_scores(f64(q), f64(kc), l, scale, None if cu is None else np.asarray(cu))
    check_topk(idx, score, S)
    if xla_idx is not None:
        xla_idx = np.asarray(xla_idx)
        check_topk(xla_idx, score, S)
        # Rows may differ only at near-ties (both were just validated); count them.
        return int(np.sum(np.any(idx != xla_idx, axis=-1)))
    return 0


# (B, T, HQ, H, D, l, S): G in {1, 2, 16}, odd T and D, S not a power of two, S above the
# number of candidates, one row whose token sees nothing.
CASES = [
    (2, 63, 2, 2, 40, 16, 3),  # G=1, odd T and D
    (1, 200, 4, 2, 24, 16, 5),  # G=2, odd D, S odd
    (1, 130, 16, 1, 32, 16, 16),  # G=16, S=16 (the model's), T past 8 blocks
    (1, 100, 6, 2, 16, 32, 7),  # G=3 (padded heads), S > candidates for early tokens
    (1, 1, 2, 1, 16, 16, 4),  # one token: only block 0 is a candidate
]
CASE_IDS = ["B{}T{}HQ{}H{}D{}l{}S{}".format(*c) for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_topk_matches_reference(case):
    B, T, HQ, H, D, l, S = case
    q, kc, _ = _inputs(sum(case), B, T, HQ, H, D, l)
    scale = D**-0.5
    got = T_FN(q, kc, None, S, l, scale, None)
    assert got.shape == (B, T, H, S)
    _check(got, q, kc, S, l, scale, None, X_FN(q, kc, None, S, l, scale, None))


def test_topk_many_chunks_and_lse_given():
    """More blocks than one chunk of the default config: the running lists must merge
    across chunks; lse from the compression forward (XLA) instead of the kernel's own
    first pass."""
    B, T, HQ, H, D, l, S = 1, 1100, 1, 1, 16, 16, 6
    assert triton_topk.TopkConfig.default(D, 1, S, jnp.float32).block_c < math.ceil(T / l)
    q, kc, _ = _inputs(11, B, T, HQ, H, D, l)
    scale = 0.3
    _, lse = ejnsa.nsa_compression(q, kc, kc, l, scale, platform="xla")
    got = T_FN(q, kc, lse, S, l, scale, None)
    own = T_FN(q, kc, None, S, l, scale, None)
    _check(got, q, kc, S, l, scale, None, X_FN(q, kc, lse, S, l, scale, None))
    _check(own, q, kc, S, l, scale, None)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_topk_half_precision(dtype):
    B, T, HQ, H, D, l, S = 1, 96, 8, 2, 32, 16, 4
    q, kc, _ = _inputs(3, B, T, HQ, H, D, l, dtype)
    scale = D**-0.5
    got = T_FN(q, kc, None, S, l, scale, None)
    _check(got, q, kc, S, l, scale, None, X_FN(q, kc, None, S, l, scale, None))


VARLEN = {
    "mixed": [0, 1, 37, 0, 64, 1, 25],  # empty and one-token sequences, partial blocks
    "edges": [0, 33, 0, 0, 16, 1, 0],
}


@pytest.mark.parametrize("layout", sorted(VARLEN))
def test_topk_varlen(layout):
    lengths = VARLEN[layout]
    T, HQ, H, D, l, S = sum(lengths), 4, 2, 16, 16, 3
    q, kc, cu = _inputs(5, 1, T, HQ, H, D, l, lengths=lengths)
    scale = D**-0.5
    got = T_FN(q, kc, None, S, l, scale, cu)
    _check(got, q, kc, S, l, scale, cu, X_FN(q, kc, None, S, l, scale, cu))
    # With lse from the compression forward as well.
    _, lse = ejnsa.nsa_compression(q, kc, kc, l, scale, cu, platform="xla")
    _check(T_FN(q, kc, lse, S, l, scale, cu), q, kc, S, l, scale, cu)


# Configurations other than the default: the "qk" scheme (the first kernel; chunks of 32
# at G=1); "kq" with chunks of one 16-block part (one list per token, no alternating
# directions); "kq" with 16 tokens and chunks of 128 (8 parts). S=20
# gives 32-slot lists (parts of 32 blocks, wider than a warp's rows on the GPU).
CONFIGS = {
    "qk": lambda D, G, S, dt: triton_topk.TopkConfig.qk(D, G, S, dt),
    "kq_bc16": lambda D, G, S, dt: triton_topk.TopkConfig(
        block_t=max(4, 16 // triton.next_power_of_2(G)), block_c=16, scheme="kq"),
    "kq_bt16_bc128": lambda D, G, S, dt: triton_topk.TopkConfig(block_t=16, block_c=128, scheme="kq"),
}
CONFIG_CASES = [
    (1, 600, 2, 2, 16, 16, 6, None),  # G=1, 38 blocks: several chunks of 16 and of 32
    (1, 300, 6, 2, 16, 16, 20, None),  # G=3 (padded heads), S=20
    (1, 0, 4, 2, 16, 16, 3, [0, 1, 200, 0, 45, 17]),  # varlen, G=2
]


CASE_IDS = ["G1S6", "G3S20", "varlen"]
# Each configuration runs one case in the default run (together they cover every case);
# the others are marked slow (`pytest -m slow`): the interpreter takes 10-30 s per case.
CI_CASE = {"qk": "varlen", "kq_bc16": "G1S6", "kq_bt16_bc128": "G3S20"}
CONFIG_PARAMS = [
    pytest.param(name, case, id=f"{name}-{cid}", marks=() if CI_CASE[name] == cid else pytest.mark.slow)
    for name in sorted(CONFIGS) for case, cid in zip(CONFIG_CASES, CASE_IDS)
]


@pytest.mark.parametrize("name,case", CONFIG_PARAMS)
def test_topk_configs(name, case):
    """Other configurations select like the default: exactly, except at near-ties (both
    are checked against float64); with lse given, and (varlen) computed in the kernel."""
    B, T, HQ, H, D, l, S, lengths = case
    if lengths is not None:
        T = sum(lengths)
    q, kc, cu = _inputs(sum(case[:7]) + len(name), B, T, HQ, H, D, l, lengths=lengths)
    scale = D**-0.5
    cfg = CONFIGS[name](D, HQ // H, S, q.dtype)
    _, lse = ejnsa.nsa_compression(q, kc, kc, l, scale, cu, platform="xla")
    got = triton_topk.nsa_topk_fwd(q, kc, lse, S, l, scale, cu, cfg)
    _check(got, q, kc, S, l, scale, cu, X_FN(q, kc, lse, S, l, scale, cu))
    assert _check(got, q, kc, S, l, scale, cu, T_FN(q, kc, lse, S, l, scale, cu)) <= max(1, T // 100)
    if lengths is not None:
        _check(triton_topk.nsa_topk_fwd(q, kc, None, S, l, scale, cu, cfg), q, kc, S, l, scale, cu)


def test_topk_public_api_tensor_counts_jit_and_determinism():
    """ejnsa.nsa_topk(platform="triton") under jit with array block_counts (S = ceil(T/l)
    slots, each token keeping its first counts[t, h]); two runs bitwise identical."""
    B, T, HQ, H, D, l = 1, 90, 4, 2, 16, 16
    q, kc, _ = _inputs(7, B, T, HQ, H, D, l)
    counts = jnp.asarray(np.random.default_rng(0).integers(-1, 9, size=(B, T, H)), jnp.int32)
    fn = jax.jit(lambda q, kc, c: ejnsa.nsa_topk(q, kc, c, l, platform="triton"))
    a, b = fn(q, kc, counts), fn(q, kc, counts)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    S = math.ceil(T / l)
    assert a.shape == (B, T, H, S)
    want = ejnsa.nsa_topk(q, kc, counts, l, platform="xla")
    _check(a, q, kc, counts, l, D**-0.5, None, want)


def test_topk_beyond_max_slots_runs_the_next_implementation():
    """S with next_power_of_2(S) > MAX_SLOTS: the Triton function declines (Unsupported),
    and the resolver runs the XLA implementation, for the public function and inside the
    Triton NSA pipeline (array block_counts on a long sequence)."""
    B, T, HQ, H, D, l = 1, 40, 2, 1, 8, 16
    q, kc, _ = _inputs(9, B, T, HQ, H, D, l)
    S = triton_topk.MAX_SLOTS + 1
    with pytest.raises(ejnsa.Unsupported, match="at most 128 slots"):
        T_FN(q, kc, None, S, l, 0.5, None)
    got = ejnsa.nsa_topk(q, kc, S, l, 0.5, platform="triton")
    assert got.shape == (B, T, H, S)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(X_FN(q, kc, None, S, l, 0.5, None)))
    # The pipeline asks for ceil(T / l) = 129 slots when block_counts is an array.
    T2 = 16 * 129
    rng = np.random.default_rng(10)
    q2, k2 = rand(rng, (B, T2, HQ, D)), rand(rng, (B, T2, H, D))
    counts = jnp.full((B, T2, H), 2, jnp.int32)
    o = {p: ejnsa.native_sparse_attention(q2, k2, k2, block_counts=counts, block_size=l, platform=p)
         for p in ("triton", "xla")}
    np.testing.assert_allclose(np.asarray(o["triton"]), np.asarray(o["xla"]), rtol=1e-5, atol=1e-5)


def test_topk_ties_prefer_smaller_block():
    """Identical compressed keys make every visible block tie: the smallest indices win,
    in increasing order after the forced blocks."""
    B, T, HQ, H, D, l, S = 1, 160, 2, 1, 16, 16, 5
    rng = np.random.default_rng(1)
    # Values on a 1/4 grid: every q.k is exact in float32 whatever the order of its sum, so
    # the ties are exact in every implementation (the NumPy matmul behind Triton's CPU
    # interpreter sums different rows of one product in different orders).
    q = jnp.round(rand(rng, (B, T, HQ, D)) * 4) / 4
    kc = jnp.broadcast_to(jnp.round(rand(rng, (B, 1, H, D)) * 4) / 4, (B, math.ceil(T / l), H, D))
    got = np.asarray(T_FN(q, kc, None, S, l, 0.25, None))
    want = np.asarray(X_FN(q, kc, None, S, l, 0.25, None))
    np.testing.assert_array_equal(got, want)
    t = T - 1  # cur = 9: forced {0, 8, 9}, then the tied visible blocks 1, 2
    assert got[0, t, 0].tolist() == [0, 8, 9, 1, 2]


# =============================================================================== GPU


def _scores_f64(q, kc, l, scale, tokens):
    """Reference scores [n, H, NB] of the listed tokens (no varlen), float64, -inf = no candidate."""
    qt = f64(q[0, tokens])  # [n, HQ, D]
    k = f64(kc[0])  # [NB, H, D]
    n, HQ, _ = qt.shape
    NB, H, _ = k.shape
    G = HQ // H
    s = scale * (qt.reshape(n, H, G, -1) @ k.transpose(1, 2, 0)[None])  # [n, H, G, NB]
    vis = (np.arange(NB)[None, :] + 1) * l - 1 <= np.asarray(tokens)[:, None]  # [n, NB]
    s = np.where(vis[:, None, None, :], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis[:, None, None, :], np.exp(s - m), 0.0)
    z = e.sum(-1, keepdims=True)
    p = np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0).mean(axis=2)  # [n, H, NB]
    cur = np.asarray(tokens) // l
    cand = np.arange(NB)[None, :] <= cur[:, None]
    forced = (np.arange(NB)[None, :] == 0) | (np.arange(NB)[None, :] == cur[:, None]) | (
        np.arange(NB)[None, :] == cur[:, None] - 1)
    p = np.where(forced[:, None, :], 1.0, p)
    return np.where(cand[:, None, :], p, -np.inf)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 65536])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_topk_gpu_large(T, dtype):
    dt = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]
    B, HQ, H, D, l, S = 1, 64, 4, 128, 64, 16
    q, kc, _ = _inputs(T, B, T, HQ, H, D, l, dt)
    scale = D**-0.5
    _, lse = ejnsa.nsa_compression(q, kc, kc, l, scale, platform="xla")
    got = np.asarray(jax.jit(T_FN, static_argnums=(3, 4, 5))(q, kc, lse, S, l, scale, None))
    want = np.asarray(jax.jit(X_FN, static_argnums=(3, 4, 5))(q, kc, lse, S, l, scale, None))
    again = np.asarray(jax.jit(T_FN, static_argnums=(3, 4, 5))(q, kc, lse, S, l, scale, None))
    assert np.array_equal(got, again), "reruns must be bitwise identical"
    diff = np.flatnonzero(np.any(got != want, axis=-1).any(-1)[0])
    rng = np.random.default_rng(0)
    sample = rng.choice(T, size=min(T, 128), replace=False)
    # Every differing token (up to 128 of them) and a random sample, against float64.
    tokens = np.unique(np.concatenate([diff[:128], sample]))
    score = _scores_f64(q, kc, l, scale, tokens)[None]  # [1, n, H, NB]
    check_topk(got[:, tokens], score, S, tol=TIE_TOL)
    check_topk(want[:, tokens], score, S, tol=TIE_TOL)
    assert len(diff) <= T // 100, f"{len(diff)} tokens differ from XLA: more than near-ties explain"
