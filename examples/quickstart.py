"""NSA forward and backward on random data: the smallest complete use of ejnsa.

    python examples/quickstart.py            # XLA on a CPU, Triton kernels on a GPU
    python examples/quickstart.py --T 4096 --platform xla
"""

import argparse
import time

import jax
import jax.numpy as jnp

import ejnsa


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16, help="query heads HQ")
    p.add_argument("--kv-heads", type=int, default=1, help="key/value heads H")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--platform", default=None, help="auto (default), xla or triton")
    a = p.parse_args()

    B, T, HQ, H, D = 1, a.T, a.heads, a.kv_heads, a.head_dim
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, HQ, D))
    k = jax.random.normal(ks[1], (B, T, H, D))
    v = jax.random.normal(ks[2], (B, T, H, D))
    g_cmp, g_slc, g_swa = jax.nn.sigmoid(jax.random.normal(ks[3], (3, B, T, HQ)))

    def loss(q, k, v):
        o = ejnsa.native_sparse_attention(q, k, v, g_cmp, g_slc, g_swa, block_counts=16, block_size=64, window_size=256, platform=a.platform)
        return jnp.mean(o.astype(jnp.float32) ** 2), o

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    t0 = time.perf_counter()
    (val, o), grads = jax.block_until_ready(step(q, k, v))
    t1 = time.perf_counter()
    (val, o), grads = jax.block_until_ready(step(q, k, v))
    t2 = time.perf_counter()
    print(f"backend {jax.default_backend()}, T={T}, HQ={HQ}, H={H}, D={D}")
    print(f"output {o.shape} {o.dtype}, norm {float(jnp.linalg.norm(o)):.4f}")
    print("grad norms q/k/v: " + ", ".join(f"{float(jnp.linalg.norm(x)):.4f}" for x in grads))
    print(f"forward+backward: first call (compile) {t1 - t0:.2f} s, second call {t2 - t1:.3f} s")


if __name__ == "__main__":
    main()
