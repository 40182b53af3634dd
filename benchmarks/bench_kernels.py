"""Selected and sliding-window attention kernels against their dense-equivalent cuDNN floors.

On a GPU, from the repository root:

    python3 benchmarks/bench_kernels.py                 # timings, T = 8192, 32768, 65536
    python3 benchmarks/bench_kernels.py --check         # correctness vs the XLA path first
    python3 benchmarks/bench_kernels.py --check-only    # correctness only

Shapes: B = 1, HQ = 64, H = 4, D = 128, l = 64, S = 16, w = 512, bf16. The floors are
`jax.nn.dot_product_attention(..., implementation="cudnn")` with the same FLOPs: a causal
window of S * l = 1024 keys for selection, of w keys for the window branch.

Selection runs on two index patterns, labelled honestly:
- "topk": ejnsa.nsa_topk (XLA path) on queries smooth along T (q_t = base(t // 64) + 0.1 *
  noise): neighbouring tokens share most blocks, as in a trained model.
- "random": forced blocks {0, t // l, t // l - 1} plus uniformly random visible blocks per
  token: tokens share only the forced blocks (the worst case for token tiles).

Per case: median ms of forward and of forward+backward (jax.grad of a sum), the ratio to the floor, and the XLA buffer footprint of the jitted
forward+backward (arguments + outputs + temporaries, from `memory_analysis`; it includes
cuDNN's workspace and every kernel output) with its ratio to the floor's. Each case is
guarded: an exception is printed and recorded, and the run goes on. A short table comes
last; everything is written as JSON to $OUT/bench_kernels.json when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import log, median_ms, record_error, rel_err, write_json  # noqa: E402

HQ, H, D, L, S, W = 64, 4, 128, 64, 16, 512
RESULTS: dict = {"env": {}, "rows": [], "checks": [], "patterns": [], "errors": []}


# ======================================================================================
# Inputs
# ======================================================================================


def make_inputs(T, dtype, hq=None, h=None, d=None, seed=0):
    import jax
    import jax.numpy as jnp

    hq, h, d = hq or HQ, h or H, d or D
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (1, T, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (1, T, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (1, T, h, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (1, T, hq, d), jnp.float32).astype(dtype)
    return q, k, v, do


def random_indices(T, h, seed=1):
    """Forced {0, cur, cur - 1} + uniformly random distinct visible blocks, int32 [1, T, h, S]."""
    import jax
    import jax.numpy as jnp

    nb = -(-T // L)
    cur = (jnp.arange(T) // L)[:, None, None]
    blk = jnp.arange(nb)[None, None, :]
    out = []
    for i in range(0, T, 8192):  # [8192, h, nb] scores at a time
        c = cur[i:i + 8192]
        score = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(seed), i), (c.shape[0], h, nb))
        score = jnp.where((blk == 0) | (blk == c) | (blk == c - 1), 2.0, score)
        score = jnp.where(blk <= c, score, -1.0)
        out.append(_top(score))
    return jnp.concatenate(out)[None]


def _top(score):
    """Top-S block indices of score [..., nb] (negative = not a candidate), -1 padded."""
    import jax
    import jax.numpy as jnp

    nb = score.shape[-1]
    val, idx = jax.lax.top_k(score, min(S, nb))
    idx = jnp.where(val >= 0, idx, -1).astype(jnp.int32)
    if nb < S:
        idx = jnp.concatenate([idx, jnp.full(idx.shape[:-1] + (S - nb,), -1, jnp.int32)], axis=-1)
    return idx


def topk_indices(T, k, seed=2):
    """ejnsa's top-k (XLA path) on queries smooth along T; -> (indices, how they were made)."""
    import jax
    import jax.numpy as jnp

    import ejnsa

    ks = jax.random.split(jax.random.PRNGKey(seed), 2)
    hq, d = k.shape[2] * (HQ // H), k.shape[3]
    base = jax.random.normal(ks[0], (T // 64 + 1, hq, d), jnp.float32)
    qs = base[jnp.arange(T) // 64] + 0.1 * jax.random.normal(ks[1], (T, hq, d), jnp.float32)
    qs = qs[None].astype(k.dtype)
    try:
        k_cmp = ejnsa.mean_pooling(k, L)
        idx = jax.jit(lambda q, kc: ejnsa.nsa_topk(q, kc, S, L, platform="xla"))(qs, k_cmp)
        return jax.block_until_ready(idx), "nsa_topk(xla) on smooth queries"
    except Exception as e:  # pragma: no cover - GPU only
        record_error(RESULTS, f"topk indices T={T}", e)
        # Fallback: the tokens of a 64-token chunk share their scores.
        nb = -(-T // L)
        cur = (jnp.arange(T) // L)[:, None, None]
        blk = jnp.arange(nb)[None, None, :]
        score = jax.random.uniform(ks[0], (T // 64 + 1, k.shape[2], nb))[jnp.arange(T) // 64]
        score = jnp.where((blk == 0) | (blk == cur) | (blk == cur - 1), 2.0, score)
        score = jnp.where(blk <= cur, score, -1.0)
        return _top(score)[None], "synthetic chunk-shared scores (top-k failed)"


def pattern_stats(idx, name, T):
    """Mean union size per forward tile, and the time of the XLA index metadata alone
    (the forward's tile unions; the backward's token lists), to see what the kernels'
    totals include."""
    import jax
    import jax.numpy as jnp

    from ejnsa.triton import selection as sel
    from ejnsa.triton import selection_index as index

    G = HQ // H
    cfg = sel.SelectionConfig.default(D, D, G, L, jnp.bfloat16)
    plan = sel.TilePlan.make(G, cfg.fwd.rows)

    @jax.jit
    def stats(idx):
        starts = index.block_starts(idx, None, L, None, T)
        count = index.tile_union(starts, plan.bt)[1]
        valid = jnp.sum(starts != index.SENT) / starts[..., 0].size
        return jnp.mean(count.astype(jnp.float32)), valid

    union, valid = (float(x) for x in stats(idx))

    @jax.jit
    def meta_fwd(idx):
        return index.tile_union(index.block_starts(idx, None, L, None, T), plan.bt)

    @jax.jit
    def meta_bwd(idx):
        seg = sel.dkv_segment(jax.ShapeDtypeStruct((1, T, HQ, D), jnp.bfloat16),
                              jax.ShapeDtypeStruct((1, T, H, D), jnp.bfloat16),
                              jax.ShapeDtypeStruct((1, T, H, D), jnp.bfloat16), idx, L, cfg.dkv)
        rows = index.block_rows(1, T, L, None)
        return index.token_lists(idx, None, L, None, rows[0], seg, T)

    try:
        t_fwd, t_bwd = median_ms(meta_fwd, idx, reps=5), median_ms(meta_bwd, idx, reps=5)
    except Exception as e:
        record_error(RESULTS, f"metadata timing {name}", e)
        t_fwd = t_bwd = None
    row = {"T": T, "pattern": name, "valid_entries_per_token": valid, f"union_per_tile_bt{plan.bt}": union,
           "blocks_loaded_per_token": union / plan.bt, "meta_fwd_ms": t_fwd, "meta_bwd_ms": t_bwd}
    log("pattern", row)
    RESULTS["patterns"].append(row)


# ======================================================================================
# Timing
# ======================================================================================


def footprint(jitted, *args):
    """Bytes XLA assigns to the jitted call: arguments + outputs + temporaries."""
    try:
        m = jitted.lower(*args).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception as e:  # pragma: no cover
        log(f"   (memory_analysis failed: {e})")
        return None


def time_op(name, T, fn, args, reps, floor=None):
    """fn(q, k, v, *extra) -> o. Times forward and forward+backward; one row of the table."""
    import jax
    import jax.numpy as jnp

    row = {"op": name, "T": T}
    try:
        fwd = jax.jit(fn)
        row["fwd_ms"] = median_ms(fwd, *args, reps=reps)

        def loss(q, k, v, *extra):
            return jnp.sum(fn(q, k, v, *extra).astype(jnp.float32))

        fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        row["fwdbwd_ms"] = median_ms(fb, *args, reps=reps)
        row["fwdbwd_bytes"] = footprint(fb, *args)
        if floor is not None:
            for key in ("fwd_ms", "fwdbwd_ms", "fwdbwd_bytes"):
                if row.get(key) and floor.get(key):
                    row[key.replace("_ms", "").replace("_bytes", "_mem") + "_x_floor"] = row[key] / floor[key]
    except Exception as e:
        record_error(RESULTS, f"{name} T={T}", e)
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(row)
    RESULTS["rows"].append(row)
    return row


def run_timings(Ts, ops, reps):
    import jax
    import jax.numpy as jnp

    import ejnsa

    for T in Ts:
        log(f"=== T = {T}")
        try:
            q, k, v, _ = make_inputs(T, jnp.bfloat16)
        except Exception as e:
            record_error(RESULTS, f"inputs T={T}", e)
            continue
        if "slc" in ops:
            floor = time_op("cudnn_window_1024 (slc floor)", T, lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn", local_window_size=(S * L - 1, 0)), (q, k, v), reps)
            pats = []
            try:
                idx, how = topk_indices(T, k)
                pats.append((f"slc topk [{how}]", idx))
            except Exception as e:
                record_error(RESULTS, f"topk indices T={T}", e)
            try:
                pats.append(("slc random", random_indices(T, H)))
            except Exception as e:
                record_error(RESULTS, f"random indices T={T}", e)
            for name, idx in pats:
                try:
                    pattern_stats(idx, name, T)
                except Exception as e:
                    record_error(RESULTS, f"pattern stats {name} T={T}", e)
                time_op(name, T, lambda q, k, v, idx: ejnsa.apply_native_sparse_attention(
                    q, k, v, idx, S, L, platform="triton"), (q, k, v, idx), reps, floor)
            del pats
        if "swa" in ops:
            floor = time_op(f"cudnn_window_{W} (swa floor)", T, lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn", local_window_size=(W - 1, 0)), (q, k, v), reps)
            time_op(f"swa w={W}", T, lambda q, k, v: ejnsa.sliding_window_attention(q, k, v, W, platform="triton"),
                    (q, k, v), reps, floor)
        del q, k, v
        write_json(RESULTS, "bench_kernels.json")


# ======================================================================================
# Correctness against the XLA path
# ======================================================================================


def run_checks(check_Ts):
    """Triton vs XLA path (o, dq, dk, dv), bf16 and fp32, both index patterns and the window.

    The first T uses the benchmark's heads; longer ones half of them (HQ/2, H/2), which keeps
    the XLA reference affordable at T = 65536 in float32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ejnsa

    tol = {"bf16": (2e-2, 3e-2), "fp32": (1e-4, 1e-4)}
    cases = [(T, HQ, H, D) if i == 0 or H < 2 else (T, HQ // 2, H // 2, D) for i, T in enumerate(check_Ts)]
    for T, hq, h, d in cases:
        for dt_name, dtype in (("bf16", jnp.bfloat16), ("fp32", jnp.float32)):
            try:
                q, k, v, do = make_inputs(T, dtype, hq, h, d, seed=T)
            except Exception as e:
                record_error(RESULTS, f"check inputs T={T} {dt_name}", e)
                continue
            ops = {
                "slc random": (lambda q, k, v, idx, p: ejnsa.apply_native_sparse_attention(q, k, v, idx, S, L, platform=p),
                               random_indices(T, h)),
                "swa": (lambda q, k, v, idx, p: ejnsa.sliding_window_attention(q, k, v, W, platform=p), None),
            }
            try:
                ops["slc topk"] = (ops["slc random"][0], topk_indices(T, k)[0] if hq // h == HQ // H else None)
                if ops["slc topk"][1] is None:
                    # topk_indices makes HQ-head smooth queries: build the chunk-shared pattern here.
                    nb = -(-T // L)
                    cur = (jnp.arange(T) // L)[:, None, None]
                    blk = jnp.arange(nb)[None, None, :]
                    score = jax.random.uniform(jax.random.PRNGKey(5), (T // 64 + 1, h, nb))[jnp.arange(T) // 64]
                    score = jnp.where((blk == 0) | (blk == cur) | (blk == cur - 1), 2.0, score)
                    score = jnp.where(blk <= cur, score, -1.0)
                    ops["slc topk"] = (ops["slc random"][0], _top(score)[None])
            except Exception as e:
                record_error(RESULTS, f"check topk indices T={T}", e)
            for name, (fn, idx) in ops.items():
                row = {"check": name, "T": T, "dtype": dt_name, "HQ": hq, "H": h, "D": d}
                try:
                    def run(platform, dt=None, fn=fn, idx=idx):
                        def f(q, k, v, do, idx):
                            o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, idx, platform), q, k, v)
                            return (o, *vjp(do))
                        args = (q, k, v, do) if dt is None else tuple(x.astype(dt) for x in (q, k, v, do))
                        return jax.block_until_ready(jax.jit(f)(*args, idx))

                    got = run("triton")
                    # The reference: the XLA path on the same values in float32 (its bf16 run
                    # accumulates dk/dv of gathered keys in bf16, ~1e-2 off at small T already).
                    want = run("xla", jnp.float32)
                    again = run("triton")
                    ok = True
                    for part, a, b, c in zip(("o", "dq", "dk", "dv"), got, want, again):
                        a32, b32 = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
                        row[f"{part}_rel"] = rel_err(a32, b32)
                        row[f"{part}_finite"] = bool(np.all(np.isfinite(a32)))
                        row[f"{part}_deterministic"] = bool(np.array_equal(np.asarray(a), np.asarray(c)))
                        t = tol[dt_name][0 if part == "o" else 1]
                        ok &= row[f"{part}_rel"] <= t and row[f"{part}_finite"] and row[f"{part}_deterministic"]
                    row["ok"] = bool(ok)
                    del got, want, again
                except Exception as e:
                    record_error(RESULTS, f"check {name} T={T} {dt_name}", e)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    row["ok"] = False
                log(row)
                RESULTS["checks"].append(row)
                write_json(RESULTS, "bench_kernels.json")
            del q, k, v, do, ops


# ======================================================================================
# Hopper compile matrix (no GPU needed)
# ======================================================================================


# ======================================================================================
# Summary
# ======================================================================================


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def summary():
    if RESULTS["patterns"]:
        log("\nIndex patterns (mean union of blocks per tile; blocks loaded per token by the forward):")
        for r in RESULTS["patterns"]:
            log("  " + ", ".join(f"{k}={fmt(v, '.3g') if isinstance(v, float) else v}" for k, v in r.items()))
    if RESULTS["checks"]:
        log("\nChecks vs XLA (relative error; finite; bitwise rerun):")
        for r in RESULTS["checks"]:
            if "error" in r:
                log(f"  FAIL {r['check']:12s} T={r['T']:6d} {r['dtype']}: {r['error'][:160]}")
                continue
            parts = " ".join(f"{p}={r[p + '_rel']:.1e}" for p in ("o", "dq", "dk", "dv"))
            det = all(r[p + "_deterministic"] for p in ("o", "dq", "dk", "dv"))
            log(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['check']:12s} T={r['T']:6d} {r['dtype']}: {parts} det={det}")
    rows = RESULTS["rows"]
    if rows:
        log("\nTimings (ms, median) and XLA footprint of fwd+bwd (MB); x = ratio to the cuDNN floor")
        log(f"  {'op':52s} {'T':>6s} {'fwd':>8s} {'x':>5s} {'fwd+bwd':>9s} {'x':>5s} {'mem MB':>8s} {'x':>5s}")
        for r in rows:
            if "error" in r:
                log(f"  {r['op'][:52]:52s} {r['T']:6d} ERROR {r['error'][:100]}")
                continue
            mem = r.get("fwdbwd_bytes")
            log(f"  {r['op'][:52]:52s} {r['T']:6d} {fmt(r.get('fwd_ms'), '8.2f')} {fmt(r.get('fwd_x_floor'), '5.2f')} "
                f"{fmt(r.get('fwdbwd_ms'), '9.2f')} {fmt(r.get('fwdbwd_x_floor'), '5.2f')} "
                f"{fmt(None if mem is None else mem / 2**20, '8.0f')} {fmt(r.get('fwdbwd_mem_x_floor'), '5.2f')}")
    if RESULTS["errors"]:
        log(f"\n{len(RESULTS['errors'])} errors (see above / JSON)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="8192,32768,65536", help="comma-separated sequence lengths")
    ap.add_argument("--ops", default="slc,swa", help="comma-separated: slc, swa")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="compare with the XLA path (T=4096, 65536) before timing")
    ap.add_argument("--check-only", action="store_true", help="only the comparison with the XLA path")
    ap.add_argument("--check-T", default="4096,65536", help="sequence lengths of --check")
    ap.add_argument("--dims", default=None, help="HQ,H,D instead of 64,4,128 (smoke tests of this script)")
    args = ap.parse_args()
    if args.dims:
        global HQ, H, D
        HQ, H, D = (int(x) for x in args.dims.split(","))
    t0 = time.time()
    try:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax
        import triton

        RESULTS["env"] = {"jax": jax.__version__, "triton": triton.__version__, "devices": str(jax.devices())}
        log(RESULTS["env"])
        Ts = [int(t) for t in args.T.split(",") if t]
        ops = set(args.ops.split(","))
        if args.check or args.check_only:
            run_checks([int(t) for t in args.check_T.split(",") if t])
        if not args.check_only:
            run_timings(Ts, ops, args.reps)
    except Exception as e:
        record_error(RESULTS, "main", e)
    finally:
        RESULTS["wall_s"] = time.time() - t0
        write_json(RESULTS, "bench_kernels.json")
        summary()
        log(f"\nwall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
