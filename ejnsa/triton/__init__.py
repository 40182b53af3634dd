"""Triton kernels for NSA on GPUs, launched from JAX through jax-triton.

Importing this package registers the Triton implementations for Backend.GPU. It needs
the triton package but no GPU: jax_triton is imported only when a kernel launches, and
on a CPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before
ejnsa is imported), which the tests use.
"""

from .._nsa import register_pipeline
from .._registry import Backend, Platform, Runtime, kernel_registry
from . import compression, decode, selection, topk, window  # noqa: F401  (registration)
from ._call import gpu_available, require_triton

# platform=None picks these kernels only where they run compiled (a CUDA GPU with
# jax-triton); platform="triton" runs them wherever require_triton allows (the interpreter).
kernel_registry.set_runtime(Platform.TRITON, Runtime(compiled=gpu_available, require=require_triton))

# Pooling and gating stay in XLA; compression, top-k, selection and window are kernels.
register_pipeline(Platform.TRITON, Backend.GPU)
