"""Top-k block selection (semantics.md piece 3), in XLA.

score[t, h, c] is the mean over the G query heads of KV head h of the compressed
softmax probability of block c; forced blocks {0, t//l, t//l - 1} score 1.0, which no
probability mean exceeds. The k best come from a stable sort (ties toward the smaller
index, exactly the rule of the spec) rather than `lax.top_k`: XLA's partitioner gathers a
sharded `top_k` onto every device, while a sort along the block axis keeps the batch and
head shardings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._registry import Backend, Platform, kernel_registry
from .._varlen import token_info
from ._common import map_query_chunks, masked_softmax_stats
from .compression import CHUNK, compression_scores, grouped, visible_rows


def block_scores(s, vis, lse, pos, boc, inside, block_size):
    """Scores [B, C, H, TC] of a chunk (-inf for non-candidates).

    A non-finite lse (a row that sees no block, or whose compressed softmax holds a NaN)
    counts as 0, and a non-finite score as 0, on every platform: such a token's output is
    NaN anyway, and its selection stays a deterministic choice among its candidates.
    """
    if lse is None:
        _, _, lse_g, _ = masked_softmax_stats(s, vis[None, :, None, None, :])
    else:
        lse_g = lse.reshape(s.shape[:4])
    lse_g = jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)
    p = jnp.where(vis[None, :, None, None, :], jnp.exp(s - lse_g[..., None]), 0.0)
    score = p.mean(axis=3)
    score = jnp.where(jnp.isfinite(score), score, 0.0)
    local = jnp.arange(s.shape[-1], dtype=jnp.int32)[None, :] - boc[:, None]  # [C, TC]
    cur = (pos // block_size)[:, None]
    forced = (local >= 0) & ((local == 0) | (local == cur) | (local == cur - 1)) & inside[:, None]
    cand = forced | vis
    score = jnp.where(forced[None, :, None, :], 1.0, score)
    return jnp.where(cand[None, :, None, :], score, -jnp.inf)


def _top_k(score, k: int):
    """(values, indices) of the k largest along the last axis, in descending order, ties
    toward the smaller index: `lax.top_k`'s result, by a stable ascending sort of
    0 - score (0 - x rather than -x, so that a score of +0.0 sorts as +0.0)."""
    # (zeros_like: the index array takes score's sharding, which sort requires of its operands)
    idx = jnp.zeros_like(score, jnp.int32) + jnp.arange(score.shape[-1], dtype=jnp.int32)
    key, idx = lax.sort((0.0 - score, idx), dimension=score.ndim - 1, is_stable=True, num_keys=1)
    return -key[..., :k], idx[..., :k]


@kernel_registry.register("nsa_topk", Platform.XLA, Backend.ANY)
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 7))
def nsa_topk(query, k_cmp, lse, num_selected, block_size, softmax_scale, cu_seqlens, num_keys=None):
    """int32 [B, TQ, H, S] block indices (local to each sequence), -1 padded; num_keys = TK (None: TQ).

    `lse` [B, TQ, HQ] from the compression forward, or None to compute it here.
    """
    batch, seq_len = query.shape[:2]
    h = k_cmp.shape[2]
    info = token_info(cu_seqlens, seq_len, block_size, num_keys)
    query, k_cmp = lax.stop_gradient(query), lax.stop_gradient(k_cmp)
    rows = k_cmp.shape[1]

    def body(q, *rest):
        *lse_c, pos, boc, inside = rest
        s = compression_scores(grouped(q, h), k_cmp, softmax_scale)
        vis = visible_rows(pos, boc, inside, rows, block_size)
        score = block_scores(s, vis, lse_c[0] if lse_c else None, pos, boc, inside, block_size)
        if rows < num_selected:  # top_k needs at least k columns
            score = jnp.pad(score, ((0, 0),) * 3 + ((0, num_selected - rows),), constant_values=-jnp.inf)
        val, idx = _top_k(score, num_selected)
        idx = jnp.where(val > -jnp.inf, idx - boc[None, :, None, None], -1)
        return idx.astype(jnp.int32)

    batched = (query,) if lse is None else (query, lax.stop_gradient(lse))
    out = map_query_chunks(body, CHUNK, batched, (info.pos, info.boc, info.inside), seq_len)
    return out.reshape(batch, seq_len, h, num_selected)
