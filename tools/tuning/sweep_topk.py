"""GPU sweep of the Triton top-k's tile configurations (ejnsa/triton/topk.py, TopkConfig), side by side.

Shape: the benchmarks' anchor, bf16, B=1, HQ=64, H=4, D=128, l=64, S=16; T in {8192, 65536}.
Inputs as in benchmarks/bench_nsa.py: random normal q and k (v unused), k_cmp by mean
pooling, lse from the Triton compression forward (as the pipeline feeds the top-k).

For every variant and T:
- time (median ms of jitted calls, warm-up excluded), next to the compression forward,
  which the top-k should not exceed;
- same: its output equals the reference variant's bit for bit (the default for variants
  given lse, the default with its own lse pass for the "+own_lse" ones);
- the XLA top-k: rows (token, head) that differ from it, and how many of the differing
  rows (up to 64) plus 64 random tokens no tie-tolerant reading of the float64 scores
  allows ("bad", must be 0; differences at float32 near-ties are expected and fine).
The default runs twice more to check that reruns are bitwise identical.

Every case is guarded (an exception is printed and recorded, and the run goes on). A table
comes last; full results go to $OUT/sweep_topk.json (or --out). Each variant compiles once
(T is a runtime argument), so the sweep takes about a minute.

    python tools/tuning/sweep_topk.py                       # GPU
    python tools/tuning/sweep_topk.py --T 65536 --only default qk
    python tools/tuning/sweep_topk.py --smoke               # CPU: tiny shape, interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The benchmarks' shared helpers (timing, the float64 check of selections).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from _common import batched_ms, guarded, log, run_and_save, selection_problems, topk_scores_f64  # noqa: E402

SHAPE = dict(B=1, HQ=64, H=4, D=128, block_size=64, S=16, dtype="bfloat16")


def variants(D: int, G: int, S: int, dtype) -> dict:
    """name -> (TopkConfig, own_lse). 'default' is TopkConfig.default; 'qk' is the first
    kernel's default (the behaviour before the "kq" scheme), kept for comparison."""
    from ejnsa.triton.topk import TopkConfig as C

    d = C.default(D, G, S, dtype)
    qk = C.qk(D, G, S, dtype)
    kq = dict(num_warps=d.num_warps, num_stages=d.num_stages, scheme="kq")

    def kqv(**kw):
        return C(**{"block_t": d.block_t, "block_c": d.block_c, **kq, **kw})

    out = {
        "default": (d, False),
        "kq_bt4": (kqv(block_t=4, num_warps=4), False),
        "kq_bt8": (kqv(block_t=8, num_warps=4), False),
        "kq_bt8_w8": (kqv(block_t=8, num_warps=8), False),
        "kq_bt16_w8": (kqv(block_t=16, num_warps=8), False),
        "kq_bt16_w4": (kqv(block_t=16, num_warps=4), False),
        "kq_bt8_bc128_w8": (kqv(block_t=8, block_c=128, num_warps=8), False),
        "kq_bt4_bc128": (kqv(block_t=4, block_c=128, num_warps=4), False),
        "kq_stages1": (kqv(num_stages=1), False),
        "kq_stages3": (kqv(num_stages=3), False),
        "qk": (qk, False),
        "default+own_lse": (d, True),
        "qk+own_lse": (qk, True),
    }
    return out


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ejnsa import Backend, Platform, kernel_registry
    from ejnsa.triton import topk as triton_topk

    res = {"shape": SHAPE, "env": {}, "rows": [], "compression_fwd": {}, "determinism": {}}
    env = res["env"]
    env.update(python=sys.version.split()[0], jax=jax.__version__, devices=str(jax.devices()),
               device_kind=jax.devices()[0].device_kind)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = repr(e)
    log(env)

    B, HQ, H, D = SHAPE["B"], SHAPE["HQ"], SHAPE["H"], SHAPE["D"]
    l, S = SHAPE["block_size"], SHAPE["S"]
    dt = jnp.dtype(SHAPE["dtype"])
    scale = D**-0.5
    pool = kernel_registry.get("mean_pooling", Platform.XLA, Backend.ANY)
    cmp_tr = kernel_registry.get("nsa_compression", Platform.TRITON, Backend.GPU)
    topk_xla = kernel_registry.get("nsa_topk", Platform.XLA, Backend.ANY)
    vs = variants(D, HQ // H, S, dt)
    if args.only:
        vs = {k: v for k, v in vs.items() if k in args.only or k in ("default", "default+own_lse")}
    res["variants"] = {k: {"config": str(c), "own_lse": o} for k, (c, o) in vs.items()}
    for name, (cfg, own) in vs.items():
        log(f"  {name:18s} {cfg}{' (own lse)' if own else ''}")

    for T in args.T:
        log(f"\n=== T = {T} ===")
        ks = jax.random.split(jax.random.key(T), 8)
        q = jax.random.normal(ks[0], (B, T, HQ, D), dt)
        k = jax.random.normal(ks[1], (B, T, H, D), dt)
        kc = jax.jit(lambda k: pool(k, l, None))(k)
        cmp_fn = jax.jit(lambda q, kc: cmp_tr(q, kc, kc, l, scale, None))
        lse = jax.block_until_ready(cmp_fn(q, kc)[1])
        val = guarded(res["compression_fwd"], str(T), lambda: batched_ms(cmp_fn, q, kc, reps=args.reps))
        if val is not None:
            log(f"  compression fwd       {val:8.3f} ms  (the top-k's target)")

        xla = {}
        for own in sorted({o for _, o in vs.values()}):
            rec = {}
            guarded(rec, "idx", lambda own=own: np.asarray(jax.jit(
                lambda q, kc, lse: topk_xla(q, kc, None if own else lse, S, l, scale, None))(q, kc, lse)))
            xla[own] = rec.get("idx")
        rng = np.random.default_rng(T)
        sample = rng.choice(T, size=min(T, 64), replace=False)

        refs = {}
        for name, (cfg, own) in vs.items():
            rec = {"T": T, "variant": name}
            res["rows"].append(rec)
            fn = jax.jit(lambda q, kc, lse, cfg=cfg, own=own: triton_topk.nsa_topk_fwd(
                q, kc, None if own else lse, S, l, scale, None, cfg))
            out = guarded(rec, "idx", lambda fn=fn: np.asarray(fn(q, kc, lse)))
            rec.pop("idx", None)
            if out is None:
                continue
            guarded(rec, "ms", lambda fn=fn: batched_ms(fn, q, kc, lse, reps=args.reps))
            ref_name = "default+own_lse" if own else "default"
            if name == ref_name:
                refs[own] = out
                det = guarded(res["determinism"], f"{name}@{T}", lambda fn=fn, out=out: all(
                    np.array_equal(np.asarray(fn(q, kc, lse)), out) for _ in range(2)))
                if det is not None:
                    log(f"  {name}: reruns bitwise identical: {det}")
            if own in refs:
                rec["same"] = bool(np.array_equal(out, refs[own]))
                rec["rows_differing_from_ref"] = int(np.sum(np.any(out != refs[own], axis=-1)))
            want = xla.get(own)
            if want is not None:
                def check(out=out, want=want):
                    diff_tok = np.flatnonzero(np.any(out[0] != want[0], axis=(-1, -2)))
                    tokens = np.unique(np.concatenate([diff_tok[:64], sample]))
                    score = topk_scores_f64(q, kc, l, scale, tokens)
                    return dict(rows_differing=int(np.sum(np.any(out != want, axis=-1))),
                                bad=selection_problems(out[0, tokens], score), checked_tokens=int(len(tokens)))
                guarded(rec, "xla", check)
            x = rec.get("xla", {})
            log(f"  {name:18s} {rec.get('ms', float('nan')):8.3f} ms  same={rec.get('same')}"
                f"  xla_diff_rows={x.get('rows_differing')} bad={x.get('bad')}")
        del q, k, kc, lse
    return res


def summarize(res) -> str:
    Ts = sorted({r["T"] for r in res["rows"]})
    by = {(r["variant"], r["T"]): r for r in res["rows"]}
    names = list(dict.fromkeys(r["variant"] for r in res["rows"]))
    lines = [f"\ntop-k variants, {res['shape']}, median ms (same = bitwise equal to the reference "
             f"variant; xla = rows differing from the XLA top-k / rows no tie allows)"]
    head = f"{'variant':18s}" + "".join(f"{'T=' + str(T):>11s}{'same':>6s}{'xla':>10s}" for T in Ts)
    lines.append(head)
    cmp = res.get("compression_fwd", {})
    lines.append(f"{'compression fwd':18s}" + "".join(
        f"{cmp.get(str(T), float('nan')):11.3f}{'':>6s}{'':>10s}" for T in Ts))
    for n in names:
        row = f"{n:18s}"
        for T in Ts:
            r = by.get((n, T), {})
            x = r.get("xla", {})
            xs = f"{x.get('rows_differing', '-')}/{x.get('bad', '-')}"
            row += f"{r.get('ms', float('nan')):11.3f}{str(r.get('same', '-'))[:5]:>6s}{xs:>10s}"
        lines.append(row)
    lines.append("determinism: " + json.dumps(res.get("determinism", {})))
    for n in names:
        cfg = res.get("variants", {}).get(n, {})
        lines.append(f"  {n:18s} {cfg.get('config')}{' own lse' if cfg.get('own_lse') else ''}")
    errs = [(r["variant"], r["T"], {k: v for k, v in r.items() if k.endswith("_err")}) for r in res["rows"]]
    for n, T, e in errs:
        if e:
            lines.append(f"  ERROR {n} T={T}: {e}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[8192, 65536])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--only", nargs="+", help="variant names to run (the references always run)")
    p.add_argument("--out", help="JSON file (default $OUT/sweep_topk.json when $OUT is set)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape through Triton's CPU interpreter: exercises this script, times nothing real")
    args = p.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        SHAPE.update(HQ=8, H=2, D=32, block_size=16, S=4)
        args.T = [96]
        args.reps = 1
    run_and_save(run, args, "sweep_topk.json", summarize)

if __name__ == "__main__":
    main()
