"""GPU benchmark of chunked prefill: queries that are a suffix of the keys (TQ < TK) against
the whole prompt at once (TQ = TK), per query token.

bf16, HQ=64, H=4, D=128, l=64, S=16, w=512 (the decode benchmark's shape), B = 1. For each
prompt length T: `full` is `native_sparse_attention` over the whole prompt (TQ = TK = T);
`chunk C` is the same call for the last C queries only (query, gates [1, C, ...]; key and
value [1, T, ...]), the work of the last chunk of a chunked prefill. Forward only (a
prefill computes no gradients), jitted, in one process; the ratio compares the time per
query token: (chunk ms / C) / (full ms / T). A chunk's queries are the prompt's last ones,
which see the most keys under the causal band and compression, so the ratio is at worst
what a whole chunked prefill pays. `whole` is that whole prefill: the T / C calls of chunk
i (queries i*C .. (i+1)*C - 1, keys 0 .. (i+1)*C - 1), each timed, summed (for up to
--max-whole chunks); its ratio to `full` is the per-token ratio of a real chunked prefill.

    python benchmarks/bench_prefill.py                 # on the GPU
    python benchmarks/bench_prefill.py --T 65536 --chunks 4096
    python benchmarks/bench_prefill.py --smoke         # CPU, tiny: exercises the script
"""

from __future__ import annotations

import argparse
import sys

from _common import batched_ms, guarded, log, run_and_save  # noqa: E402

SHAPE = dict(HQ=64, H=4, D=128, block_size=64, S=16, window=512)
LENGTHS = [32768, 65536]
CHUNKS = [1024, 4096, 16384]


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    import ejnsa

    res = {"shape": SHAPE, "env": dict(jax=jax.__version__, device_kind=jax.devices()[0].device_kind), "rows": []}
    log(res["env"])
    HQ, H, D = SHAPE["HQ"], SHAPE["H"], SHAPE["D"]
    kw = dict(block_counts=SHAPE["S"], block_size=SHAPE["block_size"], window_size=SHAPE["window"],
              platform=args.platform)
    dt = jnp.bfloat16
    nsa = jax.jit(lambda q, k, v, g1, g2, g3: ejnsa.native_sparse_attention(q, k, v, g1, g2, g3, **kw))
    for T in args.T:
        ks = jax.random.split(jax.random.key(T), 6)
        q = jax.random.normal(ks[0], (1, T, HQ, D), dt)
        k, v = jax.random.normal(ks[1], (1, T, H, D), dt), jax.random.normal(ks[2], (1, T, H, D), dt)
        gates = tuple(jax.nn.sigmoid(jax.random.normal(ks[3 + i], (1, T, HQ), jnp.float32)).astype(dt)
                      for i in range(3))
        full = guarded({}, "full", lambda: batched_ms(nsa, q, k, v, *gates, reps=args.reps))
        log(f"  T={T}: full {full} ms")
        for C in [c for c in args.chunks if c < T]:
            row = {"T": T, "chunk": C, "full_ms": full}
            res["rows"].append(row)
            tail = lambda x: x[:, T - C:]  # noqa: E731
            args_c = (tail(q), k, v, *map(tail, gates))
            ms = guarded(row, "chunk_ms", lambda: batched_ms(nsa, *args_c, reps=args.reps))
            if ms is not None and full is not None:
                row["per_token_ratio"] = (ms / C) / (full / T)
            log(f"  T={T} C={C}: chunk {ms} ms, per query token chunk / full {row.get('per_token_ratio')}")
            if T % C == 0 and T // C <= args.max_whole:
                def whole():
                    part = lambda x, i: x[:, i * C:(i + 1) * C]  # noqa: E731
                    return sum(batched_ms(nsa, part(q, i), k[:, :(i + 1) * C], v[:, :(i + 1) * C],
                                          *(part(g, i) for g in gates), reps=3) for i in range(T // C))
                total = guarded(row, "whole_ms", whole)
                if total is not None and full is not None:
                    row["whole_ratio"] = total / full
                log(f"  T={T} C={C}: whole chunked prefill {total} ms, / full {row.get('whole_ratio')}")
    return res


def summarize(res) -> str:
    lines = [f"{'T':>7s} {'chunk':>6s} {'full ms':>9s} {'chunk ms':>9s} {'us/token full':>14s} "
             f"{'us/token chunk':>15s} {'ratio':>6s} {'whole ms':>9s} {'whole / full':>13s}"]
    f = lambda x, p=3: f"{x:.{p}f}" if isinstance(x, float) else "-"  # noqa: E731
    for r in res["rows"]:
        full, chunk = r.get("full_ms"), r.get("chunk_ms")
        per_full = full * 1e3 / r["T"] if isinstance(full, float) else None
        per_chunk = chunk * 1e3 / r["chunk"] if isinstance(chunk, float) else None
        lines.append(f"{r['T']:7d} {r['chunk']:6d} {f(full):>9s} {f(chunk):>9s} {f(per_full, 4):>14s} "
                     f"{f(per_chunk, 4):>15s} {f(r.get('per_token_ratio'), 2):>6s} {f(r.get('whole_ms')):>9s} "
                     f"{f(r.get('whole_ratio'), 2):>13s}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=LENGTHS, help="prompt lengths")
    p.add_argument("--chunks", type=int, nargs="+", default=CHUNKS, help="query chunk lengths")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-whole", type=int, default=16, help="most chunks of a timed whole chunked prefill")
    p.add_argument("--platform", default=None)
    p.add_argument("--out", help="JSON file (default $OUT/bench_prefill.json when $OUT is set)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args()
    if args.smoke:
        SHAPE.update(HQ=4, H=2, D=16, block_size=16, S=3, window=16)
        args.T, args.chunks, args.reps = [256], [64], 2
    run_and_save(run, args, "bench_prefill.json", summarize)


if __name__ == "__main__":
    sys.exit(main())
