"""Selected attention's Triton kernels (ejnsa/triton/selection.py) against the float64 reference.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are tiny; with `pytest --gpu` on a GPU machine the same tests run the real
kernels, and the tests marked `gpu` compare them with the XLA path at T = 4096 and 65536.

Every comparison is a relative error ‖a − b‖ / ‖b‖ of the output and of dq, dk, dv against
the dense float64 reference (tests/reference.py), with the tolerances of tests/_util.py.
Every run is under jax.jit, and every result must be finite: the interpreter fills outputs
with NaN before a launch, so a row a kernel forgot to write fails the check.
"""

import os

if os.environ.get("EJNSA_TEST_GPU") != "1":  # conftest does the same; kernels must see it before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ejnsa  # noqa: E402
from ejnsa.triton import selection as sel  # noqa: E402
from ejnsa.triton import selection_index as idx  # noqa: E402

try:
    from . import reference as ref
    from ._util import (TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, dense_grads, f64, make_qkv,
                        messy_block_indices, rel_err)
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref
    from _util import (TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, dense_grads, f64, make_qkv,
                       messy_block_indices, rel_err)

DT = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


# ---------------------------------------------------------------------------------- helpers


def shared_indices(rng, B, T, H, S, l, run=8, cu=None):
    """Forced blocks {0, cur, cur - 1} plus blocks shared by `run` consecutive tokens, -1 padded."""
    _, pos = ref.seq_layout(B, T, cu)
    out = np.full((B, T, H, S), -1, np.int64)
    for b in range(B):
        for t in range(T):
            cur = pos[b, t] // l
            r = np.random.default_rng(1000 * b + t // run)  # the same draw for the whole run
            for h in range(H):
                extra = [int(x) for x in r.permutation(cur + 1)]
                chosen = list(dict.fromkeys([0, cur, cur - 1] + extra))
                chosen = [c for c in chosen if c >= 0][:S]
                out[b, t, h, : len(chosen)] = chosen
    return jnp.asarray(out.astype(np.int32))


def random_indices(rng, B, T, H, S, l, cu=None):
    """Distinct blocks drawn independently per token among the visible ones, -1 padded."""
    _, pos = ref.seq_layout(B, T, cu)
    out = np.full((B, T, H, S), -1, np.int64)
    for b in range(B):
        for t in range(T):
            cur = pos[b, t] // l
            for h in range(H):
                chosen = rng.permutation(cur + 1)[:S]
                out[b, t, h, : len(chosen)] = chosen
    return jnp.asarray(out.astype(np.int32))


@functools.partial(jax.jit, static_argnums=(5, 6, 9))
def _triton_vjp(q, k, v, bi, bc, l, scale, cu, do, config):
    f = lambda q, k, v: sel.selected_attention(q, k, v, bi, bc, l, scale, cu, config=config)
    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(do.astype(o.dtype)))


def triton_run(q, k, v, bi, bc, l, scale, cu, do, config=None):
    """(o, dq, dk, dv) of the Triton implementation, under jit."""
    return _triton_vjp(q, k, v, bi, bc, l, scale, cu, do, config)


def reference(q, k, v, bi, counts, l, scale, cu, do):
    """float64 (o, dq, dk, dv) of dense attention weighted by the contract's key multiplicities.

    counts: an int or the clamped [B, T, H] array. The weights come from tests/reference.py,
    the gradients are _util.dense_grads' closed form, the forward is checked against
    reference.ref_selected, and test_dense_gradients_match_autodiff checks the gradients
    against jax.grad of it.
    """
    bi_np = np.asarray(bi)
    cnt = counts if isinstance(counts, int) else np.asarray(counts)
    T, G = q.shape[1], q.shape[2] // k.shape[2]
    w = np.repeat(ref.selected_multiplicity(bi_np, cnt, l, T, cu), G, axis=2)  # [B, T, HQ, T]
    o, _, dq, dk, dv = dense_grads(q, k, v, w, scale, do)
    want_o = ref.ref_selected(f64(q), f64(k), f64(v), bi_np, cnt, l, scale, cu)
    np.testing.assert_allclose(o, want_o, rtol=1e-9, atol=1e-12)
    return want_o, dq, dk, dv


