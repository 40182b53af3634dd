"""The Triton decode step (ejnsa/triton/decode.py) against the XLA step, its reference.

Both steps take the same cache and the same new token per row; the XLA step is checked
against the full call in tests/test_decode.py. Rows of different lengths decode together
(one idle: num_new = 0, output 0), positions cross block boundaries (a block completes
and becomes visible; a token that sees no compressed block), G in {1, 3, 16}, Dk != Dv,
array block_counts, window and g_cmp on and off, bf16, and non-finite cache entries.
Under the interpreter on the CPU; `--gpu` runs the real kernels, and a test at the
benchmark's shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejnsa
from ejnsa._registry import Unsupported

try:
    from ._util import rand, rand_gate
except ImportError:
    from _util import rand, rand_gate

L, S, W = 16, 3, 8


def _inputs(seed, B, T, HQ, H, Dk, Dv, dtype):
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, (B, T, HQ, Dk), dtype), rand(rng, (B, T, H, Dk), dtype), rand(rng, (B, T, H, Dv), dtype)
    return q, k, v, tuple(rand_gate(rng, (B, T, HQ), dtype) for _ in range(3))


def _step(platform, window, cmp, block_size=L, window_size=W):
    def step(cache, q, k, v, g1, g2, g3, counts, num_new):
        return ejnsa.nsa_decode(cache, q, k, v, g1 if cmp else None, g2, g3 if window else None,
                                block_counts=S if counts is None else counts, block_size=block_size,
                                window_size=window_size if window else 0, num_new=num_new, platform=platform)
    return jax.jit(step)


def _same(a, b, what, tol):
    """Equal NaN patterns, and the finite rest within tol (relative, per case)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN pattern")
    ok = ~np.isnan(b)
    err = np.linalg.norm(a[ok] - b[ok]) / max(np.linalg.norm(b[ok]), 1e-30)
    assert err < tol, f"{what}: relative error {err:.2e}"


CASES = {  # name: (HQ, H, Dk, Dv, window, cmp, array counts)
    "G1": (2, 2, 16, 16, True, True, False),
    "G3_DkDv_counts": (6, 2, 16, 24, True, True, True),
    "G16_nowindow": (16, 1, 16, 16, False, True, False),
    "G2_no_gcmp": (4, 2, 16, 16, True, False, False),
}


def _walk(case, dtype=jnp.float32, steps=3, poison=None, poison_value=None, prefill=(30, 15, 0), cap=48):
    """Prefill three rows with `prefill` tokens (XLA; 30, 15 and 0), then `steps`
    single-token steps with both steps on the same cache of `cap` tokens; row 2 idles for
    the first step. Returns the list of (triton, xla) outputs."""
    HQ, H, Dk, Dv, window, cmp, array_counts = CASES[case]
    B, T = 3, max(prefill) + 10
    q, k, v, gates = _inputs(list(CASES).index(case), B, T, HQ, H, Dk, Dv, dtype)
    if poison is not None:
        k = k.at[poison].set(jnp.nan)
    if poison_value is not None:
        v = v.at[poison_value].set(jnp.inf)
    counts = None
    if array_counts:
        counts = jnp.asarray(np.random.default_rng(3).integers(0, S + 2, (B, T, H)), jnp.int32)
    xla, tri = _step("xla", window, cmp), _step("triton", window, cmp)
    cache = ejnsa.init_nsa_cache(B, cap, H, Dk, Dv, block_size=L, dtype=dtype)
    cut = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    n0 = max(prefill)
    _, cache = xla(cache, q[:, :n0], k[:, :n0], v[:, :n0], *(g[:, :n0] for g in gates), cut(counts, 0, n0),
                   jnp.asarray(prefill, jnp.int32))
    done = np.array(prefill)
    outs = []
    for i in range(steps):
        n = np.array([1, 1, 0 if i == 0 else 1])
        idx = jnp.asarray(np.minimum(done, T - 1))[:, None]
        take = lambda x: None if x is None else jnp.take_along_axis(  # noqa: E731
            x, idx.reshape(B, 1, *([1] * (x.ndim - 2))), axis=1)
        args = (take(q), take(k), take(v), *map(take, gates), take(counts), jnp.asarray(n, jnp.int32))
        a, cache_a = tri(cache, *args)
        b, cache = xla(cache, *args)
        for x, y in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert a.dtype == dtype and a.shape == (B, 1, HQ, Dv)
        if i == 0:
            assert np.all(np.asarray(a)[2] == 0), "an idle row outputs 0"
        outs.append((a, b))
        done += n
    return outs


@pytest.mark.parametrize("case", list(CASES))
def test_triton_step_equals_xla_step(case):
    for i, (a, b) in enumerate(_walk(case, steps=2)):
        assert np.all(np.isfinite(np.asarray(a)))
        _same(a, b, f"{case} step {i}", 1e-5)


