"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Device time is scarce; compile errors, shared-memory overflow, register spills and
whether the dots became wgmma are all visible at compile time. `compile_for_hopper`
compiles one kernel configuration with Triton's own compiler (ptxas included in the
wheel) and reports what the GPU machine would see at launch:

    from tools.hopper_compile import compile_for_hopper
    r = compile_for_hopper(kernel, {"q": "*bf16", "T": "i32", ...}, {"BT": 64, ...}, num_warps=4, num_stages=2)
    print(r)  # {'shared': ..., 'registers': ..., 'spill': ..., 'wgmma': True, ...}

    python tools/hopper_compile.py    # every kernel of the NSA forward and backward, a few shapes

Signature strings are Triton's: "*bf16", "*fp16", "*fp32", "*i32", "*i64", "i32", "i64",
"fp32", and "constexpr" for constexpr parameters (their values in `constexprs`). The
Triton here (3.9) is newer than the GPU machine's (3.6): treat results as a strong
hint, not a proof.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes a Hopper block may use (227 KiB)


def _unwrap(kernel):
    # Autotuner/Heuristics wrap the JITFunction in .fn
    while not isinstance(kernel, triton.runtime.JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key, pat in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("local", r"LOCAL:(\d+)")):
        m = re.search(pat, out)
        usage[key] = int(m.group(1)) if m else None
    return usage


def compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 2) -> dict:
    fn = _unwrap(kernel)
    sig = {name: signature.get(name, "constexpr" if name in constexprs else None) for name in fn.arg_names}
    missing = [n for n, t in sig.items() if t is None]
    if missing:
        raise ValueError(f"signature lacks types for {missing}")
    # jax_triton declares every array argument 16-byte aligned (tt.divisibility 16);
    # without the same hint Triton cannot use async copies and pipelines no loads, and
    # the report (shared memory above all) would not be what the GPU sees.
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if str(sig[n]).startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    ck = triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = ck.asm["ptx"]
    usage = _resource_usage(ck.asm["cubin"])
    return {
        "kernel": fn.__name__,
        "shared": ck.metadata.shared,
        "shared_ok": ck.metadata.shared <= SHARED_LIMIT,
        "registers": usage["registers"],
        # register spills live in local memory and on the stack
        "spill": (usage["local"] or 0) + (usage["stack"] or 0),
        "wgmma": "wgmma" in ptx,
        "mma": "mma.sync" in ptx,
        # loads the software pipeliner turned into cp.async copies into shared memory
        "async_copies": ck.asm.get("ttgir", "").count("async_copy_global_to_local"),
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


# --------------------------------------------------------------------------------------
# Every kernel of a whole NSA call, compiled for sm_90 on this machine
# --------------------------------------------------------------------------------------

_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int8": "i8", "int16": "i16",
                 "int32": "i32", "int64": "i64", "bool": "i1"}


def _arg_type(a) -> str:
    import numpy as np

    if isinstance(a, np.floating):  # a NumPy scalar has a shape and a dtype too
        return "fp32"
    if hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, np.generic):
        return "*" + _TRITON_TYPES[np.dtype(a.dtype).name]
    if isinstance(a, (bool, np.bool_)):
        return "i1"
    if isinstance(a, (int, np.integer)):
        return "i32" if -(2**31) <= int(a) < 2**31 else "i64"
    return "fp32"


def compile_launches(fn, *args):
    """Traces fn(*args) (jax.eval_shape: nothing runs) with every ejnsa kernel launch
    replaced by a compilation for sm_90; returns the reports, one per distinct launch."""
    import jax
    import jax.numpy as jnp

    from ejnsa.triton import _call

    reports, seen = [], set()

    def compile_instead(kernel, args, structs, grid, num_warps, num_stages, name, constexprs):
        base = _call._base_kernel(kernel)
        names = base.arg_names
        params = [n for n in names if n not in constexprs]
        sig = {n: _arg_type(a) for n, a in zip(params, list(args) + list(structs))}
        key = (name, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               num_warps, num_stages)
        if key not in seen:
            seen.add(key)
            try:
                r = compile_for_hopper(base, sig, dict(constexprs), num_warps=num_warps or 4, num_stages=num_stages or 2)
            except Exception as e:  # report and go on: one failure must not hide the others
                r = {"kernel": base.fn.__name__, "error": f"{type(e).__name__}: ...{str(e)[-700:]}"}
            r["name"] = name
            reports.append(r)
        return tuple(jnp.zeros(s.shape, s.dtype) for s in structs)

    saved = _call._gpu_call, _call.gpu_available
    _call._gpu_call, _call.gpu_available = compile_instead, lambda: True
    try:
        jax.eval_shape(fn, *args)
    finally:
        _call._gpu_call, _call.gpu_available = saved
    return reports


def _main():
    """Compiles every kernel of the NSA forward and backward at a few shapes and prints a
    table (shared memory, registers, spills, wgmma): python tools/hopper_compile.py"""
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: compilation needs @triton.jit kernels, not interpreted ones")
    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--T", type=int, default=4096)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp

    import ejnsa

    cases = [  # (label, dtype, HQ, H, D, packed)
        ("bf16 G16 D128", jnp.bfloat16, 64, 4, 128, False),
        ("bf16 G16 D128 packed", jnp.bfloat16, 64, 4, 128, True),
        ("fp32 G16 D128", jnp.float32, 64, 4, 128, False),
        ("bf16 G4 D64", jnp.bfloat16, 16, 4, 64, False),
    ]
    failed = 0
    for label, dt, HQ, H, D, packed in cases:
        T = a.T
        q = jax.ShapeDtypeStruct((1, T, HQ, D), dt)
        k = jax.ShapeDtypeStruct((1, T, H, D), dt)
        g = jax.ShapeDtypeStruct((1, T, HQ), dt)
        cu = jnp.array([0, T // 3, T], jnp.int32) if packed else None

        def loss(q, k, v, g1, g2, g3):
            o = ejnsa.native_sparse_attention(q, k, v, g1, g2, g3, block_counts=16, block_size=64, window_size=512,
                                              cu_seqlens=cu, platform="triton")
            return jnp.sum(o.astype(jnp.float32))

        reports = compile_launches(jax.grad(loss, argnums=tuple(range(6))), q, k, k, g, g, g)
        print(f"\n{label} (T={T})")
        for r in reports:
            if "error" in r:
                failed += 1
                print(f"  {r['name']:34s} ERROR {r['error']}")
            else:
                print(f"  {r['name']:34s} shared {r['shared'] / 1024:6.1f} KiB{'' if r['shared_ok'] else ' (OVER)'}"
                      f"  regs {r['registers']}  spill {r['spill']}  wgmma {r['wgmma']}  async {r['async_copies']}"
                      f"  warps {r['num_warps']} stages {r['num_stages']}")
                failed += not r["shared_ok"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    _main()
