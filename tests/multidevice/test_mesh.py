"""ejnsa on a mesh of 8 CPU host devices, XLA and the Triton kernels (interpreter).

- jit with NamedSharding: batch and heads stay sharded (outputs keep the inputs'
  shardings), the compiled programs of the Triton path (forward and backward) hold no
  collective, values and gradients equal the unsharded call's; shardings the kernels cannot
  serve locally (heads not divisible, T sharded) are gathered and stay correct.
- shard_map + jax.grad with the default check_vma.
- context parallelism (`context_axis`) with 2, 4 and 8 shards, both layouts, window on and
  off, batches, packed sequences, T per shard not a multiple of the block size, the NNX
  layer; bad arguments.
Every comparison is against the unsharded call of the same platform, which the single-device
tests check against the float64 reference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ejnsa

PLATFORMS = ["xla", "triton"]
L, S, W = 16, 3, 8
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


def setup_module():
    assert jax.device_count() == 8, "run through tests/test_multidevice.py (8 host devices)"


def _mesh(shape, names):
    return jax.sharding.Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _inputs(seed, B, T, HQ, H, D, Dv=None):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    gates = tuple(jnp.asarray(rng.uniform(0.2, 1.0, (B, T, HQ)), jnp.float32) for _ in range(3))
    return (r(B, T, HQ, D), r(B, T, H, D), r(B, T, H, Dv or D)) + gates


def _nsa(P_, window=True, cu=None, **kw):
    def f(q, k, v, g1, g2, g3):
        return ejnsa.native_sparse_attention(q, k, v, g1, g2, g3 if window else None, block_counts=S, block_size=L,
                                             window_size=W if window else 0, cu_seqlens=cu, platform=P_, **kw)
    return f


def _vjp(f, args, ct):
    out, pull = jax.vjp(f, *args)
    return out, pull(ct)


def _close(a, b, what, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), what
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err < tol, f"{what}: relative error {err:.2e}"


def _collectives(compiled) -> list[str]:
    return [m.group(1) for m in COLLECTIVE.finditer(compiled.as_text())]


# ----------------------------------------------------------------------- jit + NamedSharding


@pytest.mark.parametrize("P_", PLATFORMS)
def test_jit_keeps_batch_and_head_sharding(P_):
    """(dp, tp) = (2, 4); B = 2 over dp, HQ = 12 and H = 4 over tp (G = 3 per device)."""
    mesh = _mesh((2, 4), ("dp", "tp"))
    args = _inputs(0, 2, 64, 12, 4, 16, 24)
    f = _nsa(P_)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 12, 24)), jnp.float32)
    want, want_g = jax.jit(lambda *a: _vjp(f, a[:-1], a[-1]))(*args, ct)
    heads4, heads3 = NamedSharding(mesh, P("dp", None, "tp", None)), NamedSharding(mesh, P("dp", None, "tp"))
    shard = lambda x: jax.device_put(x, heads4 if x.ndim == 4 else heads3)  # noqa: E731
    sargs = tuple(shard(x) for x in args)
    fwd = jax.jit(f).lower(*sargs).compile()
    bwd = jax.jit(lambda *a: _vjp(f, a[:-1], a[-1])).lower(*sargs, shard(ct)).compile()
    out = fwd(*sargs)
    o2, grads = bwd(*sargs, shard(ct))
    assert out.sharding.is_equivalent_to(heads4, 4)
    _close(out, want, "o")
    _close(o2, want, "o (vjp)")
    for name, g, w, a in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), grads, want_g, sargs):
        _close(g, w, f"d{name}")
        assert g.sharding.is_equivalent_to(a.sharding, g.ndim), f"d{name}: {g.sharding}"
    assert _collectives(fwd) == [], f"forward: {_collectives(fwd)}"
    assert _collectives(bwd) == [], f"backward: {_collectives(bwd)}"


@pytest.mark.parametrize("P_", PLATFORMS)
def test_jit_pieces_keep_sharding(P_):
    """Each public function alone, batch over dp and heads over tp: no collective, same values."""
    mesh = _mesh((2, 4), ("dp", "tp"))
    q, k, v, *_ = _inputs(2, 2, 48, 8, 4, 16)
    sh = NamedSharding(mesh, P("dp", None, "tp", None))
    sq, sk, sv = (jax.device_put(x, sh) for x in (q, k, v))
    kc, vc = ejnsa.mean_pooling(k, L), ejnsa.mean_pooling(v, L)
    skc, svc = jax.device_put(kc, sh), jax.device_put(vc, sh)
    bi = ejnsa.nsa_topk(q, kc, S, L, platform="xla")
    sbi = jax.device_put(bi, sh)
    cases = {
        "window": (lambda q, k, v: ejnsa.sliding_window_attention(q, k, v, W, platform=P_), (q, k, v), (sq, sk, sv)),
        "compression": (lambda q, kc, vc: ejnsa.nsa_compression(q, kc, vc, L, platform=P_)[0], (q, kc, vc),
                        (sq, skc, svc)),
        "topk": (lambda q, kc: ejnsa.nsa_topk(q, kc, S, L, platform=P_), (q, kc), (sq, skc)),
        "selection": (lambda q, k, v, bi: ejnsa.apply_native_sparse_attention(q, k, v, bi, S, L, platform=P_),
                      (q, k, v, bi), (sq, sk, sv, sbi)),
    }
    for name, (fn, plain, sharded) in cases.items():
        c = jax.jit(fn).lower(*sharded).compile()
        out = c(*sharded)
        want = jax.jit(fn)(*plain)
        if name == "topk":
            np.testing.assert_array_equal(np.asarray(out), np.asarray(want), err_msg=name)
        else:
            _close(out, want, name)
        assert out.sharding.is_equivalent_to(sh, 4), f"{name}: {out.sharding}"
        assert _collectives(c) == [], f"{name}: {_collectives(c)}"


@pytest.mark.parametrize("P_", PLATFORMS)
def test_jit_unservable_shardings_are_gathered(P_):
    """H = 2 key heads over tp = 4 cannot be split per device, and a sharded T cannot be
    served locally: the inputs are gathered (as XLA would) and the values stay right."""
    mesh = _mesh((2, 4), ("dp", "tp"))
    args = _inputs(3, 2, 64, 4, 2, 16)
    f = jax.jit(_nsa(P_))
    want = f(*args)
    specs = (P("dp", None, "tp"), P(None, "tp")) if P_ == "xla" else (P("dp", None, "tp"),)  # (interpreter: one)
    for spec in specs:
        # Query heads and gates (4) split over tp; the 2 key heads cannot be, so they keep
        # only the batch part of the spec.
        def place(x):
            dims = [d if x.shape[i] % (mesh.shape[d] if d else 1) == 0 else None for i, d in enumerate(spec)]
            return jax.device_put(x, NamedSharding(mesh, P(*dims)))
        _close(f(*(place(x) for x in args)), want, f"spec {spec}")


@pytest.mark.parametrize("P_", PLATFORMS)
def test_shard_map_grad_default_check_vma(P_):
    """jax.grad inside shard_map (batch over dp, heads over tp) with check_vma=True."""
    mesh = _mesh((2, 4), ("dp", "tp"))
    args = _inputs(4, 2, 48, 8, 4, 16)
    f = _nsa(P_)
    ct = jnp.asarray(np.random.default_rng(5).standard_normal((2, 48, 8, 16)), jnp.float32)
    want, want_g = jax.jit(lambda *a: _vjp(f, a[:-1], a[-1]))(*args, ct)
    s4, s3 = P("dp", None, "tp", None), P("dp", None, "tp")
    specs = (s4, s4, s4, s3, s3, s3)

    def local(q, k, v, g1, g2, g3, ct):
        grads = jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=tuple(range(6)))(q, k, v, g1, g2, g3)
        return f(q, k, v, g1, g2, g3), grads

    sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs + (s4,), out_specs=(s4, specs)))
    out, grads = sm(*args, ct)
    _close(out, want, "o")
    for name, g, w in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), grads, want_g):
        _close(g, w, f"d{name}")


# ------------------------------------------------------------------------ context parallel


def _context_case(P_, n, layout, window, B=2, T=96, cu=None, seed=6):
    mesh = _mesh((n,), ("sp",))
    args = _inputs(seed, B, T, 4, 2, 16)
    ct = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((B, T, 4, 16)), jnp.float32)
    want, want_g = jax.jit(lambda *a: _vjp(_nsa(P_, window, cu), a[:-1], a[-1]))(*args, ct)
    local_f = _nsa(P_, window, cu, context_axis="sp", context_layout=layout)
    sp = P(None, "sp")
    sm = jax.jit(jax.shard_map(lambda *a: _vjp(local_f, a[:-1], a[-1]), mesh=mesh, in_specs=(sp,) * 7,
                               out_specs=(sp, (sp,) * 6)))
    if layout == "balanced":
        out, grads = sm(*(ejnsa.context_reorder(x, n) for x in (*args, ct)))
        out, grads = ejnsa.context_restore(out, n), tuple(ejnsa.context_restore(g, n) for g in grads)
    else:
        out, grads = sm(*args, ct)
    what = f"{P_} n={n} {layout} window={window} cu={cu is not None}"
    _close(out, want, f"{what}: o")
    for name, g, w in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), grads, want_g):
        if name == "g_swa" and not window:
            continue
        _close(g, w, f"{what}: d{name}")


# Each shard count with both layouts, window on and off alternating (the window crosses
# shard boundaries at every n: w = 8 against 48, 24 and 12 tokens per shard).
CONTEXT_XLA = [(2, "contiguous", True), (4, "balanced", False), (8, "contiguous", False), (8, "balanced", True)]
# The interpreter is slow: the Triton cases cover both layouts, window on and off, 4 and 8
# shards, at T = 64 (8 tokens per shard at n = 8, half a block).
CONTEXT_TRITON = [(4, "contiguous", False), (8, "balanced", True)]


@pytest.mark.parametrize("n,layout,window", CONTEXT_XLA)
def test_context_parallel_xla(n, layout, window):
    """T = 96: 12 tokens per shard at n = 8 (no multiple of l = 16), 6 per chunk balanced."""
    _context_case("xla", n, layout, window)


@pytest.mark.parametrize("n,layout,window", CONTEXT_TRITON)
def test_context_parallel_triton(n, layout, window):
    _context_case("triton", n, layout, window, T=64)


@pytest.mark.parametrize("P_,layout", [("xla", "contiguous"), ("xla", "balanced"), ("triton", "balanced")])
def test_context_parallel_packed(P_, layout):
    """Packed sequences crossing shard boundaries, one of a single token, an empty one."""
    cu = jnp.asarray([0, 30, 31, 31, 70, 96], jnp.int32)
    _context_case(P_, 4, layout, True, B=1, cu=cu, seed=8)


def test_context_parallel_given_indices_and_counts():
    """block_indices and an array block_counts, split with the queries."""
    n, B, T = 4, 1, 64
    mesh = _mesh((n,), ("sp",))
    q, k, v, g1, g2, g3 = _inputs(9, B, T, 4, 2, 16)
    kc = ejnsa.mean_pooling(k, L)
    bi = ejnsa.nsa_topk(q, kc, S, L, platform="xla")
    counts = jnp.asarray(np.random.default_rng(10).integers(0, S + 1, (B, T, 2)), jnp.int32)

    def f(q, k, v, g1, g2, bi, counts, axis=None):
        return ejnsa.native_sparse_attention(q, k, v, g1, g2, block_indices=bi, block_counts=counts, block_size=L,
                                             platform="xla", context_axis=axis)

    want = jax.jit(f)(q, k, v, g1, g2, bi, counts)
    sp = P(None, "sp")
    out = jax.jit(jax.shard_map(lambda *a: f(*a, axis="sp"), mesh=mesh, in_specs=(sp,) * 7, out_specs=sp))(
        q, k, v, g1, g2, bi, counts)
    _close(out, want, "o")


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
def test_context_parallel_nnx_layer(layout):
    """The NNX layer with context_axis inside shard_map equals the layer on the whole
    sequence (rotary positions are the global ones)."""
    from flax import nnx

    from ejnsa.nnx import NativeSparseAttention

    n, B, T, C = 4, 2, 64, 32
    kw = dict(block_size=L, block_counts=S, window_size=W, platform="xla")
    full = NativeSparseAttention(C, 4, 2, rngs=nnx.Rngs(0), **kw)
    cp = NativeSparseAttention(C, 4, 2, rngs=nnx.Rngs(0), context_axis="sp", context_layout=layout, **kw)
    x = jax.random.normal(jax.random.key(1), (B, T, C))
    want = nnx.jit(lambda m, x: m(x))(full, x)
    graph, state = nnx.split(cp)
    mesh = _mesh((n,), ("sp",))

    def local(state, x):
        return nnx.merge(graph, state)(x)

    sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "sp")), out_specs=P(None, "sp")))
    if layout == "balanced":
        out = ejnsa.context_restore(sm(state, ejnsa.context_reorder(x, n)), n)
    else:
        out = sm(state, x)
    _close(out, want, f"nnx {layout}")


def test_context_bad_input():
    q, k, v, g1, g2, g3 = _inputs(11, 1, 32, 4, 2, 16)
    with pytest.raises(ValueError, match="context_axis='sp' must name a mesh axis of the enclosing jax.shard_map"):
        ejnsa.native_sparse_attention(q, k, v, g1, platform="xla", context_axis="sp")
    with pytest.raises(TypeError, match="context_axis must be a mesh axis name"):
        ejnsa.native_sparse_attention(q, k, v, g1, platform="xla", context_axis=1)
    with pytest.raises(ValueError, match="context_layout must be one of"):
        ejnsa.native_sparse_attention(q, k, v, g1, platform="xla", context_axis="sp", context_layout="zigzag")
    mesh = _mesh((2,), ("sp",))
    sp = P(None, "sp")

    def run(fn, *a):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(sp,) * len(a), out_specs=sp))(*a)

    with pytest.raises(ValueError, match="TQ == TK"):
        run(lambda q, k, v: ejnsa.native_sparse_attention(q[:, :4], k, v, platform="xla", context_axis="sp")[:, :1],
            q, k, v)
    with pytest.raises(ValueError, match="a pair \\(cu_q, cu_k\\) is not supported"):
        cu = jnp.asarray([0, 16], jnp.int32)
        run(lambda q, k, v: ejnsa.native_sparse_attention(q, k, v, platform="xla", cu_seqlens=(cu, cu),
                                                          context_axis="sp"), q, k, v)
    with pytest.raises(ValueError, match="even number of tokens per shard"):
        run(lambda q, k, v: ejnsa.native_sparse_attention(q, k, v, platform="xla", context_axis="sp",
                                                          context_layout="balanced"), q[:, :30], k[:, :30], v[:, :30])
    with pytest.raises(ValueError, match="not a multiple of it"):
        ejnsa.context_reorder(q[:, :30], 4)
