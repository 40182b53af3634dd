"""Selected attention's Triton kernels (ejnsa/triton/selection.py) against the float64 reference.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are tiny; with `pytest --gpu` on the device machine the same tests run the real
kernels, and the tests marked `gpu` compare them with the XLA path at T = 4096 and 65536.

Every comparison is a relative error ‖a − b‖ / ‖b‖ of the output and of dq, dk, dv against
the dense float64 reference (tests/reference.py), with the tolerances of tests/_util.py.
Every run is under jax.jit, and every result must be finite: the interpreter fills outputs
with NaN before a launch, so a row a kernel forgot to write fails the check.
"""

import os
import sys

if "--gpu" not in sys.argv:  # conftest does the same; kernels must see it before triton is imported
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

try:
    from . import reference as ref
    from ._util import TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, f64, make_qkv, messy_block_indices, rel_err
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref
    from _util import TOL_GRAD, TOL_OUT, assert_close, cu_from_lengths, f64, make_qkv, messy_block_indices, rel_err

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
    """float64 (o, dq, dk, dv) of dense attention weighted by SPEC's key multiplicities.

    counts: an int or the clamped [B, T, H] array. The gradients are the textbook ones of
    softmax attention (ds = p * (dp - rowsum(p * dp))), in NumPy: the weights come from
    tests/reference.py, the forward is reference.ref_selected, and
    test_dense_gradients_match_autodiff checks these formulas against jax.grad of it.
    """
    bi_np = np.asarray(bi)
    cnt = counts if isinstance(counts, int) else np.asarray(counts)
    q64, k64, v64, do64 = f64(q), f64(k), f64(v), f64(do)
    B, T, HQ, _ = q64.shape
    G = HQ // k64.shape[2]
    w = np.repeat(ref.selected_multiplicity(bi_np, cnt, l, T, cu), G, axis=2).astype(np.float64)  # [B, T, HQ, T]
    kk, vv = np.repeat(k64, G, axis=2), np.repeat(v64, G, axis=2)  # [B, T, HQ, D]
    s = scale * np.einsum("bthd,bjhd->bthj", q64, kk)
    m = np.max(np.where(w > 0, s, -np.inf), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = w * np.exp(np.where(w > 0, s - m, -np.inf))
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    o = np.einsum("bthj,bjhd->bthd", p, vv)
    dp = np.einsum("bthd,bjhd->bthj", do64, vv)
    ds = p * (dp - np.sum(p * dp, -1, keepdims=True))
    dq = scale * np.einsum("bthj,bjhd->bthd", ds, kk)
    dk = scale * np.einsum("bthj,bthd->bjhd", ds, q64).reshape(B, T, -1, G, q64.shape[-1]).sum(3)
    dv = np.einsum("bthj,bthd->bjhd", p, do64).reshape(B, T, -1, G, v64.shape[-1]).sum(3)
    want_o = ref.ref_selected(q64, k64, v64, bi_np, cnt, l, scale, cu)
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
    # G = 16 (one token per fallback tile), neighbours sharing their blocks
    "g16_bf16_shared": (1, 45, 16, 1, 32, 32, 16, 3, "bf16", "shared", "int"),
    # G = 16, independent random selections, fp16
    "g16_fp16_random": (1, 45, 16, 1, 16, 32, 16, 3, "fp16", "random", "int"),
    # G = 80 > 64 rows: query heads split over programs (2 chunks of 40, fallback 5 of 16)
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


# ------------------------------------------------------------------------------ tilings


def test_tilings_choice_and_both_agree():
    """Shared selections keep the main tiling for dk/dv, random ones take the small tiles;
    forced, each tiling matches the reference (so both kernels' paths are exercised)."""
    rng = np.random.default_rng(11)
    B, T, HQ, H, Dk, Dv, l, S = 1, 128, 16, 1, 16, 16, 16, 2
    q, k, v = make_qkv(rng, B, T, HQ, H, Dk, Dv, jnp.float32)
    do = jnp.asarray(rng.standard_normal((B, T, HQ, Dv)).astype(np.float32))
    t = np.arange(T)
    shared = np.zeros((B, T, H, S), np.int32)  # the same 2 blocks for 4 consecutive tokens
    shared[0, :, :, 0] = ((t // 4 * 3) % (t // l + 1))[:, None]
    shared[0, :, :, 1] = (t // l)[:, None]
    rand = random_indices(rng, B, T, H, S, l)
    # With no fixed step cost, dk/dv's cost is the streamed rows: equal for shared
    # selections (ties keep the main tiling), fewer with small tiles for random ones.
    tile = sel.TileConfig(dkv_step_rows=0)
    choose = jax.jit(lambda bi: sel.tiling_choices(bi, None, l, None, HQ // H, tile)[1])
    assert sel.tiling_choices(rand, None, l, None, HQ // H)[0] is None  # the forward never falls back
    assert not bool(choose(jnp.asarray(shared)))
    assert bool(choose(rand))
    # Forced, on the first 40 tokens (the interpreter is slow).
    n = 40
    q, k, v, do, rand = q[:, :n], k[:, :n], v[:, :n], do[:, :n], rand[:, :n]
    want = reference(q, k, v, rand, S, l, 0.5, None, do)
    for layout in ("tokens", "tiles"):
        for variant in ("main", "fallback"):
            tile = sel.TileConfig(variant=variant, dkv_layout=layout)
            cfg = sel.SelectionConfig.default(Dk, Dv, HQ // H, l, jnp.float32, tile)
            check(triton_run(q, k, v, rand, None, l, 0.5, None, do, cfg), want, jnp.float32, f"{layout} {variant}")


def test_segment_split_and_reduce():
    """Lists cut into segments of 2 loop steps: partials written and summed in order by the
    reducer, in both dk/dv layouts."""
    rng = np.random.default_rng(5)
    B, T, HQ, H, Dk, Dv, l, S = 1, 96, 8, 2, 16, 32, 16, 3
    q, k, v = make_qkv(rng, B, T, HQ, H, Dk, Dv, jnp.float32)
    bi = shared_indices(rng, B, T, H, S, l, run=3)
    do = jnp.asarray(rng.standard_normal((B, T, HQ, Dv)).astype(np.float32))
    want = reference(q, k, v, bi, S, l, 0.4, None, do)
    bound = B * T * H * S
    rows = sel._block_rows(B, T, l, None)
    for layout in ("tiles", "tokens"):
        tile = sel.TileConfig(rows_main=16, dkv_layout=layout)
        cfg = sel.SelectionConfig.default(Dk, Dv, HQ // H, l, jnp.float32, tile)
        small = dataclasses.replace(cfg.main_dkv, min_segment=2, partial_bytes=1 << 30)
        cfg = dataclasses.replace(cfg, main_dkv=small, fallback_dkv=small)
        if layout == "tiles":
            seg = sel._segment_length(bound, l, Dk, Dv, small)
            assert seg == 2
            plan = sel._Plan.make(HQ // H, 16)
            union = sel._tile_union(sel._block_starts(bi, None, l, None), plan.bt)[0]
            part_num = sel._inverse_index(union, rows[0], seg, bound)[3]
        else:
            p = sel._Plan.make(HQ // H, small.rows).bt  # tokens per step
            seg = sel._token_segment(bound, p, l, Dk, Dv, small)
            assert seg == 2 * p
            part_num = sel._token_lists(bi, None, l, None, rows[0], seg, small.order)[3]
        assert int(jnp.max(part_num)) > 2  # some lists are split, block 0's into many segments
        check(triton_run(q, k, v, bi, None, l, 0.4, None, do, cfg), want, jnp.float32, f"segments {layout}")


def test_token_lists_segments():
    """"tokens" layout index: every valid entry is in the list of its block (tokens ascending,
    duplicates kept), each list is cut into segments covering it exactly once, multi-segment
    lists own disjoint partial slots; "longest" puts the longest lists first and "block"
    orders them by block row, KV heads inside. With batch rows, varlen and counts."""
    rng = np.random.default_rng(4)
    cases = [(2, 70, None, None), (1, 59, cu_from_lengths([0, 21, 1, 0, 30, 7]), "counts")]
    H, S, l, seg = 3, 4, 8, 5
    for B, T, cu, counts in cases:
        cu_j = None if cu is None else jnp.asarray(cu)
        bi = messy_block_indices(rng, B, T, H, S, l, cu)
        bc = None if counts is None else jnp.asarray(rng.integers(0, S + 1, size=(B, T, H)).astype(np.int32))
        starts = np.asarray(sel._block_starts(bi, bc, l, cu_j))
        row_start, row_len = (np.asarray(x) for x in sel._block_rows(B, T, l, cu_j))
        br = row_start.shape[0]
        e = H * B * T * S
        for order in ("longest", "block"):
            toks, desc, part_off, part_num = (np.asarray(x) for x in sel._token_lists(
                bi, bc, l, cu_j, jnp.asarray(row_start), seg, order))
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
                assert got == want, (order, lst, got, want)
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
            if order == "longest":
                assert [n_of[x] for x in lists] == sorted((n_of[x] for x in lists), reverse=True)
            else:
                assert lists == [h * br + rho for rho in range(br) for h in range(H)]


def test_dkv_tokens_variants():
    """The "tokens" layout's options all match the reference: block order with segments of
    one step, 16-row steps, a forward choosing its tiling per call; the program order
    changes no bit."""
    rng = np.random.default_rng(8)
    B, T, HQ, H, Dk, Dv, l, S = 2, 45, 8, 2, 32, 16, 8, 3
    q, k, v = make_qkv(rng, B, T, HQ, H, Dk, Dv, jnp.bfloat16)
    bi = messy_block_indices(rng, B, T, H, S, l)
    do = jnp.asarray(rng.standard_normal((B, T, HQ, Dv)).astype(np.float32))
    want = reference(q, k, v, bi, S, l, 0.3, None, do)
    base = sel.SelectionConfig.default(Dk, Dv, HQ // H, l, jnp.bfloat16)
    rep = dataclasses.replace
    cfgs = {
        "default": base,
        "block_order": rep(base, main_dkv=rep(base.main_dkv, order="block")),
        "block_order_short": rep(base, main_dkv=rep(base.main_dkv, order="block", min_segment=1,
                                                    partial_bytes=1 << 30)),
        "rows16": rep(base, main_dkv=rep(base.main_dkv, rows=16)),
        # the forward chooses per call between 32- and 16-row tiles (knee below the main
        # tiling's rows), and dq follows its choice
        "fwd_choice": sel.SelectionConfig.default(Dk, Dv, HQ // H, l, jnp.bfloat16,
                                                  sel.TileConfig(rows_main=32, rows_fallback=16, knee_rows=24)),
    }
    got = {}
    for name, cfg in cfgs.items():
        got[name] = triton_run(q, k, v, bi, None, l, 0.3, None, do, cfg)
        check(got[name], want, jnp.bfloat16, name)
    for x, y, part in zip(got["default"], got["block_order"], ("o", "dq", "dk", "dv")):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"block order changed {part}"


def test_inverse_index_segments():
    """Each block's list of (tile, slot) pairs is cut into segments covering it exactly once,
    multi-segment lists own disjoint partial slots, and the longest lists come first."""
    rng = np.random.default_rng(2)
    B, T, H, S, l, bt, seg = 2, 70, 3, 4, 8, 4, 3
    bi = messy_block_indices(rng, B, T, H, S, l)
    starts = sel._block_starts(bi, None, l, None)
    union, count, mult = sel._tile_union(starts, bt)
    row_start, row_len = sel._block_rows(B, T, l, None)
    bound = B * T * H * S
    pairs, desc, part_off, part_num = (np.asarray(x) for x in sel._inverse_index(union, row_start, seg, bound))
    union, count, mult = np.asarray(union), np.asarray(count), np.asarray(mult)
    row_start = np.asarray(row_start)
    nt, w = union.shape[1], union.shape[2]
    br = row_start.shape[0]
    # union / mult against a direct count
    st = np.asarray(starts)
    for h in range(H):
        for tile in range(nt):
            b, t0 = divmod(tile, -(-T // bt))
            t0 *= bt
            ent = st[b, t0:t0 + bt, h]  # [<=bt, S]
            uniq = sorted({int(x) for x in ent.reshape(-1) if x != sel.SENT})
            assert count[h, tile] == len(uniq) and list(union[h, tile, : len(uniq)]) == uniq
            for u, s in enumerate(uniq):
                assert [int((ent[i] == s).sum()) for i in range(len(ent))] == list(mult[h, tile, u, : len(ent)])
    # segments
    covered = {}
    slots = []
    lengths = []
    for lst, lo, hi, out in desc:
        if lst < 0:
            continue
        h, rho = divmod(int(lst), br)
        assert 0 <= hi - lo <= seg
        covered.setdefault(int(lst), []).append((int(lo), int(hi), int(out)))
    for lst in range(H * br):
        h, rho = divmod(lst, br)
        want = [e for e in range(nt * w) if union[h, e // w, e % w] == row_start[rho]]
        segs = covered[lst]  # every list has at least one program (an empty one writes zeros)
        got = [int(pairs[h, p]) for lo, hi, _ in segs for p in range(lo, hi)]
        assert got == want, (lst, got, want)
        outs = [o for _, _, o in segs]
        if len(segs) == 1:
            assert outs == [-1] and part_num[lst] == 0
        else:
            assert outs == list(range(part_off[lst], part_off[lst] + len(segs))) and part_num[lst] == len(segs)
            slots += outs
        lengths.append(len(want))
    assert len(slots) == len(set(slots)) and len(slots) <= -(-2 * bound // seg) + 1
    firsts = [int(lst) for lst, *_ in desc if lst >= 0]
    n_of = {lst: sum(hi - lo for lo, hi, _ in covered[lst]) for lst in covered}
    order = [n_of[x] for x in dict.fromkeys(firsts)]
    assert order == sorted(order, reverse=True)
    assert any(n > seg for n in lengths)  # the split path was exercised


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
