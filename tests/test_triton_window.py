"""Triton sliding-window attention (ejnsa.triton.window) against float64 references.

Without --gpu the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
so sizes are tiny; small tiles (16..32 rows/keys) make even these cross many tiles, tile
starts inside a token's G heads (G = 3), all three loop phases, and the dK/dV split.
Forward outputs are checked against tests/reference.py; gradients against the closed-form
float64 softmax-attention gradients below (themselves checked once against jax.grad of
the reference, which is too slow to compile for every case). The tests marked gpu run
the compiled kernels at T = 4096 and 65536 against the XLA path.
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
    from ._util import TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, f64, make_qkv, rand, ref_grads, dense_grads
except ImportError:
    import reference as ref
    from _util import TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, make_qkv, rand, ref_grads, dense_grads

from ejnsa.triton import window as W  # noqa: E402
from ejnsa.triton._common import head_tile  # noqa: E402
from ejnsa.triton.band import BandConfigs, BandDkvConfig, BandDqConfig, BandFwdConfig  # noqa: E402
from ejnsa.triton._call import triton_runnable  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_runnable(), reason="Triton runs neither on a GPU nor in the interpreter here")

# Small tiles: several programs and steps at tiny T (the interpreter is slow per program).
SMALL = BandConfigs(
    fwd=BandFwdConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    dq=BandDqConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),
    dkv=BandDkvConfig(block_n=32, block_m=32, num_warps=4, num_stages=1),
)
SPLIT = BandConfigs(
    fwd=BandFwdConfig(block_m=16, block_n=32, num_warps=4, num_stages=1),
    dq=BandDqConfig(block_m=16, block_n=16, num_warps=4, num_stages=1),
    dkv=BandDkvConfig(block_n=16, block_m=16, num_warps=4, num_stages=1, split_tokens=12),
)


def window_mask(B, T, w, cu=None):
    """[B, T, T]: token t sees key j (same sequence, t - w < j <= t), from the contract's text."""
    seq, pos = ref.seq_layout(B, T, None if cu is None else np.asarray(cu))
    pt, pj = pos[:, :, None], pos[:, None, :]
    return (seq[:, :, None] == seq[:, None, :]) & (pj <= pt) & (pt - w < pj)


def _run(q, k, v, w, cu, configs):
    if configs is None:
        return ejnsa.sliding_window_attention(q, k, v, w, cu_seqlens=cu, platform="triton")
    return W.sliding_window_attention_with(q, k, v, w, q.shape[-1] ** -0.5, cu, configs)


def _check(q, k, v, w, cu=None, configs=SMALL, dtype=jnp.float32, seed=1):
    """Kernel forward and d(query, key, value) vs float64."""
    cot = rand(np.random.default_rng(seed), q.shape[:3] + (v.shape[-1],), dtype)
    o, vjp = jax.vjp(lambda q, k, v: _run(q, k, v, w, cu, configs), q, k, v)
    assert o.dtype == q.dtype and o.shape == cot.shape
    assert_close(o, ref.ref_window(q, k, v, w, cu_seqlens=None if cu is None else np.asarray(cu)), TOL_OUT[dtype], "o")
    got = vjp(cot)
    want = dense_grads(q, k, v, window_mask(q.shape[0], q.shape[1], w, cu), q.shape[-1] ** -0.5, cot)[2:]
    for name, a, b, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_close(a, b, TOL_GRAD[dtype], name)


