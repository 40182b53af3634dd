"""Context-parallel NSA on 1..n GPUs of one host: time, speed-up, memory, collectives.

bf16, B=1, HQ=64, H=4, D=128, l=64, S=16, w=512, random inputs. For each T and each
device count n: the sequence is split over a mesh axis "sp" of n devices and every device
runs `native_sparse_attention(..., context_axis="sp")` inside `jax.shard_map` on its part
(layout `--layout`, default "balanced": inputs reordered once with `ejnsa.context_reorder`,
outside the timed step). n = 1 is the plain call on one GPU, the baseline. Recorded:

- forward and forward+backward time (median), and the speed-up over n = 1;
- peak memory per device (`memory_stats()["peak_bytes_in_use"]`, the process's running
  peak, so read it case by case in the order the cases run);
- the collectives' share: the all-gathers of K and V and the reduce-scatters of dK and
  dV timed alone at the same sizes (an upper bound on their cost in the step, where XLA
  may overlap them with compute), over the step time;
- correctness at the smallest T: every n's output and gradients against n = 1's.

    python benchmarks/bench_context.py                                   # all GPUs of the host
    python benchmarks/bench_context.py --T 262144 --devices 1 2 4
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_context.py --smoke   # CPU dry run
"""

from __future__ import annotations

import argparse
import sys

from _common import guarded, log, median_ms, rel_err, run_and_save  # noqa: E402

SHAPE = dict(HQ=64, H=4, D=128, block_size=64, S=16, window=512)


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ejnsa

    res = {"shape": SHAPE, "layout": args.layout, "rows": [], "checks": [],
           "env": dict(jax=jax.__version__, devices=jax.device_count(), device_kind=jax.devices()[0].device_kind)}
    log(res["env"])
    HQ, H, D = SHAPE["HQ"], SHAPE["H"], SHAPE["D"]
    l, S, w = SHAPE["block_size"], SHAPE["S"], SHAPE["window"]
    dt = jnp.dtype(args.dtype)
    f32sum = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731
    counts = [n for n in (args.devices or [1, 2, 4, 8]) if n <= jax.device_count()]

    def nsa(q, k, v, gc, gs, gw, axis=None):
        return ejnsa.native_sparse_attention(q, k, v, gc, gs, gw, block_counts=S, block_size=l, window_size=w,
                                             platform=args.platform, context_axis=axis, context_layout=args.layout)

    def steps(n):
        """(forward, forward+backward) over n devices; inputs in the layout's order."""
        if n == 1:
            return jax.jit(nsa), jax.jit(jax.grad(lambda *a: f32sum(nsa(*a)), argnums=tuple(range(6))))
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("sp",))
        sp = P(None, "sp")
        local = lambda *a: nsa(*a, axis="sp")  # noqa: E731
        grads = lambda *a: jax.grad(lambda *b: f32sum(local(*b)), argnums=tuple(range(6)))(*a)  # noqa: E731
        fwd = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(sp,) * 6, out_specs=sp))
        bwd = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(sp,) * 6, out_specs=(sp,) * 6))
        return fwd, bwd

    def comm_ms(n, T):
        """The step's collectives alone: all-gather of K and V, reduce-scatter of dK, dV."""
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("sp",))
        sp = P(None, "sp")
        x = jax.device_put(jnp.ones((1, T, H, D), dt), NamedSharding(mesh, sp))
        gather = jax.jit(jax.shard_map(lambda a, b: (jax.lax.all_gather(a, "sp", axis=1, tiled=True),
                                                     jax.lax.all_gather(b, "sp", axis=1, tiled=True)),
                                       mesh=mesh, in_specs=(sp, sp), out_specs=(P(), P()), check_vma=False))
        full = jax.device_put(jnp.ones((1, T, H, D), jnp.float32), NamedSharding(mesh, P()))
        scatter = jax.jit(jax.shard_map(lambda a, b: (jax.lax.psum_scatter(a, "sp", scatter_dimension=1, tiled=True),
                                                      jax.lax.psum_scatter(b, "sp", scatter_dimension=1, tiled=True)),
                                        mesh=mesh, in_specs=(P(), P()), out_specs=(sp, sp), check_vma=False))
        return median_ms(gather, x, x, reps=args.reps), median_ms(scatter, full, full, reps=args.reps)

    for T in args.T:
        ks = jax.random.split(jax.random.key(T), 6)
        q = jax.random.normal(ks[0], (1, T, HQ, D), dt)
        k, v = (jax.random.normal(ks[i], (1, T, H, D), dt) for i in (1, 2))
        gates = [jax.nn.sigmoid(jax.random.normal(ks[3 + i], (1, T, HQ), jnp.float32)).astype(dt) for i in range(3)]
        base = None
        for n in counts:
            row = {"T": T, "devices": n}
            res["rows"].append(row)
            if n > 1 and T % (2 * n if args.layout == "balanced" else n):
                row["skipped"] = "T is not a multiple of the layout's chunks"
                continue
            args_n = [q, k, v, *gates]
            if n > 1:
                mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("sp",))
                order = (lambda x: ejnsa.context_reorder(x, n)) if args.layout == "balanced" else (lambda x: x)
                args_n = [jax.device_put(order(x), NamedSharding(mesh, P(None, "sp"))) for x in args_n]
            fwd, bwd = steps(n)
            guarded(row, "fwd_ms", lambda: median_ms(fwd, *args_n, reps=args.reps))
            guarded(row, "fwdbwd_ms", lambda: median_ms(bwd, *args_n, reps=args.reps))
            row["peak_GB_per_device"] = [round(d.memory_stats().get("peak_bytes_in_use", 0) / 1e9, 2)
                                         for d in jax.devices()[:n]] if jax.devices()[0].platform == "gpu" else None
            if n == 1:
                base = row
            else:
                for m in ("fwd_ms", "fwdbwd_ms"):
                    if base and base.get(m) and row.get(m):
                        row[m.replace("_ms", "_speedup")] = base[m] / row[m]
                comm = guarded(row, "comm_ms", lambda: comm_ms(n, T))
                if comm and row.get("fwdbwd_ms"):
                    row["comm_share_fwdbwd"] = (comm[0] + comm[1]) / row["fwdbwd_ms"]
                    row["comm_share_fwd"] = comm[0] / row["fwd_ms"] if row.get("fwd_ms") else None
            if T == min(args.T) and base is not None:
                def check(n=n, fwd=fwd, bwd=bwd, args_n=args_n):
                    f1, b1 = steps(1)
                    back = (lambda x: ejnsa.context_restore(x, n)) if n > 1 and args.layout == "balanced" else (lambda x: x)
                    errs = {"o": rel_err(back(fwd(*args_n)), f1(q, k, v, *gates))}
                    for name, g, g1 in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"), bwd(*args_n),
                                           b1(q, k, v, *gates)):
                        errs[name] = rel_err(back(g), g1)
                    return errs
                res["checks"].append({"T": T, "devices": n, "rel_err_vs_1": guarded(row, "check", check)})
            log(f"  T={T} n={n}: {({k_: v_ for k_, v_ in row.items() if k_ not in ('T', 'devices')})}")
        del q, k, v, gates
    return res


