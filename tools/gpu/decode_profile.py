"""GPU time of the decode step by kernel: ten steps back to back (cache donated) under
jax.profiler (a perfetto trace), for the Triton and the XLA step, at three shapes of
benchmarks/bench_decode.py. Prints the step's back-to-back time, the GPU kernel time per
step, the span per step, and the kernels that take the most.

    python3 tools/gpu/decode_profile.py        # traces under $OUT (or /tmp)
"""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from _common import batched_ms, log
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trace import gpu_times
import ejnsa
HQ, H, D, l, S, w = 64, 4, 128, 64, 16, 512
dt = jnp.bfloat16
out = os.environ.get("OUT", "/tmp")
for B, C in [(8, 65536), (64, 65536), (1, 524288)]:
    ks = jax.random.split(jax.random.key(0), 8)
    cache = ejnsa.init_nsa_cache(B, C, H, D, block_size=l, dtype=dt)
    keys = jax.random.normal(ks[0], cache.key.shape, dt); vals = jax.random.normal(ks[1], cache.value.shape, dt)
    pooled = jax.jit(lambda k: ejnsa.mean_pooling(k, l))
    cache = cache._replace(key=keys, value=vals, key_cmp=pooled(keys), value_cmp=pooled(vals), lengths=jnp.full((B,), C - 1, jnp.int32))
    del keys, vals
    q = jax.random.normal(ks[2], (B, 1, HQ, D), dt)
    k1, v1 = jax.random.normal(ks[3], (B, 1, H, D), dt), jax.random.normal(ks[4], (B, 1, H, D), dt)
    g = tuple(jax.nn.sigmoid(jax.random.normal(ks[5 + i], (B, 1, HQ), jnp.float32)).astype(dt) for i in range(3))
    for plat in ("triton", "xla"):
        def step(c, q, k1, v1, g1, g2, g3, plat=plat):
            c = c._replace(lengths=jnp.full((B,), C - 1, jnp.int32))
            return ejnsa.nsa_decode(c, q, k1, v1, g1, g2, g3, block_counts=S, block_size=l, window_size=w, platform=plat)
        js = jax.jit(step, donate_argnums=(0,))
        st = {"c": cache}
        def one():
            o, st["c"] = js(st["c"], q, k1, v1, *g)
            return o
        log(f"B={B} C={C} {plat} batched {batched_ms(one):.4f} ms")
        per, busy, span = gpu_times(one, (), 10, f"{out}/trace_{B}_{C}_{plat}")
        cache = st["c"]
        log(f"  kernel time per step {busy:.1f} us, span per step {span:.1f} us")
        for n, (t, c) in sorted(per.items(), key=lambda x: -x[1][0])[:14]:
            log(f"    {t:8.2f} us  x{c:.1f}  {n}")
    del cache
