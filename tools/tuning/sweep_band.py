"""GPU sweep of the band kernels' tiles (ejnsa/triton/band.py: BandFwdConfig, BandDqConfig,
BandDkvConfig) for the window and the compression branch, kernel by kernel.

Shape: the benchmarks' anchor, bf16, B=1, HQ=64, H=4, D=128, l=64, w=512, at one T
(default 65536). Prints the median ms of every candidate and writes $OUT/sweep_band.json
when OUT is set; the defaults of `BandConfigs.default` come from runs of this script.

    python tools/tuning/sweep_band.py [--T 65536]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from _common import log, median_ms  # noqa: E402

B, HQ, H, D, L, W = 1, 64, 4, 128, 64, 512
FWD = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3)]
DQ = [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3)]
DKV = [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=65536)
    T = ap.parse_args().T

    import jax
    import jax.numpy as jnp

    import ejnsa
    from ejnsa.triton import band
    from ejnsa.triton.compression import CompressionIntervals
    from ejnsa.triton.window import WindowIntervals

    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, HQ, D), jnp.bfloat16)
    kc, vc = ejnsa.mean_pooling(k, L), ejnsa.mean_pooling(v, L)
    scale = D**-0.5
    rows = []
    cases = {
        "window": (k, v, WindowIntervals(W)(None, T, T), [0]),
        "compression": (kc, vc, CompressionIntervals(L)(None, T, kc.shape[1]), [1024, 2048, 4096]),
    }

    def record(**row):
        rows.append(row)
        log(json.dumps(row))

    for name, (kk, vv, iv, splits) in cases.items():
        default = band.BandFwdConfig.default(D, D, jnp.bfloat16)
        o, lse = jax.jit(lambda q, kk, vv: band.band_forward(q, kk, vv, iv, scale, default))(q, kk, vv)
        delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
        for m, n, w, s in FWD:
            cfg = band.BandFwdConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
            f = jax.jit(lambda q, kk, vv, cfg=cfg: band.band_forward(q, kk, vv, iv, scale, cfg))
            record(op=name, kernel="fwd", config=repr(cfg), ms=round(median_ms(f, q, kk, vv, reps=10), 3))
        for m, n, w, s in DQ:
            cfg = band.BandDqConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
            f = jax.jit(lambda *a, cfg=cfg: band.band_backward_dq(*a, iv, scale, cfg))
            record(op=name, kernel="dq", config=repr(cfg), ms=round(median_ms(f, q, kk, vv, do, lse, delta, reps=10), 3))
        for n, m, w, s in DKV:
            for split in splits:
                cfg = band.BandDkvConfig(block_n=n, block_m=m, num_warps=w, num_stages=s, split_tokens=split)
                f = jax.jit(lambda *a, cfg=cfg: band.band_backward_dkv(*a, iv, scale, cfg))
                record(op=name, kernel="dkv", config=repr(cfg),
                       ms=round(median_ms(f, q, kk, vv, do, lse, delta, reps=10), 3))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sweep_band.json"), "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
