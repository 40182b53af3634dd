"""GPU benchmark of one NSA decode step (`ejnsa.nsa_decode`) against dense decode attention.

bf16, HQ=64, H=4, D=128, l=64, S=16, w=512 (the shape of a large GQA model's decode). For each batch B
and context C: a cache of capacity C holding C - 1 tokens per row (random keys and values,
compressed blocks pooled from them), and one new token per row. Timed, in one process:

- `nsa`: the whole decode step, cache update included (write the new key/value, pool the
  block it completes, compressed attention, top-k, selected and window attention, gates),
  jitted with the cache donated, as a generation loop runs it;
- `dense`: dense decode attention of the same query over the same cache (all C keys of
  each row): `jax.nn.dot_product_attention` with cuDNN where it serves the shape, else
  XLA's (the column says which);
- both timed back to back (per step, the host never waiting: how a Python generation loop
  runs), one call at a time (`sync` columns: dispatch and the wait for the result
  included), and `loop`: --loop steps inside one jitted `lax.fori_loop` (how a compiled
  generation loop runs: no Python dispatch per step), each step's query moved by the
  last step's output so that no step can be hoisted out of the loop, per step;
- the bytes floor: the bytes each step must read (NSA: the compressed keys/values of the
  complete blocks, the S selected blocks and the window, per KV head, once for all G query
  heads; dense: every cached key and value) over the copy bandwidth measured here.

    python benchmarks/bench_decode.py                        # on the GPU
    python benchmarks/bench_decode.py --B 8 --contexts 65536
    python benchmarks/bench_decode.py --smoke                # CPU, tiny: exercises the script
"""

from __future__ import annotations

import argparse
import sys

from _common import batched_ms, filled_decode_cache, guarded, log, median_ms, run_and_save  # noqa: E402

