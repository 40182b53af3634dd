"""The whole NSA on the Triton path against the XLA path (outputs and every gradient).

ejnsa.native_sparse_attention(platform="triton") composes XLA pooling, the Triton
compression, top-k, selection and window kernels and XLA gating. The selection is a
discrete decision: where two block scores are closer than float32 rounding the paths may
legitimately pick different blocks. So the comparison is made exact instead of loose:

1. the block indices each pipeline selects are recomputed here exactly as the pipeline
   does (same pieces, same lse) and both are checked against the float64 reference
   scores as tie-tolerant sets (tests/_util.check_topk, tolerance 1e-6 on a score);
2. the XLA path is then fed the Triton path's indices, so that everything downstream is
   compared with the usual relative-error tolerances, never loosened for ties.

On a CPU the kernels run in Triton's interpreter (tiny shapes); `pytest --gpu` adds the
large cases marked gpu.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejnsa
from ejnsa import kernel_registry
from ejnsa._nsa import clamp_counts, topk_slots

try:
    from . import reference as ref
    from ._util import (assert_close, check_topk, cu_from_lengths, f64, impl_grads, messy_block_indices, rand,
                        rand_gate, rel_err)
    from .test_triton_topk import _scores_f64
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref
    from _util import (assert_close, check_topk, cu_from_lengths, f64, impl_grads, messy_block_indices, rand,
                       rand_gate, rel_err)
    from test_triton_topk import _scores_f64

DT = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
# Triton vs XLA, relative error ‖a − b‖ / ‖b‖. Both compute in float32; for 16-bit inputs
# the outputs (and the kernels' tensor-core operands in the backward) are rounded to the
# input dtype, worth ~2^-9 (bf16) / 2^-11 (fp16) relative.
TOL_OUT = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}
TOL_GRAD = {"fp32": 2e-5, "bf16": 2e-2, "fp16": 5e-3}
GPU_TOL_OUT = {"fp32": 1e-4, "bf16": 1e-2}  # tf32x3 dots on the GPU
GPU_TOL_GRAD = {"fp32": 2e-4, "bf16": 2e-2}


def _pipeline_indices(platform, q, k, v, g_cmp, block_counts, l, scale, cu):
    """The block indices the `platform` pipeline selects, computed as ejnsa/_nsa.py does."""
    pool = ejnsa.kernel_registry.get("mean_pooling", "xla", "any")
    k_cmp = pool(k, l, cu)
    lse = None
    if g_cmp is not None:
        _, lse = kernel_registry.call("nsa_compression", q, k_cmp, pool(v, l, cu), l, scale, cu, k.shape[1],
                                        platform=platform)
    slots = topk_slots(block_counts, k.shape[1], l)
    return kernel_registry.call("nsa_topk", q, k_cmp, lse, slots, l, scale, cu, k.shape[1],
                                platform=platform), k_cmp


def _masked(idx, block_counts):
    """Indices as the selection uses them: slots past a token's count are -1."""
    idx = np.asarray(idx)
    counts = clamp_counts(block_counts, idx.shape[-1])
    if counts is None:
        return idx
    return np.where(np.arange(idx.shape[-1]) < np.asarray(counts)[..., None], idx, -1)


def _make(seed, B, T, HQ, H, Dk, Dv, dtype, gates="csw", lengths=None):
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, (B, T, HQ, Dk), dtype), rand(rng, (B, T, H, Dk), dtype, scale=3.0), rand(rng, (B, T, H, Dv), dtype)
    g = {n: (rand_gate(rng, (B, T, HQ), dtype) if c in gates else None) for n, c in (("g_cmp", "c"), ("g_slc", "s"), ("g_swa", "w"))}
    cu = None if lengths is None else jnp.asarray(cu_from_lengths(lengths))
    return rng, q, k, v, g, cu


