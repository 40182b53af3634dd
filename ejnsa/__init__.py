"""ejnsa: Native Sparse Attention (DeepSeek NSA, arXiv 2502.11089) for JAX."""

from importlib import metadata as _metadata

from ._api import apply_native_sparse_attention as apply_native_sparse_attention
from ._api import mean_pooling as mean_pooling
from ._api import native_sparse_attention as native_sparse_attention
from ._api import nsa_compression as nsa_compression
from ._api import nsa_topk as nsa_topk
from ._api import sliding_window_attention as sliding_window_attention
from ._context import context_reorder as context_reorder
from ._context import context_restore as context_restore
from ._decode import NSACache as NSACache
from ._decode import init_nsa_cache as init_nsa_cache
from ._decode import nsa_decode as nsa_decode
from ._registry import Backend as Backend
from ._registry import Platform as Platform
from ._registry import kernel_registry as kernel_registry
from ._registry import Unsupported as Unsupported
from . import xla as xla  # registers the XLA implementations

# The Triton kernels register themselves for GPUs; importing them needs the triton
# package (the `cuda` extra) but neither a GPU nor jax_triton, which is imported at
# launch. Without triton ejnsa runs its XLA implementations, and platform="triton" says
# what to install.
try:
    from . import triton as triton  # noqa: F401
except ImportError as _e:
    if _e.name != "triton":  # installed but broken: say so when Triton is asked for
        kernel_registry.set_missing(
            Platform.TRITON, f"ejnsa.triton failed to import ({_e}); reinstall with pip install 'ejnsa[cuda]'"
        )

try:
    __version__ = _metadata.version("ejnsa")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "Backend",
    "NSACache",
    "Platform",
    "Unsupported",
    "apply_native_sparse_attention",
    "context_reorder",
    "context_restore",
    "init_nsa_cache",
    "kernel_registry",
    "mean_pooling",
    "native_sparse_attention",
    "nsa_decode",
    "nsa_compression",
    "nsa_topk",
    "sliding_window_attention",
]
