"""Tests of the Flax NNX layer ejnsa.nnx.NativeSparseAttention (skipped without flax)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("flax")

import jax
import jax.numpy as jnp
from flax import nnx

import ejnsa
from ejnsa.nnx import NativeSparseAttention, positions_from_cu_seqlens

# Small but not trivial: T not a multiple of the block, two partial windows, S < #blocks.
HIDDEN, T, BS, S, W = 48, 75, 16, 3, 16


def make(num_heads=4, num_kv_heads=2, seed=0, **kw):
    kw = {"block_size": BS, "block_counts": S, "window_size": W, **kw}
    return NativeSparseAttention(HIDDEN, num_heads, num_kv_heads, rngs=nnx.Rngs(seed), **kw)


def inputs(batch=2, seq_len=T, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (batch, seq_len, HIDDEN), dtype)


@nnx.jit
def run(layer, x, positions=None, cu_seqlens=None):
    # Jitted: one compile per layer configuration is far cheaper on the CPU than eager
    # op-by-op dispatch of the NSA pipeline.
    return layer(x, positions=positions, cu_seqlens=cu_seqlens)


@functools.partial(jax.jit, static_argnames=("block_counts", "block_size", "window_size"))
def direct(q, k, v, g_cmp, g_slc, g_swa, cu_seqlens, *, block_counts, block_size, window_size):
    return ejnsa.native_sparse_attention(
        q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, block_counts=block_counts,
        block_size=block_size, window_size=window_size, cu_seqlens=cu_seqlens,
    )


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def rope_reference(x, positions, theta=10000.0):
    """Independent RoPE: the pair (x_i, x_{i+D/2}) as one complex number times e^{i pos w_i}."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    w = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * np.asarray(positions)[..., None, None] * w)
    return np.concatenate([z.real, z.imag], axis=-1)


def by_hand(layer, x, positions, cu_seqlens=None):
    """The layer rebuilt from its parameters around a direct ejnsa.native_sparse_attention call."""
    B, L, _ = x.shape
    hq, h, dk, dv = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.v_head_dim
    W_ = {n: np.asarray(getattr(layer, n).kernel[...], np.float64) for n in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")}
    xs = np.asarray(x, np.float64)
    q = rope_reference((xs @ W_["q_proj"]).reshape(B, L, hq, dk), positions)
    k = rope_reference((xs @ W_["k_proj"]).reshape(B, L, h, dk), positions)
    v = (xs @ W_["v_proj"]).reshape(B, L, h, dv)
    g = 1.0 / (1.0 + np.exp(-(xs @ W_["g_proj"]).reshape(B, L, hq, 3)))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    o = direct(
        f32(q), f32(k), f32(v), f32(g[..., 0]), f32(g[..., 1]), f32(g[..., 2]), cu_seqlens,
        block_counts=layer.block_counts, block_size=layer.block_size, window_size=layer.window_size,
    )
    return np.asarray(o, np.float64).reshape(B, L, hq * dv) @ W_["o_proj"]


# --------------------------------------------------------------------------- shape, dtype


def test_output_shape_and_dtype_bfloat16():
    layer = make(dtype=jnp.bfloat16)
    y = run(layer, inputs(dtype=jnp.bfloat16))
    assert y.shape == (2, T, HIDDEN)
    assert y.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert layer.q_proj.kernel[...].dtype == jnp.float32  # param_dtype, not dtype


def test_param_count_by_formula():
    hq, h, dk, dv = 4, 2, 8, 24
    layer = make(hq, h, head_dim=dk, v_head_dim=dv)
    want = HIDDEN * (hq * dk + h * dk + h * dv + 3 * hq) + hq * dv * HIDDEN
    assert layer.num_params() == want
    assert sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param))) == want
    # The window-only ablation drops the two unused gates per head and nothing else.
    window_only = make(hq, h, head_dim=dk, v_head_dim=dv, use_selection=False, use_compression=False)
    assert window_only.num_params() == want - 2 * hq * HIDDEN


