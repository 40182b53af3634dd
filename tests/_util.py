"""Helpers shared by the reference tests: random inputs, error ratios, top-k set checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

try:
    from . import reference as ref
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref

# Relative error ‖a − b‖ / ‖b‖ allowed against the float64 reference, per input dtype.
# float32 is the real correctness check (an honest float32 computation is near 2e-7 here);
# for bf16/fp16 the output (and each gradient) is rounded to the input dtype once, worth
# about 1.7e-3 / 2e-4 relative (rms) on random data, so these leave 5-10x that and nothing
# more: accumulating in the low precision (docs/semantics.md: accumulation is float32) does not pass.
TOL_OUT = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
TOL_GRAD = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# Two reference top-k scores closer than this are a tie the implementation may break either
# way (scores are probabilities in [0, 1], computed in float32 by the implementation).
TIE_TOL = 1e-6

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def f64(x):
    """Exact float64 copy of a (possibly bf16/fp16) array: what the reference is fed."""
    if isinstance(x, np.ndarray) and x.dtype == np.float64:
        return x
    return np.asarray(jnp.asarray(x).astype(jnp.float32)).astype(np.float64)


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in float64 (‖a − b‖ when b is all zero)."""
    a, b = f64(a), f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / nb) if nb > 0 else float(diff)


def assert_close(actual, expected, tol, name=""):
    actual64 = f64(actual)
    assert np.all(np.isfinite(actual64)), f"{name}: non-finite values in the result"
    err = rel_err(actual64, np.asarray(expected, np.float64))
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def rounding_error(x64, dtype):
    """‖round(x64 to dtype) − x64‖ / ‖x64‖: what rounding a perfect result once costs."""
    x64 = np.asarray(x64, np.float64)
    rounded = f64(jnp.asarray(x64.astype(np.float32)).astype(dtype))
    return rel_err(rounded, x64)


def assert_finite(x, name=""):
    x = f64(x)
    assert np.all(np.isfinite(x)), f"{name}: {np.sum(~np.isfinite(x))} non-finite values"


def rand(rng, shape, dtype=jnp.float32, scale=1.0):
    """Standard normal values (never zeros or ones) rounded to dtype, as a jax array."""
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


def rand_gate(rng, shape, dtype=jnp.float32):
    """Sigmoid of a normal, like the gates a model passes."""
    x = 1.0 / (1.0 + np.exp(-rng.standard_normal(shape)))
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def make_qkv(rng, B, T, HQ, H, Dk, Dv, dtype=jnp.float32):
    q = rand(rng, (B, T, HQ, Dk), dtype)
    k = rand(rng, (B, T, H, Dk), dtype)
    v = rand(rng, (B, T, H, Dv), dtype)
    return q, k, v