def check(got, want, dtype, where):
    names = ("o", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        tol = TOL_OUT[dtype] if name == "o" else TOL_GRAD[dtype]
        assert_close(a, b, tol, f"{where} {name}")


def counts_for(bc, S):
    """What apply_native_sparse_attention hands the kernel: None for an int, else clamped."""
    return None if isinstance(bc, int) else jnp.clip(jnp.asarray(bc, jnp.int32), 0, S)


# ------------------------------------------------------------------------------ correctness

# B, T, HQ, H, Dk, Dv, l, S, dtype, pattern, counts
CASES = {
    # G = 1, two batch rows, Dk != Dv, -1 / negative / future / out-of-range / duplicate entries
    "g1_fp32_messy_batch2": (2, 67, 2, 2, 32, 16, 16, 4, "fp32", "messy", "int"),
    # G = 2, odd head dims (masked to 64 / 32), tensor counts with 0 and > S, huge indices
    "g2_fp32_odd_dims_counts": (1, 50, 4, 2, 40, 24, 16, 3, "fp32", "messy_huge", "tensor"),
    # G = 16 (4 tokens per tile), neighbours sharing their blocks
    "g16_bf16_shared": (1, 45, 16, 1, 32, 32, 16, 3, "bf16", "shared", "int"),
    # G = 16, independent random selections, fp16
    "g16_fp16_random": (1, 45, 16, 1, 16, 32, 16, 3, "fp16", "random", "int"),
    # G = 80 > 64 rows: query heads split over programs (2 chunks of 40)
    "g80_fp32_head_chunks": (1, 20, 80, 1, 16, 16, 16, 2, "fp32", "messy", "int"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    B, T, HQ, H, Dk, Dv, l, S, dt, pattern, counts = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    dtype = DT[dt]
    q, k, v = make_qkv(rng, B, T, HQ, H, Dk, Dv, dtype)
    if pattern == "shared":
        bi = shared_indices(rng, B, T, H, S, l)
    elif pattern == "random":
        bi = random_indices(rng, B, T, H, S, l)
    else:
        bi = np.array(messy_block_indices(rng, B, T, H, S, l))
        if pattern == "messy_huge":
            # Never form b * l in int32: these must be ignored, not wrap around into range.
            huge = np.array([2**30, 2**31 - 1, -(2**31), 2**31 // l, -(2**31) // l])
            spots = rng.random(bi.shape) < 0.15
            bi = np.where(spots, huge[rng.integers(0, len(huge), bi.shape)], bi)
        bi = jnp.asarray(bi.astype(np.int32))
    if counts == "int":
        bc = S
    else:
        bc = jnp.asarray(rng.integers(-1, S + 3, size=(B, T, H)).astype(np.int32))  # 0 and > S included
    do = jnp.asarray(rng.standard_normal((B, T, HQ, Dv)).astype(np.float32))
    scale = Dk**-0.5
    got = triton_run(q, k, v, bi, counts_for(bc, S), l, scale, None, do)
    want = reference(q, k, v, bi, bc if isinstance(bc, int) else counts_for(bc, S), l, scale, None, do)
    check(got, want, dtype, case)
    # The public entry point resolves to the same kernels.
    o = jax.jit(lambda q, k, v: ejnsa.apply_native_sparse_attention(q, k, v, bi, bc, l, platform="triton"))(q, k, v)
    assert_close(o, want[0], TOL_OUT[dtype], f"{case} public o")


def test_varlen_with_empty_and_one_token_sequences():
    """Packed sequences (B = 1): positions and block indices restart at each sequence."""
    rng = np.random.default_rng(7)
    lengths = [0, 37, 1, 0, 20, 1]
    cu = cu_from_lengths(lengths)
    T, HQ, H, Dk, Dv, l, S = int(cu[-1]), 6, 2, 32, 32, 16, 3  # G = 3: tiles of 21 tokens, 63 of 64 rows
    q, k, v = make_qkv(rng, 1, T, HQ, H, Dk, Dv, jnp.float32)
    bi = messy_block_indices(rng, 1, T, H, S, l, cu)
    bc = jnp.asarray(rng.integers(0, S + 1, size=(1, T, H)).astype(np.int32))
    do = jnp.asarray(rng.standard_normal((1, T, HQ, Dv)).astype(np.float32))
    got = triton_run(q, k, v, bi, bc, l, 0.3, jnp.asarray(cu), do)
    want = reference(q, k, v, bi, bc, l, 0.3, cu, do)
    check(got, want, jnp.float32, "varlen")


def test_empty_rows_deterministic_lse():
    """Rows with no key give o = 0, zero dq and finite lse (-inf); reruns are bitwise equal."""
    rng = np.random.default_rng(3)
    B, T, HQ, H, Dk, Dv, l, S = 1, 40, 4, 2, 16, 16, 16, 2
    q, k, v = make_qkv(rng, B, T, HQ, H, Dk, Dv, jnp.float32)
    bi = np.array(messy_block_indices(rng, B, T, H, S, l))
    empty = rng.random((B, T, H)) < 0.3
    bi[empty] = -1  # these (token, KV head) pairs attend nothing
    bi = jnp.asarray(bi)
    do = jnp.asarray(rng.standard_normal((B, T, HQ, Dv)).astype(np.float32))
    a = triton_run(q, k, v, bi, None, l, 0.25, None, do)
    b = triton_run(q, k, v, bi, None, l, 0.25, None, do)
    for x, y, name in zip(a, b, ("o", "dq", "dk", "dv")):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{name} differs between two runs"
    check(a, reference(q, k, v, bi, S, l, 0.25, None, do), jnp.float32, "empty rows")
    mult = ref.selected_multiplicity(np.asarray(bi), S, l, T)  # [B, T, H, T]
    none = np.repeat(mult.sum(-1) == 0, HQ // H, axis=2)  # [B, T, HQ]
    assert none.any()
    assert np.all(np.asarray(a[0])[none] == 0) and np.all(np.asarray(a[1])[none] == 0)
    _, lse = jax.jit(lambda q, k, v: sel.selected_attention(q, k, v, bi, None, l, 0.25, return_lse=True))(q, k, v)
    lse = np.asarray(lse)
    assert np.all(lse[none] == -np.inf) and np.all(np.isfinite(lse[~none]))


def test_dense_gradients_match_autodiff():
    """The NumPy gradients of `reference` equal jax.grad of reference.ref_selected (float64)."""
    rng = np.random.default_rng(9)
    B, T, HQ, H, D, l, S = 1, 20, 4, 2, 8, 4, 3
    q, k, v = make_qkv(rng, B, T, HQ, H, D, D, jnp.float32)
    bi = messy_block_indices(rng, B, T, H, S, l)
    do = rng.standard_normal((B, T, HQ, D)).astype(np.float32)
    got = reference(q, k, v, bi, S, l, 0.7, None, do)
    with jax.enable_x64(True):
        def loss(q_, k_, v_):
            o = ref.ref_selected(q_, k_, v_, np.asarray(bi), S, l, 0.7, None, xp=jnp)
            return jnp.sum(o * jnp.asarray(do))
        want = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(f64(x)) for x in (q, k, v)))
    for a, b in zip(got[1:], want):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- dk/dv index


def test_segment_split_and_reduce():
    """Lists cut into segments of 2 loop steps: partials written and summed in order by the
    reduce kernel."""
    rng = np.random.default_rng(5)
    B, T, HQ, H, Dk, Dv, l, S = 1, 96, 8, 2, 16, 32, 16, 3
    q, k, v = make_qkv(rng, B, T, HQ, H, Dk, Dv, jnp.float32)
    bi = shared_indices(rng, B, T, H, S, l, run=3)
    do = jnp.asarray(rng.standard_normal((B, T, HQ, Dv)).astype(np.float32))
    want = reference(q, k, v, bi, S, l, 0.4, None, do)
    cfg = sel.SelectionConfig.default(Dk, Dv, HQ // H, l, jnp.float32)
    small = dataclasses.replace(cfg.dkv, rows=16, min_segment=2, partial_bytes=1 << 30)
    cfg = dataclasses.replace(cfg, dkv=small)
    seg = sel.dkv_segment(q, k, v, bi, l, small)
    p = sel.TilePlan.make(HQ // H, small.rows).bt  # tokens per step
    assert seg == 2 * p
    rows = idx.block_rows(B, T, l, None)
    part_num = idx.token_lists(bi, None, l, None, rows[0], seg, T)[3]
    assert int(jnp.max(part_num)) > 2  # some lists are split, block 0's into many segments
    check(triton_run(q, k, v, bi, None, l, 0.4, None, do, cfg), want, jnp.float32, "segments")


def test_token_lists_segments():
    """dk/dv index: every valid entry is in the list of its block (tokens ascending,
    duplicates kept), each list is cut into segments covering it exactly once, multi-segment
    lists own disjoint partial slots, the longest lists come first. With batch rows, varlen
    and counts."""
    rng = np.random.default_rng(4)
    cases = [(2, 70, None, None), (1, 59, cu_from_lengths([0, 21, 1, 0, 30, 7]), "counts")]
    H, S, l, seg = 3, 4, 8, 5
    for B, T, cu, counts in cases:
        cu_j = None if cu is None else jnp.asarray(cu)
        bi = messy_block_indices(rng, B, T, H, S, l, cu)
        bc = None if counts is None else jnp.asarray(rng.integers(0, S + 1, size=(B, T, H)).astype(np.int32))
        starts = np.asarray(idx.block_starts(bi, bc, l, cu_j, T))
        row_start, row_len = (np.asarray(x) for x in idx.block_rows(B, T, l, cu_j))
        br = row_start.shape[0]
        e = H * B * T * S
        toks, desc, part_off, part_num = (np.asarray(x) for x in idx.token_lists(
            bi, bc, l, cu_j, jnp.asarray(row_start), seg, T))
        assert desc.shape[0] == H * br + -(-e // seg)
        covered, slots, firsts = {}, [], []
        for lst, lo, hi, out in desc:
            if lst < 0:
                continue
            assert 0 <= lo <= hi <= lo + seg
            covered.setdefault(int(lst), []).append((int(lo), int(hi), int(out)))
            firsts.append(int(lst))
        n_of = {}
        for lst in range(H * br):
            h, rho = divmod(lst, br)
            segs = covered[lst]  # every list has a program (an empty one writes zeros)
            got = [int(toks[i]) for lo, hi, _ in segs for i in range(lo, hi)]
            want = sorted(b * T + t for b in range(B) for t in range(T) for j in range(S)
                          if row_start[rho] >= 0 and starts[b, t, h, j] == row_start[rho])
            assert got == want, (lst, got, want)
            n_of[lst] = len(want)
            outs = [o for _, _, o in segs]
            if len(segs) == 1:
                assert outs == [-1] and part_num[lst] == 0
            else:
                assert outs == list(range(part_off[lst], part_off[lst] + len(segs))) and part_num[lst] == len(segs)
                slots += outs
        assert len(slots) == len(set(slots)) and len(slots) <= -(-2 * e // seg) + 1
        assert any(n > seg for n in n_of.values())  # the split path was exercised
        lists = list(dict.fromkeys(firsts))  # each list's segments are consecutive
        assert sum(len(covered[x]) for x in lists) == len(firsts)
        assert [n_of[x] for x in lists] == sorted((n_of[x] for x in lists), reverse=True)


def test_tile_union():
    """union / count / mult of the forward's tiles against a direct count."""
    rng = np.random.default_rng(2)
    B, T, H, S, l, bt = 2, 70, 3, 4, 8, 4
    bi = messy_block_indices(rng, B, T, H, S, l)
    st = np.asarray(idx.block_starts(bi, None, l, None, T))
    union, count, mult = (np.asarray(x) for x in idx.tile_union(jnp.asarray(st), bt))
    nt = union.shape[1]
    for h in range(H):
        for tile in range(nt):
            b, t0 = divmod(tile, -(-T // bt))
            t0 *= bt
            ent = st[b, t0:t0 + bt, h]  # [<=bt, S]
            uniq = sorted({int(x) for x in ent.reshape(-1) if x != idx.SENT})
            assert count[h, tile] == len(uniq) and list(union[h, tile, : len(uniq)]) == uniq
            for u, s in enumerate(uniq):
                assert [int((ent[i] == s).sum()) for i in range(len(ent))] == list(mult[h, tile, u, : len(ent)])


def test_dkv_options():
    """Non-default dk/dv steps (16 rows) and one-step segments match the reference."""
    rng = np.random.default_rng(8)
    B, T, HQ, H, Dk, Dv, l, S = 2, 45, 8, 2, 32, 16, 8, 3
    q, k, v = make_qkv(rng, B, T, HQ, H, Dk, Dv, jnp.bfloat16)
    bi = messy_block_indices(rng, B, T, H, S, l)
    do = jnp.asarray(rng.standard_normal((B, T, HQ, Dv)).astype(np.float32))
    want = reference(q, k, v, bi, S, l, 0.3, None, do)
    base = sel.SelectionConfig.default(Dk, Dv, HQ // H, l, jnp.bfloat16)
    rep = dataclasses.replace
    cfgs = {
        "rows16": rep(base, dkv=rep(base.dkv, rows=16)),
        "short_segments": rep(base, dkv=rep(base.dkv, min_segment=1, partial_bytes=1 << 30)),
        "fwd_rows32": rep(base, fwd=rep(base.fwd, rows=32)),
    }
    for name, cfg in cfgs.items():
        check(triton_run(q, k, v, bi, None, l, 0.3, None, do, cfg), want, jnp.bfloat16, name)


# ---------------------------------------------------------------------------------- GPU


def gpu_indices(T, H, S, l, pattern, seed=0):
    """int32 [1, T, H, S] like top-k's: forced blocks {0, cur, cur - 1} first, then the best
    scores among the visible blocks. "shared": the tokens of a 64-token chunk share their
    scores (plus a little noise), as with queries that are smooth along T; "random": scores
    drawn per token."""
    nb = -(-T // l)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    t = jnp.arange(T)
    cur = (t // l)[:, None, None]
    if pattern == "random":
        score = jax.random.uniform(k1, (T, H, nb))
    else:
        score = jax.random.uniform(k1, (T // 64 + 1, H, nb))[t // 64] + 0.01 * jax.random.uniform(k2, (T, H, nb))
    blk = jnp.arange(nb)[None, None, :]
    score = jnp.where((blk == 0) | (blk == cur) | (blk == cur - 1), 2.0, score)
    score = jnp.where(blk <= cur, score, -1.0)
    val, idx = jax.lax.top_k(score, S)
    return jnp.where(val >= 0, idx, -1).astype(jnp.int32)[None]


def _gpu_case(T, dtype, pattern):
    B, HQ, H, D, l, S = 1, 32, 2, 128, 64, 16
    keys = jax.random.split(jax.random.PRNGKey(T), 4)
    q = jax.random.normal(keys[0], (B, T, HQ, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, H, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, H, D), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (B, T, HQ, D), jnp.float32).astype(dtype)
    return q, k, v, do, gpu_indices(T, H, S, l, pattern), l, S


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 65536])
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_gpu_matches_xla(T, dt):
    dtype = DT[dt]
    for pattern in ("shared", "random"):
        q, k, v, do, bi, l, S = _gpu_case(T, dtype, pattern)

        def run(platform, dt=dtype):
            def f(q, k, v, do):
                o, vjp = jax.vjp(lambda q, k, v: ejnsa.apply_native_sparse_attention(
                    q, k, v, bi, S, l, platform=platform), q, k, v)
                return (o, *vjp(do))
            return jax.jit(f)(*(x.astype(dt) for x in (q, k, v, do)))

        # Reference: the XLA path on the same values in float32 (in bf16 it accumulates the
        # gathered keys' dk/dv in bf16).
        got, want = run("triton"), run("xla", jnp.float32)
        tol_o, tol_g = (1e-4, 1e-4) if dt == "fp32" else (2e-2, 3e-2)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert np.all(np.isfinite(np.asarray(a.astype(jnp.float32)))), f"{pattern} {name}: non-finite"
            err = rel_err(a, b)
            assert err <= (tol_o if name == "o" else tol_g), f"T={T} {dt} {pattern} {name}: rel err {err:.2e}"
        again = run("triton")
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, again):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{pattern} {name} not deterministic"
