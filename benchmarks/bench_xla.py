"""CPU benchmark of the pure-JAX (XLA) NSA: time and peak memory, forward and forward+backward.

Each (T, pass) case runs in a fresh subprocess so that its peak resident memory (the
process's ru_maxrss, which on Linux is in KiB) belongs to that case alone. The numbers
show that the XLA path's memory grows linearly in T (no [T, T] or [T, HQ, T/l] tensors).

    python benchmarks/bench_xla.py                      # T in 1024, 4096, 16384
    python benchmarks/bench_xla.py --T 1024 4096 --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPE = dict(B=1, HQ=16, H=1, D=64, block_size=64, block_counts=16, window_size=256)


def run_case(T: int, mode: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    import ejnsa

    B, HQ, H, D = SHAPE["B"], SHAPE["HQ"], SHAPE["H"], SHAPE["D"]
    ks = jax.random.split(jax.random.key(0), 7)
    q = jax.random.normal(ks[0], (B, T, HQ, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.float32)
    g = [jax.nn.sigmoid(jax.random.normal(ks[3 + i], (B, T, HQ), jnp.float32)) for i in range(3)]
    kw = dict(block_size=SHAPE["block_size"], block_counts=SHAPE["block_counts"], window_size=SHAPE["window_size"], platform="xla")

    def nsa(q, k, v, g0, g1, g2):
        return ejnsa.native_sparse_attention(q, k, v, g_cmp=g0, g_slc=g1, g_swa=g2, **kw)

    if mode == "fwd":
        f = jax.jit(nsa)
    else:
        r = jax.random.normal(ks[6], (B, T, HQ, D), jnp.float32)
        f = jax.jit(jax.grad(lambda *a: jnp.sum(nsa(*a) * r), argnums=(0, 1, 2, 3, 4, 5)))
    args = (q, k, v, *g)
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))  # compile + first run
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"T": T, "mode": mode, "median_s": statistics.median(times), "first_s": first, "reps": reps, "peak_rss_gib": peak_kib / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--case", nargs=2, metavar=("T", "MODE"), help=argparse.SUPPRESS)  # child process
    a = p.parse_args()
    if a.case:
        print(json.dumps(run_case(int(a.case[0]), a.case[1], a.reps)))
        return

    rows = []
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for T in a.T:
        for mode in a.modes:
            out = subprocess.run([sys.executable, __file__, "--case", str(T), mode, "--reps", str(a.reps)], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"case T={T} {mode} failed")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"T={T:6d} {mode:8s} median {row['median_s']:8.3f} s   first (compile+run) {row['first_s']:7.2f} s   peak RSS {row['peak_rss_gib']:6.2f} GiB", flush=True)
    print(f"\nshape: {SHAPE}, float32, CPU ({os.cpu_count()} cores)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": SHAPE, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
