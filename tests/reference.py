"""Dense, float64 reference for every piece of docs/semantics.md, written from its text alone.

Nothing here is fast or clever: every piece builds an explicit mask (or key multiplicity) over
all (query token, key token) pairs and runs a plain masked softmax. The same code runs on
NumPy (`xp=np`, float64 values) and on `jax.numpy` (`xp=jnp` inside `jax.enable_x64(True)`)
so that `jax.grad` of it is the float64 reference gradient.

Layout is docs/semantics.md's BTHD: query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv],
gates [B, T, HQ], block_indices [B, T, H, S], cu_seqlens [N + 1] (then B == 1).

Masks and block tables are integer bookkeeping and always come from NumPy; only the floating
point arithmetic goes through `xp`. Selection (top-k) therefore needs concrete values, which
matches docs/semantics.md: no gradient flows through selection.

Compressed rows with `cu_seqlens` follow the lead's packing decision: sequence i contributes
ceil(len_i / l) rows, packed in order, and the array has min(T, T // l + N) rows, the rows past
the real total being zero (and never read).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "cmp_rows",
    "num_cmp_rows",
    "ref_compression",
    "ref_mean_pooling",
    "ref_nsa",
    "ref_selected",
    "ref_topk",
    "ref_topk_scores",
    "ref_window",
    "seq_layout",
]


# --------------------------------------------------------------------------- bookkeeping


def _f64(x, xp):
    """Inputs as float64 NumPy arrays (NumPy path); untouched on the jax path (caller's job)."""
    if xp is np:
        return np.asarray(x).astype(np.float64)
    return x


def _sequences(T, cu_seqlens):
    """[(start, end)] of every packed sequence (one sequence [0, T) without cu_seqlens)."""
    if cu_seqlens is None:
        return [(0, T)]
    cu = [int(c) for c in np.asarray(cu_seqlens).reshape(-1)]
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"reference: malformed cu_seqlens {cu} for T={T}")
    return list(zip(cu[:-1], cu[1:]))


def seq_layout(B, T, cu_seqlens=None):
    """seq [B, T]: sequence id of each token; pos [B, T]: its position within its sequence."""
    if cu_seqlens is not None and B != 1:
        raise ValueError("reference: cu_seqlens needs B == 1")
    seq = np.zeros((B, T), np.int64)
    pos = np.zeros((B, T), np.int64)
    for i, (s, e) in enumerate(_sequences(T, cu_seqlens)):
        seq[:, s:e] = i
        pos[:, s:e] = np.arange(e - s)
    return seq, pos


def cmp_rows(T, block_size, cu_seqlens=None):
    """Compressed rows in packed order: [(sequence id, local block c, first token, end token)].

    Block c of a sequence [s, e) covers tokens s + c*l .. min(s + (c+1)*l, e) - 1.
    """
    rows = []
    for i, (s, e) in enumerate(_sequences(T, cu_seqlens)):
        for c in range(math.ceil((e - s) / block_size)):
            rows.append((i, c, s + c * block_size, min(s + (c + 1) * block_size, e)))
    return rows


