"""Triton compressed attention (ejnsa.triton.compression) against float64 references.

Without --gpu the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
so sizes are tiny; small tiles make them cross many tiles and split the dK/dV query axis
into several float32 partials. Both outputs are differentiated: the cotangent of lse_cmp
is random too. Forward values come from tests/reference.py, gradients from closed-form
float64 attention gradients (checked once against jax.grad of the reference). The tests
marked gpu run the compiled kernels at T = 4096 and 65536 against the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejnsa
from ejnsa import Backend, Platform, kernel_registry

try:
    from . import reference as ref
    from ._util import TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, f64, rand, ref_grads, dense_grads
except ImportError:
    import reference as ref
    from _util import TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, f64, rand, ref_grads, dense_grads

from ejnsa.triton import compression as C  # noqa: E402
from ejnsa.triton.band import BandConfigs, BandDkvConfig, BandDqConfig, BandFwdConfig  # noqa: E402
from ejnsa.triton._call import triton_runnable  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_runnable(), reason="Triton runs neither on a GPU nor in the interpreter here")

SMALL = BandConfigs(
    fwd=BandFwdConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    dq=BandDqConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    dkv=BandDkvConfig(block_n=16, block_m=32, num_warps=4, num_stages=1, split_tokens=24),
)


def compressed_mask(B, T, NC, l, cu=None):
    """[B, T, NC]: token t sees packed row r (its own sequence's block c, (c+1)*l - 1 <= pos)."""
    cu = None if cu is None else np.asarray(cu)
    seq, pos = ref.seq_layout(B, T, cu)
    row_seq = np.full(NC, -1)
    row_blk = np.zeros(NC, np.int64)
    for r, (i, c, _, _) in enumerate(ref.cmp_rows(T, l, cu)[:NC]):
        row_seq[r], row_blk[r] = i, c
    return (row_seq[None, None, :] == seq[:, :, None]) & ((row_blk[None, None, :] + 1) * l - 1 <= pos[:, :, None])


def make_inputs(rng, B, T, HQ, H, Dk, Dv, l, dtype=jnp.float32, cu=None):
    """query and random (not pooled) k_cmp, v_cmp with the static number of rows: the
    kernel must not care where they came from, nor read rows past the packed total."""
    NC = ref.num_cmp_rows(T, l, cu)
    return rand(rng, (B, T, HQ, Dk), dtype), rand(rng, (B, NC, H, Dk), dtype), rand(rng, (B, NC, H, Dv), dtype)


def _run(q, kc, vc, l, cu, configs):
    if configs is None:
        return ejnsa.nsa_compression(q, kc, vc, l, cu_seqlens=cu, platform="triton")
    return C.nsa_compression_with(q, kc, vc, l, q.shape[-1] ** -0.5, cu, configs)


def _check(q, kc, vc, l, cu=None, configs=SMALL, dtype=jnp.float32, seed=1):
    """Kernel (o, lse) and d(query, k_cmp, v_cmp) under random cotangents of both, vs float64."""
    rng = np.random.default_rng(seed)
    B, T, HQ, _ = q.shape
    do = rand(rng, (B, T, HQ, vc.shape[-1]), dtype)
    dlse = rand(rng, (B, T, HQ), jnp.float32)
    (o, lse), vjp = jax.vjp(lambda q, kc, vc: _run(q, kc, vc, l, cu, configs), q, kc, vc)
    assert o.dtype == q.dtype and o.shape == do.shape and lse.dtype == jnp.float32 and lse.shape == (B, T, HQ)
    ro, rl = ref.ref_compression(q, kc, vc, l, cu_seqlens=None if cu is None else np.asarray(cu))
    assert_close(o, ro, TOL_OUT[dtype], "o")
    lse = np.asarray(lse)
    empty = np.isinf(rl)
    assert np.array_equal(np.isneginf(lse), empty), "lse must be -inf exactly for tokens that see no block"
    assert np.all(np.isfinite(lse[~empty]))
    if (~empty).any():
        assert np.max(np.abs(lse[~empty] - rl[~empty])) <= 1e-5 * max(1.0, np.max(np.abs(rl[~empty])))
    assert np.all(f64(o)[empty] == 0.0)
    got = vjp((do, dlse))
    mask = compressed_mask(B, T, kc.shape[1], l, cu)
    want = dense_grads(q, kc, vc, mask, q.shape[-1] ** -0.5, do, dlse)[2:]
    for name, a, b, x in zip(("dq", "dk_cmp", "dv_cmp"), got, want, (q, kc, vc)):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_close(a, b, TOL_GRAD[dtype], name)


@pytest.mark.parametrize(
    "dtype,B,T,HQ,H,Dk,Dv,l,configs",
    [
        (jnp.float32, 2, 70, 4, 2, 32, 16, 16, SMALL),  # G = 2, B > 1, partial last block, 3 dK/dV parts
        (jnp.float32, 1, 61, 3, 1, 40, 24, 16, SMALL),  # G = 3 (tiles start mid-token), odd Dk != Dv
        (jnp.float32, 1, 50, 16, 1, 16, 32, 16, None),  # G = 16, the default (Hopper) tiles
        (jnp.float32, 1, 45, 2, 2, 16, 16, 16, SMALL),  # G = 1
        (jnp.bfloat16, 1, 64, 4, 2, 32, 32, 32, SMALL),
        (jnp.float16, 1, 48, 8, 2, 16, 32, 16, SMALL),  # G = 4
    ],
    ids=["fp32-G2-B2", "fp32-G3-odd-dims", "fp32-G16-default", "fp32-G1", "bf16", "fp16"],
)
def test_matches_reference(dtype, B, T, HQ, H, Dk, Dv, l, configs):
    q, kc, vc = make_inputs(np.random.default_rng(0), B, T, HQ, H, Dk, Dv, l, dtype)
    _check(q, kc, vc, l, None, configs, dtype)


def test_no_visible_block():
    """T < l: every token sees nothing: o = 0, lse = -inf, zero (finite) gradients."""
    q, kc, vc = make_inputs(np.random.default_rng(7), 1, 12, 4, 2, 16, 16, 16)
    (o, lse), vjp = jax.vjp(lambda q, kc, vc: _run(q, kc, vc, 16, None, SMALL), q, kc, vc)
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
    grads = vjp((rand(np.random.default_rng(8), o.shape), rand(np.random.default_rng(9), lse.shape)))
    for g in grads:
        assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_varlen(dtype):
    """Packed sequences: empty, one-token, exactly-one-block and partial-block sequences,
    compressed rows packed per sequence (static row count past the real total)."""
    lengths = [0, 1, 17, 0, 33, 16, 3]
    cu = cu_from_lengths(lengths)
    q, kc, vc = make_inputs(np.random.default_rng(2), 1, sum(lengths), 4, 2, 32, 16, 16, dtype, cu)
    _check(q, kc, vc, 16, jnp.asarray(cu), SMALL, dtype)


def test_dense_grads_match_autodiff_reference():
    """The closed-form float64 gradients used above equal jax.grad of reference.ref_compression."""
    rng = np.random.default_rng(6)
    lengths = [20, 0, 37]
    cu = cu_from_lengths(lengths)
    T = sum(lengths)
    q, kc, vc = make_inputs(rng, 1, T, 4, 2, 8, 6, 16, cu=cu)
    do = rand(rng, (1, T, 4, 6))
    mask = compressed_mask(1, T, kc.shape[1], 16, cu)
    dlse = jnp.where(mask.any(-1)[..., None], rand(rng, (1, T, 4)), 0.0)  # no cotangent on -inf
    fn = functools.partial(ref.ref_compression, block_size=16, cu_seqlens=cu)
    want = ref_grads(lambda xp, q, kc, vc: fn(q, kc, vc, xp=xp), dict(q=q, kc=kc, vc=vc), (do, dlse))
    got = dense_grads(q, kc, vc, mask, 8**-0.5, do, dlse)
    ro, rl = ref.ref_compression(q, kc, vc, 16, cu_seqlens=cu)
    np.testing.assert_allclose(got[0], ro, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(rl))
    for name, g in zip(("q", "kc", "vc"), got[2:]):
        np.testing.assert_allclose(g, want[name], rtol=1e-10, atol=1e-12)


def test_matches_xla_path_and_public_api():
    rng = np.random.default_rng(3)
    q, kc, vc = make_inputs(rng, 1, 40, 4, 2, 24, 40, 16)
    cot = (rand(rng, (1, 40, 4, 40)), rand(rng, (1, 40, 4)))
    outs = {}
    for p in ("triton", "xla"):
        fn = lambda q, kc, vc, p=p: ejnsa.nsa_compression(q, kc, vc, 16, softmax_scale=0.3, platform=p)
        (o, lse), vjp = jax.vjp(fn, q, kc, vc)
        outs[p] = (o, jnp.where(jnp.isfinite(lse), lse, 0.0), *vjp(cot))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), outs["triton"], outs["xla"]):
        assert_close(a, b, 1e-5 if name in ("o", "lse") else 2e-5, name)
    assert kernel_registry.get("nsa_compression", Platform.TRITON, Backend.GPU) is C.nsa_compression


