"""What the benchmark scripts share: timing, guarded steps, relative errors, and the
float64 check of top-k selections.

The scripts run as `python3 benchmarks/<script>.py`, so this directory is on sys.path and
`import _common` finds this file; importing it also puts the repository root on the path
(as `PYTHONPATH=$PWD` does on the GPU machine). jax and numpy are imported inside the
functions: `--plot` and `--hopper` modes run without initialising JAX.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def median_ms(f, *args, reps: int = 20, warmup: int = 2) -> float:
    """Median ms of f(*args) over `reps` calls, each blocked on, after `warmup` calls (the
    first compiles). For kernels of a millisecond or more, where dispatch is hidden."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def batched_ms(f, *args, reps: int = 7, min_ms: float = 25.0) -> float:
    """Median ms per call: one warm-up call (compile), then `reps` batches of back-to-back
    calls, each batch long enough to fill min_ms, which hides the host's dispatch cost of
    short stages (pooling, gating, top-k at small T)."""
    import jax

    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    one = time.perf_counter() - t0
    inner = max(1, min(200, int(min_ms / 1e3 / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e3


# --------------------------------------------------------------------------------------
# keep going after a failure: every GPU minute counts
# --------------------------------------------------------------------------------------


def guarded(record: dict, key: str, fn):
    """record[key] = fn(), or record[key + '_err'] = the exception (printed); returns the
    value or None."""
    try:
        record[key] = fn()
        return record[key]
    except Exception as e:
        record[key + "_err"] = f"{type(e).__name__}: {str(e)[:400]}"
        log(f"  !! {key}: {type(e).__name__}: {str(e)[:400]}")
        traceback.print_exc(limit=3)
        return None


def record_error(results: dict, where: str, e: BaseException):
    """Prints the exception and appends it to results["errors"]."""
    log(f"!! {where}: {type(e).__name__}: {e}")
    traceback.print_exc()
    results["errors"].append({"where": where, "error": f"{type(e).__name__}: {str(e)[:2000]}"})


def write_json(results: dict, filename: str):
    """Writes results to $OUT/filename when OUT is set (the output folder of a GPU run);
    called after every case, so a run cut short keeps what it measured."""
    import json

    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, filename), "w") as f:
        json.dump(results, f, indent=1, default=str)


# --------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (||a - b|| when b is 0), in float32 on the arrays' device: the
    arrays of a 64K-token check are GBs, too large to copy to the host in float64."""
    import jax.numpy as jnp

    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    diff = float(jnp.linalg.norm((a - b).ravel()))
    norm = float(jnp.linalg.norm(b.ravel()))
    return diff / norm if norm > 0 else diff


def topk_scores_f64(q, kc, l, scale, tokens):
    """float64 host scores [n, H, NB] of the listed tokens of batch row 0 (semantics.md piece 3);
    -inf marks a block that is no candidate."""
    import numpy as np

    qt = np.asarray(q[0, tokens].astype("float32"), np.float64)  # [n, HQ, D]
    k = np.asarray(kc[0].astype("float32"), np.float64)  # [NB, H, D]
    n, HQ, _ = qt.shape
    NB, H, _ = k.shape
    s = scale * (qt.reshape(n, H, HQ // H, -1) @ k.transpose(1, 2, 0)[None])  # [n, H, G, NB]
    tok = np.asarray(tokens)
    c = np.arange(NB)
    vis = (c[None, :] + 1) * l - 1 <= tok[:, None]
    s = np.where(vis[:, None, None, :], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis[:, None, None, :], np.exp(s - m), 0.0)
    z = e.sum(-1, keepdims=True)
    p = np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0).mean(axis=2)
    cur = tok // l
    forced = (c[None, :] == 0) | (c[None, :] == cur[:, None]) | (c[None, :] == cur[:, None] - 1)
    p = np.where(forced[:, None, :], 1.0, p)
    return np.where((c[None, :] <= cur[:, None])[:, None, :], p, -np.inf)


def selection_problems(idx, score, tol: float = 1e-6) -> int:
    """How many rows of idx [n, H, S] no tie-tolerant reading of score [n, H, NB] allows:
    the chosen blocks must be distinct candidates in descending score order, padded with
    -1, and no unchosen candidate may beat the worst chosen one by more than tol."""
    import numpy as np

    bad = 0
    n, H, S = idx.shape
    for i in range(n):
        for h in range(H):
            row, sel = score[i, h], idx[i, h]
            cands = set(np.flatnonzero(row > -np.inf).tolist())
            k = min(S, len(cands))
            chosen = sel[:k].tolist()
            ok = all(c in cands for c in chosen) and len(set(chosen)) == k and np.all(sel[k:] == -1)
            if ok:
                worst = min(row[c] for c in chosen) if chosen else np.inf
                rest = [row[u] for u in cands - set(chosen)]
                ok = not rest or max(rest) <= worst + tol
                ok = ok and all(row[b] <= row[a] + tol for a, b in zip(chosen, chosen[1:]))
            bad += not ok
    return bad


def run_and_save(run, args, name: str, summarize) -> dict:
    """res = run(args), timed; then, whatever happened, the results go to JSON (args.out, or
    $OUT/name when OUT is set) and summarize(res) and the wall time to the log."""
    import json

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    t0 = time.perf_counter()
    res = {}
    try:
        res = run(args)
    finally:
        res["wall_s"] = time.perf_counter() - t0
        out = args.out or (os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None)
        if out:
            with open(out, "w") as f:
                json.dump(res, f, indent=1, default=str)
            log(f"wrote {os.path.basename(out)}")  # (no machine path in logs kept in docs/results)
        if "rows" in res:
            log(summarize(res))
        log(f"wall {res['wall_s']:.0f} s")
    return res


def filled_decode_cache(B: int, C: int, HQ: int, H: int, D: int, block_size: int, dtype, seed: int):
    """(cache, q, k1, v1, gates) for a decode step at context C: an `ejnsa.NSACache` of
    capacity C holding C - 1 random tokens per row (compressed blocks pooled from them),
    and one new token per row (q [B, 1, HQ, D], k1 / v1 [B, 1, H, D], three sigmoid gates
    [B, 1, HQ])."""
    import jax
    import jax.numpy as jnp

    import ejnsa

    ks = jax.random.split(jax.random.key(seed), 8)
    cache = ejnsa.init_nsa_cache(B, C, H, D, block_size=block_size, dtype=dtype)
    keys = jax.random.normal(ks[0], cache.key.shape, dtype)
    vals = jax.random.normal(ks[1], cache.value.shape, dtype)
    pooled = jax.jit(lambda x: ejnsa.mean_pooling(x, block_size))
    cache = cache._replace(key=keys, value=vals, key_cmp=pooled(keys), value_cmp=pooled(vals),
                           lengths=jnp.full((B,), C - 1, jnp.int32))
    q = jax.random.normal(ks[2], (B, 1, HQ, D), dtype)
    k1, v1 = jax.random.normal(ks[3], (B, 1, H, D), dtype), jax.random.normal(ks[4], (B, 1, H, D), dtype)
    gates = tuple(jax.nn.sigmoid(jax.random.normal(ks[5 + i], (B, 1, HQ), jnp.float32)).astype(dtype)
                  for i in range(3))
    return cache, q, k1, v1, gates
