"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Device time is scarce; compile errors, shared-memory overflow, register spills and
whether the dots became wgmma are all visible at compile time. `compile_for_hopper`
compiles one kernel configuration with Triton's own compiler (ptxas included in the
wheel) and reports what the GPU machine would see at launch:

    from tools.hopper_compile import compile_for_hopper
    r = compile_for_hopper(kernel, {"q": "*bf16", "T": "i32", ...}, {"BT": 64, ...}, num_warps=4, num_stages=2)
    print(r)  # {'shared': ..., 'registers': ..., 'spill': ..., 'wgmma': True, ...}

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
