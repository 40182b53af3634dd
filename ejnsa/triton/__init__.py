"""Triton kernels for NSA on GPUs, launched from JAX through jax-triton.

Importing this package registers the Triton implementations for Backend.GPU. It needs
the triton package but no GPU: jax_triton is imported only when a kernel launches, and
on a CPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before
ejnsa is imported), which the tests use.
"""

from .._nsa import register_pipeline
from .._registry import Backend, Platform
from . import compression, selection, topk, window  # noqa: F401  (registration)

# Pooling and gating stay in XLA; compression, top-k, selection and window are kernels.
register_pipeline(Platform.TRITON, Backend.GPU)
