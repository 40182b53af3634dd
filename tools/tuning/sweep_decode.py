"""GPU sweep of the Triton decode step's tiles (ejnsa/triton/decode.py, DecodeConfig).

Shape: benchmarks/bench_decode.py's (bf16, HQ=64, H=4, D=128, l=64, S=16, w=512), a cache
holding C - 1 tokens per row and one new token per row, at (B, C) in {(64, 65536),
(8, 65536), (1, 524288)} (--cases picks). For every variant (one knob of the default
changed) and case:
- `ms`: the whole step back to back (cache donated and fed back, as bench_decode times it);
- `gpu_us`: GPU time per step of the decode kernels, by kernel, from a profiler trace of
  ten steps (the host sets the step's time at B <= 8; the kernels are what a variant changes);
- `err`: relative error of the output against the default's (a different order of
  summation: about 1e-3 in bf16; a broken variant is far off).
Every case is guarded. Results to $OUT/sweep_decode.json (or --out).

    python tools/tuning/sweep_decode.py                          # GPU
    python tools/tuning/sweep_decode.py --cases 64:65536 --only default cmp_stages1
    python tools/tuning/sweep_decode.py --smoke                  # CPU: tiny, interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
sys.path.insert(0, os.path.join(HERE, "..", "gpu"))
from _common import batched_ms, filled_decode_cache, guarded, log, rel_err, run_and_save  # noqa: E402

SHAPE = dict(HQ=64, H=4, D=128, block_size=64, S=16, window=512)


def variants() -> dict:
    from ejnsa.triton.decode import DecodeConfig

    d = DecodeConfig.default(SHAPE["block_size"])
    knobs = {
        "cmp_programs2048": dict(cmp_programs=2048), "cmp_programs4096": dict(cmp_programs=4096),
        "cmp_rows32": dict(cmp_rows=32), "cmp_rows128": dict(cmp_rows=128),
        "cmp_warps8": dict(cmp_warps=8), "cmp_stages1": dict(cmp_stages=1), "cmp_stages2": dict(cmp_stages=2),
        "cmp_stages4": dict(cmp_stages=4),
        "attend_programs1024": dict(attend_programs=1024), "attend_programs4096": dict(attend_programs=4096),
        "slot_tile2": dict(slot_tile=2), "slot_tile4_p1024": dict(slot_tile=4, attend_programs=1024),
        "attend_warps8": dict(attend_warps=8), "attend_stages1": dict(attend_stages=1),
        "window_step32": dict(window_step=32), "window_step128": dict(window_step=128),
        "combine_cols16": dict(combine_cols=16), "combine_cols64": dict(combine_cols=64),
        "combine_partials4": dict(combine_partials=4), "combine_partials16": dict(combine_partials=16),
        "combine_warps8": dict(combine_warps=8),
    }
    return {"default": d, **{k: dataclasses.replace(d, **v) for k, v in knobs.items()}}


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    import ejnsa
    from ejnsa.triton import decode

    res = {"shape": SHAPE, "env": dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind)), "rows": []}
    log(res["env"])
    HQ, H, D, l, S, w = (SHAPE[k] for k in ("HQ", "H", "D", "block_size", "S", "window"))
    dt = jnp.bfloat16
    vs = {k: v for k, v in variants().items() if not args.only or k in args.only}
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases]
    if args.smoke:
        HQ, H, D, l, S, w, cases = 4, 2, 16, 16, 3, 32, [(2, 512)]
    default_config = decode.DecodeConfig.default
    for B, C in cases:
        cache, q, k1, v1, g = filled_decode_cache(B, C, HQ, H, D, l, dt, seed=0)
        st = {"c": cache}
        ref = None
        for name, config in vs.items():
            row = {"B": B, "context": C, "variant": name}
            res["rows"].append(row)
            decode.DecodeConfig.default = staticmethod(lambda block_size, c=config: c)
            try:
                def step(c, q, k1, v1, g1, g2, g3):
                    # The same position every step: the cache fills no further.
                    c = c._replace(lengths=jnp.full((B,), C - 1, jnp.int32))
                    return ejnsa.nsa_decode(c, q, k1, v1, g1, g2, g3, block_counts=S, block_size=l, window_size=w,
                                            platform="triton")
                js = jax.jit(step, donate_argnums=(0,))

                def one():
                    o, st["c"] = js(st["c"], q, k1, v1, *g)
                    return o
                o = jax.block_until_ready(one())
                if ref is None:
                    ref = o
                row["err"] = rel_err(o.astype(jnp.float32), ref.astype(jnp.float32))
                guarded(row, "ms", lambda: batched_ms(one))
                if not args.smoke and not args.no_trace:
                    from _trace import gpu_times

                    def kernels():
                        per, busy, _ = gpu_times(one, (), 10, os.path.join(os.environ.get("OUT", "/tmp"),
                                                                           f"trace_{B}_{C}_{name}"))
                        return {"total": busy, **{n: t for n, (t, _) in per.items() if "decode" in n}}
                    guarded(row, "gpu_us", kernels)
            finally:
                decode.DecodeConfig.default = default_config
            gu = row.get("gpu_us", {})
            log(f"B={B} C={C} {name:22s} ms {row.get('ms', float('nan')):.4f} err {row['err']:.1e} "
                + " ".join(f"{n.replace('decode_', '').replace('_kernel', '')} {t:.1f}" for n, t in gu.items()))
        del st, cache
    return res


def summarize(res) -> str:
    lines = ["| B | context | variant | step ms | GPU us | err |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['B']} | {r['context']} | {r['variant']} | {r.get('ms', float('nan')):.4f} | "
                     f"{r.get('gpu_us', {}).get('total', float('nan')):.1f} | {r.get('err', float('nan')):.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=["64:65536", "8:65536", "1:524288"], help="B:context")
    p.add_argument("--only", nargs="*", help="variant names")
    p.add_argument("--no-trace", action="store_true", help="skip the per-kernel profile")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run_and_save(run, a, "sweep_decode.json", summarize)