def _compare(rng, q, k, v, g, cu, dtype, l, window, block_counts=3, block_indices=None, tol_out=None, tol_grad=None,
             check_same_path=False):
    """Triton NSA (block_indices None -> its own top-k) vs XLA NSA fed the Triton indices."""
    scale = q.shape[-1] ** -0.5
    kw = dict(block_counts=block_counts, block_size=l, window_size=window, softmax_scale=scale, cu_seqlens=cu)
    if block_indices is None:
        idx_tr, k_cmp = _pipeline_indices("triton", q, k, v, g["g_cmp"], block_counts, l, scale, cu)
        idx_x, _ = _pipeline_indices("xla", q, k, v, g["g_cmp"], block_counts, l, scale, cu)
        score = ref.ref_topk_scores(f64(q), f64(k_cmp), l, scale, None if cu is None else np.asarray(cu))
        check_topk(_masked(idx_tr, block_counts), score, block_counts)
        check_topk(_masked(idx_x, block_counts), score, block_counts)
        given_x = idx_tr
    else:
        given_x = block_indices

    def nsa(platform, bi):
        def f(q, k, v, g_cmp=None, g_slc=None, g_swa=None):
            return ejnsa.native_sparse_attention(q, k, v, g_cmp, g_slc, g_swa, block_indices=bi, platform=platform, **kw)
        return f

    f_tr = nsa("triton", block_indices)
    f_x = nsa("xla", given_x)
    args = {"q": q, "k": k, "v": v, **{n: x for n, x in g.items() if x is not None}}
    o_tr = jax.jit(f_tr)(**args)
    o_x = jax.jit(f_x)(**args)
    assert o_tr.dtype == q.dtype and o_tr.shape == q.shape[:3] + (v.shape[-1],)
    assert np.all(np.isfinite(f64(o_tr))), "non-finite output"
    err = rel_err(o_tr, o_x)
    assert err <= tol_out, f"output: relative error {err:.3e} > {tol_out:.1e}"
    if check_same_path:
        # The indices recomputed above are the ones the pipeline used: bitwise the same output.
        assert np.array_equal(np.asarray(o_tr), np.asarray(jax.jit(nsa("triton", given_x))(**args)))

    cot = rand(rng, o_tr.shape, jnp.float32)
    g_tr = impl_grads(lambda **a: f_tr(**a), args, cot)
    g_x = impl_grads(lambda **a: f_x(**a), args, cot)
    errs = {}
    for name in args:
        assert g_tr[name].shape == args[name].shape and g_tr[name].dtype == args[name].dtype, name
        assert np.all(np.isfinite(f64(g_tr[name]))), f"d{name}: non-finite"
        errs[name] = rel_err(g_tr[name], g_x[name])
    print(f"[{dtype}] output {err:.2e}, gradients " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    bad = {n: e for n, e in errs.items() if not e <= tol_grad}
    assert not bad, f"gradients beyond {tol_grad:.1e}: {bad} (all: {errs})"
    return o_tr, g_tr


# =============================================================================== CPU


def test_nsa_full_fp32_jit():
    """All three branches and gates, own top-k (lse from the compression), G=2, Dk != Dv."""
    rng, q, k, v, g, cu = _make(0, 1, 100, 4, 2, 32, 24, jnp.float32)
    _compare(rng, q, k, v, g, cu, "fp32", l=16, window=24, block_counts=3,
             tol_out=TOL_OUT["fp32"], tol_grad=TOL_GRAD["fp32"], check_same_path=True)


def test_nsa_no_cmp_gate_no_window_bf16():
    """g_cmp None (top-k computes lse itself), no window, G=1, odd T."""
    rng, q, k, v, g, cu = _make(1, 2, 77, 2, 2, 40, 40, jnp.bfloat16, gates="s")
    _compare(rng, q, k, v, g, cu, "bf16", l=16, window=0, block_counts=2,
             tol_out=TOL_OUT["bf16"], tol_grad=TOL_GRAD["bf16"])


def test_nsa_given_indices_tensor_counts_g16():
    """block_indices given (invalid, duplicate and future entries mixed in), array counts, G=16."""
    rng, q, k, v, g, cu = _make(2, 1, 70, 16, 1, 16, 16, jnp.float32, gates="cw")
    bi = messy_block_indices(rng, 1, 70, 1, 4, 16)
    counts = jnp.asarray(rng.integers(-1, 6, size=(1, 70, 1)), jnp.int32)
    _compare(rng, q, k, v, g, cu, "fp32", l=16, window=16, block_counts=counts, block_indices=bi,
             tol_out=TOL_OUT["fp32"], tol_grad=TOL_GRAD["fp32"])


def test_nsa_varlen_tensor_counts():
    """Packed sequences (empty and one-token ones), own top-k with array counts, window on."""
    lengths = [0, 1, 37, 0, 40, 1, 17]
    rng, q, k, v, g, cu = _make(3, 1, sum(lengths), 4, 2, 16, 16, jnp.float32, lengths=lengths)
    counts = jnp.asarray(rng.integers(0, 5, size=(1, sum(lengths), 2)), jnp.int32)
    _compare(rng, q, k, v, g, cu, "fp32", l=16, window=8, block_counts=counts,
             tol_out=TOL_OUT["fp32"], tol_grad=TOL_GRAD["fp32"])


def test_nsa_fp16_and_determinism():
    """fp16 end to end; the Triton forward and gradients are bitwise identical on a rerun."""
    rng, q, k, v, g, cu = _make(4, 1, 64, 4, 1, 16, 32, jnp.float16, gates="csw")
    o1, g1 = _compare(rng, q, k, v, g, cu, "fp16", l=16, window=16, block_counts=2,
                      tol_out=TOL_OUT["fp16"], tol_grad=TOL_GRAD["fp16"])
    cot = rand(np.random.default_rng(5), o1.shape, jnp.float32)

    def f(q, k, v, g_cmp, g_slc, g_swa):
        return ejnsa.native_sparse_attention(q, k, v, g_cmp, g_slc, g_swa, block_counts=2, block_size=16,
                                             window_size=16, platform="triton")

    args = {"q": q, "k": k, "v": v, **g}
    o2 = jax.jit(f)(**args)
    assert np.array_equal(np.asarray(o1), np.asarray(o2)), "forward differs between runs"
    ga, gb = impl_grads(f, args, cot), impl_grads(f, args, cot)
    for n in args:
        assert np.array_equal(np.asarray(ga[n]), np.asarray(gb[n])), f"d{n} differs between runs"


# =============================================================================== GPU


def _check_gpu_selection(idx_tr, idx_x, q, k_cmp, l, scale, S):
    """Differing rows must be near-ties: checked in float64 on those tokens and a sample."""
    got, want = np.asarray(idx_tr), np.asarray(idx_x)
    T = got.shape[1]
    diff = np.flatnonzero(np.any(got[0] != want[0], axis=(-1, -2)))
    sample = np.random.default_rng(0).choice(T, size=min(T, 64), replace=False)
    tokens = np.unique(np.concatenate([diff[:64], sample]))
    score = _scores_f64(q, k_cmp, l, scale, tokens)[None]
    check_topk(got[:, tokens], score, S)
    check_topk(want[:, tokens], score, S)
    assert len(diff) <= max(8, T // 100), f"{len(diff)} of {T} tokens select differently"


@pytest.mark.parametrize("varlen", [False, True], ids=["batch_rows", "packed"])
def test_nsa_vmap_matches_per_example_calls(varlen):
    """jax.vmap over an extra leading axis on the Triton path, outputs and gradients (also
    vmap of grad, and an unmapped gate): equal to calling it on each entry. Without
    cu_seqlens the launches run the mapped entries as extra batch rows; with it, one by one
    (ejnsa/triton/_vmap.py)."""
    lengths = [0, 13, 1, 26] if varlen else None
    N, B, T, HQ, H, D, l = 2, (1 if varlen else 2), 40, 4, 2, 16, 16
    rng = np.random.default_rng(21)
    q, k, v = rand(rng, (N, B, T, HQ, D)), rand(rng, (N, B, T, H, D), scale=3.0), rand(rng, (N, B, T, H, D))
    g_cmp, g_slc = rand_gate(rng, (N, B, T, HQ)), rand_gate(rng, (N, B, T, HQ))
    g_swa = rand_gate(rng, (B, T, HQ))  # not mapped
    cu = None if lengths is None else jnp.asarray(cu_from_lengths(lengths))
    cot = rand(rng, (N, B, T, HQ, D))

    def nsa(q, k, v, g_cmp, g_slc, g_swa):
        return ejnsa.native_sparse_attention(q, k, v, g_cmp, g_slc, g_swa, block_counts=3, block_size=l,
                                             window_size=8, cu_seqlens=cu, platform="triton")

    def loss(q, k, v, g_cmp, g_slc, g_swa, cot):
        return jnp.sum(nsa(q, k, v, g_cmp, g_slc, g_swa).astype(jnp.float32) * cot)

    axes = (0, 0, 0, 0, 0, None)
    o = jax.jit(jax.vmap(nsa, in_axes=axes))(q, k, v, g_cmp, g_slc, g_swa)
    if not varlen:  # the kernels see N * B batch rows
        assert f"[{N * B},{T},{HQ},{D}]" in str(jax.make_jaxpr(jax.vmap(nsa, in_axes=axes))(q, k, v, g_cmp, g_slc, g_swa))
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)), in_axes=axes + (0,)))(
        q, k, v, g_cmp, g_slc, g_swa, cot)
    for i in range(N):
        args = (q[i], k[i], v[i], g_cmp[i], g_slc[i], g_swa)
        assert_close(o[i], f64(jax.jit(nsa)(*args)), 1e-6, f"o[{i}]")
        want = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args, cot[i])
        for name, got, w in zip(("dq", "dk", "dv", "dg_cmp"), grads, want):
            assert_close(got[i], f64(w), 1e-6, f"{name}[{i}]")
    # grad of a vmapped sum, and the gradient of the unmapped gate (summed over entries)
    dg_swa = jax.jit(jax.grad(lambda g: jnp.sum(jax.vmap(loss, in_axes=axes + (0,))(
        q, k, v, g_cmp, g_slc, g, cot))))(g_swa)
    want = sum(jax.jit(jax.grad(loss, argnums=5))(q[i], k[i], v[i], g_cmp[i], g_slc[i], g_swa, cot[i])
               for i in range(N))
    assert_close(dg_swa, f64(want), 1e-5, "dg_swa")