def test_gradients_finite_and_nonzero_for_every_parameter():
    layer = make()
    x = inputs()

    @nnx.jit
    def grad(layer):
        return nnx.grad(lambda m: jnp.mean(jnp.sin(m(x))))(layer)  # sin: not symmetric in the output

    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grad(layer), nnx.Param))
    assert len(leaves) == 5  # q, k, v, g, o kernels; no biases
    for path, g in leaves:
        g = np.asarray(g)
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (16, 1)])  # G = 1, 4, 16
def test_matches_direct_call(num_heads, num_kv_heads):
    layer = make(num_heads, num_kv_heads, head_dim=8)
    x = inputs()
    got = run(layer, x)
    assert got.shape == (2, T, HIDDEN) and got.dtype == jnp.float32
    assert rel_err(got, by_hand(layer, x, np.broadcast_to(np.arange(T), (2, T)))) < 1e-5


def test_matches_direct_call_with_explicit_positions_and_distinct_value_head_dim():
    layer = make(4, 2, head_dim=16, v_head_dim=8)
    x = inputs()
    pos = np.asarray(jax.random.randint(jax.random.key(3), (2, T), 0, 1000))
    assert rel_err(run(layer, x, positions=jnp.asarray(pos)), by_hand(layer, x, pos)) < 1e-5


# --------------------------------------------------------------------------- packed sequences


def test_positions_from_cu_seqlens():
    cu = jnp.array([0, 3, 3, 7, 8])  # an empty and a one-token sequence
    want = [0, 1, 2, 0, 1, 2, 3, 0]
    np.testing.assert_array_equal(positions_from_cu_seqlens(cu, 8), want)
    np.testing.assert_array_equal(jax.jit(positions_from_cu_seqlens, static_argnums=1)(cu, 8), want)


def test_packed_equals_separate():
    lens = [30, 0, 30, 1]  # an empty and a one-token sequence, lengths off the block grid
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    layer = make()
    x = inputs(batch=1, seq_len=int(cu[-1]))
    packed = run(layer, x, cu_seqlens=jnp.asarray(cu))  # cu_seqlens traced under jit
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            assert rel_err(packed[:, a:b], run(layer, x[:, a:b])) < 1e-5, (a, b)
    # ...and equals the by-hand computation with rotary positions restarting per sequence.
    pos = np.concatenate([np.arange(n) for n in lens])[None]
    assert rel_err(packed, by_hand(layer, x, pos, cu_seqlens=jnp.asarray(cu))) < 1e-5


# --------------------------------------------------------------------------- ablations


def test_window_only_ablation_is_local():
    """Window-only output at t ignores tokens <= t - w; the full layer's does not."""
    x = inputs(batch=1)
    x2 = x.at[:, 0].add(1.0)
    window_only = make(use_selection=False, use_compression=False)
    d = np.abs(np.asarray(run(window_only, x2) - run(window_only, x)))[0].max(-1)
    assert d[W:].max() < 1e-7 and d[0] > 0
    full = make()
    d = np.abs(np.asarray(run(full, x2) - run(full, x)))[0].max(-1)
    assert d[W:].min() > 0  # block 0 is always selected, and compressed once complete


def test_window_only_matches_sliding_window_call():
    layer = make(use_selection=False, use_compression=False, rope_theta=None)
    x = inputs(batch=1)
    xs = np.asarray(x, np.float64)
    Wk = lambda n: np.asarray(getattr(layer, n).kernel[...], np.float64)  # noqa: E731
    q = (xs @ Wk("q_proj")).reshape(1, T, 4, -1)
    k = (xs @ Wk("k_proj")).reshape(1, T, 2, -1)
    v = (xs @ Wk("v_proj")).reshape(1, T, 2, -1)
    g = 1.0 / (1.0 + np.exp(-(xs @ Wk("g_proj"))))  # [1, T, HQ]: one gate per head
    o = jax.jit(ejnsa.sliding_window_attention, static_argnums=3)(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), W)
    want = (np.asarray(o, np.float64) * g[..., None]).reshape(1, T, -1) @ Wk("o_proj")
    assert rel_err(run(layer, x), want) < 1e-5


@pytest.mark.parametrize("kw", [dict(use_compression=False), dict(use_selection=False)])
def test_other_branch_subsets_run(kw):
    layer = make(**kw)
    y = run(layer, inputs(batch=1))
    assert y.shape == (1, T, HIDDEN) and np.isfinite(np.asarray(y)).all()
    assert layer.g_proj.kernel.shape == (HIDDEN, 4 * 2)


# --------------------------------------------------------------------------- training, sharding