def summarize(res) -> str:
    lines = [f"layout {res['layout']}; devices available {res['env']['devices']} ({res['env']['device_kind']})",
             f"{'T':>8s} {'n':>3s} {'fwd ms':>9s} {'x':>6s} {'fwd+bwd ms':>11s} {'x':>6s} {'comm share':>11s} peak GB/dev"]
    f = lambda x, p=2: f"{x:.{p}f}" if isinstance(x, float) else "-"  # noqa: E731
    for r in res["rows"]:
        lines.append(f"{r['T']:8d} {r['devices']:3d} {f(r.get('fwd_ms')):>9s} {f(r.get('fwd_speedup')):>6s} "
                     f"{f(r.get('fwdbwd_ms')):>11s} {f(r.get('fwdbwd_speedup')):>6s} "
                     f"{f(r.get('comm_share_fwdbwd'), 3):>11s} {r.get('peak_GB_per_device')}")
    for c in res["checks"]:
        lines.append(f"check T={c['T']} n={c['devices']}: {c['rel_err_vs_1']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[131072, 262144, 524288])
    p.add_argument("--devices", type=int, nargs="+", help="device counts (default 1 2 4 8, those present)")
    p.add_argument("--layout", choices=["contiguous", "balanced"], default="balanced")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--platform", default=None)
    p.add_argument("--out", help="JSON file (default $OUT/bench_context.json when $OUT is set)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (XLA on CPU host devices: a dry run)")
    args = p.parse_args()
    if args.smoke:
        SHAPE.update(HQ=4, H=2, D=16, block_size=16, S=3, window=16)
        args.T, args.reps, args.dtype = [256, 512], 2, "float32"
        args.platform = args.platform or "xla"
    run_and_save(run, args, "bench_context.json", summarize)


if __name__ == "__main__":
    sys.exit(main())
