"""GPU benchmark and check of ejnsa's FlashAttention-style kernels: sliding window and compression.

    python benchmarks/bench_fa.py            # timings vs cuDNN floors at T = 8192, 32768, 65536
    python benchmarks/bench_fa.py --check    # Triton vs the XLA path at T = 4096, 65536 (bf16, fp32)

Shapes are the project's anchors: B = 1, HQ = 64, H = 4, D = 128, l = 64, w = 512, bf16.
Floors, measured in the same process:
- window: cuDNN sliding window, `jax.nn.dot_product_attention(..., implementation="cudnn",
  is_causal=True, local_window_size=(w - 1, 0))`;
- compression: half of cuDNN full (non-causal) attention of the T queries over the T / l
  compressed keys (compressed attention is causal over those keys: about half the work).
Forward+backward is `jax.grad` of sum(o) w.r.t. every input, the same loss for ours and
cuDNN. Each case is caught separately (one failure never loses the rest), a short table is
printed last, and everything goes to $OUT/bench_fa.json when OUT is set. Memory is XLA's
compiled memory analysis of each jitted function (arguments excluded): temporaries + outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

from _common import median_ms, rel_err  # the repository root on sys.path, for ejnsa

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ejnsa  # noqa: E402

B, HQ, H, D, L, W = 1, 64, 4, 128, 64, 512
TARGETS = {  # ratio to the floor the project aims at (docs/benchmarks.md)
    ("window", "fwd"): 1.5, ("window", "fwd+bwd"): 1.5,
    ("compression", "fwd"): 2.0, ("compression", "fwd+bwd"): 2.5,
}
ROWS: list[dict] = []
T0 = time.perf_counter()


def log(**row):
    row["elapsed_s"] = round(time.perf_counter() - T0, 1)
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def mem_mb(f, *args):
    try:
        m = f.lower(*args).compile().memory_analysis()
        return round((m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20, 1)
    except Exception:  # memory analysis is best effort
        return None


def inputs(T, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, HQ, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.float32).astype(dtype)
    kc, vc = ejnsa.mean_pooling(k, L), ejnsa.mean_pooling(v, L)
    return q, k, v, kc, vc


def grad_of(fn, argnums=(0, 1, 2)):
    def loss(*a):
        out = fn(*a)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=argnums))


def ops():
    """name -> (ours(q, k, v, kc, vc) args picker, function, floor function, floor factor)."""
    swa = lambda q, k, v: ejnsa.sliding_window_attention(q, k, v, W, platform="triton")
    cudnn_swa = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", is_causal=True, local_window_size=(W - 1, 0))
    cmp = lambda q, kc, vc: ejnsa.nsa_compression(q, kc, vc, L, platform="triton")
    cudnn_full = lambda q, kc, vc: jax.nn.dot_product_attention(q, kc, vc, implementation="cudnn")
    return {
        "window": (lambda q, k, v, kc, vc: (q, k, v), swa, cudnn_swa, 1.0),
        "compression": (lambda q, k, v, kc, vc: (q, kc, vc), cmp, cudnn_full, 0.5),
    }


def run_timings(Ts):
    for T in Ts:
        try:
            q, k, v, kc, vc = inputs(T)
        except Exception as e:
            log(mode="time", T=T, error=f"inputs: {e!r}"[:300])
            continue
        for name, (pick, ours, floor, factor) in ops().items():
            args = pick(q, k, v, kc, vc)
            for kind in ("fwd", "fwd+bwd"):
                row = dict(mode="time", op=name, kind=kind, T=T)
                try:
                    f = jax.jit(ours) if kind == "fwd" else grad_of(ours)
                    row["ours_ms"] = round(median_ms(f, *args), 3)
                    row["ours_mem_mb"] = mem_mb(f, *args)
                except Exception as e:
                    row["ours_error"] = repr(e)[:400]
                    traceback.print_exc()
                try:
                    g = jax.jit(floor) if kind == "fwd" else grad_of(floor)
                    row["floor_ms"] = round(median_ms(g, *args) * factor, 3)
                    row["floor_mem_mb"] = mem_mb(g, *args)
                except Exception as e:
                    row["floor_error"] = repr(e)[:400]
                if "ours_ms" in row and "floor_ms" in row:
                    row["ratio"] = round(row["ours_ms"] / row["floor_ms"], 2)
                    row["target"] = TARGETS[(name, kind)]
                log(**row)
        del q, k, v, kc, vc


def run_check(Ts):
    """Triton vs the XLA path (float32 HIGHEST) at benchmark shapes: outputs and gradients,
    random cotangents (on lse too)."""
    tol = {jnp.bfloat16: (1e-2, 2e-2), jnp.float32: (5e-5, 1e-4)}
    for T in Ts:
        for dtype in (jnp.bfloat16, jnp.float32):
            try:
                q, k, v, kc, vc = inputs(T, dtype, seed=1)
                ks = jax.random.split(jax.random.key(2), 2)
                do = jax.random.normal(ks[0], (B, T, HQ, D), jnp.float32).astype(dtype)
                dlse = jax.random.normal(ks[1], (B, T, HQ), jnp.float32)
            except Exception as e:
                log(mode="check", T=T, dtype=jnp.dtype(dtype).name, error=f"inputs: {e!r}"[:300])
                continue
            for name in ("window", "compression"):
                row = dict(mode="check", op=name, T=T, dtype=jnp.dtype(dtype).name)
                try:
                    res, again = {}, None
                    for p in ("triton", "xla"):
                        if name == "window":
                            def f(q, k, v, do, p=p):
                                o, vjp = jax.vjp(lambda q, k, v: ejnsa.sliding_window_attention(q, k, v, W, platform=p), q, k, v)
                                return (o, *vjp(do))
                            jf = jax.jit(f)
                            res[p] = jax.block_until_ready(jf(q, k, v, do))
                            if p == "triton":
                                again = jf(q, k, v, do)
                            names = ("o", "dq", "dk", "dv")
                        else:
                            def f(q, kc, vc, do, dlse, p=p):
                                (o, lse), vjp = jax.vjp(lambda q, kc, vc: ejnsa.nsa_compression(q, kc, vc, L, platform=p), q, kc, vc)
                                return (o, jnp.where(jnp.isfinite(lse), lse, 0.0), *vjp((do, dlse)))
                            jf = jax.jit(f)
                            res[p] = jax.block_until_ready(jf(q, kc, vc, do, dlse))
                            if p == "triton":
                                again = jf(q, kc, vc, do, dlse)
                            names = ("o", "lse", "dq", "dk_cmp", "dv_cmp")
                        res[p] = [np.asarray(x.astype(jnp.float32)) for x in res[p]]
                    ok = True
                    for n, a, b in zip(names, res["triton"], res["xla"]):
                        e = rel_err(a, b)
                        row[n] = float(f"{e:.3e}")
                        finite = bool(np.all(np.isfinite(a)))
                        limit = 1e-5 if n == "lse" else tol[dtype][0 if n == "o" else 1]
                        ok &= finite and e <= limit
                        if not finite:
                            row[n + "_nonfinite"] = int(np.sum(~np.isfinite(a)))
                    # Determinism: the Triton path run again must agree bitwise.
                    row["deterministic"] = all(
                        np.array_equal(np.asarray(x.astype(jnp.float32)), y) for x, y in zip(again, res["triton"]))
                    row["ok"] = bool(ok and row["deterministic"])
                except Exception as e:
                    row["error"] = repr(e)[:400]
                    traceback.print_exc()
                log(**row)
            del q, k, v, kc, vc, do


def table():
    print("\n" + "=" * 100)
    for r in ROWS:
        if r.get("mode") == "time":
            ours, floor = r.get("ours_ms"), r.get("floor_ms")
            verdict = ""
            if "ratio" in r:
                verdict = "OK" if r["ratio"] <= r["target"] else "OVER TARGET"
            print(f"{r['op']:12s} {r['kind']:8s} T={r['T']:6d}  ours {ours if ours is not None else 'ERR':>8} ms"
                  f"  floor {floor if floor is not None else 'ERR':>8} ms  ratio {r.get('ratio', '-'):>5}"
                  f" (target {r.get('target', '-')})  mem {r.get('ours_mem_mb')}/{r.get('floor_mem_mb')} MB  {verdict}"
                  + (f"  ERR {r.get('ours_error', '')[:80]}" if "ours_error" in r else ""))
        elif r.get("mode") == "check":
            errs = {k: v for k, v in r.items() if k not in ("mode", "op", "T", "dtype", "elapsed_s", "ok")}
            print(f"check {r['op']:12s} T={r['T']:6d} {r['dtype']:9s} {'PASS' if r.get('ok') else 'FAIL'} {errs}")
        else:
            print(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the XLA path instead of timing")
    ap.add_argument("--T", type=int, nargs="*", help="sequence lengths (default per mode)")
    ap.add_argument("--small", action="store_true",
                    help="tiny heads (HQ=4, H=2, D=32, l=16, w=16): a CPU smoke test under TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.small:
        global HQ, H, D, L, W
        HQ, H, D, L, W = 4, 2, 32, 16, 16
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    try:
        from ejnsa.triton import compression as C
        from ejnsa.triton.band import BandConfigs

        q = jax.ShapeDtypeStruct((B, 65536, HQ, D), jnp.bfloat16)
        kc = jax.ShapeDtypeStruct((B, 65536 // L, H, D), jnp.bfloat16)
        log(mode="configs", window=repr(BandConfigs.default(D, D, jnp.bfloat16)),
            compression_T65536=repr(C.default_configs(q, kc, kc)))
    except Exception as e:
        log(mode="configs", error=repr(e)[:300])
    try:
        if args.check:
            run_check(args.T or [4096, 65536])
        else:
            run_timings(args.T or [8192, 32768, 65536])
    finally:
        table()
        out = os.environ.get("OUT")
        if out:
            name = "bench_fa_check.json" if args.check else "bench_fa.json"
            with open(os.path.join(out, name), "w") as f:
                json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
