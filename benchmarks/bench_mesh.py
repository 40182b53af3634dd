"""GPU benchmark of ejnsa on a mesh, on one GPU: what partitioning costs, and how evenly
context parallelism spreads its work.

bf16, HQ=64, H=4, D=128, l=64, S=16, w=512 (the anchor shape of docs/benchmarks.md),
random inputs, the Triton path.

1. `partitioned` (T = --T, default 65536): the whole NSA, forward and forward+backward,
   called plainly under jit, and under jit with its inputs placed on a one-device mesh
   ("dp", "tp") with NamedSharding P("dp", None, "tp", None) (the way a sharded training
   step calls it: the kernels go through their custom_partitioning rule). Both are timed
   in alternating rounds in one process; the ratio is the cost of the partitioned path.
   Outputs and gradients of the two must be identical bits.
2. `context` (--cp-T, default 1M tokens over --shards 8): the work of each shard of
   context parallelism. Shard i's call is the NSA of its queries over the keys before
   them, a suffix call with `cu_seqlens=(cu_q, cu_k)` over the gathered keys: exactly the
   call `context_axis` makes on that shard, here run one shard at a time on one GPU
   (the all-gather and reduce-scatter are not in it; the multi-GPU runs measure those).
   "contiguous": shard i holds [i T/n, (i+1) T/n); "balanced": chunks i and 2n-1-i of 2n
   (two calls). A step waits for the slowest shard, so the cost of imbalance is
   max / mean - 1 of the shard times.

    python benchmarks/bench_mesh.py                     # on the GPU, both parts
    python benchmarks/bench_mesh.py --part context --cp-T 262144
    python benchmarks/bench_mesh.py --smoke             # CPU interpreter, tiny: exercises the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import guarded, log, run_and_save  # noqa: E402

SHAPE = dict(HQ=64, H=4, D=128, block_size=64, S=16, window=512)


def _inputs(T, HQ, H, D, seed, jnp, jax):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (1, T, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, T, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, T, H, D), jnp.bfloat16)
    gates = tuple(jax.nn.sigmoid(jax.random.normal(ks[3 + i], (1, T, HQ), jnp.float32)).astype(jnp.bfloat16)
                  for i in range(3))
    return (q, k, v) + gates


def _alternating_ms(fns: dict, args: dict, rounds: int, inner: int):
    """Median ms per call of each fn, timed in alternating rounds of `inner` calls (so that
    clocks and temperature drift hit every variant alike), after a warm-up call each."""
    import jax

    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                out = f(*args[name])
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ejnsa

    res = {"shape": SHAPE, "env": dict(jax=jax.__version__, device_kind=jax.devices()[0].device_kind), "rows": []}
    log(res["env"])
    HQ, H, D = SHAPE["HQ"], SHAPE["H"], SHAPE["D"]
    l, S, w = SHAPE["block_size"], SHAPE["S"], SHAPE["window"]
    f32sum = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731

    def nsa(q, k, v, gc, gs, gw, cu=None):
        return ejnsa.native_sparse_attention(q, k, v, gc, gs, gw, block_counts=S, block_size=l, window_size=w,
                                             cu_seqlens=cu, platform=args.platform)

    grad = lambda f, n: jax.grad(lambda *a: f32sum(f(*a)), argnums=tuple(range(n)))  # noqa: E731

    if args.part in ("all", "partitioned"):
        row = {"part": "partitioned", "T": args.T}
        res["rows"].append(row)
        plain = _inputs(args.T, HQ, H, D, 0, jnp, jax)
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("dp", "tp"))
        spec = lambda x: NamedSharding(mesh, P("dp", None, "tp", None) if x.ndim == 4 else P("dp", None, "tp"))  # noqa: E731
        placed = tuple(jax.device_put(x, spec(x)) for x in plain)
        fwd, bwd = jax.jit(nsa), jax.jit(grad(nsa, 6))

        def check():
            same_o = bool(jnp.array_equal(fwd(*plain), fwd(*placed)))
            same_g = all(bool(jnp.array_equal(a, b)) for a, b in zip(bwd(*plain), bwd(*placed)))
            hlo = bwd.lower(*placed).compile().as_text()
            return {"same_output_bits": same_o, "same_grad_bits": same_g,
                    "triton_calls_in_bwd": hlo.count("triton_kernel_call") + hlo.count("__gpu$xla.gpu.triton")}

        log("  check:", guarded(row, "check", check))
        for mode, f in (("fwd", fwd), ("fwdbwd", bwd)):
            ms = guarded(row, mode, lambda: _alternating_ms({"plain": f, "mesh": f}, {"plain": plain, "mesh": placed},
                                                            args.rounds, args.inner))
            if ms:
                row[f"{mode}_ratio"] = ms["mesh"] / ms["plain"]
                log(f"  {mode}: plain {ms['plain']:.3f} ms, one-device mesh {ms['mesh']:.3f} ms, "
                    f"ratio {ms['mesh'] / ms['plain']:.4f}")
        del plain, placed

    if args.part in ("all", "context"):
        T, n = args.cp_T, args.shards
        q, k, v, gc, gs, gw = _inputs(T, HQ, H, D, 1, jnp, jax)
        fwd, bwd = jax.jit(nsa), jax.jit(grad(nsa, 6))

        def shard_call(start, length):
            """The call of the shard whose queries are [start, start + length): its
            queries as the suffix of the keys [0, start + length), the later keys
            belonging to no sequence (what context_axis builds from the gathered keys)."""
            end = start + length
            cu = (jnp.asarray([0, length, length], jnp.int32), jnp.asarray([0, end, T], jnp.int32))
            sl = lambda x: jax.lax.slice_in_dim(x, start, end, axis=1)  # noqa: E731
            return (sl(q), k, v, sl(gc), sl(gs), sl(gw), cu)

        for layout in ("contiguous", "balanced"):
            row = {"part": "context", "T": T, "shards": n, "layout": layout, "fwd": [], "fwdbwd": []}
            res["rows"].append(row)
            for i in range(n):
                if layout == "contiguous":
                    parts = [(i * T // n, T // n)]
                else:
                    half = T // (2 * n)
                    parts = [(i * half, half), ((2 * n - 1 - i) * half, half)]
                calls = [shard_call(*p) for p in parts]
                for mode, f in (("fwd", fwd), ("fwdbwd", bwd)):
                    def one(f=f):
                        return sum(_alternating_ms({"x": f}, {"x": c}, args.rounds, 1)["x"] for c in calls)
                    row[mode].append(guarded(row, f"{mode}_{i}", one))
                log(f"  {layout} shard {i}: fwd {row['fwd'][-1]} ms, fwd+bwd {row['fwdbwd'][-1]} ms")
                del calls
            for mode in ("fwd", "fwdbwd"):
                ts = [t for t in row[mode] if t is not None]
                if len(ts) == n:
                    row[f"{mode}_max_over_mean"] = max(ts) / statistics.mean(ts)
        del q, k, v, gc, gs, gw
    return res


def summarize(res) -> str:
    lines = []
    for r in res["rows"]:
        if r["part"] == "partitioned":
            lines.append(f"partitioned T={r['T']}: check {r.get('check')}")
            for m in ("fwd", "fwdbwd"):
                if r.get(m):
                    lines.append(f"  {m}: plain {r[m]['plain']:.3f} ms, one-device mesh {r[m]['mesh']:.3f} ms, "
                                 f"mesh / plain {r[f'{m}_ratio']:.4f}")
        else:
            lines.append(f"context T={r['T']} shards={r['shards']} {r['layout']}:")
            for m in ("fwd", "fwdbwd"):
                ts = " ".join(f"{t:.1f}" if t is not None else "-" for t in r[m])
                mm = r.get(f"{m}_max_over_mean")
                lines.append(f"  {m} per shard (ms): {ts}" + (f"; max/mean {mm:.3f}" if mm else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "partitioned", "context"], default="all")
    p.add_argument("--T", type=int, default=65536, help="T of the partitioned comparison")
    p.add_argument("--cp-T", type=int, default=1 << 20, help="whole sequence of the context-parallel shards")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--inner", type=int, default=3, help="calls per round in the partitioned comparison")
    p.add_argument("--platform", default="triton")
    p.add_argument("--out", help="JSON file (default $OUT/bench_mesh.json when $OUT is set)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes through Triton's CPU interpreter")
    args = p.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        SHAPE.update(HQ=4, H=2, D=16, block_size=16, S=3, window=16)
        args.T, args.cp_T, args.shards, args.rounds, args.inner = 128, 256, 4, 2, 1
    run_and_save(run, args, "bench_mesh.json", summarize)


if __name__ == "__main__":
    sys.exit(main())