def test_triton_step_bf16():
    """bf16, with an Inf in row 1's value at position 10 (in the window of its steps)."""
    for i, (a, b) in enumerate(_walk("G3_DkDv_counts", jnp.bfloat16, steps=2, poison_value=(1, 10, 1, 5))):
        _same(a, b, f"bf16 step {i}", 1e-2)
        a = np.asarray(a, np.float32)
        assert np.isnan(a[1, 0, 3:]).all() and np.isfinite(a[0]).all(), "row 1's heads of KV head 1 see the Inf"


def test_triton_step_non_finite_cache():
    """A NaN key in row 1's cache (position 3: block 0, which every token selects, outside
    the windows of the steps) gives NaN where the XLA step gives it, and leaves
    row 0 bit-identical to a run without it."""
    clean = _walk("G1", steps=2)
    dirty = _walk("G1", steps=2, poison=(1, 3, 0, 3))
    for i, ((a, b), (c, _)) in enumerate(zip(dirty, clean)):
        _same(a, b, f"non-finite step {i}", 1e-5)
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(c)[0])
        assert np.isnan(np.asarray(a)[1]).any(), "row 1 sees its NaN key (compressed block 0)"


@pytest.mark.parametrize("case", ["G3_DkDv_counts", "G16_nowindow"])
def test_triton_step_other_tiles(case, monkeypatch):
    """Tiles the default does not pick at these sizes: the compressed keys of rows of 300
    and 200 tokens (19 and 13 blocks) in splits of 16, all selected slots in one program,
    loaded two blocks at a time, the window in steps of 16, and the combine merging two
    partials of 8 value columns per step."""
    from ejnsa.triton import decode

    config = decode.DecodeConfig(cmp_programs=1 << 20, min_split_rows=16, cmp_rows=16, attend_programs=1,
                                 slot_tile=2, window_step=16, combine_cols=8, combine_partials=2)
    monkeypatch.setattr(decode.DecodeConfig, "default", staticmethod(lambda block_size: config))
    for i, (a, b) in enumerate(_walk(case, steps=2, prefill=(300, 200, 0), cap=320)):
        assert np.all(np.isfinite(np.asarray(a)))
        _same(a, b, f"{case} step {i}", 1e-5)


def test_other_calls_run_on_xla():
    """TN > 1 (a prefill chunk) is not the Triton step's: it says so, and platform="triton"
    runs the XLA step instead (the registry's fallback)."""
    from ejnsa.triton import decode

    B, T, H, D = 1, 20, 1, 16
    q, k, v, gates = _inputs(7, B, T, 2, H, D, D, jnp.float32)
    kw = dict(block_counts=S, block_size=L, window_size=W)
    cache = ejnsa.init_nsa_cache(B, T, H, D, block_size=L)
    a, _ = ejnsa.nsa_decode(cache, q, k, v, *gates, platform="xla", **kw)
    b, _ = ejnsa.nsa_decode(cache, q, k, v, *gates, platform="triton", **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    z = jnp.zeros((B,), jnp.int32)
    with pytest.raises(Unsupported, match="one new token per row"):
        decode.nsa_decode(q, cache.key, cache.value, cache.key_cmp, cache.value_cmp, *gates, z, z, None, S, L, W, 0.25)
    with pytest.raises(Unsupported, match="top-k slots"):
        decode.nsa_decode(q[:, :1], cache.key, cache.value, cache.key_cmp, cache.value_cmp,
                          *(g[:, :1] for g in gates), z, z, None, decode.MAX_SLOTS + 1, L, W, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_benchmark_shape(dtype):
    """The benchmark's shape (HQ=64, H=4, D=128, l=64, S=16, w=512), B = 4 rows at
    contexts 4096 + 1000 r, a few steps across a block boundary."""
    dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    B, HQ, H, D, l, S16, w, cap = 4, 64, 4, 128, 64, 16, 512, 8192
    rng = np.random.default_rng(0)
    lengths = np.array([4094 + 1000 * r for r in range(B)])
    cache = ejnsa.init_nsa_cache(B, cap, H, D, block_size=l, dtype=dt)
    keys, vals = rand(rng, cache.key.shape, dt), rand(rng, cache.value.shape, dt)
    cache = cache._replace(key=keys, value=vals, key_cmp=ejnsa.mean_pooling(keys, l),
                           value_cmp=ejnsa.mean_pooling(vals, l), lengths=jnp.asarray(lengths, jnp.int32))

    def step(platform):
        return jax.jit(lambda c, q, k, v, g1, g2, g3: ejnsa.nsa_decode(
            c, q, k, v, g1, g2, g3, block_counts=S16, block_size=l, window_size=w, platform=platform))

    tri, xla = step("triton"), step("xla")
    for i in range(3):
        q, k1, v1 = rand(rng, (B, 1, HQ, D), dt), rand(rng, (B, 1, H, D), dt), rand(rng, (B, 1, H, D), dt)
        gates = tuple(rand_gate(rng, (B, 1, HQ), dt) for _ in range(3))
        with jax.default_matmul_precision("highest"):
            a, _ = tri(cache, q, k1, v1, *gates)
            b, cache = xla(cache, q, k1, v1, *gates)
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
        _same(a, b, f"{dtype} step {i}", 1e-2 if dtype == "bf16" else 1e-5)
