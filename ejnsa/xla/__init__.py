"""Pure-JAX implementations of every NSA piece: the fallback on any backend and the
reference the Triton kernels are checked against. Importing registers them."""

from .._nsa import register_pipeline
from .._registry import Backend, Platform
from . import compression, decode, mean_pooling, selection, topk, window  # noqa: F401  (registration)

register_pipeline(Platform.XLA, Backend.ANY)