def test_tiny_training_loop_loss_falls():
    optax = pytest.importorskip("optax")

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, HIDDEN, rngs=rngs)
            # window_size=0: also covers the layer without the window branch (two gates).
            self.attn = NativeSparseAttention(HIDDEN, 2, 1, block_size=16, block_counts=2, window_size=0, rngs=rngs)
            assert self.attn.g_proj.kernel.shape == (HIDDEN, 2 * 2)
            self.head = nnx.Linear(HIDDEN, 16, rngs=rngs)

        def __call__(self, tokens):
            x = self.embed(tokens)
            return self.head(x + self.attn(x))

    # Repeating each random token: predictable from the previous one, so one layer learns it.
    tokens = jnp.repeat(jax.random.randint(jax.random.key(0), (4, 24), 0, 16), 2, axis=1)
    model = Tiny(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(15)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses


def test_sharding_annotations():
    layer = make(sharding=(None, "model"))
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert specs["q_proj"]["kernel"].get_value() == jax.sharding.PartitionSpec(None, "model")
    assert specs["o_proj"]["kernel"].get_value() == jax.sharding.PartitionSpec("model", None)
    # Under a mesh the parameters are created on it. With Explicit axes (jax.make_mesh's
    # default) the head-sharded o_proj contraction needs the layer's help; the result must
    # not change. Only Explicit is run: building under a new mesh recompiles every
    # initializer (~3 s). A 2x2 data x model mesh of forced host devices matches too, checked
    # by hand (it needs XLA_FLAGS set before JAX starts).
    x = inputs(batch=1)
    want = run(layer, x)  # outside the mesh: the same compilation as the other tests'
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        placed = make(sharding=(None, "model"))
        assert placed.q_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
        assert rel_err(run(placed, x), want) < 1e-6
    # sharding=None, the default, records nothing, and builds under a mesh of any axis names.
    plain = make()
    assert "out_sharding" not in plain.q_proj.kernel.get_metadata()
    with jax.set_mesh(jax.make_mesh((1, 1), ("dp", "sp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)):
        assert rel_err(run(make(), x), want) < 1e-6


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(num_heads=6, num_kv_heads=4), ValueError, "num_heads must be a multiple of num_kv_heads"),
        (dict(num_heads=5, num_kv_heads=5), ValueError, "hidden_size must be divisible by num_heads"),
        (dict(num_heads=0), ValueError, "num_heads must be positive"),
        (dict(num_heads=4.0), TypeError, "num_heads must be an int"),
        (dict(head_dim=7), ValueError, "head_dim must be even"),
        (dict(block_size=24), ValueError, "block_size must be a power of two"),
        (dict(block_size=8), ValueError, "block_size must be a power of two"),
        (dict(block_counts=0), ValueError, "block_counts must be positive"),
        (dict(window_size=-1), ValueError, "window_size must be >= 0"),
        (dict(window_size=0, use_selection=False, use_compression=False), ValueError, "window_size > 0"),
        (dict(platform="cuda"), ValueError, "platform must be one of"),
        (dict(sharding=("model",)), ValueError, "sharding must be"),
        (dict(sharding="model"), ValueError, "sharding must be"),
        (dict(context_axis=3), TypeError, "context_axis must be a mesh axis name"),
        (dict(context_axis="sp", use_selection=False), ValueError, "context_axis needs use_selection=True"),
        (dict(context_layout="zigzag"), ValueError, "context_layout must be"),
    ],
)
def test_bad_constructor_arguments(kw, exc, match):
    kw = {"num_heads": 4, "num_kv_heads": 2, **kw}
    with pytest.raises(exc, match=match):
        NativeSparseAttention(HIDDEN, kw.pop("num_heads"), kw.pop("num_kv_heads"), rngs=nnx.Rngs(0), **kw)


def test_bad_call_arguments():
    layer = make()
    with pytest.raises(ValueError, match="x must have shape"):
        layer(jnp.zeros((2, T, HIDDEN + 1)))
    with pytest.raises(ValueError, match="cu_seqlens needs B == 1"):
        layer(inputs(batch=2), cu_seqlens=jnp.array([0, T]))
    with pytest.raises(ValueError, match="positions must have shape"):
        layer(inputs(batch=2), positions=jnp.zeros((3, T), jnp.int32))


def test_ejnsa_imports_without_flax_and_nnx_says_how_to_install():
    # A fresh interpreter in which `import flax` fails: ejnsa must not need it, ejnsa.nnx must
    # name the extra to install.
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['flax'] = None\n"
        "import ejnsa\n"
        "try:\n    import ejnsa.nnx\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout and "pip install ejnsa[nnx]" in out.stdout, out.stdout
