"""Bad values (docs/semantics.md, "Bad values"), on both platforms.

- Containment: a NaN or Inf anywhere in one packed sequence (query, key, value, a gate)
  changes no output and no gradient row of any other sequence: they equal, exactly, those
  of a run with a finite value in its place.
- Within the sequence: a token returns NaN at a head exactly where it attends a
  non-finite value (or its own query holds one); every other token and head stays finite,
  and a token that sees no compressed block gets o_cmp = 0, lse_cmp = -inf.
- Malformed cu_seqlens: the call equals the valid call on the tokens inside
  [cu'[0], cu'[-1]) of the sanitized cu' (docs/semantics.md); tokens outside output 0 and
  get zero gradients, top-k gives them -1. The interpreter poisons unwritten outputs
  (NaN, int min), so an unwritten row fails these checks.
- Out-of-range, duplicate and negative block indices, block_counts past S or negative.
- Determinism: every call of this file runs twice and must give the same bits.

The Triton kernels run in Triton's interpreter on the CPU; with --gpu the tests marked gpu
run a subset at larger T on the real kernels.
"""

from __future__ import annotations

import os

if os.environ.get("EJNSA_TEST_GPU") != "1":  # conftest does the same; kernels must see it before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ejnsa  # noqa: E402
from ejnsa._varlen import sanitize_cu_seqlens  # noqa: E402

try:
    from . import reference as ref
    from ._util import cu_from_lengths, messy_block_indices, rand, rand_gate
except ImportError:
    import reference as ref
    from _util import cu_from_lengths, messy_block_indices, rand, rand_gate

PLATFORMS = ["xla", "triton"]
# Packed: empty, one-token and block-straddling sequences; T = 51 is no multiple of l = 16.
LENGTHS = [0, 17, 1, 0, 20, 13]
HQ, H, D, L, S, W = 4, 2, 16, 16, 3, 8
BAD_SEQ = 4  # tokens 18..37: blocks 0 (18..33) and 1 (34..37, partial)


def _inputs(seed=0, T=None, hq=HQ, h=H, d=D):
    rng = np.random.default_rng(seed)
    T = T or sum(LENGTHS)
    q, k, v = rand(rng, (1, T, hq, d)), rand(rng, (1, T, h, d)), rand(rng, (1, T, h, d))
    gates = tuple(rand_gate(rng, (1, T, hq)) for _ in range(3))
    return q, k, v, gates


