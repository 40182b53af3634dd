"""Flax NNX layer for Native Sparse Attention (optional dependency: `pip install ejnsa[nnx]`).

`ejnsa/__init__.py` does not import this module, so `import ejnsa` works without Flax. Use it as

    from ejnsa.nnx import NativeSparseAttention

The layer is the attention block of the NSA paper (Yuan et al., DeepSeek 2025, section 3): q/k/v
projections with grouped-query heads, rotary position embedding on q and k, a per-head sigmoid
gate for each of the three branches (compressed, selected, sliding window), the ejnsa attention
kernel, and an output projection. The kernel itself is `ejnsa.native_sparse_attention`, so the
layer runs the Triton kernels on a GPU and the pure-JAX implementation elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

try:
    from flax import nnx
except ImportError as e:  # pragma: no cover - exercised only without flax
    raise ImportError(
        "ejnsa.nnx needs Flax (and optax for training); install them with `pip install ejnsa[nnx]`"
    ) from e

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import ejnsa
from ejnsa._context import global_indices

__all__ = ["NativeSparseAttention", "apply_rotary", "positions_from_cu_seqlens"]

_PLATFORMS = (None, "auto", "xla", "triton")


def positions_from_cu_seqlens(cu_seqlens: Int[Array, " N1"], seq_len: int | Int[Array, " T"]) -> Int[Array, " T"]:
    """Position of every packed token within its own sequence.

    `cu_seqlens` [N+1] follows the FlashAttention convention (starts at 0, ends at `seq_len`,
    non-decreasing). Returns int32 [seq_len]; `seq_len` may also be the int32 array of the
    tokens' indices along T (a shard's tokens under context parallelism). Pure jnp, so it
    works under `jit` with a traced `cu_seqlens`: token t belongs to the last sequence whose
    start is <= t (`searchsorted` with side="right" skips empty sequences, whose start equals
    the next one's).
    """
    t = jnp.arange(seq_len, dtype=jnp.int32) if isinstance(seq_len, int) else seq_len.astype(jnp.int32)
    cu = cu_seqlens.astype(jnp.int32)
    seq = jnp.searchsorted(cu, t, side="right") - 1
    # Clipping keeps a malformed cu_seqlens (not checkable under jit) from indexing out of range.
    seq = jnp.clip(seq, 0, cu.shape[0] - 2)
    return t - cu[seq]


def apply_rotary(
    x: Float[Array, "B T N D"], positions: Int[Array, "B T"], theta: float = 10000.0
) -> Float[Array, "B T N D"]:
    """Rotary position embedding (RoFormer), "rotate half" layout as in GPT-NeoX and Llama.

    Dimension i < D/2 is paired with i + D/2 and rotated by angle position * theta^(-2i/D).
    Computed in float32 and returned in x's dtype: bfloat16 angles lose whole radians at long
    positions.
    """
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _check_positive_int(name: str, value: Any) -> int:
    # bool is an int subclass; `num_heads=True` is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class NativeSparseAttention(nnx.Module):
    """Native Sparse Attention layer: [B, T, hidden_size] -> [B, T, hidden_size].

    out = o_proj(sum over branches b of g_b * attention_b(rope(q), rope(k), v)), with
    g_cmp, g_slc, g_swa = sigmoid(g_proj(x)) one gate per query head and branch (NSA paper,
    eq. 5). q has `num_heads` heads, k and v have `num_kv_heads` heads (grouped-query
    attention: query head h reads key/value head h // (num_heads // num_kv_heads)).

    Args:
      hidden_size: width of the input and output.
      num_heads: query heads HQ.
      num_kv_heads: key/value heads H; must divide `num_heads` (any ratio, 1 = MQA). Defaults
        to `num_heads` (plain multi-head attention). NSA's selection is shared by the query
        heads of one KV head, so fewer KV heads means fewer, more shared, selections.
      head_dim: query/key head dim Dk. Defaults to hidden_size // num_heads. Must be even when
        rotary embedding is on.
      v_head_dim: value head dim Dv. Defaults to `head_dim`; may differ (the paper uses 192/128).
      block_size: NSA block length l, used both for compression (mean pooling) and selection;
        a power of two in [16, 256].
      block_counts: selected blocks S per token and KV head (including the forced blocks: the
        first block and the token's own and previous block).
      window_size: sliding-window length w; 0 disables the window branch.
      use_compression: add the gated compressed-attention output. With False the compressed
        scores still drive the block selection (NSA needs them), only the g_cmp branch is
        dropped from the output and its gate from g_proj.
      use_selection: add the selected-attention branch. With False the layer runs only the
        remaining branches through `ejnsa.nsa_compression` / `ejnsa.sliding_window_attention`;
        `use_selection=False, use_compression=False` is the window-only ablation.
      rope_theta: rotary base. None disables rotary embedding (positions are then unused).
      softmax_scale: attention logit scale; None means head_dim ** -0.5.
      platform: passed to ejnsa: None or "auto" (Triton on GPU, XLA elsewhere), "xla",
        "triton".
      dtype: computation dtype of projections and attention (e.g. jnp.bfloat16). None follows
        the input's and parameters' promoted dtype.
      param_dtype: dtype the parameters are stored in.
      kernel_init: initializer of every projection matrix (default: nnx.Linear's, LeCun
        normal).
      sharding: mesh axis names (embed_axis, heads_axis) for the projection matrices: q/k/v/g
        kernels [hidden, heads*dim] are annotated (embed_axis, heads_axis), o's kernel
        [heads*dim, hidden] (heads_axis, embed_axis); e.g. (None, "tp") for tensor parallel
        over heads, ("fsdp", "tp") with FSDP too. The names go to `nnx.with_partitioning`
        verbatim, so logical names work too under flax's logical axis rules. The arrays are
        placed on the mesh at creation only when a mesh is active (`with jax.set_mesh(mesh):`)
        and flax's eager sharding is on; otherwise only the annotation is recorded and
        `nnx.get_partition_spec(nnx.state(layer))` gives the PartitionSpecs to shard with.
        None (the default, right for any mesh) records no annotation.
      context_axis: context parallelism: call the layer inside `jax.shard_map` with T split
        over this mesh axis (x, positions: the shard's block; cu_seqlens: the global array).
        Rotary positions are then the tokens' global positions. docs/sharding.md.
      context_layout: "contiguous" or "balanced" (see `ejnsa.native_sparse_attention`).
      rngs: `nnx.Rngs` for parameter initialization.

    Call with `x` [B, T, hidden_size] and optionally
      positions: int [B, T] or [T] token positions for the rotary embedding. Wins over the
        positions derived from `cu_seqlens`.
      cu_seqlens: int [N+1] packed-sequence offsets (FlashAttention convention, requires
        B == 1). Attention never crosses a sequence boundary, and rotary positions restart at
        every sequence start (derived in jnp, so `cu_seqlens` may be traced under jit).
      decode: True to run against the KV cache made by `init_cache` (flax's
        `nnx.MultiHeadAttention` convention): x holds T new tokens per row (a prefill chunk,
        or one token), appended at each row's cache index; rotary positions come from that
        index. Prefill then single-token steps give the rows of the full forward.
      num_new: with decode, int [B]: row b takes only its first num_new[b] tokens of x (the
        rest is padding: output 0, not cached), so prompts of different lengths prefill
        together. Default: all T.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        block_size: int = 64,
        block_counts: int = 16,
        window_size: int = 512,
        use_compression: bool = True,
        use_selection: bool = True,
        rope_theta: float | None = 10000.0,
        softmax_scale: float | None = None,
        platform: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable[..., Any] | None = None,
        sharding: Sequence[str | None] | None = None,
        context_axis: str | None = None,
        context_layout: str = "contiguous",
        rngs: nnx.Rngs,
    ):
        hidden_size = _check_positive_int("hidden_size", hidden_size)
        num_heads = _check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, "
                f"num_kv_heads={num_kv_heads}"
            )
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"hidden_size must be divisible by num_heads when head_dim is not given, got "
                    f"hidden_size={hidden_size}, num_heads={num_heads}; pass head_dim explicitly"
                )
            head_dim = hidden_size // num_heads
        head_dim = _check_positive_int("head_dim", head_dim)
        v_head_dim = head_dim if v_head_dim is None else _check_positive_int("v_head_dim", v_head_dim)
        if rope_theta is not None:
            if head_dim % 2 != 0:
                raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
            if not rope_theta > 0:
                raise ValueError(f"rope_theta must be positive or None, got {rope_theta}")
        block_size = _check_positive_int("block_size", block_size)
        if block_size & (block_size - 1) or not 16 <= block_size <= 256:
            raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
        block_counts = _check_positive_int("block_counts", block_counts)
        if isinstance(window_size, bool) or not isinstance(window_size, int):
            raise TypeError(f"window_size must be an int, got {type(window_size).__name__} {window_size!r}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0 disables the window), got {window_size}")
        if not use_selection and not use_compression and window_size == 0:
            raise ValueError(
                "use_selection=False and use_compression=False leave only the window branch, "
                "which needs window_size > 0, got window_size=0"
            )
        if softmax_scale is not None and not softmax_scale > 0:
            raise ValueError(f"softmax_scale must be positive or None, got {softmax_scale}")
        # ejnsa.Platform members are str, so this accepts them too; ejnsa resolves the rest.
        if platform is not None and not (isinstance(platform, str) and platform.lower() in _PLATFORMS):
            raise ValueError(f"platform must be one of {list(_PLATFORMS)} or an ejnsa.Platform, got {platform!r}")
        if sharding is not None and (isinstance(sharding, str) or len(sharding) != 2):
            raise ValueError(f"sharding must be (embed_axis, heads_axis) or None, got {sharding!r}")
        if context_axis is not None:
            if not isinstance(context_axis, str):
                raise TypeError(f"context_axis must be a mesh axis name (str) or None, got {context_axis!r}")
            if not use_selection:
                raise ValueError("context_axis needs use_selection=True (context parallelism runs the fused NSA)")
        if context_layout not in ("contiguous", "balanced"):
            raise ValueError(f"context_layout must be 'contiguous' or 'balanced', got {context_layout!r}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim
        self.block_size = block_size
        self.block_counts = block_counts
        self.window_size = window_size
        self.use_compression = bool(use_compression)
        self.use_selection = bool(use_selection)
        self.rope_theta = rope_theta
        self.softmax_scale = softmax_scale
        self.platform = platform
        self.dtype = dtype
        self.context_axis = context_axis
        self.context_layout = context_layout
        # The gate projection has one output per query head per active branch, in the order
        # (cmp, slc, swa) restricted to the active ones; an ablation carries no dead weights.
        self.branches = tuple(
            name
            for name, on in (("cmp", use_compression), ("slc", use_selection), ("swa", window_size > 0))
            if on
        )

        init = kernel_init if kernel_init is not None else nnx.initializers.lecun_normal()

        def annotated(axes: tuple[str | None, str | None]) -> Callable[..., Any]:
            if sharding is None:
                return init
            # Flax 0.12 places annotated parameters on a mesh at creation ("eager sharding")
            # and raises without one; place eagerly only when there is a mesh to place on, so
            # the layer builds on a single device and the annotation is still recorded.
            eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
            return nnx.with_partitioning(init, axes, eager_sharding=eager)

        embed_axis, heads_axis = (None, None) if sharding is None else tuple(sharding)

        def linear(n_in: int, n_out: int, axes: tuple[str | None, str | None]) -> nnx.Linear:
            # No biases, as in the paper's and fla's NSA layer.
            return nnx.Linear(
                n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=annotated(axes), rngs=rngs,
            )

        self.q_proj = linear(hidden_size, num_heads * head_dim, (embed_axis, heads_axis))
        self.k_proj = linear(hidden_size, num_kv_heads * head_dim, (embed_axis, heads_axis))
        self.v_proj = linear(hidden_size, num_kv_heads * v_head_dim, (embed_axis, heads_axis))
        self.g_proj = linear(hidden_size, num_heads * len(self.branches), (embed_axis, heads_axis))
        self.o_proj = linear(num_heads * v_head_dim, hidden_size, (heads_axis, embed_axis))

    def __call__(
        self,
        x: Float[Array, "B T C"],
        *,
        positions: Int[Array, "B T"] | Int[Array, " T"] | None = None,
        cu_seqlens: Int[Array, " N1"] | None = None,
        decode: bool = False,
        num_new: Int[Array, " B"] | None = None,
    ) -> Float[Array, "B T C"]:
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [B, T, {self.hidden_size}], got {x.shape}")
        B, T, _ = x.shape
        if cu_seqlens is not None and (cu_seqlens.ndim != 1 or B != 1):
            raise ValueError(
                f"cu_seqlens needs B == 1 and shape [N+1], got x {x.shape} and cu_seqlens {cu_seqlens.shape}"
            )
        if decode:
            self._check_decode(x, cu_seqlens)
        elif num_new is not None:
            raise ValueError("num_new is for decode=True (the new tokens of each row in the cache)")

        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.v_head_dim)
        # [B, T, HQ, n_branches]: gates per head are contiguous, as in fla's NSA layer.
        g = jax.nn.sigmoid(self.g_proj(x).astype(jnp.float32)).astype(q.dtype)
        gates = dict(zip(self.branches, jnp.unstack(g.reshape(B, T, self.num_heads, len(self.branches)), axis=-1)))

        if decode and positions is None:  # each row continues at its cache index
            positions = self.cache_index[...][:, None] + jnp.arange(T, dtype=jnp.int32)
        if self.rope_theta is not None:
            if positions is None:
                # Global positions: with context_axis, x is this shard's block of T.
                t = (jnp.arange(T, dtype=jnp.int32) if self.context_axis is None
                     else global_indices(T, self.context_axis, self.context_layout))
                positions = t if cu_seqlens is None else positions_from_cu_seqlens(cu_seqlens, t)
            positions = jnp.asarray(positions)
            if positions.shape == (T,):
                positions = jnp.broadcast_to(positions, (B, T))
            if positions.shape != (B, T):
                raise ValueError(f"positions must have shape [B, T] = {(B, T)} or [T], got {positions.shape}")
            q = apply_rotary(q, positions, self.rope_theta)
            k = apply_rotary(k, positions, self.rope_theta)

        if decode:
            cache = ejnsa.NSACache(self.cached_key[...], self.cached_value[...], self.cached_key_cmp[...],
                                   self.cached_value_cmp[...], self.cache_index[...])
            o, cache = ejnsa.nsa_decode(
                cache, q, k, v, g_cmp=gates.get("cmp"), g_slc=gates["slc"], g_swa=gates.get("swa"),
                block_counts=self.block_counts, block_size=self.block_size, window_size=self.window_size,
                softmax_scale=self.softmax_scale, num_new=num_new, platform=self.platform,
            )
            self.cached_key[...], self.cached_value[...] = cache.key, cache.value
            self.cached_key_cmp[...], self.cached_value_cmp[...] = cache.key_cmp, cache.value_cmp
            self.cache_index[...] = cache.lengths
        elif self.use_selection:
            o = ejnsa.native_sparse_attention(
                q, k, v,
                g_cmp=gates.get("cmp"), g_slc=gates["slc"], g_swa=gates.get("swa"),
                block_counts=self.block_counts, block_size=self.block_size,
                window_size=self.window_size, softmax_scale=self.softmax_scale,
                cu_seqlens=cu_seqlens, platform=self.platform,
                context_axis=self.context_axis, context_layout=self.context_layout,
            )
        else:
            # ejnsa's fused entry point always runs selection, so the ablations without it are
            # assembled from the branch functions; the sum is taken in float32 like the kernel's.
            o = jnp.zeros((B, T, self.num_heads, self.v_head_dim), jnp.float32)
            if self.use_compression:
                k_cmp = ejnsa.mean_pooling(k, self.block_size, cu_seqlens=cu_seqlens)
                v_cmp = ejnsa.mean_pooling(v, self.block_size, cu_seqlens=cu_seqlens)
                o_cmp, _ = ejnsa.nsa_compression(
                    q, k_cmp, v_cmp, self.block_size, softmax_scale=self.softmax_scale,
                    cu_seqlens=cu_seqlens, platform=self.platform,
                )
                o = o + gates["cmp"][..., None].astype(jnp.float32) * o_cmp.astype(jnp.float32)
            if self.window_size > 0:
                o_swa = ejnsa.sliding_window_attention(
                    q, k, v, self.window_size, softmax_scale=self.softmax_scale,
                    cu_seqlens=cu_seqlens, platform=self.platform,
                )
                o = o + gates["swa"][..., None].astype(jnp.float32) * o_swa.astype(jnp.float32)
            o = o.astype(q.dtype)

        o = o.reshape(B, T, self.num_heads * self.v_head_dim)
        # Under a mesh with Explicit axes, o's feature dim and o_proj's input dim are both
        # sharded over heads, a contraction whose partial sums JAX will not reduce on its own.
        # Let the compiler place that reduction (row-parallel matmul + all-reduce) and give the
        # output the layout of the input x, which is what a residual connection needs.
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.are_all_axes_explicit:
            # The kernel goes in as an argument: auto_axes must see every explicit-sharded array.
            w = self.o_proj.kernel[...]
            dt = self.dtype if self.dtype is not None else jnp.result_type(o, w)
            matmul = lambda a, b: jnp.dot(a.astype(dt), b.astype(dt))  # noqa: E731  (o_proj has no bias)
            return jax.sharding.auto_axes(matmul, out_sharding=jax.typeof(x).sharding.spec)(o, w)
        return self.o_proj(o)

    def init_cache(self, input_shape: tuple[int, int, int], dtype: Any = jnp.float32) -> None:
        """Makes an empty KV cache for `input_shape` = (batch, max_length, hidden_size), in
        `dtype` (the keys and values are stored in it: use the layer's computation dtype for
        results equal to the full forward's). The capacity is max_length rounded up to a
        multiple of block_size. Calling it again starts a new, empty cache."""
        if len(input_shape) != 3 or input_shape[-1] != self.hidden_size:
            raise ValueError(f"input_shape must be (batch, max_length, {self.hidden_size}), got {tuple(input_shape)}")
        batch, max_length, _ = input_shape
        cache = ejnsa.init_nsa_cache(batch, max_length, self.num_kv_heads, self.head_dim, self.v_head_dim,
                                     block_size=self.block_size, dtype=dtype)
        self.cached_key = nnx.Cache(cache.key)
        self.cached_value = nnx.Cache(cache.value)
        self.cached_key_cmp = nnx.Cache(cache.key_cmp)
        self.cached_value_cmp = nnx.Cache(cache.value_cmp)
        self.cache_index = nnx.Cache(cache.lengths)  # tokens cached per row

    def _check_decode(self, x, cu_seqlens) -> None:
        if not hasattr(self, "cache_index"):
            raise ValueError("decode=True needs a cache: call layer.init_cache((batch, max_length, hidden)) first")
        if cu_seqlens is not None:
            raise ValueError("decode=True takes no cu_seqlens: each batch row is one sequence in the cache")
        if self.context_axis is not None:
            raise ValueError("decode=True does not run with context_axis (the cache holds whole rows)")
        if not self.use_selection:
            raise NotImplementedError("decode=True needs use_selection=True: the decode step runs the full NSA "
                                      "(the ablations without selection have no cached step)")
        if x.shape[0] != self.cache_index.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]} but the cache was made for batch {self.cache_index.shape[0]}")

    def num_params(self) -> int:
        """Parameter count: hidden*(HQ*Dk + H*Dk + H*Dv + HQ*n_branches) + HQ*Dv*hidden."""
        return sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
