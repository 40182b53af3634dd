"""Triton kernels for NSA on GPUs, launched from JAX through jax-triton.

Importing this package registers the Triton implementations for Backend.GPU. It needs
the triton package but no GPU: jax_triton is imported only when a kernel launches, and
on a CPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before
ejnsa is imported), which the tests use.
"""