def _same(a, b):
    """Equal values and the same NaN positions (-0 == 0)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def _twice(fn, *args):
    """fn(*args), run twice: the second run must give the same bits."""
    first, second = fn(*args), fn(*args)
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), "two runs differ"
    return first


def _cotangent(out, seed=1, lo=0, hi=None):
    """A finite random cotangent for `out` (a pytree of [1, T, ...] arrays), drawn for
    T = hi tokens and cut to [lo, lo + T), so that a call on a slice gets the same values."""
    rng = np.random.default_rng(seed)

    def one(o):
        full = rng.standard_normal((o.shape[0], hi or o.shape[1]) + o.shape[2:]).astype(np.float32)
        return jnp.asarray(full[:, lo:lo + o.shape[1]]).astype(o.dtype)

    return jax.tree.map(one, out)


def _op(name, P, cu, bi, counts):
    """The public function `name` on the arrays it differentiates."""
    if name == "nsa":
        return lambda q, k, v, g1, g2, g3: ejnsa.native_sparse_attention(
            q, k, v, g1, g2, g3, block_indices=bi, block_counts=S, block_size=L, window_size=W, cu_seqlens=cu,
            platform=P)
    if name == "window":
        return lambda q, k, v: ejnsa.sliding_window_attention(q, k, v, W, cu_seqlens=cu, platform=P)
    if name == "selection":
        return lambda q, k, v: ejnsa.apply_native_sparse_attention(q, k, v, bi, counts, L, cu_seqlens=cu, platform=P)
    if name == "compression":
        return lambda q, kc, vc: ejnsa.nsa_compression(q, kc, vc, L, cu_seqlens=cu, platform=P)
    if name == "topk":
        return lambda q, kc: ejnsa.nsa_topk(q, kc, counts, L, cu_seqlens=cu, platform=P)
    if name == "pool":
        return lambda k: ejnsa.mean_pooling(k, L, cu)
    raise ValueError(name)


_JITTED: dict = {}


def _call(name, P, args, cu=None, bi=None, counts=S, grads=True, lo=0, hi=None):
    """Outputs of the public function `name` (with grads: and the gradients w.r.t. `args`
    for the cotangent of `_cotangent(out, lo=lo, hi=hi)`), under jit, run twice.

    cu, bi and an array `counts` are traced arguments, so that one compilation serves
    every case of a test (the XLA path compiles slowly on a CPU)."""
    static_counts = counts if isinstance(counts, int) else None
    key = (name, P, grads, lo, hi, static_counts)
    if key not in _JITTED:
        def run(args, cu, bi, counts):
            fn = _op(name, P, cu, bi, static_counts if static_counts is not None else counts)
            if not grads:
                return fn(*args)
            out, vjp = jax.vjp(fn, *args)
            return out, vjp(_cotangent(out, lo=lo, hi=hi))
        _JITTED[key] = jax.jit(run)
    return _twice(_JITTED[key], tuple(args), cu, bi, None if static_counts is not None else counts)


def _token_seq(T, cu):
    seq, _ = ref.seq_layout(1, T, cu)
    return seq[0]


def _row_seq(T, cu, rows):
    """Sequence of each packed compressed row (-1 past the total)."""
    out = np.full(rows, -1)
    for r, (i, _, _, _) in enumerate(ref.cmp_rows(T, L, cu)[:rows]):
        out[r] = i
    return out


def _poison(x, t, h, value):
    return x.at[0, t, h].set(value)


# ---------------------------------------------------------------------------- containment

SITES = [  # (input, token, head, value): in the bad sequence, NaN and both infinities
    ("query", 22, 1, np.nan),
    ("key", 35, 0, np.inf),
    ("value", 22, 1, np.nan),
    ("g_cmp", 36, 2, np.nan),
    ("g_slc", 30, 0, -np.inf),
    ("g_swa", 19, 3, np.nan),
]


@pytest.mark.parametrize("P", PLATFORMS)
@pytest.mark.parametrize("site", SITES, ids=[s[0] for s in SITES])
def test_nsa_containment(P, site):
    """The whole NSA (top-k path): other sequences' outputs and every gradient row equal
    those of a run without the bad value, exactly; the bad token itself is not finite."""
    name, t, h, value = site
    cu = jnp.asarray(cu_from_lengths(LENGTHS))
    T = int(cu[-1])
    q, k, v, gates = _inputs()
    args = dict(query=q, key=k, value=v, g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2])
    bad = dict(args, **{name: _poison(args[name], t, h, value)})
    o_ok, g_ok = _call("nsa", P, args.values(), cu)
    o_bad, g_bad = _call("nsa", P, bad.values(), cu)
    other = _token_seq(T, np.asarray(cu)) != BAD_SEQ
    assert _same(o_bad[0, other], o_ok[0, other])
    for n, a, b in zip(args, g_bad, g_ok):
        assert _same(a[0, other], b[0, other]), f"d{n} of another sequence changed"
    assert not np.isfinite(np.asarray(o_bad[0, t].astype(jnp.float32))).all()


@pytest.mark.parametrize("P", PLATFORMS)
def test_pieces_containment(P):
    """Every public function with a NaN or Inf in one sequence: other sequences' outputs and
    gradient rows unchanged, exactly (compressed rows: those of other sequences)."""
    cu_np = cu_from_lengths(LENGTHS)
    cu = jnp.asarray(cu_np)
    T = int(cu_np[-1])
    q, k, v, _ = _inputs(3)
    bi = messy_block_indices(np.random.default_rng(4), 1, T, H, S, L, cu_np)
    tok_other = _token_seq(T, cu_np) != BAD_SEQ
    kc, vc = ejnsa.mean_pooling(k, L, cu), ejnsa.mean_pooling(v, L, cu)
    row_other = _row_seq(T, cu_np, kc.shape[1]) != BAD_SEQ
    row_bad = int(np.flatnonzero(~row_other)[0])
    cases = [  # (op, arguments, poisoned (argument, token or row, head, value), rows kept per gradient)
        ("window", (q, k, v), (2, 30, 0, np.nan), [tok_other] * 3),
        ("window", (q, k, v), (1, 25, 1, np.inf), [tok_other] * 3),
        ("selection", (q, k, v), (2, 20, 1, np.nan), [tok_other] * 3),
        ("selection", (q, k, v), (1, 19, 0, -np.inf), [tok_other] * 3),
        ("selection", (q, k, v), (0, 36, 2, np.nan), [tok_other] * 3),
        ("compression", (q, kc, vc), (2, row_bad, 1, np.nan), [tok_other, row_other, row_other]),
        ("compression", (q, kc, vc), (0, 35, 3, np.inf), [tok_other, row_other, row_other]),
        ("pool", (k,), (0, 30, 0, np.nan), [tok_other]),
    ]
    for name, args, (i, t, h, value), keep in cases:
        bad = list(args)
        bad[i] = _poison(bad[i], t, h, value)
        o_ok, g_ok = _call(name, P, args, cu, bi)
        o_bad, g_bad = _call(name, P, bad, cu, bi)
        out_rows = row_other if name == "pool" else tok_other
        for a, b in zip(jax.tree.leaves(o_bad), jax.tree.leaves(o_ok)):
            assert _same(a[0, out_rows], b[0, out_rows]), f"{name} {i}: another sequence's output changed"
        for j, (a, b, rows) in enumerate(zip(g_bad, g_ok, keep)):
            assert _same(a[0, rows], b[0, rows]), f"{name} {i}: gradient {j} of another sequence changed"
    got = np.asarray(_call("pool", P, (_poison(k, 30, 0, np.nan),), cu, grads=False))[0]
    rows_bad = np.flatnonzero(~row_other)
    assert np.isnan(got[rows_bad[0], 0]).all() and np.isfinite(got[rows_bad[1]]).all()  # token 30 is in block 0
    for i, x in ((0, q), (1, kc)):  # top-k: no gradient
        args = [q, kc]
        args[i] = _poison(x, 33 if i == 0 else row_bad, 1, np.nan)
        bad, ok = (_call("topk", P, a, cu, grads=False) for a in (args, (q, kc)))
        assert _same(bad[0, tok_other], ok[0, tok_other])


# --------------------------------------------------------------------- within the sequence


def _expect_nan(attends):
    """[T, HQ] from attends [T, H]: a KV head's query heads all attend its keys."""
    return np.repeat(attends, HQ // H, axis=1)


@pytest.mark.parametrize("P", PLATFORMS)
def test_nan_exactly_where_attended(P):
    """o is NaN at (token, head) exactly where that head attends a non-finite key or value,
    or its own query holds one and it sees something; finite everywhere else, also within
    the bad sequence (no spreading). Per branch, from the masks of tests/reference.py."""
    cu_np = cu_from_lengths(LENGTHS)
    cu = jnp.asarray(cu_np)
    T = int(cu_np[-1])
    q, k, v, _ = _inputs(5)
    seq, pos = (x[0] for x in ref.seq_layout(1, T, cu_np))
    same = seq[:, None] == seq[None, :]
    window = same & (pos[None, :] <= pos[:, None]) & (pos[:, None] - W < pos[None, :])  # [t, j]
    bi = messy_block_indices(np.random.default_rng(6), 1, T, H, S, L, cu_np)
    mult = ref.selected_multiplicity(np.asarray(bi), S, L, T, cu_np)[0]  # [t, h, j]
    kc, vc = ejnsa.mean_pooling(k, L, cu), ejnsa.mean_pooling(v, L, cu)
    rows = ref.cmp_rows(T, L, cu_np)
    sees = np.zeros((T, kc.shape[1]), bool)  # token t sees compressed row r
    for r, (i, c, _, _) in enumerate(rows):
        sees[:, r] = (seq == i) & ((c + 1) * L - 1 <= pos)

    j, h = 22, 1  # key/value poisoned at token 22, KV head 1 (block 0 of the bad sequence)
    r = next(r for r, (_, _, s0, e0) in enumerate(rows) if s0 <= j < e0)
    cases = []  # (label, op, arguments, NaN expected [T, HQ])
    for which in (0, 1):  # key or value (k_cmp or v_cmp, as mean pooling of a NaN key makes it)
        kv, kvc = [k, v], [kc, vc]
        kv[which] = _poison(kv[which], j, h, np.nan)
        kvc[which] = _poison(kvc[which], r, h, np.nan)
        for name, args, attends in (("window", kv, window[:, j]), ("selection", kv, mult[:, h, j] > 0),
                                    ("compression", kvc, sees[:, r])):
            att = np.zeros((T, H), bool)
            att[:, h] = attends
            cases.append((name, [q, *args], _expect_nan(att)))
    t, hq = 35, 2  # query poisoned at token 35, head 2: that row only, if it sees anything
    for name, rest, seen in (("window", (k, v), True), ("selection", (k, v), mult[t, hq // (HQ // H)].any()),
                             ("compression", (kc, vc), sees[t].any())):
        want = np.zeros((T, HQ), bool)
        want[t, hq] = seen
        cases.append((name, [_poison(q, t, hq, np.nan), *rest], want))
    for name, args, want in cases:
        out = _call(name, P, args, cu, bi, grads=False)
        o = np.asarray((out[0] if name == "compression" else out).astype(jnp.float32))[0]  # [T, HQ, D]
        got = np.isnan(o).any(-1)
        assert np.array_equal(got, want), f"{name}: NaN at {np.argwhere(got ^ want)[:5].tolist()} (expected {want.sum()})"
        assert np.isnan(o[want]).all() and np.isfinite(o[~want]).all(), name
        if name == "compression":  # lse_cmp follows o_cmp
            assert np.array_equal(np.isnan(np.asarray(out[1])[0]), want), name


@pytest.mark.parametrize("P", PLATFORMS)
def test_no_block_means_zero_whatever_the_values(P):
    """A token that sees no compressed block: o_cmp = 0 and lse_cmp = -inf, however many
    NaN and Inf its sequence's queries and compressed keys and values hold."""
    cu_np = cu_from_lengths(LENGTHS)
    cu = jnp.asarray(cu_np)
    T = int(cu_np[-1])
    q, k, v, _ = _inputs(7)
    kc, vc = ejnsa.mean_pooling(k, L, cu), ejnsa.mean_pooling(v, L, cu)
    _, pos = (x[0] for x in ref.seq_layout(1, T, cu_np))
    blind = pos < L - 1
    q = jnp.where(jnp.asarray(blind)[None, :, None, None], jnp.nan, q)
    kc, vc = kc.at[:, :, 0].set(jnp.nan), vc.at[:, :, 1].set(jnp.inf)
    o, lse = _call("compression", P, (q, kc, vc), cu, grads=False)
    o, lse = np.asarray(o)[0], np.asarray(lse)[0]
    assert np.all(o[blind] == 0) and np.all(lse[blind] == -np.inf)
    # every head of a token that sees a block attends a non-finite row: NaN, not Inf
    assert np.isnan(o[~blind]).all() and np.isnan(lse[~blind]).all()


@pytest.mark.parametrize("P", PLATFORMS)
def test_topk_with_a_nan_query(P):
    """A token whose query is NaN: every score of its KV head is NaN, which counts as 0, so
    it selects its forced blocks and then the smallest visible ones; no other token moves."""
    T = 90
    q, k, _, _ = _inputs(8, T=T)
    kc = ejnsa.mean_pooling(k, L)
    t = 70  # block 4; forced {0, 4, 3}, visible {0, 1, 2, 3}
    qb = q.at[0, t, : HQ // H].set(jnp.nan)  # the query heads of KV head 0
    got, want = (np.asarray(_call("topk", P, (x, kc), counts=S + 2, grads=False)) for x in (qb, q))
    assert list(got[0, t, 0]) == [0, 3, 4, 1, 2]
    keep = np.ones(got.shape, bool)
    keep[0, t, 0] = False
    assert np.array_equal(got[keep], want[keep])


@pytest.mark.parametrize("P", PLATFORMS)
def test_infinite_query_with_no_weight(P):
    """A query entry of -Inf against keys that are all positive there: every score of the
    token at that head is -inf, so it has keys but no weight. Its output there is NaN (it
    attends a non-finite value: rule 2), not the 0 of a token that sees nothing; every
    other token and head is finite."""
    T, t = 40, 37
    q, k, v, _ = _inputs(10, T=T)
    k = k.at[..., 0].set(jnp.abs(k[..., 0]) + 0.5)
    q = q.at[0, t, 1, 0].set(-jnp.inf)  # query head 1: KV head 0
    kc, vc = ejnsa.mean_pooling(k, L), ejnsa.mean_pooling(v, L)
    bi = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (1, T, H, S))
    for name, args in (("window", (q, k, v)), ("selection", (q, k, v)), ("compression", (q, kc, vc))):
        out = _call(name, P, args, bi=bi, grads=False)
        o = np.asarray(out[0] if name == "compression" else out)[0]
        want = np.zeros(o.shape[:2], bool)
        want[t, 1] = True
        assert np.isnan(o[want]).all() and np.isfinite(o[~want]).all(), name
        if name == "compression":
            lse = np.asarray(out[1])[0]
            assert not np.isfinite(lse[t, 1]) and np.isfinite(lse[L - 1:][~want[L - 1:]]).all()


def test_platforms_agree_on_nan_rows():
    """The XLA path no longer turns a NaN row into 0: both platforms mark the same entries."""
    cu = jnp.asarray(cu_from_lengths(LENGTHS))
    q, k, v, gates = _inputs(9)
    q = q.at[0, 20, 1].set(jnp.nan)
    v = v.at[0, 40, 0].set(jnp.inf)
    outs = [np.asarray(_call("nsa", P, (q, k, v, *gates), cu, grads=False)) for P in PLATFORMS]
    assert np.isnan(outs[0]).any() and np.array_equal(np.isnan(outs[0]), np.isnan(outs[1]))


# ------------------------------------------------------------------ malformed cu_seqlens

MALFORMED = {
    "decreasing": [0, 30, 20, 51],
    "first_not_0": [5, 20, 51],
    "last_below_T": [0, 20, 40],
    "last_above_T": [0, 20, 60],
    "negative": [-5, 20, 51],
    "shrinking_end": [0, 40, 12],
    "all_zeros": [0, 0, 0],
}
# The interpreter is slow: the Triton path runs these in the default run, all with -m slow.
TRITON_CI = ("decreasing", "first_not_0", "shrinking_end", "all_zeros")
MALFORMED_PARAMS = [
    pytest.param(P, case, id=f"{P}-{case}", marks=() if P == "xla" or case in TRITON_CI else pytest.mark.slow)
    for P in PLATFORMS for case in MALFORMED
]


@pytest.mark.parametrize("P,case", MALFORMED_PARAMS)
def test_malformed_cu_seqlens(P, case):
    """Under jit a malformed cu_seqlens is read as its sanitized form cu': tokens inside
    [cu'[0], cu'[-1]) get exactly the results of the valid call on that slice, tokens
    outside output 0 (top-k: -1, lse: -inf) and every gradient row only they own is 0."""
    T = 51
    cu = jnp.asarray(MALFORMED[case], jnp.int32)
    clean = np.asarray(sanitize_cu_seqlens(cu, T))
    lo, hi = int(clean[0]), int(clean[-1])
    q, k, v, gates = _inputs(11, T=T)
    inner = jnp.asarray(clean - lo)
    bi = messy_block_indices(np.random.default_rng(12), 1, T, H, S, L)
    for label, given in (("nsa", None), ("nsa with indices", bi)):
        args = (q, k, v, *gates)
        o, grads = _call("nsa", P, args, cu, given, hi=T)
        o, grads = np.asarray(o)[0], [np.asarray(g)[0] for g in grads]
        assert np.all(o[:lo] == 0) and np.all(o[hi:] == 0), f"{label}: outside output not 0"
        for g in grads:
            assert np.all(g[:lo] == 0) and np.all(g[hi:] == 0), f"{label}: outside gradient not 0"
        if hi > lo:
            sliced = tuple(a[:, lo:hi] for a in args)
            o_in, g_in = _call("nsa", P, sliced, inner, None if given is None else given[:, lo:hi], lo=lo, hi=T)
            np.testing.assert_allclose(o[lo:hi], np.asarray(o_in)[0], rtol=1e-5, atol=1e-6, err_msg=label)
            for g, gi in zip(grads, g_in):
                np.testing.assert_allclose(g[lo:hi], np.asarray(gi)[0], rtol=1e-4, atol=1e-5, err_msg=label)
    # the pieces that read packed compressed rows
    kc, vc = ejnsa.mean_pooling(k, L, cu), ejnsa.mean_pooling(v, L, cu)
    idx = np.asarray(_call("topk", P, (q, kc), cu, grads=False))[0]
    assert np.all(idx[:lo] == -1) and np.all(idx[hi:] == -1)
    (oc, lse), grads = _call("compression", P, (q, kc, vc), cu, hi=T)
    oc, lse = np.asarray(oc)[0], np.asarray(lse)[0]
    assert np.all(oc[:lo] == 0) and np.all(oc[hi:] == 0) and np.all(lse[:lo] == -np.inf) and np.all(lse[hi:] == -np.inf)
    assert np.all(np.asarray(grads[0])[0, :lo] == 0) and np.all(np.asarray(grads[0])[0, hi:] == 0)
    for g in grads[1:]:
        assert np.all(np.isfinite(np.asarray(g)))
    if hi > lo:
        rows = ref.num_cmp_rows(hi - lo, L, np.asarray(inner))
        kc_in = ejnsa.mean_pooling(k[:, lo:hi], L, inner)
        np.testing.assert_array_equal(np.asarray(kc)[0, :rows], np.asarray(kc_in)[0, :rows])
        assert np.all(np.asarray(kc)[0, rows:] == 0)
        idx_in = np.asarray(_call("topk", P, (q[:, lo:hi], kc_in), inner, grads=False))[0]
        np.testing.assert_array_equal(idx[lo:hi], idx_in)


# ----------------------------------------------------------------- indices and counts


@pytest.mark.parametrize("P", PLATFORMS)
def test_indices_and_counts(P):
    """Out-of-range and negative indices are ignored exactly like -1; counts past S act as
    S and negative counts as 0; a duplicate counts twice (against the float64 reference)."""
    cu_np = cu_from_lengths(LENGTHS)
    cu = jnp.asarray(cu_np)
    T = int(cu_np[-1])
    q, k, v, _ = _inputs(13)
    rng = np.random.default_rng(14)
    bi = np.asarray(messy_block_indices(rng, 1, T, H, S, L, cu_np))
    _, pos = ref.seq_layout(1, T, cu_np)
    invalid = (bi < 0) | (bi > (pos // L)[..., None, None])
    as_minus_one = jnp.asarray(np.where(invalid, -1, bi))
    got = _call("selection", P, (q, k, v), cu, jnp.asarray(bi))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_call("selection", P, (q, k, v), cu, as_minus_one))):
        assert _same(a, b)
    counts = rng.integers(-3, S + 4, size=(1, T, H)).astype(np.int32)
    clamped = np.clip(counts, 0, S)
    a, b = (_call("selection", P, (q, k, v), cu, jnp.asarray(bi), jnp.asarray(c)) for c in (counts, clamped))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert _same(x, y)
    dup = bi.copy()
    dup[..., 1] = dup[..., 0]
    o = np.asarray(_call("selection", P, (q, k, v), cu, jnp.asarray(dup), grads=False))
    want = ref.ref_selected(q, k, v, dup, S, L, cu_seqlens=cu_np)
    np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_gpu_containment_and_malformed(dtype):
    """The real kernels at T = 4096 (16 packed sequences, G = 8, D = 128, l = 64): a NaN in
    each input of one sequence leaves the others' outputs and gradients bit-identical, and
    a malformed cu_seqlens zeroes the tokens outside it."""
    rng = np.random.default_rng(0)
    lengths = [0, 1, 63, 64, 65, 300, 1, 700] + [363] * 8
    cu = jnp.asarray(cu_from_lengths(lengths))
    T, hq, h, d, l = int(cu[-1]), 16, 2, 128, 64
    q, k, v = (rand(rng, (1, T, n, d), dtype) for n in (hq, h, h))
    gates = tuple(rand_gate(rng, (1, T, hq), dtype) for _ in range(3))
    other = _token_seq(T, np.asarray(cu)) != 5  # sequence 5: 300 tokens at 194..493

    @jax.jit
    def run(args, cu):
        def nsa(*a):
            return ejnsa.native_sparse_attention(*a, block_counts=16, block_size=l, window_size=128, cu_seqlens=cu,
                                                 platform="triton")
        out, vjp = jax.vjp(nsa, *args)
        return out, vjp(_cotangent(out))

    args = (q, k, v, *gates)
    o_ok, g_ok = _twice(run, args, cu)
    for i, t in ((0, 300), (1, 250), (2, 420), (3, 480), (4, 300), (5, 200)):
        bad = list(args)
        bad[i] = bad[i].at[0, t, 0].set(jnp.nan)
        o_bad, g_bad = _twice(run, tuple(bad), cu)
        assert _same(np.asarray(o_bad)[0, other], np.asarray(o_ok)[0, other]), f"input {i}: output changed"
        for j, (a, b) in enumerate(zip(g_bad, g_ok)):
            assert _same(np.asarray(a)[0, other], np.asarray(b)[0, other]), f"input {i}: gradient {j} changed"
    o, grads = _twice(run, args, jnp.asarray([100, 900, 700, 3000], jnp.int32))
    o = np.asarray(o.astype(jnp.float32))[0]
    assert np.all(o[:100] == 0) and np.all(o[3000:] == 0) and np.isfinite(o).all()
    for g in grads:
        g = np.asarray(g.astype(jnp.float32))[0]
        assert np.all(g[:100] == 0) and np.all(g[3000:] == 0) and np.isfinite(g).all()
