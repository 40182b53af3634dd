"""Index metadata of selected attention, built in XLA once per call from block_indices.

The Triton kernels of ejnsa.triton.selection never look at block_indices themselves; they
read the arrays built here (all int32 unless said otherwise, all linear in T):

- `block_starts`: the global token index of the first key of every valid entry,
  `b * T + bos_t + b_idx * l`, SENT for invalid ones (-1, negative, future, out of range,
  past the token's count, or a token outside every sequence). With cu_seqlens the blocks of
  all sequences are numbered disjointly, so every key token belongs to exactly one block.
  `b_idx * l` is formed only for valid entries: huge indices cannot overflow.
- `tile_union` (forward and dq): per tile of BT tokens and KV head, the sorted union of
  its tokens' block starts and each token's multiplicity for each union slot.
- `block_rows` (dk/dv): every key token's block, as (first key token, length) rows.
- `token_lists` (dk/dv): per (KV head, block row), the tokens that selected it, ascending,
  cut into segments by `segments`, the one builder of segment descriptors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._varlen import TokenInfo, cdiv, key_cu, segment_tiles, token_info, token_segments

# Start of a block that is not one (invalid entries, union padding). Larger than every real
# start (< B * T), so it sorts last.
SENT = np.iinfo(np.int32).max


def _valid_entries(block_indices, block_counts, block_size: int, cu_seqlens,
                   num_keys: int) -> tuple[jax.Array, jax.Array, TokenInfo]:
    """(valid [B, TQ, H, S], the block index with invalid entries set to 0, query info).

    An entry is valid when 0 <= b <= pos_t // l (compared on the index itself, so that
    b * l is never formed for a huge b), it lies within the token's count, and the token
    belongs to a sequence.
    """
    num_sel = block_indices.shape[-1]
    info = token_info(cu_seqlens, block_indices.shape[1], block_size, num_keys)
    idx = block_indices.astype(jnp.int32)
    cur = (info.pos // block_size)[None, :, None, None]
    valid = (idx >= 0) & (idx <= cur) & info.inside[None, :, None, None]
    if block_counts is not None:
        valid &= jnp.arange(num_sel, dtype=jnp.int32) < block_counts.astype(jnp.int32)[..., None]
    return valid, jnp.where(valid, idx, 0), info


def block_starts(block_indices, block_counts, block_size: int, cu_seqlens, num_keys: int) -> jax.Array:
    """Global start key (b * TK + j) of every valid entry, SENT elsewhere: int32 [B, TQ, H, S]."""
    batch = block_indices.shape[0]
    valid, idx, info = _valid_entries(block_indices, block_counts, block_size, cu_seqlens, num_keys)
    base = jnp.arange(batch, dtype=jnp.int32)[:, None] * num_keys + info.bos[None, :]  # [B, TQ]
    return jnp.where(valid, base[:, :, None, None] + idx * block_size, SENT)


def _mult_dtype(num_sel: int):
    if num_sel <= 127:
        return jnp.int8
    if num_sel <= 32767:
        return jnp.int16
    return jnp.int32


def tile_union(starts, bt: int):
    """Per tile of bt tokens (and KV head): union [H, NT, W], count [H, NT], mult [H, NT, W, bt].

    union holds the distinct block starts ascending (SENT padded); mult[h, tile, u, i] is
    how many of token i's entries name block union[h, tile, u]. NT = B * cdiv(T, bt),
    W = bt * S.
    """
    batch, seq_len, heads, num_sel = starts.shape
    ntt = cdiv(seq_len, bt)
    nt, w = batch * ntt, bt * num_sel
    x = jnp.pad(starts, ((0, 0), (0, ntt * bt - seq_len), (0, 0), (0, 0)), constant_values=SENT)
    x = x.reshape(batch, ntt, bt, heads, num_sel).transpose(3, 0, 1, 2, 4).reshape(heads, nt, w)
    tok = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32) // num_sel, x.shape)
    xs, toks = lax.sort((x, tok), dimension=2, num_keys=1, is_stable=True)
    valid = xs != SENT
    prev = jnp.concatenate([jnp.full((heads, nt, 1), -1, jnp.int32), xs[:, :, :-1]], axis=2)
    new = valid & (xs != prev)
    slot = jnp.cumsum(new.astype(jnp.int32), axis=2) - 1
    count = jnp.sum(new, axis=2, dtype=jnp.int32)
    hh = jnp.arange(heads, dtype=jnp.int32)[:, None, None]
    tt = jnp.arange(nt, dtype=jnp.int32)[None, :, None]
    union = jnp.full((heads, nt, w), SENT, jnp.int32).at[hh, tt, jnp.where(new, slot, w)].set(xs, mode="drop")
    mdt = _mult_dtype(num_sel)
    # Integer adds: the result does not depend on their order.
    mult = jnp.zeros((heads, nt, w, bt), mdt).at[hh, tt, jnp.where(valid, slot, 0), toks].add(valid.astype(mdt))
    return union, count, mult


def block_rows(batch: int, seq_len: int, block_size: int, cu_seqlens):
    """Blocks of keys: row_start (global key, -1 for padding rows), row_len; int32 [B * R];
    seq_len = TK, cu_seqlens the keys' (of a pair, cu_k).

    Rows are numbered like the packed compressed rows (b * R + boc + block); every key token
    belongs to exactly one row, so writing every row writes every dk/dv token once. With
    cu_seqlens the tokens outside every sequence get rows too, after the sequences' (no
    entry selects them, so their dk/dv are written as zeros).
    """
    if cu_seqlens is None:
        nr = cdiv(seq_len, block_size)
        blk = jnp.arange(nr, dtype=jnp.int32)
        start = (jnp.arange(batch, dtype=jnp.int32)[:, None] * seq_len + blk * block_size).reshape(-1)
        length = jnp.tile(jnp.minimum(block_size, seq_len - blk * block_size), batch)
        return start, length.astype(jnp.int32)
    bounds, _ = token_segments(key_cu(cu_seqlens), seq_len)
    first, count, _, nr = segment_tiles(bounds, seq_len, block_size)
    # Tiles come in token order: the span before the first sequence, the sequences' blocks
    # (boc + block of each), the span after them, padding. Rotating the span before to the
    # end numbers the sequences' blocks like the packed compressed rows.
    before = (bounds[1] + block_size - 1) // block_size
    tile = (jnp.arange(nr, dtype=jnp.int32) + before) % nr
    length = count[tile]
    return jnp.where(length > 0, first[tile], -1), length


def token_segment(num_entries: int, tokens_per_step: int, block_size: int, dk: int, dv: int, min_segment: int,
                  partial_bytes: int) -> int:
    """Entries per segment: a whole number of steps, at least min_segment of them, and long
    enough that the float32 partials fit in partial_bytes for ANY selection (a list of n
    entries takes ceil(n / seg) <= n / seg + 1 slots, and only lists longer than seg take
    any, so there are fewer than 2 * entries / seg slots)."""
    slot_bytes = block_size * (dk + dv) * 4
    max_slots = max(1, partial_bytes // slot_bytes)
    steps = max(1, min_segment, cdiv(cdiv(2 * num_entries, max_slots), tokens_per_step))
    return steps * tokens_per_step


def segments(lo, n, seg: int, nseg_total: int, perm):
    """Cuts list i ([lo[i], lo[i] + n[i]) of a sorted array) into segments of <= seg and
    lays them out in the list order `perm`, a list's segments together.

    Returns desc [nseg_total, 4] int32 (list or -1, lo, hi, partial slot or -1), part_off,
    part_num (a multi-segment list's first partial slot and number of segments, 0 for a
    list written directly). Built from scatters and scans only: no while loop (searchsorted)
    and no sort but `perm`'s.
    """
    nlists = n.shape[0]
    nseg = jnp.maximum(1, (n + seg - 1) // seg)
    multi = nseg > 1
    part_num = jnp.where(multi, nseg, 0)
    part_off = jnp.cumsum(part_num) - part_num
    nseg_p = nseg[perm]
    end = jnp.cumsum(nseg_p)
    first = end - nseg_p  # strictly increasing: every list has >= 1 segment
    s = jnp.arange(nseg_total, dtype=jnp.int32)
    # kk[s]: position in perm of the list that segment s belongs to
    kk = lax.cummax(jnp.zeros((nseg_total,), jnp.int32).at[first].set(
        jnp.arange(nlists, dtype=jnp.int32), mode="drop"), axis=0)
    lst = perm[kk]
    j = s - first[kk]
    seg_lo = lo[lst] + j * seg
    seg_hi = jnp.minimum(seg_lo + seg, lo[lst] + n[lst])
    out = jnp.where(multi[lst], part_off[lst] + j, -1)
    ok = s < end[-1]
    desc = jnp.stack([jnp.where(ok, lst, -1), seg_lo, seg_hi, out], axis=1).astype(jnp.int32)
    return desc, part_off.astype(jnp.int32), part_num.astype(jnp.int32)


def token_lists(block_indices, block_counts, block_size: int, cu_seqlens, row_start, seg: int, num_keys: int):
    """For dk/dv: the tokens that selected each block, cut into segments.

    Every valid entry gets the list of its block, h * BR + row (rows as in `block_rows`);
    ONE stable sort of all H * B * T * S entries by list (a 1-D key-value sort, which XLA
    hands to CUB's radix sort on GPUs) groups them, tokens ascending within a list because
    entries are laid out token-major per head. Lists come longest first (load balance).

    Returns
      toks [E] int32, E = H * B * TQ * S: the global query (b * TQ + t) of every entry,
        grouped by list, invalid entries last;
      desc [NSEG, 4] int32 (list or -1, lo, hi, partial slot or -1): entries [lo, hi) of
        toks, NSEG = H * BR + cdiv(E, seg); part_off, part_num [H * BR] (see `segments`).
    """
    batch, seq_len, heads, _ = block_indices.shape
    br = row_start.shape[0]
    nr = br // batch
    nlists = heads * br
    valid, bidx, info = _valid_entries(block_indices, block_counts, block_size, cu_seqlens, num_keys)
    b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
    row = b * nr + info.boc[None, :, None, None] + bidx
    start = b * num_keys + info.bos[None, :, None, None] + bidx * block_size
    # The row must exist and start at the entry's block (always, unless cu_seqlens is
    # malformed; then the entry is ignored, as an entry matching no row always was).
    valid &= (row < br) & (row_start[jnp.minimum(row, br - 1)] == start)
    h = jnp.arange(heads, dtype=jnp.int32)[None, None, :, None]
    key = jnp.where(valid, h * br + row, nlists)  # nlists: no list, sorts last
    tok = jnp.broadcast_to(b * seq_len + jnp.arange(seq_len, dtype=jnp.int32)[None, :, None, None], key.shape)
    key = key.transpose(2, 0, 1, 3).reshape(-1)
    tok = tok.transpose(2, 0, 1, 3).reshape(-1)
    skey, toks = lax.sort((key, tok), num_keys=1, is_stable=True)
    # [lo, hi) of every list from the places where the key changes (lists with no entry
    # keep lo = hi = 0).
    e = skey.shape[0]
    pos = jnp.arange(e, dtype=jnp.int32)
    change = skey[1:] != skey[:-1]
    first = jnp.concatenate([jnp.ones((1,), bool), change])
    last = jnp.concatenate([change, jnp.ones((1,), bool)])
    lo = jnp.zeros((nlists,), jnp.int32).at[jnp.where(first, skey, nlists)].set(pos, mode="drop")
    hi = jnp.zeros((nlists,), jnp.int32).at[jnp.where(last, skey, nlists)].set(pos + 1, mode="drop")
    n = hi - lo
    perm = jnp.argsort(-n, stable=True).astype(jnp.int32)
    desc, part_off, part_num = segments(lo, n, seg, nlists + cdiv(e, seg), perm)
    return toks, desc, part_off, part_num