@pytest.mark.parametrize(
    "dtype,B,T,HQ,H,Dk,Dv,w,configs",
    [
        (jnp.float32, 2, 37, 2, 2, 32, 32, 16, SMALL),  # G = 1, odd T, B > 1
        (jnp.float32, 1, 45, 6, 2, 40, 24, 21, SMALL),  # G = 3 (tiles start mid-token), odd Dk != Dv
        (jnp.float32, 1, 40, 16, 1, 16, 32, 7, None),  # G = 16, the default (Hopper) tiles
        (jnp.float32, 1, 30, 2, 1, 16, 16, 1, SMALL),  # w = 1: each token sees itself only
        (jnp.float32, 1, 40, 4, 2, 16, 16, 1000, SPLIT),  # w > T (causal); split dK/dV partials
        (jnp.bfloat16, 1, 50, 4, 2, 32, 16, 20, SMALL),
        (jnp.float16, 1, 48, 8, 4, 32, 32, 48, SMALL),  # G = 2, w = T
    ],
    ids=["fp32-G1", "fp32-G3-odd-dims", "fp32-G16-default", "fp32-w1", "fp32-causal-split", "bf16", "fp16"],
)
def test_matches_reference(dtype, B, T, HQ, H, Dk, Dv, w, configs):
    q, k, v = make_qkv(np.random.default_rng(0), B, T, HQ, H, Dk, Dv, dtype)
    _check(q, k, v, w, None, configs, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_varlen(dtype):
    """Empty, one-token and longer sequences: positions and windows restart per sequence."""
    lengths = [0, 1, 30, 0, 1, 2, 27]
    q, k, v = make_qkv(np.random.default_rng(2), 1, sum(lengths), 4, 2, 32, 16, dtype)
    _check(q, k, v, 9, jnp.asarray(cu_from_lengths(lengths)), SMALL, dtype)


def test_dense_grads_match_autodiff_reference():
    """The closed-form float64 gradients used above equal jax.grad of reference.ref_window."""
    rng = np.random.default_rng(6)
    lengths = [3, 0, 14]
    cu = cu_from_lengths(lengths)
    q, k, v = make_qkv(rng, 1, sum(lengths), 4, 2, 8, 6)
    cot = rand(rng, (1, sum(lengths), 4, 6))
    want = ref_grads(functools.partial(ref.ref_window, window_size=5, cu_seqlens=cu), dict(q=q, k=k, v=v), cot)
    got = dense_grads(q, k, v, window_mask(1, sum(lengths), 5, cu), 8**-0.5, cot)
    np.testing.assert_allclose(got[0], ref.ref_window(q, k, v, 5, cu_seqlens=cu), rtol=1e-12, atol=1e-12)
    for name, g in zip("qkv", got[2:]):
        np.testing.assert_allclose(g, want[name], rtol=1e-10, atol=1e-12)


def test_matches_xla_path_and_public_api():
    rng = np.random.default_rng(3)
    q, k, v = make_qkv(rng, 1, 33, 4, 2, 24, 40)
    cot = rand(rng, (1, 33, 4, 40))
    outs = {}
    for p in ("triton", "xla"):
        fn = lambda q, k, v, p=p: ejnsa.sliding_window_attention(q, k, v, 11, softmax_scale=0.3, platform=p)
        o, vjp = jax.vjp(fn, q, k, v)
        outs[p] = (o, *vjp(cot))
    for name, a, b in zip(("o", "dq", "dk", "dv"), outs["triton"], outs["xla"]):
        assert_close(a, b, 1e-5 if name == "o" else 2e-5, name)
    assert kernel_registry.get("sliding_window_attention", Platform.TRITON, Backend.GPU) is W.sliding_window_attention


def test_jit_deterministic_and_finite():
    """Under jit, twice: bitwise-identical outputs and gradients, none of them NaN (the
    interpreter poisons unwritten outputs with NaN)."""
    lengths = [5, 0, 30, 1, 12]
    q, k, v = make_qkv(np.random.default_rng(4), 1, sum(lengths), 6, 2, 32, 32, jnp.bfloat16)
    cu = jnp.asarray(cu_from_lengths(lengths))

    @jax.jit
    def step(q, k, v, cu):
        loss = lambda q, k, v: jnp.sum(_run(q, k, v, 13, cu, SMALL).astype(jnp.float32) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    first = jax.tree.map(np.asarray, step(q, k, v, cu))
    second = jax.tree.map(np.asarray, step(q, k, v, cu))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.all(np.isfinite(a.astype(np.float32)))
        assert a.tobytes() == b.tobytes()


def test_default_configs():
    """Hopper tiles: dots stay >= 16 wide, the window never splits dK/dV."""
    for dk, dv in ((64, 64), (128, 128), (192, 128), (256, 256), (40, 24)):
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            c = BandConfigs.default(dk, dv, dtype)
            assert min(c.fwd.block_m, c.fwd.block_n, c.dq.block_m, c.dq.block_n, c.dkv.block_m, c.dkv.block_n) >= 16
            assert c.dkv.split_tokens == 0
    assert head_tile(40) == 64 and head_tile(8) == 16


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 65536])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_gpu_matches_xla(dtype, T):
    """Compiled kernels vs the XLA path (float32 HIGHEST): forward and all gradients."""
    rng = np.random.default_rng(5)
    HQ, H, D, w = 16, 2, 128, 512
    q, k, v = make_qkv(rng, 1, T, HQ, H, D, D, dtype)
    cot = rand(rng, (1, T, HQ, D), dtype)
    tol_o, tol_g = (1e-2, 2e-2) if dtype == jnp.bfloat16 else (5e-5, 1e-4)  # fp32: tf32x3 dots
    res = {}
    for p in ("triton", "xla"):
        def fwd_bwd(q, k, v, c, p=p):
            o, vjp = jax.vjp(lambda q, k, v: ejnsa.sliding_window_attention(q, k, v, w, platform=p), q, k, v)
            return (o, *vjp(c))
        res[p] = jax.jit(fwd_bwd)(q, k, v, cot)
    for name, a, b in zip(["o", "dq", "dk", "dv"], res["triton"], res["xla"]):
        assert_close(a, b, tol_o if name == "o" else tol_g, f"T={T} {name}")