def test_jit_deterministic_and_finite():
    """Under jit, twice: bitwise-identical outputs and gradients (dK/dV partials are summed
    in a fixed order), no NaN anywhere (the interpreter poisons unwritten outputs)."""
    lengths = [5, 0, 40, 1, 20]
    cu = cu_from_lengths(lengths)
    q, kc, vc = make_inputs(np.random.default_rng(4), 1, sum(lengths), 6, 2, 32, 32, 16, jnp.bfloat16, cu)

    @jax.jit
    def step(q, kc, vc, cu):
        def loss(q, kc, vc):
            o, lse = _run(q, kc, vc, 16, cu, SMALL)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, kc, vc)

    first = jax.tree.map(np.asarray, step(q, kc, vc, jnp.asarray(cu)))
    second = jax.tree.map(np.asarray, step(q, kc, vc, jnp.asarray(cu)))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.all(np.isfinite(a.astype(np.float32)))
        assert a.tobytes() == b.tobytes()


def test_default_configs():
    """The dK/dV split gives ~TARGET_DKV_PROGRAMS programs and never parts under the minimum."""
    assert BandConfigs.default(128, 128, jnp.bfloat16).dkv.block_n == 128
    assert C.split_tokens(65536, 1024, 1, 4, 128) == 2048  # 8 key tiles x 32 parts x 4 heads
    assert C.split_tokens(4096, 64, 1, 4, 128) == C.MIN_SPLIT_TOKENS
    for dk, dv in ((64, 64), (192, 128), (256, 256), (40, 24)):
        for dtype in (jnp.bfloat16, jnp.float32):
            q = jax.ShapeDtypeStruct((1, 8192, 16, dk), dtype)
            kc = jax.ShapeDtypeStruct((1, 128, 1, dk), dtype)
            vc = jax.ShapeDtypeStruct((1, 128, 1, dv), dtype)
            cfg = C.default_configs(q, kc, vc)
            assert cfg.dkv.split_tokens > 0 and min(cfg.fwd.block_m, cfg.dq.block_n, cfg.dkv.block_m) >= 16


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 65536])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_gpu_matches_xla(dtype, T):
    """Compiled kernels vs the XLA path (float32 HIGHEST): o, lse and all gradients,
    with cotangents on both outputs."""
    rng = np.random.default_rng(5)
    HQ, H, D, l = 16, 2, 128, 64
    q, kc, vc = make_inputs(rng, 1, T, HQ, H, D, D, l, dtype)
    cot = (rand(rng, (1, T, HQ, D), dtype), rand(rng, (1, T, HQ)))
    tol_o, tol_g = (1e-2, 2e-2) if dtype == jnp.bfloat16 else (5e-5, 1e-4)  # fp32: tf32x3 dots
    res = {}
    for p in ("triton", "xla"):
        def fwd_bwd(q, kc, vc, c, p=p):
            (o, lse), vjp = jax.vjp(lambda q, kc, vc: ejnsa.nsa_compression(q, kc, vc, l, platform=p), q, kc, vc)
            return (o, jnp.where(jnp.isfinite(lse), lse, 0.0), *vjp(c))
        res[p] = jax.jit(fwd_bwd)(q, kc, vc, cot)
    for name, a, b in zip(["o", "lse", "dq", "dk", "dv"], res["triton"], res["xla"]):
        tol = tol_o if name in ("o", "lse") else tol_g
        assert_close(a, b, 1e-5 if name == "lse" else tol, f"T={T} {name}")
