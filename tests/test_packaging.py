"""Packaging: the base install needs no Triton, and ejnsa without it still works.

The no-Triton case runs in a subprocess in which `import triton` fails as on a machine
without the package (sys.modules["triton"] = None), so that this test process keeps its
own Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_dependencies_have_no_triton():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "triton" not in base and "beartype" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["cuda"]) and any(d.startswith("jax-triton") for d in extras["cuda"])
    assert any(d.startswith("jax[cuda") for d in extras["cuda"])
    assert any(d.startswith("triton") for d in extras["test"])  # CI runs the kernels in the interpreter
    assert os.path.exists(os.path.join(ROOT, "ejnsa", "py.typed"))


def test_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # `import triton` raises ImportError, as when it is not installed
        sys.modules["jax_triton"] = None
        import jax, jax.numpy as jnp
        import ejnsa
        from ejnsa import Platform, kernel_registry
        assert "ejnsa.triton" not in sys.modules
        assert not any(s.platform == Platform.TRITON for s in kernel_registry.list())
        fn = kernel_registry.get("native_sparse_attention")
        assert fn.keywords["platform"] == Platform.XLA, fn
        # the README snippet, smaller
        B, T, HQ, H, D = 1, 256, 4, 1, 32
        q = jax.random.normal(jax.random.key(0), (B, T, HQ, D), jnp.bfloat16)
        k = jax.random.normal(jax.random.key(1), (B, T, H, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(2), (B, T, H, D), jnp.bfloat16)
        g_cmp, g_slc, g_swa = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (3, B, T, HQ)))
        nsa = lambda q, k, v: ejnsa.native_sparse_attention(
            q, k, v, g_cmp, g_slc, g_swa, block_counts=4, block_size=32, window_size=64)
        o = jax.jit(nsa)(q, k, v)
        dq = jax.jit(jax.grad(lambda q: nsa(q, k, v).astype(jnp.float32).sum()))(q)
        assert o.shape == (B, T, HQ, D) and bool(jnp.isfinite(o.astype(jnp.float32)).all())
        assert bool(jnp.isfinite(dq.astype(jnp.float32)).all())
        try:
            ejnsa.sliding_window_attention(q, k, v, 8, platform="triton")
        except RuntimeError as e:
            assert "ejnsa[cuda]" in str(e) and "triton" in str(e), e
        else:
            raise AssertionError("platform='triton' without triton must raise")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