def num_cmp_rows(T, block_size, cu_seqlens=None):
    """Static number of compressed rows: ceil(T/l), or min(T, T // l + N) with cu_seqlens."""
    if cu_seqlens is None:
        return math.ceil(T / block_size)
    n = len(np.asarray(cu_seqlens).reshape(-1)) - 1
    return min(T, T // block_size + n)


def _cmp_visible(B, T, NC, block_size, cu_seqlens):
    """vis [B, T, NC]: token t sees compressed row r (same sequence, (c+1)*l - 1 <= pos)."""
    seq, pos = seq_layout(B, T, cu_seqlens)
    row_seq = np.full(NC, -1, np.int64)  # rows past the real total belong to no sequence
    row_blk = np.zeros(NC, np.int64)
    for r, (i, c, _, _) in enumerate(cmp_rows(T, block_size, cu_seqlens)[:NC]):
        row_seq[r] = i
        row_blk[r] = c
    same = row_seq[None, None, :] == seq[:, :, None]
    complete_and_past = (row_blk[None, None, :] + 1) * block_size - 1 <= pos[:, :, None]
    return same & complete_and_past


def _attend(q, k, v, weight, scale, xp):
    """Softmax attention where key j counts `weight[b, t, hq, j]` times (0 = not attended).

    q [B, T, HQ, Dk], k [B, J, H, Dk], v [B, J, H, Dv], weight [B, T, HQ, J] (NumPy, >= 0).
    Returns o [B, T, HQ, Dv] (0 where nothing is attended), lse [B, T, HQ] (-inf there) and
    the probabilities p [B, T, HQ, J].
    """
    HQ, H = q.shape[2], k.shape[2]
    G = HQ // H
    # Query head hq reads KV head hq // G: repeating each KV head G times lines them up.
    k = xp.repeat(k, G, axis=2)
    v = xp.repeat(v, G, axis=2)
    s = scale * xp.einsum("bthd,bjhd->bthj", q, k)
    seen = weight > 0
    any_seen = seen.any(axis=-1, keepdims=True)
    # Shift by the max over attended keys only; masked logits never enter exp (double where),
    # so neither values nor gradients see inf or NaN on masked or empty rows.
    m = xp.max(xp.where(seen, s, -xp.inf), axis=-1, keepdims=True)
    m = xp.where(any_seen, m, 0.0)
    e = weight * xp.exp(xp.where(seen, s - m, 0.0))
    denom = xp.sum(e, axis=-1, keepdims=True)
    safe = xp.where(any_seen, denom, 1.0)
    p = e / safe
    o = xp.einsum("bthj,bjhd->bthd", p, v)
    lse = xp.where(any_seen, m + xp.log(safe), -xp.inf)[..., 0]
    return o, lse, p


# --------------------------------------------------------------------------- the five pieces


def ref_mean_pooling(x, block_size, cu_seqlens=None, xp=np):
    """x [B, T, H, D] -> x_cmp [B, NC, H, D]: mean of each (possibly partial) block."""
    x = _f64(x, xp)
    B, T = x.shape[:2]
    NC = num_cmp_rows(T, block_size, cu_seqlens)
    pool = np.zeros((NC, T))
    for r, (_, _, s, e) in enumerate(cmp_rows(T, block_size, cu_seqlens)):
        pool[r, s:e] = 1.0 / (e - s)
    return xp.einsum("rt,bthd->brhd", pool, x)


def ref_compression(q, k_cmp, v_cmp, block_size, scale=None, cu_seqlens=None, xp=np):
    """Compressed attention: (o_cmp [B, T, HQ, Dv], lse_cmp [B, T, HQ])."""
    o, lse, _ = _compression_full(q, k_cmp, v_cmp, block_size, scale, cu_seqlens, xp)
    return o, lse


def _compression_full(q, k_cmp, v_cmp, block_size, scale, cu_seqlens, xp):
    q, k_cmp, v_cmp = (_f64(a, xp) for a in (q, k_cmp, v_cmp))
    B, T, HQ, Dk = q.shape
    NC = k_cmp.shape[1]
    scale = Dk**-0.5 if scale is None else scale
    vis = _cmp_visible(B, T, NC, block_size, cu_seqlens)
    weight = np.broadcast_to(vis[:, :, None, :], (B, T, HQ, NC)).astype(np.float64)
    return _attend(q, k_cmp, v_cmp, weight, scale, xp)


def ref_topk_scores(q, k_cmp, block_size, scale=None, cu_seqlens=None):
    """score [B, T, H, ceil(T/l)] over LOCAL block indices; -inf for non-candidates.

    Visible blocks score the mean over the G query heads of the compressed softmax
    probability; the forced blocks {0, t//l, t//l - 1} score 1.0.
    """
    q = np.asarray(q).astype(np.float64)
    k_cmp = np.asarray(k_cmp).astype(np.float64)
    B, T, HQ, _ = q.shape
    NC, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    v_dummy = np.zeros(k_cmp.shape[:3] + (1,))
    _, _, p = _compression_full(q, k_cmp, v_dummy, block_size, scale, cu_seqlens, np)
    p_kv = p.reshape(B, T, H, G, NC).mean(axis=3)  # [B, T, H, NC]
    vis = _cmp_visible(B, T, NC, block_size, cu_seqlens)
    NB = math.ceil(T / block_size)
    score = np.full((B, T, H, NB), -np.inf)
    for r, (_, c, _, _) in enumerate(cmp_rows(T, block_size, cu_seqlens)[:NC]):
        here = vis[:, :, r]  # only tokens of row r's own sequence can see it
        score[:, :, :, c] = np.where(here[:, :, None], p_kv[:, :, :, r], score[:, :, :, c])
    _, pos = seq_layout(B, T, cu_seqlens)
    for b in range(B):
        for t in range(T):
            cur = pos[b, t] // block_size
            for c in {0, cur, cur - 1}:
                if c >= 0:
                    score[b, t, :, c] = 1.0
    return score


def ref_topk(q, k_cmp, block_counts, block_size, scale=None, cu_seqlens=None):
    """(indices int32 [B, T, H, S], slot scores float64 [B, T, H, S], -inf on -1 slots).

    S = block_counts if it is an int, else ceil(T/l) with per-token counts clamped to [0, S].
    Highest score first, ties to the smaller block index, -1 padding at the end.
    """
    score = ref_topk_scores(q, k_cmp, block_size, scale, cu_seqlens)
    B, T, H, _ = score.shape
    if isinstance(block_counts, (int, np.integer)):
        S = int(block_counts)
        counts = np.full((B, T, H), S, np.int64)
    else:
        S = math.ceil(T / block_size)
        counts = np.clip(np.asarray(block_counts).astype(np.int64), 0, S)
    idx = np.full((B, T, H, S), -1, np.int32)
    val = np.full((B, T, H, S), -np.inf)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                row = score[b, t, h]
                cands = [c for c in range(len(row)) if row[c] > -np.inf]
                cands.sort(key=lambda c: (-row[c], c))
                take = cands[: min(int(counts[b, t, h]), len(cands))]
                idx[b, t, h, : len(take)] = take
                val[b, t, h, : len(take)] = row[take]
    return idx, val


def selected_multiplicity(block_indices, block_counts, block_size, T, cu_seqlens=None):
    """mult [B, T, H, T]: how many times token t (KV head h) attends key j in selected attention.

    Entries used: the first block_counts[t, h] (clamped to [0, S]), or all S for an int.
    Entry b >= 0 covers keys j of t's sequence with b*l <= pos_j < (b+1)*l and pos_j <= pos_t.
    """
    bi = np.asarray(block_indices).astype(np.int64)
    B, _, H, S = bi.shape
    if isinstance(block_counts, (int, np.integer)):
        counts = np.full((B, T, H), S, np.int64)
    else:
        counts = np.clip(np.asarray(block_counts).astype(np.int64), 0, S)
    seq, pos = seq_layout(B, T, cu_seqlens)
    used = (np.arange(S)[None, None, None, :] < counts[..., None]) & (bi >= 0)  # [B, T, H, S]
    key_block = pos // block_size  # [B, J]
    hit = used[..., None] & (bi[..., None] == key_block[:, None, None, None, :])  # [B,T,H,S,J]
    allowed = (seq[:, :, None] == seq[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
    return hit.sum(axis=3) * allowed[:, :, None, :]


def ref_selected(q, k, v, block_indices, block_counts, block_size, scale=None, cu_seqlens=None,
                 xp=np):
    """Selected-block attention o_slc [B, T, HQ, Dv] (duplicates attended twice)."""
    q, k, v = (_f64(a, xp) for a in (q, k, v))
    B, T, HQ, Dk = q.shape
    H = k.shape[2]
    scale = Dk**-0.5 if scale is None else scale
    mult = selected_multiplicity(block_indices, block_counts, block_size, T, cu_seqlens)
    weight = np.repeat(mult, HQ // H, axis=2).astype(np.float64)
    return _attend(q, k, v, weight, scale, xp)[0]


def ref_window(q, k, v, window_size, scale=None, cu_seqlens=None, xp=np):
    """Sliding-window attention o_swa: keys j of t's sequence with t - w < j <= t."""
    q, k, v = (_f64(a, xp) for a in (q, k, v))
    B, T, HQ, Dk = q.shape
    scale = Dk**-0.5 if scale is None else scale
    seq, pos = seq_layout(B, T, cu_seqlens)
    pt, pj = pos[:, :, None], pos[:, None, :]
    mask = (seq[:, :, None] == seq[:, None, :]) & (pj <= pt) & (pt - window_size < pj)
    weight = np.broadcast_to(mask[:, :, None, :], (B, T, HQ, T)).astype(np.float64)
    return _attend(q, k, v, weight, scale, xp)[0]


def ref_nsa(q, k, v, g_cmp=None, g_slc=None, g_swa=None, block_indices=None, block_counts=16,
            block_size=64, window_size=0, scale=None, cu_seqlens=None, xp=np):
    """The full NSA output o [B, T, HQ, Dv] of docs/semantics.md.

    With block_indices None the selection comes from `ref_topk` on concrete values, so on the
    jax path (gradients) pass the selection in explicitly: it carries no gradient anyway.
    """
    q, k, v = (_f64(a, xp) for a in (q, k, v))
    g_cmp, g_slc, g_swa = (None if g is None else _f64(g, xp) for g in (g_cmp, g_slc, g_swa))
    Dk = q.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    if window_size > 0 and g_swa is None:
        raise ValueError("reference: window_size > 0 needs g_swa")
    k_cmp = ref_mean_pooling(k, block_size, cu_seqlens, xp)
    v_cmp = ref_mean_pooling(v, block_size, cu_seqlens, xp)
    if block_indices is None:
        if xp is not np:
            raise ValueError("reference: on the jax path pass block_indices from ref_topk")
        block_indices, _ = ref_topk(q, k_cmp, block_counts, block_size, scale, cu_seqlens)
    o_slc = ref_selected(q, k, v, block_indices, block_counts, block_size, scale, cu_seqlens, xp)
    o = o_slc if g_slc is None else g_slc[..., None] * o_slc
    if g_cmp is not None:
        o_cmp, _ = ref_compression(q, k_cmp, v_cmp, block_size, scale, cu_seqlens, xp)
        o = o + g_cmp[..., None] * o_cmp
    if window_size > 0:
        o = o + g_swa[..., None] * ref_window(q, k, v, window_size, scale, cu_seqlens, xp)
    return o
