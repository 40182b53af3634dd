"""GPU time per kernel of a jitted call, from a jax.profiler (perfetto) trace: what the
GPU tools share."""
import collections
import glob
import gzip
import json

import jax


def gpu_times(f, args, runs: int, trace_dir: str):
    """(per-kernel [name -> (us per run, launches per run)], GPU busy us per run, span us per
    run) of `runs` back-to-back calls f(*args) (already compiled and warm)."""
    jax.block_until_ready(f(*args))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(runs):
            o = f(*args)
        jax.block_until_ready(o)
    files = glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True)
    if not files:
        raise RuntimeError(f"no perfetto trace under {trace_dir}")
    ev = json.load(gzip.open(files[0]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = [e for e in ev if e.get("ph") == "X" and "GPU" in pname.get(e.get("pid"), "") and "dur" in e]
    tot, cnt = collections.defaultdict(float), collections.Counter()
    for e in gpu:
        tot[e["name"][:80]] += e["dur"]
        cnt[e["name"][:80]] += 1
    ts = sorted(e["ts"] for e in gpu)
    ends = max((e["ts"] + e["dur"] for e in gpu), default=0)
    per = {n: (t / runs, cnt[n] / runs) for n, t in tot.items()}
    return per, sum(tot.values()) / runs, (ends - ts[0]) / runs if ts else 0.0
