"""GPU benchmark of ejnsa's Triton NSA: stage by stage and in total, against cuDNN.

One process, one GPU, bf16, B=1, HQ=64, H=4, D=128, l=64, S=16, w=512 (the anchor shape of
docs/benchmarks.md), at T in {8192, 32768, 65536}:

- correctness at this scale first: top-k selections against the XLA top-k (identical
  except at float32 near-ties, which are verified in float64 on the host), compression,
  selection, window and the whole NSA (fed the same block indices) against the XLA path;
  gradients of the whole NSA at the smallest T;
- the forward and forward+backward time of every stage (mean pooling, compression,
  top-k, selection, window, gating), each timed alone under jit on its real inputs
  (indices from the top-k, etc.), and of the whole three-branch NSA;
- cuDNN dense causal attention and the dense-equivalent floor (cuDNN sliding
  window S*l = 1024 for selection, window 512, half of a T x T/l full attention for
  compression).

Inputs (`--inputs`): "random" (q, k, v i.i.d. normal, as in the anchors: every token's
query is unrelated to its neighbours', so top-k picks nearly independent blocks per token,
the worst case for sharing loads across tokens) or "coherent" (queries vary slowly along
T, q_t = base(t // 64) + 0.1 * noise, as neighbouring tokens' queries do in a trained
language model, so neighbouring tokens select mostly the same blocks; k and v stay
random). Every table says which inputs it used.

Every case is guarded: an exception is printed and recorded, and the run goes on. A short
table comes last; the full results go to JSON ($OUT/bench_nsa.json, or --out FILE).

    python benchmarks/bench_nsa.py                          # on the GPU
    python benchmarks/bench_nsa.py --T 8192 --no-check     # quicker
    python benchmarks/bench_nsa.py --plot bench_nsa.json docs/bench_nsa.png   # CPU, matplotlib
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from _common import batched_ms, guarded, log, rel_err, run_and_save, selection_problems, topk_scores_f64  # noqa: E402

SHAPE = dict(B=1, HQ=64, H=4, D=128, block_size=64, S=16, window=512, dtype="bfloat16")
TARGETS = {
    "T=65536 fwd speedup vs dense": 5.0,
    "T=65536 fwd+bwd speedup vs dense": 3.5,
    "T=8192 fwd+bwd speedup vs dense": 1.0,
}


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ejnsa
    from ejnsa import Backend, Platform, kernel_registry

    res = {"shape": SHAPE, "inputs": args.inputs, "env": {}, "rows": [], "checks": []}
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
    l, S, w = SHAPE["block_size"], SHAPE["S"], SHAPE["window"]
    dt = jnp.bfloat16
    scale = D**-0.5
    TR = lambda name: kernel_registry.get(name, Platform.TRITON, Backend.GPU)  # noqa: E731
    XL = lambda name: kernel_registry.get(name, Platform.XLA, Backend.ANY)  # noqa: E731
    pool = XL("mean_pooling")
    f32sum = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731

    for T in args.T:
        log(f"\n=== T = {T} ===")
        ks = jax.random.split(jax.random.key(T), 8)
        if args.inputs == "coherent":
            base = jax.random.normal(ks[0], (T // 64 + 1, HQ, D), jnp.float32)
            noise = jax.random.normal(jax.random.fold_in(ks[0], 1), (B, T, HQ, D), jnp.float32)
            q = (base[jnp.arange(T) // 64][None] + 0.1 * noise).astype(dt)
        else:
            q = jax.random.normal(ks[0], (B, T, HQ, D), dt)
        k = jax.random.normal(ks[1], (B, T, H, D), dt)
        v = jax.random.normal(ks[2], (B, T, H, D), dt)
        g_cmp, g_slc, g_swa = (jax.nn.sigmoid(jax.random.normal(ks[3 + i], (B, T, HQ), jnp.float32)).astype(dt) for i in range(3))
        row = {"T": T}
        chk = {"T": T}
        res["rows"].append(row)
        res["checks"].append(chk)

        kw = dict(block_counts=S, block_size=l, window_size=w, softmax_scale=scale)

        def nsa(q, k, v, gc, gs, gw, platform="triton", bi=None):
            return ejnsa.native_sparse_attention(q, k, v, gc, gs, gw, block_indices=bi, platform=platform, **kw)

        def t(key, f, *a):
            val = guarded(row, key, lambda: batched_ms(f, *a, reps=args.reps))
            if val is not None:
                log(f"  {key:24s} {val:9.3f} ms")

        if args.nsa_only:
            t("nsa_fwd", jax.jit(nsa), q, k, v, g_cmp, g_slc, g_swa)
            t("nsa_fwdbwd", jax.jit(jax.grad(lambda *a: f32sum(nsa(*a)), argnums=tuple(range(6)))), q, k, v, g_cmp, g_slc, g_swa)
            continue

        # ---- real inputs of every stage, computed once
        kc, vc = jax.jit(lambda k, v: (pool(k, l, None), pool(v, l, None)))(k, v)
        cmp_fn = jax.jit(lambda q, kc, vc: TR("nsa_compression")(q, kc, vc, l, scale, None))
        topk_fn = jax.jit(lambda q, kc, lse: TR("nsa_topk")(q, kc, lse, S, l, scale, None))
        slc_fn = jax.jit(lambda q, k, v, idx: TR("apply_native_sparse_attention")(q, k, v, idx, None, l, scale, None))
        swa_fn = jax.jit(lambda q, k, v: TR("sliding_window_attention")(q, k, v, w, scale, None))
        o_cmp = lse = idx = o_slc = o_swa = None
        try:
            o_cmp, lse = cmp_fn(q, kc, vc)
            idx = topk_fn(q, kc, lse)
            o_slc = slc_fn(q, k, v, idx)
            o_swa = swa_fn(q, k, v)
            jax.block_until_ready((o_cmp, lse, idx, o_slc, o_swa))
        except Exception as e:  # noqa: BLE001
            log(f"  !! stage inputs: {type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc(limit=3)
            chk["inputs_err"] = repr(e)[:400]

        # ---- correctness at scale
        if not args.no_check and idx is not None:
            def check_topk():
                want = jax.jit(lambda q, kc, lse: XL("nsa_topk")(q, kc, lse, S, l, scale, None))(q, kc, lse)
                got, want = np.asarray(idx), np.asarray(want)
                again = np.asarray(topk_fn(q, kc, lse))
                diff_tok = np.flatnonzero(np.any(got[0] != want[0], axis=(-1, -2)))
                rng = np.random.default_rng(0)
                tokens = np.unique(np.concatenate([diff_tok[:64], rng.choice(T, 64, replace=False)]))
                score = topk_scores_f64(q, kc, l, scale, tokens)
                out = dict(
                    rows_differing=int(np.sum(np.any(got != want, axis=-1))),
                    rows=int(got.size // S),
                    deterministic=bool(np.array_equal(got, again)),
                    triton_bad_rows=selection_problems(got[0, tokens], score),
                    xla_bad_rows=selection_problems(want[0, tokens], score),
                    checked_tokens=int(len(tokens)),
                )
                out["ok"] = out["deterministic"] and out["triton_bad_rows"] == 0
                return out

            guarded(chk, "topk", check_topk)
            def check_compression():
                o_x, lse_x = jax.jit(lambda q, kc, vc: XL("nsa_compression")(q, kc, vc, l, scale, None))(q, kc, vc)
                finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)  # noqa: E731
                return {"o": rel_err(o_cmp, o_x), "lse": rel_err(finite(lse), finite(lse_x)),
                        "lse_inf_match": bool(jnp.array_equal(jnp.isinf(lse), jnp.isinf(lse_x)))}

            guarded(chk, "compression_rel", check_compression)
            guarded(chk, "selection_rel", lambda: rel_err(o_slc, jax.jit(
                lambda q, k, v, i: XL("apply_native_sparse_attention")(q, k, v, i, None, l, scale, None))(q, k, v, idx)))
            guarded(chk, "window_rel", lambda: rel_err(o_swa, jax.jit(
                lambda q, k, v: XL("sliding_window_attention")(q, k, v, w, scale, None))(q, k, v)))
            # The whole NSA on both paths with the same (Triton) selection.
            guarded(chk, "nsa_fwd_rel", lambda: rel_err(
                jax.jit(lambda *a: nsa(*a, bi=idx))(q, k, v, g_cmp, g_slc, g_swa),
                jax.jit(lambda *a: nsa(*a, platform="xla", bi=idx))(q, k, v, g_cmp, g_slc, g_swa)))
            guarded(chk, "nsa_topk_path_equal_given_path", lambda: bool(jnp.array_equal(
                jax.jit(nsa)(q, k, v, g_cmp, g_slc, g_swa),
                jax.jit(lambda *a: nsa(*a, bi=idx))(q, k, v, g_cmp, g_slc, g_swa))))
            if T == min(args.T):
                def grads():
                    r = jax.random.normal(ks[6], (B, T, HQ, D), jnp.float32)
                    out = {}
                    gs = []
                    for p in ("triton", "xla"):
                        loss = lambda *a, p=p: jnp.sum(nsa(*a, platform=p, bi=idx).astype(jnp.float32) * r)  # noqa: E731
                        gs.append(jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, g_cmp, g_slc, g_swa))
                    for name, a, b in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"), *gs):
                        out[name] = rel_err(a, b)
                    return out
                guarded(chk, "nsa_grad_rel", grads)
            log("  checks:", json.dumps({k_: v_ for k_, v_ in chk.items() if k_ != "T"}))

        # ---- stage timings (forward, forward+backward), each on its real inputs
        t("pool_fwd", jax.jit(lambda k, v: (pool(k, l, None), pool(v, l, None))), k, v)
        t("pool_fwdbwd", jax.jit(jax.grad(lambda k, v: f32sum(pool(k, l, None)) + f32sum(pool(v, l, None)), argnums=(0, 1))), k, v)
        t("cmp_fwd", cmp_fn, q, kc, vc)
        t("cmp_fwdbwd", jax.jit(jax.grad(lambda q, kc, vc: f32sum(TR("nsa_compression")(q, kc, vc, l, scale, None)[0]), argnums=(0, 1, 2))), q, kc, vc)
        if lse is not None:
            t("topk_fwd", topk_fn, q, kc, lse)
        if idx is not None:
            t("slc_fwd", slc_fn, q, k, v, idx)
            t("slc_fwdbwd", jax.jit(jax.grad(lambda q, k, v, i: f32sum(TR("apply_native_sparse_attention")(q, k, v, i, None, l, scale, None)), argnums=(0, 1, 2))), q, k, v, idx)
        t("swa_fwd", swa_fn, q, k, v)
        t("swa_fwdbwd", jax.jit(jax.grad(lambda q, k, v: f32sum(TR("sliding_window_attention")(q, k, v, w, scale, None)), argnums=(0, 1, 2))), q, k, v)

        def gate(oc, os_, ow, gc, gs, gw):
            f = lambda o, g: o.astype(jnp.float32) * g.astype(jnp.float32)[..., None]  # noqa: E731
            return (f(os_, gs) + f(oc, gc) + f(ow, gw)).astype(dt)

        if o_slc is not None:
            t("gate_fwd", jax.jit(gate), o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
            t("gate_fwdbwd", jax.jit(jax.grad(lambda *a: f32sum(gate(*a)), argnums=tuple(range(6)))), o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
        t("nsa_fwd", jax.jit(nsa), q, k, v, g_cmp, g_slc, g_swa)
        t("nsa_fwdbwd", jax.jit(jax.grad(lambda *a: f32sum(nsa(*a)), argnums=tuple(range(6)))), q, k, v, g_cmp, g_slc, g_swa)

        # ---- cuDNN dense causal and the dense-equivalent floor
        def cudnn(qq, kk, vv, causal=True, window=None):
            extra = {} if window is None else {"local_window_size": (window - 1, 0)}
            return jax.nn.dot_product_attention(qq, kk, vv, is_causal=causal, implementation="cudnn", **extra)

        def both(key, f, *a):
            t(key + "_fwd", jax.jit(f), *a)
            t(key + "_fwdbwd", jax.jit(jax.grad(lambda *x: f32sum(f(*x)), argnums=(0, 1, 2))), *a)

        both("dense", cudnn, q, k, v)
        both("floor_slc", lambda a, b, c: cudnn(a, b, c, window=S * l), q, k, v)
        both("floor_swa", lambda a, b, c: cudnn(a, b, c, window=w), q, k, v)
        kc_f = jax.random.normal(ks[7], (B, T // l, H, D), dt)
        both("floor_cmp_full", lambda a, b, c: cudnn(a, b, c, causal=False), q, kc_f, kc_f)
        for m in ("fwd", "fwdbwd"):
            parts = [row.get(f"floor_slc_{m}"), row.get(f"floor_swa_{m}"), row.get(f"floor_cmp_full_{m}")]
            if all(p is not None for p in parts):
                row[f"floor_{m}"] = parts[0] + parts[1] + parts[2] / 2
            stages = ["pool", "cmp", "slc", "swa", "gate"]
            vals = [row.get(f"{s_}_{m}") for s_ in stages] + [row.get("topk_fwd")]
            if all(x is not None for x in vals):
                row[f"stages_sum_{m}"] = sum(vals)

        del q, k, v, kc, vc, o_cmp, lse, idx, o_slc, o_swa
    return res


def summarize(res) -> str:
    lines = [f"inputs: {res.get('inputs', 'random')}"]
    cols = ["pool", "cmp", "topk", "slc", "swa", "gate", "stages_sum", "nsa", "dense", "floor"]
    for m in ("fwd", "fwdbwd"):
        lines.append(f"\n{m} (ms)  " + "".join(f"{c:>11s}" for c in cols) + f"{'x dense':>9s}{'x floor':>9s}")
        for r in res["rows"]:
            def g(c):
                key = "topk_fwd" if c == "topk" else f"{c}_{m}"
                return r.get(key)
            vals = "".join(f"{g(c):11.3f}" if g(c) is not None else f"{'-':>11s}" for c in cols)
            nsa, dense, floor = g("nsa"), g("dense"), g("floor")
            sp = f"{dense / nsa:9.2f}" if nsa and dense else f"{'-':>9s}"
            fl = f"{nsa / floor:9.2f}" if nsa and floor else f"{'-':>9s}"
            lines.append(f"T={r['T']:<6d}  " + vals + sp + fl)
    lines.append("\n(x dense = dense time / NSA time, higher is better; x floor = NSA time / floor, lower is better)")
    # targets
    by_t = {r["T"]: r for r in res["rows"]}
    for name, want in TARGETS.items():
        T = int(name.split()[0].split("=")[1])
        m = "fwdbwd" if "fwd+bwd" in name else "fwd"
        r = by_t.get(T, {})
        if r.get(f"nsa_{m}") and r.get(f"dense_{m}"):
            got = r[f"dense_{m}"] / r[f"nsa_{m}"]
            lines.append(f"target {name} >= {want}: {got:.2f}  {'MET' if got >= want else 'MISSED'}")
    for c in res["checks"]:
        lines.append("check " + json.dumps(c))
    return "\n".join(lines)


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(json_path))
    rows = sorted(res["rows"], key=lambda r: r["T"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, m, title in zip(axes, ("fwd", "fwdbwd"), ("forward", "forward + backward")):
        for key, label, style in (("nsa", "ejnsa NSA (Triton, 3 branches)", "o-"),
                                  ("dense", "cuDNN dense causal", "s--"),
                                  ("floor", "dense-equivalent floor (cuDNN)", "^:")):
            pts = [(r["T"], r[f"{key}_{m}"]) for r in rows if r.get(f"{key}_{m}") is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["T"] for r in rows], [str(r["T"]) for r in rows])
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    s = res.get("shape", SHAPE)
    device = res.get("env", {}).get("device_kind", "GPU")
    fig.suptitle(f"NSA on {device}, {s.get('dtype')}: B={s.get('B')}, HQ={s.get('HQ')}, H={s.get('H')}, "
                 f"D={s.get('D')}, l={s.get('block_size')}, S={s.get('S')}, w={s.get('window')}; "
                 f"{res.get('inputs', 'random')} inputs", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=130)
    print(f"wrote {png_path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inputs", choices=["random", "coherent"], default="random",
                   help="random q/k/v, or queries coherent along T (see the module docstring)")
    p.add_argument("--out", help="JSON file (default $OUT/bench_nsa.json when $OUT is set)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--nsa-only", action="store_true",
                   help="time only the whole NSA (forward, forward+backward): for comparing two versions")
    p.add_argument("--plot", nargs=2, metavar=("RESULTS_JSON", "OUT_PNG"), help="draw the chart and exit (CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape through Triton's CPU interpreter: exercises this script, times nothing real")
    args = p.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        SHAPE.update(HQ=4, H=2, D=32, block_size=16, S=4, window=32)
        args.reps = 1
    run_and_save(run, args, "bench_nsa.json", summarize)

if __name__ == "__main__":
    main()