def cu_from_lengths(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def messy_block_indices(rng, B, T, H, S, block_size, cu_seqlens=None):
    """block_indices mixing valid past blocks, -1, other negatives, out-of-range and duplicates."""
    _, pos = ref.seq_layout(B, T, cu_seqlens)
    NB = math.ceil(T / block_size)
    cur = pos // block_size  # [B, T]
    base = rng.integers(0, cur[..., None, None] + 1, size=(B, T, H, S))
    kind = rng.random((B, T, H, S))
    out = np.where(kind < 0.12, -1, base)
    out = np.where((kind >= 0.12) & (kind < 0.18), -rng.integers(2, 1000, size=out.shape), out)
    out = np.where((kind >= 0.18) & (kind < 0.24), NB + rng.integers(0, 5, size=out.shape), out)
    # Future blocks of the own sequence (b*l > t): contribute nothing either.
    out = np.where((kind >= 0.24) & (kind < 0.30), cur[..., None, None] + 1, out)
    # Duplicates: copy entry 0 into entry 1 somewhere.
    if S >= 2:
        dup = rng.random((B, T, H)) < 0.3
        out[..., 1] = np.where(dup, out[..., 0], out[..., 1])
    return jnp.asarray(out.astype(np.int32))


def check_topk(idx, ref_scores, block_counts, tol=TIE_TOL):
    """Check an implementation's top-k `idx` [B, T, H, S] against reference scores.

    ref_scores [B, T, H, NB]: `reference.ref_topk_scores` (-inf = not a candidate).
    block_counts: int S, or the [B, T, H] tensor (then S must be ceil(T/l)).
    Selections are compared as sets; only reference scores within `tol` of each other may be
    exchanged. Exact ties (the forced blocks all score 1.0) go to the smaller block index.
    """
    idx = np.asarray(idx)
    B, T, H, S = idx.shape
    NB = ref_scores.shape[-1]
    if isinstance(block_counts, (int, np.integer)):
        assert S == block_counts, f"top-k returned S={S}, expected {block_counts}"
        counts = np.full((B, T, H), S)
    else:
        assert S == NB, f"top-k with tensor block_counts returned S={S}, expected ceil(T/l)={NB}"
        counts = np.clip(np.asarray(block_counts), 0, S)
    problems = []
    for b in range(B):
        for t in range(T):
            for h in range(H):
                row = ref_scores[b, t, h]
                sel = idx[b, t, h]
                where = f"[b={b}, t={t}, h={h}] got {sel.tolist()}"
                cands = {int(c) for c in np.flatnonzero(row > -np.inf)}
                k = min(int(counts[b, t, h]), len(cands))
                if not (np.all(sel[:k] >= 0) and np.all(sel[k:] == -1)):
                    problems.append(f"{where}: expected {k} blocks then -1 padding")
                    continue
                chosen = [int(c) for c in sel[:k]]
                if len(set(chosen)) != k:
                    problems.append(f"{where}: duplicate block")
                    continue
                if not set(chosen) <= cands:
                    problems.append(f"{where}: non-candidate block, candidates {sorted(cands)}")
                    continue
                rest = cands - set(chosen)
                for c in chosen:
                    for u in rest:
                        if row[u] > row[c] + tol or (row[u] == row[c] and u < c):
                            problems.append(f"{where}: {u} (score {row[u]:.9g}) should beat "
                                            f"{c} (score {row[c]:.9g})")
                for a, c in zip(chosen, chosen[1:]):
                    if row[c] > row[a] + tol or (row[c] == row[a] and c < a):
                        problems.append(f"{where}: order {a} ({row[a]:.9g}) before "
                                        f"{c} ({row[c]:.9g})")
    assert not problems, f"{len(problems)} top-k mismatches, first: " + "; ".join(problems[:5])


def selection_margin(ref_scores, ref_idx):
    """Smallest gap between a selected and an unselected candidate's reference score.

    Exactly equal scores (the forced blocks, all 1.0) are skipped: the smaller index wins them
    in any implementation. Above the implementation's rounding, its selection must be the
    reference's.
    """
    B, T, H, S = ref_idx.shape
    margin = np.inf
    for b in range(B):
        for t in range(T):
            for h in range(H):
                row = ref_scores[b, t, h]
                chosen = [c for c in ref_idx[b, t, h] if c >= 0]
                rest = [c for c in np.flatnonzero(row > -np.inf) if c not in chosen]
                gaps = [row[c] - row[u] for c in chosen for u in rest if row[c] != row[u]]
                if gaps:
                    margin = min(margin, min(gaps))
    return margin


def ref_grads(fn, diff_args, cotangent):
    """float64 gradients of sum(fn(xp=jnp, **diff_args) * cotangent) w.r.t. diff_args.

    fn: a reference function (bind everything but the differentiated arrays and `xp` with a
    lambda or functools.partial); it may return a tuple, matched by a tuple of cotangents.
    diff_args maps names to arrays (fed to the reference as exact float64 copies).
    """
    names = list(diff_args)
    cots = cotangent if isinstance(cotangent, tuple) else (cotangent,)
    cots = [f64(c) for c in cots]
    with jax.enable_x64(True):
        def loss(*vals):
            out = fn(xp=jnp, **dict(zip(names, vals)))
            outs = out if isinstance(out, tuple) else (out,)
            return sum(jnp.sum(o * c) for o, c in zip(outs, cots))
        vals = [jnp.asarray(f64(diff_args[n])) for n in names]
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*vals)
        return {n: np.asarray(g, np.float64) for n, g in zip(names, grads)}


def impl_grads(fn, diff_args, cotangent):
    """Gradients of sum(fn(**diff_args).astype(f32) * cotangent) (implementation side, jit)."""
    names = list(diff_args)
    cots = cotangent if isinstance(cotangent, tuple) else (cotangent,)

    def loss(*vals):
        out = fn(**dict(zip(names, vals)))
        outs = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(o.astype(jnp.float32) * jnp.asarray(c).astype(jnp.float32))
                   for o, c in zip(outs, cots))

    # jit: one compilation of the whole backward is much cheaper on CPU than op by op.
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(
        *[diff_args[n] for n in names])
    return dict(zip(names, grads))


def dense_grads(q, k, v, weight, scale, do, dlse=None):
    """float64 (o, lse, dq, dk, dv) of weighted softmax attention, closed form.

    Query (b, t, hq) attends key j with weight weight[b, t, hq, j] (0: not at all; 2: its
    key counts twice); a [B, T, J] weight (or boolean mask) is the same for every head.
    dS = P * (dP - rowsum(P * dP) + dlse); every test that uses this checks it once against
    jax.grad of its reference.
    """
    q, k, v, do = (f64(x) for x in (q, k, v, do))
    B, T, HQ, _ = q.shape
    J, H = k.shape[1], k.shape[2]
    G = HQ // H
    w = np.asarray(weight, np.float64)
    w = np.broadcast_to(w[:, :, None, :] if w.ndim == 3 else w, (B, T, HQ, J))
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.where(w > 0, scale * np.einsum("bthd,bjhd->bthj", q, kr), -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(w > 0, w * np.exp(s - mx), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)
    o = np.einsum("bthj,bjhd->bthd", p, vr)
    lse = np.where(den[..., 0] > 0, mx[..., 0] + np.log(np.where(den[..., 0] > 0, den[..., 0], 1.0)), -np.inf)
    dp = np.einsum("bthd,bjhd->bthj", do, vr)
    shift = (p * dp).sum(-1, keepdims=True)
    if dlse is not None:
        shift = shift - f64(dlse)[..., None]
    ds = p * (dp - shift)
    dq = scale * np.einsum("bthj,bjhd->bthd", ds, kr)
    dk = scale * np.einsum("bthj,bthd->bjhd", ds, q).reshape(B, J, H, G, -1).sum(3)
    dv = np.einsum("bthj,bthd->bjhd", p, do).reshape(B, J, H, G, -1).sum(3)
    return o, lse, dq, dk, dv


def assert_grads_close(got, want, tol, where=""):
    for name in want:
        assert_close(got[name], want[name], tol, f"{where} d{name}")
