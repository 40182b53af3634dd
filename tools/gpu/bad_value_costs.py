"""Costs of the bad-value handling at T=65536 on the GPU: the XLA work it adds (finite
parts of K and V, flags, running count) and each Triton stage with and without it
(`_band` / `_selected` on inputs made finite beforehand: the kernels alone).

    python3 tools/gpu/bad_value_costs.py          # T=65536; T=... in the environment
"""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from _common import batched_ms, log
import ejnsa
from ejnsa.triton._common import finite_part, bad_keys, bad_counts
from ejnsa.triton import band, selection, window
from ejnsa._registry import kernel_registry
B, T, HQ, H, D, l, S, w = 1, int(os.environ.get("T", 65536)), 64, 4, 128, 64, 16, 512
dt = jnp.bfloat16
ks = jax.random.split(jax.random.PRNGKey(0), 4)
q = jax.random.normal(ks[0], (B, T, HQ, D), dt); k = jax.random.normal(ks[1], (B, T, H, D), dt); v = jax.random.normal(ks[2], (B, T, H, D), dt)
scale = D ** -0.5
def t(name, f, *a):
    log(f"{name:40s} {batched_ms(jax.jit(f), *a):8.3f} ms")
t("finite_part k", finite_part, k)
t("finite_part k,v", lambda k, v: (finite_part(k), finite_part(v)), k, v)
t("bad_keys", bad_keys, k, v)
bad = jax.jit(bad_keys)(k, v)
t("bad_counts", bad_counts, bad)
t("prep all", lambda k, v: (finite_part(k), finite_part(v), bad_counts(bad_keys(k, v))), k, v)
TR = lambda n: kernel_registry.get(n, platform="triton")
t("window full", lambda q, k, v: TR("sliding_window_attention")(q, k, v, w, scale, None), q, k, v)
window_cfg = band.BandConfigs.default(D, D, dt)
fk, fv = jax.jit(finite_part)(k), jax.jit(finite_part)(v)
t("window kernel-only (_band)", lambda q, k, v, bad: band._band(window.WindowIntervals(w), float(scale), window_cfg, q, k, v, bad, None)[0], q, fk, fv, bad)
kc = jax.jit(lambda k: ejnsa.mean_pooling(k, l))(k); vc = jax.jit(lambda v: ejnsa.mean_pooling(v, l))(v)
t("compression full", lambda q, kc, vc: TR("nsa_compression")(q, kc, vc, l, scale, None), q, kc, vc)
o_cmp, lse = jax.jit(lambda q, kc, vc: TR("nsa_compression")(q, kc, vc, l, scale, None))(q, kc, vc)
idx = jax.jit(lambda q, kc, lse: TR("nsa_topk")(q, kc, lse, S, l, scale, None))(q, kc, lse)
t("selection full", lambda q, k, v, idx: TR("apply_native_sparse_attention")(q, k, v, idx, None, l, scale, None), q, k, v, idx)
cfg = selection.SelectionConfig.default(D, D, HQ // H, l, dt)
t("selection kernel-only (_selected)", lambda q, k, v, bad, idx: selection._selected(q, k, v, bad, idx, None, None, l, float(scale), cfg), q, fk, fv, bad, idx)
def noflag(q, k, v, idx):
    return selection._selected(q, k, v, jnp.zeros(k.shape[:3], jnp.int32), idx, None, None, l, float(scale), cfg)
t("selection kernel zero-bad", noflag, q, fk, fv, idx)
