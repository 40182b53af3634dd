"""GPU time of every kernel of the whole NSA (forward, and forward+backward) at one T, for
the ejnsa on the path (run it once per version folder, `cd VERSION && python3 ...`), so that
two versions can be compared kernel by kernel. Inputs as benchmarks/bench_nsa.py (random).

    python3 tools/gpu/kernel_times.py OUT.json [T] [--fwd-only]
"""
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trace import gpu_times  # noqa: E402

import ejnsa  # noqa: E402

pos = [a for a in sys.argv[1:] if not a.startswith("--")]
out, T = pos[0], int(pos[1]) if len(pos) > 1 else 65536
B, HQ, H, D, l, S, w = 1, 64, 4, 128, 64, 16, 512
dt = jnp.bfloat16
ks = jax.random.split(jax.random.key(T), 8)
q = jax.random.normal(ks[0], (B, T, HQ, D), dt)
k = jax.random.normal(ks[1], (B, T, H, D), dt)
v = jax.random.normal(ks[2], (B, T, H, D), dt)
gates = [jax.nn.sigmoid(jax.random.normal(ks[3 + i], (B, T, HQ), jnp.float32)).astype(dt) for i in range(3)]
kw = dict(block_counts=S, block_size=l, window_size=w, softmax_scale=D**-0.5, platform="triton")


def nsa(q, k, v, gc, gs, gw):
    return ejnsa.native_sparse_attention(q, k, v, gc, gs, gw, **kw)


fns = {"fwd": jax.jit(nsa)}
if "--fwd-only" not in sys.argv:
    fns["fwdbwd"] = jax.jit(jax.grad(lambda *a: jnp.sum(nsa(*a).astype(jnp.float32)), argnums=tuple(range(6))))
res = {}
for name, f in fns.items():
    per, busy, span = gpu_times(f, (q, k, v, *gates), 5, os.path.join(os.environ.get("OUT", "/tmp"), f"trace_{name}"))
    res[name] = {"busy_us": busy, "span_us": span, "kernels": per}
    print(f"{name}: GPU busy {busy / 1e3:.3f} ms per call, span {span / 1e3:.3f} ms", flush=True)
    for n, (t, c) in sorted(per.items(), key=lambda x: -x[1][0])[:12]:
        print(f"  {t / 1e3:8.3f} ms  x{c:.0f}  {n}", flush=True)
json.dump(res, open(out, "w"), indent=1)