SHAPE = dict(HQ=64, H=4, D=128, block_size=64, S=16, window=512)
CASES = [(b, c) for b in (1, 8, 64) for c in (8192, 32768, 65536, 131072)] + [(1, 524288)]


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    import ejnsa

    res = {"shape": SHAPE, "env": dict(jax=jax.__version__, device_kind=jax.devices()[0].device_kind), "rows": []}
    log(res["env"])
    HQ, H, D = SHAPE["HQ"], SHAPE["H"], SHAPE["D"]
    l, S, w = SHAPE["block_size"], SHAPE["S"], SHAPE["window"]
    dt = jnp.bfloat16
    itemsize = 2

    # Copy bandwidth: read + write of a 4 GiB array (smaller in --smoke).
    n = (1 << 31) if not args.smoke else (1 << 20)
    x = jnp.ones((n,), dt)
    copy = jax.jit(lambda x: x * 2)
    ms = median_ms(copy, x, reps=20)
    res["copy_GBps"] = 2 * n * itemsize / (ms * 1e-3) / 1e9
    log(f"copy bandwidth {res['copy_GBps']:.0f} GB/s")
    del x

    cases = [(b, c) for b, c in CASES if (args.B is None or b in args.B) and (args.contexts is None or c in args.contexts)]
    for B, C in cases:
        row = {"B": B, "context": C}
        res["rows"].append(row)
        cache, q, k1, v1, gates = filled_decode_cache(B, C, HQ, H, D, l, dt, seed=C + B)

        def step(cache, q, k1, v1, g1, g2, g3):
            # Every timed step is the step at context C: the lengths are reset inside the
            # step, so that the loop feeds the cache back with nothing else dispatched.
            cache = cache._replace(lengths=jnp.full((B,), C - 1, jnp.int32))
            return ejnsa.nsa_decode(cache, q, k1, v1, g1, g2, g3, block_counts=S, block_size=l, window_size=w,
                                    platform=args.platform)

        # The cache is donated and fed back, as a generation loop runs the step.
        jstep = jax.jit(step, donate_argnums=(0,))
        state = {"cache": cache}

        def one():
            o, state["cache"] = jstep(state["cache"], q, k1, v1, *gates)
            return o

        # Back to back (as a generation loop dispatches: the host never waits for a step),
        # and one call at a time (dispatch and the wait included), for both.
        guarded(row, "nsa_ms", lambda: batched_ms(one, reps=args.reps))
        guarded(row, "nsa_sync_ms", lambda: median_ms(one, reps=args.reps, warmup=3))

        def looped(body, carry, *consts):
            """ms per step of args.loop steps of body(carry, q, *consts) -> (o, carry) in one
            jitted fori_loop (carry donated); the next query is q + o / 1024 (o as q)."""
            def run_loop(carry, q, *consts):
                def it(_, cq):
                    o, c = body(cq[0], cq[1], *consts)
                    return c, (q + o.astype(q.dtype) / 1024).astype(q.dtype)
                return jax.lax.fori_loop(0, args.loop, it, (carry, q))
            f = jax.jit(run_loop, donate_argnums=(0,))
            box = {"c": carry}

            def call():
                box["c"], q1 = f(box["c"], q, *consts)
                return q1
            ms = batched_ms(call, reps=max(3, args.reps // 4)) / args.loop
            return ms, box["c"]

        def nsa_loop():
            ms, state["cache"] = looped(lambda c, q1: step(c, q1, k1, v1, *gates), state["cache"])
            return ms
        if args.loop:
            guarded(row, "nsa_loop_ms", nsa_loop)
        lens = jnp.full((B,), C, jnp.int32)

        def dense(impl):
            attend = lambda q, k, v, n: jax.nn.dot_product_attention(  # noqa: E731
                q, k, v, key_value_seq_lengths=n, implementation=impl)
            f = jax.jit(attend)
            a = (q, state["cache"].key, state["cache"].value, lens)
            row["dense_sync_ms"] = median_ms(f, *a, reps=args.reps, warmup=3)
            if args.loop:
                row["dense_loop_ms"], _ = looped(lambda c, q1, k, v, n: (attend(q1, k, v, n), c),
                                                 jnp.zeros((), jnp.int32), *a[1:])
            return batched_ms(f, *a, reps=args.reps)

        if guarded(row, "dense_ms", lambda: dense("cudnn")) is not None:
            row["dense_impl"] = "cudnn"
        else:
            row.pop("dense_ms_err", None)
            guarded(row, "dense_ms", lambda: dense("xla"))
            row["dense_impl"] = "xla"

        per_row = (C // l) * H * 2 * D + S * l * H * 2 * D + w * H * 2 * D  # keys+values, elements
        row["nsa_floor_ms"] = B * per_row * itemsize / (res["copy_GBps"] * 1e9) * 1e3
        row["dense_floor_ms"] = B * C * H * 2 * D * itemsize / (res["copy_GBps"] * 1e9) * 1e3
        if row.get("nsa_ms") and row.get("dense_ms"):
            row["speedup_vs_dense"] = row["dense_ms"] / row["nsa_ms"]
            row["nsa_over_floor"] = row["nsa_ms"] / row["nsa_floor_ms"]
        if row.get("nsa_loop_ms") and row.get("dense_loop_ms"):
            row["loop_speedup_vs_dense"] = row["dense_loop_ms"] / row["nsa_loop_ms"]
            row["loop_nsa_over_floor"] = row["nsa_loop_ms"] / row["nsa_floor_ms"]
        log(f"  B={B:3d} C={C:7d}: nsa {row.get('nsa_ms')} ms, dense ({row.get('dense_impl')}) {row.get('dense_ms')} ms,"
            f" x dense {row.get('speedup_vs_dense')}, nsa / floor {row.get('nsa_over_floor')}")
        del cache, state
    return res


def summarize(res) -> str:
    lines = [f"copy bandwidth {res.get('copy_GBps', 0):.0f} GB/s",
             f"{'B':>4s} {'context':>8s} {'nsa ms':>9s} {'dense ms':>9s} {'impl':>6s} {'x dense':>8s} "
             f"{'nsa floor':>10s} {'nsa/floor':>10s} {'nsa sync':>9s} {'dense sync':>10s} "
             f"{'nsa loop':>9s} {'dense loop':>10s} {'x dense':>8s} {'nsa/floor':>10s}"]
    f = lambda x, p=3: f"{x:.{p}f}" if isinstance(x, float) else "-"  # noqa: E731
    for r in res["rows"]:
        lines.append(f"{r['B']:4d} {r['context']:8d} {f(r.get('nsa_ms')):>9s} {f(r.get('dense_ms')):>9s} "
                     f"{r.get('dense_impl', '-'):>6s} {f(r.get('speedup_vs_dense'), 2):>8s} "
                     f"{f(r.get('nsa_floor_ms'), 4):>10s} {f(r.get('nsa_over_floor'), 1):>10s} "
                     f"{f(r.get('nsa_sync_ms')):>9s} {f(r.get('dense_sync_ms')):>10s} "
                     f"{f(r.get('nsa_loop_ms')):>9s} {f(r.get('dense_loop_ms')):>10s} "
                     f"{f(r.get('loop_speedup_vs_dense'), 2):>8s} {f(r.get('loop_nsa_over_floor'), 1):>10s}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="+", help="batch sizes (default: all cases)")
    p.add_argument("--contexts", type=int, nargs="+", help="contexts (default: all cases)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--loop", type=int, default=32, help="steps per jitted loop (0: no loop timing)")
    p.add_argument("--platform", default=None)
    p.add_argument("--out", help="JSON file (default $OUT/bench_decode.json when $OUT is set)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args()
    if args.smoke:
        SHAPE.update(HQ=4, H=2, D=16, block_size=16, S=3, window=16)
        CASES[:] = [(1, 256), (2, 512)]
        args.reps, args.loop = 3, min(args.loop, 2)
    run_and_save(run, args, "bench_decode.json", summarize)


if __name__ == "__main__":
    sys.exit(main())
