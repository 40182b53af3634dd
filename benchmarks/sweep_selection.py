"""Selected attention variants side by side: whole fwd / fwd+bwd and the time of every stage.

On the GPU machine (H100), from the repository root, in under ~3 minutes (carry .whl, made
once here by ../shared/tools/gpu-wheels.sh, see /work/shared/GPU.md):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
    python3 benchmarks/sweep_selection.py                      # all variants, T = 65536 and 8192
    python3 benchmarks/sweep_selection.py --variants default,legacy --T 65536

Without a GPU (Triton 3.6 like the GPU machine: /work/venv36/bin/python):

    python3 benchmarks/sweep_selection.py --hopper             # sm_90 compile of every kernel config

Shapes as benchmarks/bench_kernels.py: B = 1, HQ = 64, H = 4, D = 128, l = 64, S = 16, bf16,
and its two index patterns (the same functions): "topk" = ejnsa.nsa_topk on queries smooth
along T (neighbouring tokens share blocks, union of ~19 blocks per 4-token tile at 64K) and
"random" = forced blocks plus uniformly random visible ones (what top-k gives on random
data, union ~50 per 4-token tile).

Per (T, pattern, variant):
- fwd_ms and fwdbwd_ms: the jitted forward, and forward + vjp with a random cotangent, whole.
- stages: every stage of `selection.forward_stages` / `backward_stages` jitted and timed
  ALONE on its real inputs (the outputs of the stages before it): meta_fwd (block starts +
  tile unions), fwd (kernel), meta_tiles (dq's tile unions; in fwd+bwd XLA shares them with
  the forward's), dq (kernel, also forming delta = rowsum(o * do)), meta_dkv (dk/dv lists: token sort or the tiles' inverse index), dkv
  (segment kernel), reduce (partials summed, single-segment rows copied). The "tiles" layout
  chooses its dk/dv tiling per call; here the choice is made on the host and named in
  brackets ("tiles_auto" chooses its forward / dq tiling inside the fwd and dq stages).
  bwd_sum_ms adds the backward stages; fwd+bwd can be below fwd + bwd_sum because XLA
  shares the tile unions and overlaps small kernels. A stage whose code, static values and
  argument shapes equal those of a stage of a variant run before (same T and pattern) is
  compiled and timed once: its time is copied and marked * (and listed in "shared").
- check: o, dq, dk, dv against the "default" variant on the same inputs: `bitwise` (every
  bit equal) or, where the summation order legitimately differs (another dk/dv grouping,
  another tiling), the relative error ||a - b|| / ||b||, which must stay
  <= 1e-3 (a quarter of one bf16 ulp in rms: a real bug is O(1)); the default is also run
  twice and must be bitwise deterministic. "legacy" is the implementation validated against
  the XLA path before this sweep, so its row is the correctness link.

Everything goes to $OUT/sweep_selection.json (when OUT is set) as it is measured; a table is
printed last. Work stops being started after --budget seconds (default 170).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from _common import log, median_ms, record_error, write_json  # noqa: E402

HQ, H, D, L, S = 64, 4, 128, 64, 16
TOL = 1e-3
RESULTS: dict = {"env": {}, "patterns": [], "rows": [], "hopper": [], "errors": []}
T0 = time.time()


# ======================================================================================
# Variants
# ======================================================================================


def variants(dtype, names=None):
    """name -> SelectionConfig, in the order they are run (most informative first)."""
    import jax.numpy as jnp  # noqa: F401

    from ejnsa.triton import selection as sel

    G = HQ // H
    base = sel.SelectionConfig.default(D, D, G, L, dtype)
    dkv = base.main_dkv
    rep = dataclasses.replace
    out = {
        # tokens dk/dv layout (4 tokens x 16 heads per step)
        "default": base,
        # the first dk/dv layout: tiles, with its per-call tiling choice
        "legacy": sel.SelectionConfig.legacy(D, D, G, L, dtype),
        # dk/dv programs in block order (neighbouring blocks share their local queries in L2)
        "dkv_block_order": rep(base, main_dkv=rep(dkv, order="block")),
        # segments of >= 256 steps (partials may take 512 MiB) instead of >= 1024 at 64K:
        # block 0's lists (every token selects block 0) cut finer, less tail
        "dkv_short_segments": rep(base, main_dkv=rep(dkv, min_segment=16, partial_bytes=512 << 20)),
        # dq with two warpgroups (the default before run 4; now one: M = 64 rows, every
        # wgmma has its full 64 rows)
        "dq_w8": rep(base, main_dq=rep(base.main_dq, num_warps=8)),
        # dk/dv with two warpgroups (the default before run 5): the 64-key dots are laid out
        # 8 warps along M and their results cross warpgroups through shared memory
        "dkv_w8": rep(base, main_dkv=rep(dkv, num_warps=8)),
        # dk/dv with 3 pipeline stages, or 2 tokens x 16 heads per step (no register spill)
        "dkv_s3": rep(base, main_dkv=rep(dkv, num_stages=3)),
        "dkv_rows32": rep(base, main_dkv=rep(dkv, rows=32)),
        # 128-row forward / dq tiles (8 tokens): fewer K/V loads when tokens share blocks
        "tiles128": sel.SelectionConfig.default(D, D, G, L, dtype, sel.TileConfig(rows_main=128)),
        # per call (lax.cond in the forward, dq follows): 128-row tiles when
        # 128/96 * union(8 tokens) < union(4 tokens), else 64-row ones
        "tiles_auto": sel.SelectionConfig.default(
            D, D, G, L, dtype, sel.TileConfig(rows_main=128, rows_fallback=64, knee_rows=96)),
    }
    if names:
        missing = [n for n in names if n not in out]
        if missing:
            raise SystemExit(f"unknown variants {missing}; known: {list(out)}")
        out = {n: out[n] for n in names}
    return out


# ======================================================================================
# GPU sweep
# ======================================================================================


def pattern_stats(idx, T, pattern):
    """Union sizes per tile and the dk/dv work of both layouts for this pattern."""
    import jax
    import jax.numpy as jnp

    from ejnsa.triton import selection as sel

    @jax.jit
    def stats(idx):
        starts = sel._block_starts(idx, None, L, None)
        valid = jnp.sum(starts != sel.SENT) / (T * H)
        out = {"entries_per_token": valid}
        for bt in (1, 4, 8):
            out[f"union_bt{bt}"] = jnp.mean(sel._tile_union(starts, bt)[1].astype(jnp.float32))
        # tokens layout: steps = sum over (head, block) lists of ceil(n / P), P = 4 and 8
        rows = sel._block_rows(1, T, L, None)
        toks, desc, _, _ = sel._token_lists(idx, None, L, None, rows[0], 1 << 30, "longest")
        n = desc[:, 2] - desc[:, 1]
        for p in (4, 8):
            out[f"dkv_tokens_steps_P{p}"] = jnp.sum(jnp.where(desc[:, 0] >= 0, (n + p - 1) // p, 0))
        return out

    row = {"T": T, "pattern": pattern, **{k: float(v) for k, v in stats(idx).items()}}
    row["fwd_dq_steps_bt4"] = row["union_bt4"] * -(-T // 4) * H
    row["fwd_dq_steps_bt8"] = row["union_bt8"] * -(-T // 8) * H
    row["dkv_tiles_pairs_bt4"] = row["fwd_dq_steps_bt4"]
    row["dkv_tiles_pairs_bt1"] = row["union_bt1"] * T * H
    log("pattern", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})
    RESULTS["patterns"].append(row)


_CMP = []


def compare(got, want):
    """(bitwise equal, relative errors, all finite) of (o, dq, dk, dv), on the device."""
    import jax
    import jax.numpy as jnp

    if not _CMP:
        def cmp(a, b):
            a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
            nb = jnp.linalg.norm(b32.reshape(-1))
            err = jnp.linalg.norm((a32 - b32).reshape(-1))
            return jnp.array_equal(a, b), jnp.where(nb > 0, err / nb, err), jnp.all(jnp.isfinite(a32))

        _CMP.append(jax.jit(cmp))
    res = [_CMP[0](a, b) for a, b in zip(got, want)]
    return (all(bool(r[0]) for r in res), [float(r[1]) for r in res], all(bool(r[2]) for r in res))


def stage_key(T, name, fn, args):
    """Identifies a stage's computation: its code, the static values it closes over
    (selection.py's stage closures capture only those) and the structure, shapes and dtypes
    of its arguments (None where an input is absent), so that a stage identical in two
    variants is compiled once and timed once."""
    import jax

    cells = tuple(repr(c.cell_contents) for c in (fn.__closure__ or ()))
    leaves, tree = jax.tree_util.tree_flatten(args)
    return (T, name, fn.__code__, cells, str(tree), tuple((x.shape, str(x.dtype)) for x in leaves))


def run_case(T, pattern, q, k, v, do, idx, cfgs, reps, budget, jit_cache, reference, timings):
    import jax

    from ejnsa.triton import selection as sel

    scale = D**-0.5
    for vname, cfg in cfgs.items():
        row = {"T": T, "pattern": pattern, "variant": vname, "stages": {}, "shared": {}}
        if time.time() - T0 > budget:
            row["skipped"] = f"budget of {budget:.0f} s spent"
            RESULTS["rows"].append(row)
            log(f"-- skip {vname} T={T} {pattern}: budget")
            continue
        t_start = time.time()
        try:
            def whole(q, k, v, do, idx, cfg=cfg):
                o, vjp = jax.vjp(lambda q, k, v: sel.selected_attention(q, k, v, idx, None, L, scale, config=cfg),
                                 q, k, v)
                return (o, *vjp(do))

            def fwd(q, k, v, idx, cfg=cfg):
                return sel.selected_attention(q, k, v, idx, None, L, scale, config=cfg)

            fb = jit_cache.setdefault((vname, T, "<whole fwd+bwd>"), jax.jit(whole))
            outs = jax.block_until_ready(fb(q, k, v, do, idx))
            row["fwdbwd_ms"] = median_ms(lambda: fb(q, k, v, do, idx), reps=reps, warmup=0)
            # the forward depends on the tiling and the forward kernels' configs only
            fkey = (T, pattern, "<whole fwd>", repr(cfg.tile), repr(cfg.main_fwd), repr(cfg.fallback_fwd))
            if fkey in timings:
                row["fwd_ms"], row["shared"]["<whole fwd>"] = timings[fkey]
            else:
                ff = jit_cache.setdefault(fkey[:1] + fkey[2:], jax.jit(fwd))
                row["fwd_ms"] = median_ms(lambda: ff(q, k, v, idx), reps=reps, warmup=1)
                timings[fkey] = (row["fwd_ms"], vname)
            if vname == "default":
                again = jax.block_until_ready(fb(q, k, v, do, idx))
                row["deterministic"] = compare(again, outs)[0]
                del again
                reference[(T, pattern)] = outs
            ref = reference.get((T, pattern))
            if ref is not None:
                bitwise, rels, finite = compare(outs, ref)
                row["bitwise_vs_default"] = bitwise
                row["rel_vs_default"] = dict(zip(("o", "dq", "dk", "dv"), rels))
                row["finite"] = finite
                row["ok"] = bool(finite and (bitwise or max(rels) <= TOL) and row.get("deterministic", True))
            del outs

            # every stage alone on its real inputs; a stage identical to one timed before (same
            # code and static values, same T and pattern) is run once for its outputs only
            def run(name, fn, *args):
                key = stage_key(T, name, fn, args)
                j = jit_cache.setdefault(key, jax.jit(fn))
                out = jax.block_until_ready(j(*args))
                tkey = (pattern,) + key
                if tkey in timings:
                    row["stages"][name], row["shared"][name] = timings[tkey]
                else:
                    row["stages"][name] = median_ms(lambda: j(*args), reps=reps, warmup=0)
                    timings[tkey] = (row["stages"][name], vname)
                return out

            o, lse, ch = sel.forward_stages(run, q, k, v, idx, None, L, scale, config=cfg)
            res = sel.backward_stages(run, q, k, v, idx, None, L, scale, o, lse, ch, do, config=cfg)
            del o, lse, ch, res
            fwd_names = ("meta_fwd", "fwd")
            row["bwd_sum_ms"] = sum(t for n, t in row["stages"].items() if n not in fwd_names)
        except Exception as e:
            record_error(RESULTS, f"{vname} T={T} {pattern}", e)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["wall_s"] = time.time() - t_start
        log({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()})
        RESULTS["rows"].append(row)
        write_json(RESULTS, "sweep_selection.json")


def run_sweep(Ts, cfg_names, reps_big, reps_small, budget):
    import jax
    import jax.numpy as jnp

    import bench_kernels as bk

    bk.HQ, bk.H, bk.D, bk.L, bk.S = HQ, H, D, L, S
    cfgs = variants(jnp.bfloat16, cfg_names)
    jit_cache: dict = {}
    reference: dict = {}
    timings: dict = {}
    for T in Ts:
        log(f"=== T = {T}")
        try:
            q, k, v, do = bk.make_inputs(T, jnp.bfloat16)
            pats = [("topk", bk.topk_indices(T, k)[0]), ("random", bk.random_indices(T, H))]
        except Exception as e:
            record_error(RESULTS, f"inputs T={T}", e)
            continue
        for pattern, idx in pats:
            try:
                pattern_stats(idx, T, pattern)
            except Exception as e:
                record_error(RESULTS, f"pattern stats T={T} {pattern}", e)
            run_case(T, pattern, q, k, v, do, idx, cfgs, reps_big if T >= 32768 else reps_small, budget,
                     jit_cache, reference, timings)
            reference.pop((T, pattern), None)
        del q, k, v, do, pats


# ======================================================================================
# Hopper compile matrix (no GPU)
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class _Launch:
    num_warps: int
    num_stages: int


def run_hopper(cfg_names):
    """Compiles every kernel configuration of the sweep's variants (benchmark shape) and of
    the defaults over a dims/dtypes matrix for sm_90: shared memory, registers, spills
    (local + stack bytes), wgmma. Pointers are declared 16-byte aligned, as jax_triton does."""
    os.environ.pop("TRITON_INTERPRET", None)
    import jax.numpy as jnp

    from ejnsa.triton import selection as sel
    from tools.hopper_compile import compile_for_hopper

    def compile_one(kernel, signature, constexprs, num_warps, num_stages):
        r = compile_for_hopper(kernel, signature, constexprs, num_warps, num_stages)
        return {k: r[k] for k in ("shared", "shared_ok", "registers", "spill", "wgmma", "async_copies")}

    def sigs(p):
        fwd = dict(q=p, k=p, v=p, union="*i32", count="*i32", mult="*i8", T="i32", NTT="i32", qk_scale="fp32",
                   o=p, lse="*fp32")
        dq = dict(q=p, k=p, v=p, o=p, do=p, lse="*fp32", union="*i32", count="*i32", mult="*i8",
                  T="i32", NTT="i32", qk_scale="fp32", scale="fp32", dq=p, delta="*fp32")
        dkv = dict(q=p, k=p, v=p, do=p, lse="*fp32", delta="*fp32", pairs="*i32", mult="*i8", desc="*i32",
                   row_start="*i32", row_len="*i32", T="i32", NTT="i32", NT="i32", BR="i32", PW="i32",
                   qk_scale="fp32", scale="fp32", dk_direct=p, dv_direct=p, part_k="*fp32", part_v="*fp32")
        dkvt = dict(q=p, k=p, v=p, do=p, lse="*fp32", delta="*fp32", toks="*i32", desc="*i32",
                    row_start="*i32", row_len="*i32", BR="i32", qk_scale="fp32", scale="fp32",
                    dk_direct=p, dv_direct=p, part_k="*fp32", part_v="*fp32")
        red = dict(dk_direct=p, dv_direct=p, part_k="*fp32", part_v="*fp32", row_start="*i32", row_len="*i32",
                   part_off="*i32", part_num="*i32", BR="i32", dk=p, dv=p)
        return fwd, dq, dkv, dkvt, red

    dts = {"bf16": ("*bf16", jnp.bfloat16), "fp32": ("*fp32", jnp.float32)}
    seen = set()

    def kernels_of(cfg, dt, dk, dv, g, l, label):
        p, jdt = dts[dt]
        fwd_sig, dq_sig, dkv_sig, dkvt_sig, red_sig = sigs(p)
        bk, bv = sel._next_pow2(max(16, dk)), sel._next_pow2(max(16, dv))
        base = dict(H=4, HQ=4 * g, G=g, K=dk, V=dv, BS=l, BK=bk, PREC=sel._dot_precision(jdt))
        tiles = cfg.tile.dkv_layout == "tiles"
        todo = []
        for tiling, rows, fc, qc, kc in (("main", cfg.tile.rows_main, cfg.main_fwd, cfg.main_dq, cfg.main_dkv),
                                         ("fallback", cfg.tile.rows_fallback, cfg.fallback_fwd, cfg.fallback_dq,
                                          cfg.fallback_dkv)):
            plan = sel._Plan.make(g, rows)
            pc = dict(base, GB=plan.gb, NG=plan.ng, BT=plan.bt, M=plan.rows, W=plan.bt * S)
            todo.append(("fwd", tiling, sel._slc_fwd_kernel, fwd_sig, fc,
                         dict(pc, BC=min(fc.block_keys, l), BV=min(fc.block_v, bv))))
            todo.append(("dq", tiling, sel._slc_dq_kernel, dq_sig, qc, dict(pc, BC=min(qc.block_keys, l), BV=bv)))
            if tiles:
                todo.append(("dkv_tiles", tiling, sel._slc_dkv_kernel, dkv_sig, kc,
                             dict(pc, BC=min(kc.block_keys, l), BV=bv)))
        if not tiles:
            kc = cfg.main_dkv
            plan = sel._Plan.make(g, kc.rows)
            todo.append(("dkv_tokens", "tokens", sel._slc_dkv_tokens_kernel, dkvt_sig, kc,
                         dict(base, GB=plan.gb, NG=plan.ng, P=plan.bt, M=plan.rows, BC=min(kc.block_keys, l), BV=bv)))
        rc = cfg.reduce
        todo.append(("reduce", "-", sel._slc_reduce_kernel, red_sig, _Launch(rc.num_warps, 1),
                     dict(H=4, K=dk, V=dv, BS=l, BC=min(rc.block_keys, l), BK=bk, BV=bv)))
        for kname, tiling, kern, sig, c, constexprs in todo:
            key = (kname, dt, tuple(sorted(constexprs.items())), c.num_warps, c.num_stages)
            if key in seen:
                continue
            seen.add(key)
            row = {"config": label, "dtype": dt, "Dk": dk, "Dv": dv, "G": g, "l": l, "kernel": kname,
                   "tiling": tiling, "M": constexprs.get("M", "-"), "BC": constexprs["BC"],
                   "warps": c.num_warps, "stages": c.num_stages}
            try:
                row.update(compile_one(kern, sig, constexprs, c.num_warps, c.num_stages))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(row)
            RESULTS["hopper"].append(row)
            write_json(RESULTS, "sweep_selection.json")

    for name, cfg in variants(jnp.bfloat16, cfg_names).items():
        kernels_of(cfg, "bf16", D, D, HQ // H, L, name)
    matrix = []
    for dt in ("bf16", "fp32"):
        for dk, dv in ((64, 64), (128, 128), (192, 128), (256, 256)):
            for g in (1, 16):
                matrix.append((dt, dk, dv, g, 64))
    matrix += [("bf16", 128, 128, 16, 16), ("bf16", 128, 128, 16, 256), ("bf16", 40, 24, 2, 32),
               ("bf16", 128, 128, 80, 64)]
    for dt, dk, dv, g, l in matrix:
        cfg = sel.SelectionConfig.default(dk, dv, g, l, dts[dt][1])
        kernels_of(cfg, dt, dk, dv, g, l, "default")


# ======================================================================================
# Summary
# ======================================================================================


STAGE_COLS = ("meta_fwd", "fwd", "meta_tiles", "dq", "meta_dkv", "dkv", "reduce")


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def summary():
    if RESULTS["hopper"]:
        log("\nHopper compile (sm_90): shared KB / regs / spill bytes / wgmma / async copies in ttgir")
        for r in RESULTS["hopper"]:
            head = (f"  {r['config'][:15]:15s} {r['dtype']} Dk={r['Dk']:3d} Dv={r['Dv']:3d} G={r['G']:2d} "
                    f"l={r['l']:3d} {r['kernel']:10s} {r['tiling']:8s} M={r['M']!s:>3} BC={r['BC']:3d} "
                    f"w={r['warps']} s={r['stages']}:")
            if "error" in r:
                log(f"{head} ERROR {r['error'][:120]}")
                continue
            bad = "" if r["shared_ok"] else "  <-- SHARED OVERFLOW"
            bad += "  <-- SPILLS" if r["spill"] else ""
            log(f"{head} {r['shared'] / 1024:6.1f} KB {r['registers']:3d} regs spill {r['spill']:5d} "
                f"wgmma={r['wgmma']} async={r['async_copies']}{bad}")
    if RESULTS["patterns"]:
        log("\nIndex patterns: entries per token, mean union per tile of bt tokens, loop steps of each layout")
        for r in RESULTS["patterns"]:
            log("  " + ", ".join(f"{k}={fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in r.items()))
    rows = RESULTS["rows"]
    if rows:
        log(f"\nSelected attention, bf16, HQ={HQ} H={H} D={D} l={L} S={S}: median ms; stages each jitted alone; "
            f"check vs 'default' (bit = bitwise, else max rel err, tol {TOL:g}); * = the same "
            f"computation as in a variant above, timed there")
        head = f"  {'T':>6s} {'pattern':7s} {'variant':18s} {'fwd':>7s} {'fwd+bwd':>8s} {'bwd_sum':>8s} " + " ".join(
            f"{c:>10s}" for c in STAGE_COLS) + "  check"
        log(head)
        for r in rows:
            lead = f"  {r['T']:6d} {r['pattern']:7s} {r['variant']:18s}"
            if "skipped" in r or "error" in r:
                log(f"{lead} {r.get('skipped') or 'ERROR ' + r['error'][:100]}")
                continue
            st = r["stages"]

            def stage(c):
                names = [n for n in st if n == c or n.startswith(c + "[")]
                if not names:
                    return f"{'-':>10s}"
                mark = "*" if any(n in r.get("shared", {}) for n in names) else " "
                return f"{sum(st[n] for n in names):9.3f}{mark}"

            if "rel_vs_default" in r:
                chk = "bit" if r["bitwise_vs_default"] else f"{max(r['rel_vs_default'].values()):.1e}"
                chk = ("ok " if r["ok"] else "FAIL ") + chk
                if "deterministic" in r:
                    chk += " det" if r["deterministic"] else " NONDET"
            else:
                chk = "-"
            other = [n for n in st if not any(n == c or n.startswith(c + "[") for c in STAGE_COLS)]
            extra = ("  + " + ", ".join(f"{n} {st[n]:.3f}" for n in other)) if other else ""
            log(f"{lead} {fmt(r.get('fwd_ms'), '7.2f')} {fmt(r.get('fwdbwd_ms'), '8.2f')} "
                f"{fmt(r.get('bwd_sum_ms'), '8.2f')} " + " ".join(stage(c) for c in STAGE_COLS) + f"  {chk}{extra}")
    if RESULTS["errors"]:
        log(f"\n{len(RESULTS['errors'])} errors (see above / JSON)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="65536,8192", help="comma-separated sequence lengths, in run order")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats at T >= 32768")
    ap.add_argument("--reps-small", type=int, default=10, help="timed repeats below")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds after which no new case is started")
    ap.add_argument("--hopper", action="store_true", help="compile every kernel config for sm_90 (no GPU) and exit")
    ap.add_argument("--dims", default=None, help="HQ,H,D instead of 64,4,128 (smoke tests of this script)")
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n] or None
    if args.dims:
        global HQ, H, D
        HQ, H, D = (int(x) for x in args.dims.split(","))
    try:
        if args.hopper:
            run_hopper(names)
            return
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax
        import triton

        RESULTS["env"] = {"jax": jax.__version__, "triton": triton.__version__, "devices": str(jax.devices()),
                          "argv": sys.argv}
        log(RESULTS["env"])
        run_sweep([int(t) for t in args.T.split(",") if t], names, args.reps, args.reps_small, args.budget)
    except Exception as e:
        record_error(RESULTS, "main", e)
    finally:
        RESULTS["wall_s"] = time.time() - T0
        write_json(RESULTS, "sweep_selection.json")
        summary()
        log(f"\nwall {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