@pytest.mark.gpu
@pytest.mark.parametrize("T,HQ,H,D", [(4096, 64, 4, 128), (65536, 16, 1, 64)])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_nsa_gpu_large(T, HQ, H, D, dtype):
    l, S, w = 64, 16, 512
    rng, q, k, v, g, cu = _make(T, 1, T, HQ, H, D, D, DT[dtype])
    scale = D**-0.5
    idx_tr, k_cmp = _pipeline_indices("triton", q, k, v, g["g_cmp"], S, l, scale, None)
    idx_x, _ = _pipeline_indices("xla", q, k, v, g["g_cmp"], S, l, scale, None)
    _check_gpu_selection(idx_tr, idx_x, q, k_cmp, l, scale, S)
    kw = dict(block_counts=S, block_size=l, window_size=w, softmax_scale=scale)

    def f_tr(**a):
        return ejnsa.native_sparse_attention(**a, platform="triton", **kw)

    def f_x(**a):
        return ejnsa.native_sparse_attention(**a, block_indices=idx_tr, platform="xla", **kw)

    args = {"query": q, "key": k, "value": v, **g}
    o_tr, o_x = jax.jit(f_tr)(**args), jax.jit(f_x)(**args)
    assert rel_err(o_tr, o_x) <= GPU_TOL_OUT[dtype]
    cot = rand(rng, o_tr.shape, jnp.float32)
    g_tr, g_x = impl_grads(f_tr, args, cot), impl_grads(f_x, args, cot)
    errs = {n: rel_err(g_tr[n], g_x[n]) for n in args}
    assert all(e <= GPU_TOL_GRAD[dtype] for e in errs.values()), errs
