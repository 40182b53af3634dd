"""Launching Triton kernels from JAX: the one place in ejnsa that does it.

Every Triton kernel of ejnsa is launched through `triton_call`, whose contract is that of
`jax_triton.triton_call` (0.3.1). Keeping the launch in one module means the quirks of
jax_triton, and the CPU bridge to Triton's interpreter, are handled once, and a kernel that
passes the CPU tests is launched on the GPU with exactly the same arguments.

Where a kernel runs
-------------------
1. A real GPU. When JAX's default backend is a GPU (`jax.default_backend()` in
   {"gpu", "cuda", "rocm"}) and jax_triton imports, the call goes to
   `jax_triton.triton_call`. The default backend decides, not the devices of the inputs:
   under `jit` the inputs are tracers without devices, and the default backend is where a
   jitted computation runs unless the caller says otherwise.
2. Triton's interpreter, on the CPU. When `TRITON_INTERPRET=1` was set before the kernels
   were decorated, `@triton.jit` returns `InterpretedFunction` objects, which no compiler
   can take. `triton_call` then runs the same kernel, launch by launch, through Triton's
   interpreter on NumPy buffers inside a host callback (`jax.pure_callback`; inside a
   partitioned operation, `ejnsa.triton._host`'s dispatcher), so `jit`, `custom_vjp`,
   `eval_shape` and sharded inputs behave as on the GPU. This path is chosen whenever the kernel object is an
   `InterpretedFunction`, even if a GPU is present (jax_triton cannot compile it).
3. Anywhere else (no GPU and interpreter off, or a compiled `JITFunction` on a machine
   without a GPU) the call raises the `RuntimeError` of `require_triton`, which says why
   and what to do.

`gpu_available`, `interpreter_enabled` and `triton_runnable` answer these questions for
callers choosing a platform; `require_triton` raises the error. None of them does anything
at import: JAX's backend is queried, and triton and jax_triton imported, on first use.
jax_triton refuses to import without a GPU, and it sets `TRITON_CACHE_DIR=""` when
imported, which breaks every other Triton user in the process (Triton then cannot find a
cache directory); this module imports it once, lazily, and puts the variable back.

Contract for kernel writers
---------------------------
- Positional `args` are jax arrays (each becomes a pointer) or scalars, in the order of
  the kernel's parameters; then one pointer per `out_shape` entry, in order. Keyword
  arguments are constexprs: every keyword must name a parameter annotated `tl.constexpr`,
  and every positional argument must land on a parameter that is not. This is checked at
  trace time on both paths, because jax_triton and the interpreter disagree on what
  happens otherwise.
- Scalars: Python/NumPy ints arrive as `i32` when they fit in int32, else `i64` (Triton's
  rule, both paths); cast with `.to(tl.int64)` before multiplying by strides. Bools arrive
  as `i1`. Floats (Python or NumPy) arrive as `fp32` on both paths (jax_triton would pass a
  Python float as fp64). A 0-d jax array is an array: it arrives as a pointer.
- Arrays arrive as pointers to C-contiguous buffers of their dtype. bfloat16 arrives as
  `*bf16` (JAX's `ml_dtypes.bfloat16`); int64 arrays need `jax_enable_x64`, and an int64
  `out_shape` without it is refused (JAX would silently make the buffer int32).
- Outputs are NOT zeroed: on the GPU they hold whatever was in memory, and on the
  interpreter they start poisoned (NaN for floats, the dtype's minimum for signed ints, its
  maximum for unsigned ints, True for bool), so an element a kernel forgets to write shows
  up in the CPU tests. A launch with an empty grid writes nothing and returns poison.
- Inputs are read-only. The interpreter runs on private copies of the inputs and raises
  if a kernel wrote to one (on the GPU that would corrupt a buffer JAX still owns).
- `grid` is a tuple of up to three Python ints (or an int), or a callable taking the dict
  of constexprs and returning one. It is evaluated here, at trace time; tracers are
  refused. CUDA's limits apply on both paths: axis 0 < 2**31, axes 1 and 2 <= 65535.
- `num_warps` (a power of two) and `num_stages` go to the compiler; the interpreter
  ignores them.
- No gradients and no batching. jax_triton can neither differentiate nor vmap a kernel
  call, so the interpreter path refuses too (vmap raises NotImplementedError here rather
  than silently looping, which would let a CPU test pass that fails on the GPU). Wrap
  kernels in `jax.custom_vjp` (and `jax.custom_batching.custom_vmap` to batch).
- `triton.heuristics` kernels work on both paths; `triton.autotune` kernels only on the
  GPU (the interpreter path refuses them: ejnsa keeps tile sizes in dataclasses instead).

Interpreter quirks (Triton 3.x) that kernels must respect
---------------------------------------------------------
- bfloat16. The interpreter stores bf16 as uint16 bits and, left alone, does arithmetic
  on the bits: `tl.dot` on bf16 operands, `x * 0.5` on a bf16 `x` (implicit promotion
  against a Python float), bf16 comparisons and int -> bf16 casts give garbage, and
  fp32 -> bf16 casts truncate where the GPU rounds to nearest even. This bridge repairs
  dot, casts, elementwise arithmetic and fma during its launches (see `_faithful_bf16`),
  so bf16 `tl.dot` with a float32 accumulator, the fast path on tensor cores, is checked
  exactly; `tl.sum` and `tl.argmax`/`tl.argmin` of bf16 are repaired too, scans
  (`tl.cumsum`) are not. Rule for kernel writers: cast loads to float32
  explicitly (`tl.load(p).to(tl.float32)`), do softmax, scaling and reductions in
  float32, and keep bf16 only for `tl.dot` operands and stores.
- `tl.dot` ignores `input_precision` in the interpreter: fp32 operands are multiplied in
  full fp32, while the GPU's default for fp32 dots is TF32 (10-bit mantissa). CPU tests
  cannot see TF32 error; pass `input_precision="ieee"` where fp32 accuracy matters.
- The interpreter is a NumPy program: one Python loop iteration per program of the grid.
  Keep CPU test sizes small. Launches are serialised by a lock, because the interpreter
  patches `triton.language` globally while a kernel runs.
- An unmasked out-of-bounds load or store reads or writes raw host memory, exactly as on
  the GPU; it may crash the process instead of raising.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._host import host_call

__all__ = [
    "gpu_available",
    "interpreter_enabled",
    "require_triton",
    "triton_call",
    "triton_runnable",
]

# JAX backend names under which jax_triton can compile and launch a kernel.
_GPU_BACKENDS = frozenset({"gpu", "cuda", "rocm"})

# CUDA's grid limits (x, y, z). Checked on the CPU too, so that a launcher putting a large
# extent on axis 1 fails in CI rather than on the first long sequence on a GPU.
_MAX_GRID = (2**31 - 1, 65535, 65535)

# jax_triton.triton_call's own keyword options. A constexpr with one of these names would
# be taken as the option on the GPU and as a constexpr on the interpreter: refuse it.
_JAX_TRITON_OPTIONS = frozenset({
    "custom_call_target_name", "num_ctas", "compute_capability", "enable_fp_fusion",
    "input_output_aliases", "zeroed_outputs", "debug", "serialized_metadata",
})

# Array dtypes both paths understand, by NumPy name, with the Triton dtype each maps to
# (the same table as jax_triton's, so a kernel sees the same pointer type on both paths).
_TRITON_DTYPE_NAMES = {
    "bool": "int1",
    "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64",
    "float8_e4m3fn": "float8e4nv", "float8_e5m2": "float8e5",
    "float8_e4m3fnuz": "float8e4b8", "float8_e5m2fnuz": "float8e5b16",
}

# --------------------------------------------------------------------------------------
# Where can a kernel run?
# --------------------------------------------------------------------------------------


def _import_triton():
    """Returns the triton module, or None when it is not installed (the XLA path needs none)."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def _jax_backend() -> str:
    try:
        return jax.default_backend()
    except RuntimeError:  # no backend could be initialised at all
        return "none"


_jax_triton_lock = threading.Lock()
_jax_triton_result: list[tuple[Any, str | None]] = []  # one (module or None, why not) once tried


def _load_jax_triton() -> tuple[Any, str | None]:
    """Imports jax_triton once, restoring TRITON_CACHE_DIR; returns (module or None, reason).

    jax_triton 0.3.1 assigns `os.environ["TRITON_CACHE_DIR"] = ""` at import, after which any
    other Triton compilation in the process fails to locate its cache directory. The value is
    put back (or the variable removed) whether or not the import succeeds.
    """
    with _jax_triton_lock:
        if not _jax_triton_result:
            saved = os.environ.get("TRITON_CACHE_DIR")
            try:
                import jax_triton

                result = (jax_triton, None)
            except Exception as e:  # jax_triton raises ImportError without a GPU; be broad
                result = (None, f"jax_triton does not import ({type(e).__name__}: {e})")
            finally:
                if saved is None:
                    os.environ.pop("TRITON_CACHE_DIR", None)
                else:
                    os.environ["TRITON_CACHE_DIR"] = saved
            _jax_triton_result.append(result)
        return _jax_triton_result[0]


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on (`TRITON_INTERPRET=1`).

    `@triton.jit` reads the setting when a kernel is decorated, so it must be set before
    ejnsa (which decorates its kernels at import) is imported; `triton_call` checks the
    kernel objects themselves and says so when the order was wrong.
    """
    triton = _import_triton()
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def gpu_available() -> bool:
    """True when JAX's default backend is a GPU and jax_triton imports (compiled kernels run).

    Queries JAX's backend (initialising it) and, on a GPU, imports jax_triton, on first call.
    """
    if _jax_backend() not in _GPU_BACKENDS:
        return False
    return _load_jax_triton()[0] is not None


def triton_runnable() -> bool:
    """True when a Triton kernel can run here: compiled on a GPU, or through the interpreter."""
    return gpu_available() or interpreter_enabled()


def _why_not_runnable() -> str:
    reasons = []
    if _import_triton() is None:
        reasons.append("triton is not installed")
    backend = _jax_backend()
    if backend in _GPU_BACKENDS:
        module, why = _load_jax_triton()
        if module is None:
            reasons.append(why)
    else:
        reasons.append(f"JAX's default backend is {backend!r}, not a GPU")
    if not interpreter_enabled():
        reasons.append("Triton's interpreter is off (TRITON_INTERPRET is not set to 1)")
    return "; ".join(reasons)


_HOW_TO_FIX = (
    "To run Triton kernels, either install jax-triton (with triton) on a machine whose JAX "
    "backend is a CUDA GPU, or set the environment variable TRITON_INTERPRET=1 before "
    "importing ejnsa (and triton) to run the very same kernels on the CPU through Triton's "
    "interpreter (slow: for tests). Otherwise use platform='xla'."
)


def require_triton(what: str) -> None:
    """Raises a RuntimeError naming `what` unless a Triton kernel can run here.

    The message says why Triton cannot run (no GPU backend, jax_triton missing, interpreter
    off) and what to do about it. Returns None when `triton_runnable()`.
    """
    if triton_runnable():
        return
    raise RuntimeError(
        f"{what} needs Triton, which cannot run here: {_why_not_runnable()}. {_HOW_TO_FIX}"
    )


# --------------------------------------------------------------------------------------
# Argument handling shared by both paths
# --------------------------------------------------------------------------------------


@functools.cache
def _kernel_types():
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without an interpreter
        InterpretedFunction = ()
    return Autotuner, Heuristics, JITFunction, InterpretedFunction


def _base_kernel(kernel):
    """Follows `triton.heuristics` / `triton.autotune` wrappers down to the decorated kernel."""
    Autotuner, Heuristics, _, _ = _kernel_types()
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def _kernel_name(base) -> str:
    fn = getattr(base, "fn", None)
    return getattr(fn, "__name__", None) or repr(base)


def _is_constexpr_annotation(annotation) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):  # `from __future__ import annotations` in the kernel file
        return annotation.strip().split(".")[-1] == "constexpr"
    return getattr(annotation, "__name__", None) == "constexpr"


def _check_signature(base, n_positional: int, keywords: Sequence[str], label: str) -> None:
    """Positional arguments must meet runtime parameters and keywords constexpr ones.

    jax_triton binds scalars by position and constexprs by name, while the interpreter
    decides by annotation; checking both rules here makes a mismatch a clear TypeError on
    the CPU instead of a different kernel on the GPU.
    """
    fn = getattr(base, "fn", None)
    if fn is None:
        return
    signature = inspect.signature(fn)
    try:
        bound = signature.bind(*range(n_positional), **{k: None for k in keywords})
    except TypeError as e:
        raise TypeError(
            f"{label}: kernel {fn.__name__}{signature} cannot take {n_positional} positional "
            f"arguments (inputs, then one pointer per output) and the constexprs "
            f"{sorted(keywords)}: {e}"
        ) from None
    params = signature.parameters
    for pname, value in bound.arguments.items():
        is_constexpr = _is_constexpr_annotation(params[pname].annotation)
        if pname in keywords and not is_constexpr:
            raise TypeError(
                f"{label}: keyword {pname!r} of kernel {fn.__name__} is not annotated "
                f"`tl.constexpr`; keywords are passed as constexprs, so annotate it "
                f"`{pname}: tl.constexpr` or pass it positionally"
            )
        if pname not in keywords and is_constexpr:
            raise TypeError(
                f"{label}: parameter {pname!r} of kernel {fn.__name__} is a tl.constexpr but "
                f"received positional argument {value}; pass constexprs by keyword"
            )


def _check_array_dtype(dtype, what: str, label: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.name not in _TRITON_DTYPE_NAMES:
        raise TypeError(
            f"{label}: {what} has dtype {dtype}, which Triton kernels cannot take; expected "
            f"one of {sorted(_TRITON_DTYPE_NAMES)}"
        )
    return dtype


def _normalize_arg(arg, index: int, label: str):
    """Scalars to bool / int / np.float32 (see the module docstring); arrays unchanged."""
    if isinstance(arg, (bool, np.bool_)):
        return bool(arg)
    if isinstance(arg, (int, np.integer)):
        value = int(arg)
        if not -(2**63) <= value < 2**64:
            raise ValueError(f"{label}: integer argument {index} = {value} does not fit in 64 bits")
        return value
    if isinstance(arg, (float, np.floating)):
        # jax_triton passes a Python float as fp64; every float scalar is fp32 on both paths.
        return np.float32(arg)
    if isinstance(arg, (jax.Array, np.ndarray)) or (hasattr(arg, "shape") and hasattr(arg, "dtype")):
        _check_array_dtype(arg.dtype, f"argument {index}", label)
        return arg
    raise TypeError(
        f"{label}: argument {index} must be a jax array or a bool/int/float scalar, "
        f"got {type(arg).__name__}"
    )


def _is_array(arg) -> bool:
    return not isinstance(arg, (bool, int, np.float32))


def _normalize_out_shape(out_shape, label: str) -> tuple[tuple[jax.ShapeDtypeStruct, ...], bool]:
    """Returns (structs, single): `single` when one struct (not a sequence) was given."""
    single = hasattr(out_shape, "shape") and hasattr(out_shape, "dtype")
    entries = [out_shape] if single else list(out_shape)
    if not entries:
        raise ValueError(f"{label}: out_shape must name at least one output, got {out_shape!r}")
    structs = []
    for i, entry in enumerate(entries):
        if not (hasattr(entry, "shape") and hasattr(entry, "dtype")):
            raise TypeError(f"{label}: out_shape[{i}] must be a jax.ShapeDtypeStruct, got {entry!r}")
        shape = tuple(entry.shape)
        if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            raise ValueError(
                f"{label}: out_shape[{i}] must have a static shape of ints >= 0, got {shape}"
            )
        dtype = _check_array_dtype(entry.dtype, f"out_shape[{i}]", label)
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            # JAX would hand back a narrower buffer than the kernel writes into.
            raise TypeError(
                f"{label}: out_shape[{i}] has dtype {dtype}, which JAX stores as "
                f"{jax.dtypes.canonicalize_dtype(dtype)} unless jax_enable_x64 is on"
            )
        structs.append(jax.ShapeDtypeStruct(tuple(int(d) for d in shape), dtype))
    return tuple(structs), single


def _resolve_grid(grid, meta: Mapping[str, Any], label: str) -> tuple[int, int, int]:
    if callable(grid):
        grid = grid(dict(meta))
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid = (grid,)
    try:
        grid = tuple(grid)
    except TypeError:
        raise TypeError(
            f"{label}: grid must be a tuple of up to 3 ints (or a callable returning one), got {grid!r}"
        ) from None
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{label}: grid must have 1 to 3 dimensions, got {grid}")
    for axis, extent in enumerate(grid):
        if isinstance(extent, bool) or not isinstance(extent, (int, np.integer)):
            raise TypeError(
                f"{label}: grid must hold Python ints computed from static shapes (no traced "
                f"values), got {grid}"
            )
        if not 0 <= extent <= _MAX_GRID[axis]:
            raise ValueError(f"{label}: grid axis {axis} must be in [0, {_MAX_GRID[axis]}], got {grid}")
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


def _check_launch_options(num_warps, num_stages, label: str) -> None:
    if num_warps is not None and (
        isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps < 1
        or num_warps & (num_warps - 1)
    ):
        raise ValueError(f"{label}: num_warps must be a power of two >= 1, got {num_warps!r}")
    if num_stages is not None and (
        isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1
    ):
        raise ValueError(f"{label}: num_stages must be an int >= 1, got {num_stages!r}")


def _poison_value(dtype: np.dtype):
    """What an output element holds until a kernel writes it (interpreter path)."""
    if dtype == np.bool_:
        return True
    if np.issubdtype(dtype, np.signedinteger):
        return np.iinfo(dtype).min
    if np.issubdtype(dtype, np.unsignedinteger):
        return np.iinfo(dtype).max
    return np.nan


# --------------------------------------------------------------------------------------
# The public launcher
# --------------------------------------------------------------------------------------


def triton_call(
    *args: Any,
    kernel: Any,
    out_shape: Any,
    grid: Any,
    num_warps: int | None = None,
    num_stages: int | None = None,
    name: str = "",
    **constexprs: Any,
) -> Any:
    """Launches a Triton kernel on jax arrays; the contract of `jax_triton.triton_call` (0.3.1).

    Args:
      *args: the kernel's inputs, in the order of its parameters: jax arrays (passed as
        pointers to C-contiguous buffers) or bool/int/float scalars (see the module
        docstring for their Triton types).
      kernel: a `@triton.jit` function, possibly wrapped by `triton.heuristics` (or by
        `triton.autotune`, GPU only).
      out_shape: a `jax.ShapeDtypeStruct` or a sequence of them. One pointer per output is
        appended after `args`, in order.
      grid: up to three Python ints, or a callable of the dict of constexprs returning them.
      num_warps, num_stages: compiler options (ignored by the interpreter).
      name: a label for error messages and jax_triton's custom call.
      **constexprs: the kernel's `tl.constexpr` parameters, by name.

    Returns:
      One array when `out_shape` is a single struct, else a tuple of arrays. Works under
      `jax.jit`, in `jax.custom_vjp` rules and on abstract inputs; adds no gradient and no
      batching rule.

    Raises:
      RuntimeError: Triton cannot run here (see `require_triton`), or the interpreter failed.
      TypeError, ValueError: arguments that the kernel or a launch cannot take.
    """
    if _import_triton() is None:
        raise RuntimeError(
            f"triton_call({name or 'kernel'}) needs Triton, which is not installed. {_HOW_TO_FIX}"
        )
    Autotuner, Heuristics, JITFunction, InterpretedFunction = _kernel_types()
    base = _base_kernel(kernel)
    label = f"triton_call({name or _kernel_name(base)})"
    if not isinstance(base, (JITFunction, InterpretedFunction)):
        raise TypeError(f"{label}: kernel must be a @triton.jit function, got {type(kernel).__name__}")

    structs, single = _normalize_out_shape(out_shape, label)
    _check_launch_options(num_warps, num_stages, label)
    args = tuple(_normalize_arg(a, i, label) for i, a in enumerate(args))
    clashes = sorted(_JAX_TRITON_OPTIONS.intersection(constexprs))
    if clashes:
        raise TypeError(
            f"{label}: constexprs {clashes} share a name with jax_triton options; rename them"
        )

    autotuned = isinstance(kernel, Autotuner)
    heuristic_names = _heuristic_names(kernel)
    if not autotuned:  # an autotuner's configs supply constexprs we cannot see here
        _check_signature(base, len(args) + len(structs), [*constexprs, *heuristic_names], label)

    interpreted = bool(InterpretedFunction) and isinstance(base, InterpretedFunction)
    if not interpreted and not gpu_available():
        if interpreter_enabled():
            raise RuntimeError(
                f"{label}: Triton's interpreter is on, but kernel {_kernel_name(base)} was "
                f"decorated with @triton.jit before TRITON_INTERPRET=1 was set, so it is a "
                f"compiled kernel and there is no GPU. Set TRITON_INTERPRET=1 before importing "
                f"ejnsa (and triton)."
            )
        require_triton(label)
    if interpreted and autotuned:
        raise NotImplementedError(
            f"{label}: triton.autotune kernels cannot run through Triton's interpreter here; "
            f"pick the configuration explicitly"
        )

    # The grid callable sees the constexprs plus what heuristics compute, as in jax_triton.
    # An autotuner's grid may depend on its configs: jax_triton evaluates that one itself.
    meta = {**constexprs, **_heuristic_values(kernel, base, args, structs, constexprs)}
    grid3 = grid if (autotuned and callable(grid)) else _resolve_grid(grid, meta, label)
    if not callable(grid3) and 0 in grid3:
        outs = _poisoned(structs)
    elif interpreted:
        outs = _interpreter_call(base, args, structs, grid3, meta, label)
    else:  # jax_triton evaluates the heuristics again itself: pass only the caller's constexprs
        outs = _gpu_call(kernel, args, structs, grid3, num_warps, num_stages, name, constexprs)
    return outs[0] if single else tuple(outs)


def _poisoned(structs) -> tuple[jax.Array, ...]:
    # A launch over an empty grid writes nothing (and a zero-block CUDA launch is an error).
    return tuple(jnp.full(s.shape, _poison_value(s.dtype), s.dtype) for s in structs)


def _heuristic_names(kernel) -> list[str]:
    """The constexprs that `triton.heuristics` wrappers of `kernel` compute."""
    Autotuner, Heuristics, _, _ = _kernel_types()
    names = []
    while isinstance(kernel, (Autotuner, Heuristics)):
        if isinstance(kernel, Heuristics):
            names.extend(kernel.values)
        kernel = kernel.fn
    return names


def _heuristic_values(kernel, base, args, structs, meta) -> dict[str, Any]:
    """Evaluates `triton.heuristics` like jax_triton does: arrays are seen as (shape, dtype)."""
    _, Heuristics, _, _ = _kernel_types()
    if not isinstance(kernel, Heuristics):
        return {}
    named = [jax.ShapeDtypeStruct(a.shape, a.dtype) if _is_array(a) else a for a in args]
    named += list(structs)
    named_args = dict(zip(base.arg_names, named))
    values = {}
    while isinstance(kernel, Heuristics):
        for key, heuristic in kernel.values.items():
            values[key] = heuristic({**named_args, **meta, **values})
        kernel = kernel.fn
    return values


# --------------------------------------------------------------------------------------
# GPU: jax_triton
# --------------------------------------------------------------------------------------


def _gpu_call(kernel, args, structs, grid, num_warps, num_stages, name, constexprs):
    jax_triton, _ = _load_jax_triton()
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if num_stages is not None:
        options["num_stages"] = num_stages
    outs = jax_triton.triton_call(
        *args, kernel=kernel, out_shape=tuple(structs), grid=grid, name=name, **options, **constexprs
    )
    return tuple(outs)


# --------------------------------------------------------------------------------------
# CPU: Triton's interpreter inside jax.pure_callback
# --------------------------------------------------------------------------------------

# The interpreter swaps `triton.language` builtins for NumPy versions while a kernel runs
# (process-wide), so two launches must never overlap; XLA may run callbacks on any thread.
_interpreter_lock = threading.Lock()


class _HostPointer:
    """A NumPy buffer dressed as the torch-like tensor the interpreter expects.

    The interpreter turns any argument with `data_ptr()` into a pointer, and types it from
    `dtype` through `triton.runtime.jit.mangle_type`, which accepts Triton dtypes. The
    object keeps its array alive for as long as the launch holds it.
    """

    __slots__ = ("array", "dtype")

    def __init__(self, array: np.ndarray, triton_dtype):
        self.array = array
        self.dtype = triton_dtype

    def data_ptr(self) -> int:
        return self.array.ctypes.data


@functools.cache
def _host_executor_class():
    """A GridExecutor whose host-copy hooks pass the buffers through: they live on the host.

    The stock hooks copy device tensors to host storage via torch's `untyped_storage()`
    and back after the launch; NumPy buffers need neither.
    """
    from triton.runtime import interpreter

    base = interpreter.GridExecutor
    if not (hasattr(base, "_init_args_hst") and hasattr(base, "_restore_args_dev")):
        raise RuntimeError(
            "this Triton version's interpreter has no GridExecutor._init_args_hst / "
            "_restore_args_dev hooks, which ejnsa's CPU bridge relies on; use the Triton "
            "version pinned by ejnsa, or run on a GPU"
        )

    class _HostGridExecutor(base):
        def _init_args_hst(self, args_dev, kwargs):
            return list(args_dev), dict(kwargs)

        def _restore_args_dev(self, args_dev, args_hst, kwargs, kwargs_hst):
            return None

    return _HostGridExecutor


def _triton_dtype(dtype: np.dtype):
    import triton.language as tl

    return getattr(tl, _TRITON_DTYPE_NAMES[np.dtype(dtype).name])


def _fp32_scalar(value: np.float32):
    """An fp32 scalar as the interpreter represents one, matching the GPU path's `fp32`.

    Left a Python float, the interpreter would treat it as a literal, with the wrong
    promotion against bf16 tensors (see the module docstring).
    """
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    return tl.tensor(TensorHandle(np.array([value], dtype=np.float32), tl.float32), tl.float32)


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    # ml_dtypes rounds to nearest even, as the GPU's cvt.rn.bf16.f32 does.
    import ml_dtypes

    return np.asarray(values, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


@contextlib.contextmanager
def _faithful_bf16():
    """Makes the interpreter compute with bfloat16 as the GPU does, for one launch.

    Triton's interpreter (3.x) stores bf16 tensors as uint16 bit patterns and then hands
    those bits to NumPy as if they were numbers: `tl.dot` on bf16 operands, bf16
    arithmetic (`x * 0.5`), comparisons of negative bf16 values and int/fp64 -> bf16 casts
    give garbage, and fp32 -> bf16 casts truncate where the GPU rounds to nearest even.
    Fast kernels feed bf16 straight to `tl.dot` (tensor cores), so without this the CPU
    could not check the kernels the GPU runs. For the launch only (under the interpreter
    lock), the builder's dot, cast, elementwise and fma methods, and the `tl.sum` and
    argmin/argmax reductions, are wrapped to decode bf16 to float32, compute, and round
    results back to bf16 (nearest even). (`tl.max`/`tl.min` upcast bf16 themselves.)
    Scans (`tl.cumsum`) are not repaired. On a Triton whose interpreter lacks these
    methods the launch runs unpatched.
    """
    from triton.runtime import interpreter

    import triton.language as tl

    builder = getattr(interpreter, "interpreter_builder", None)
    TensorHandle = getattr(interpreter, "TensorHandle", None)
    ReduceOps = getattr(interpreter, "ReduceOps", None)
    names = ("cast_impl", "binary_op", "unary_op", "ternary_op", "create_fma", "create_dot")
    reduce_names = ("sum", "min_max")
    if (builder is None or TensorHandle is None or ReduceOps is None
            or not all(hasattr(builder, n) for n in names)
            or not all(hasattr(ReduceOps, n) for n in reduce_names)):
        yield
        return
    original = {n: getattr(builder, n) for n in names}
    original_reduce = {n: ReduceOps.__dict__[n] for n in reduce_names}

    def is_bf16(handle) -> bool:
        return getattr(handle.dtype, "scalar", handle.dtype) == tl.bfloat16

    def as_f32(handle) -> np.ndarray:
        return _bf16_bits_to_f32(handle.data) if is_bf16(handle) else handle.data

    def back(values: np.ndarray, dtype):
        """A result as the interpreter stores it: floats as bf16 bits, comparisons as int1."""
        if np.issubdtype(values.dtype, np.floating):
            return TensorHandle(_f32_to_bf16_bits(values), dtype)
        return TensorHandle(values, tl.int1 if values.dtype == np.bool_ else dtype)

    def cast_impl(src, dst_type):
        dst = getattr(dst_type, "scalar", dst_type)
        if not (is_bf16(src) or dst == tl.bfloat16):
            return original["cast_impl"](src, dst_type)
        values = as_f32(src)
        if dst == tl.bfloat16:
            return TensorHandle(_f32_to_bf16_bits(values.astype(np.float32)), dst)
        return TensorHandle(values.astype(interpreter._get_np_dtype(dst)), dst)

    def binary_op(lhs, rhs, op):
        if not is_bf16(lhs):  # operands share a type after Triton's promotion
            return original["binary_op"](lhs, rhs, op)
        return back(op(as_f32(lhs), as_f32(rhs)), lhs.dtype.scalar)

    def unary_op(arg, op):
        if not is_bf16(arg):
            return original["unary_op"](arg, op)
        return back(op(as_f32(arg)), arg.dtype.scalar)

    def ternary_op(lhs, rhs, other, op):
        if not is_bf16(other):  # where(cond, a, b) and clamp(x, lo, hi): the value type
            return original["ternary_op"](lhs, rhs, other, op)
        return back(op(as_f32(lhs), as_f32(rhs), as_f32(other)), other.dtype.scalar)

    def create_fma(x, y, z):
        if not any(map(is_bf16, (x, y, z))):
            return original["create_fma"](x, y, z)
        product = np.multiply(as_f32(x), as_f32(y), dtype=np.float64)  # exact
        return back(np.add(product, as_f32(z), dtype=np.float64).astype(np.float32), z.dtype.scalar)

    def create_dot(a, b, d, *rest):
        # bf16 products are exact in float32, which tensor cores accumulate in.
        if not any(map(is_bf16, (a, b, d))):
            return original["create_dot"](a, b, d, *rest)
        f32 = [TensorHandle(as_f32(h), tl.float32) if is_bf16(h) else h for h in (a, b, d)]
        result = original["create_dot"](*f32, *rest)
        return back(result.data, tl.bfloat16) if is_bf16(d) else result

    def retyped(x, element_ty, data):
        """`x` (a tl.tensor) with another element type and the data stored for it."""
        shape = list(x.shape)
        ty = tl.block_type(element_ty, shape) if shape else element_ty
        return tl.core.tensor(TensorHandle(data, element_ty), ty)

    def reduce_sum(self, input):
        if not is_bf16(input.handle):
            return original_reduce["sum"](self, input)
        total = original_reduce["sum"](self, retyped(input, tl.float32, as_f32(input.handle)))
        return retyped(total, tl.bfloat16, _f32_to_bf16_bits(total.handle.data))

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if not is_bf16(x.handle):
            return original_reduce["min_max"](self, input, val_reduce_op, idx_reduce_op)
        x32 = retyped(x, tl.float32, as_f32(x.handle))
        ret = original_reduce["min_max"](self, x32, val_reduce_op, idx_reduce_op)
        if not val_reduce_op:
            return ret  # indices only
        val = ret[0] if idx_reduce_op else ret
        val = retyped(val, tl.bfloat16, _f32_to_bf16_bits(val.handle.data))
        return (val, ret[1]) if idx_reduce_op else val

    replacements = {
        "cast_impl": cast_impl, "binary_op": binary_op, "unary_op": unary_op,
        "ternary_op": ternary_op, "create_fma": create_fma, "create_dot": create_dot,
    }
    missing = object()
    saved = {n: builder.__dict__.get(n, missing) for n in names}
    try:
        for n, fn in replacements.items():
            setattr(builder, n, fn)
        ReduceOps.sum, ReduceOps.min_max = reduce_sum, min_max
        yield
    finally:
        for n, value in saved.items():
            if value is missing:
                builder.__dict__.pop(n, None)
            else:
                setattr(builder, n, value)
        for n, value in original_reduce.items():
            setattr(ReduceOps, n, value)


def _bytes_of(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _run_interpreter(base, template, host_arrays, structs, grid, meta, label):
    """Runs one launch on host buffers; returns the output arrays (the pure_callback body)."""
    executor_class = _host_executor_class()
    launch_args = []
    inputs = []  # (what JAX gave, the private copy the kernel sees)
    arrays = iter(host_arrays)
    for arg in template:
        if arg is _ARRAY:
            given = np.asarray(next(arrays))
            # A fresh C-contiguous copy: pointer arithmetic assumes a dense row-major buffer,
            # and JAX's buffer must survive a kernel that wrongly writes to its input.
            private = np.array(given, order="C", copy=True)
            inputs.append((given, private))
            launch_args.append(_HostPointer(private, _triton_dtype(private.dtype)))
        elif isinstance(arg, np.float32):
            launch_args.append(_fp32_scalar(arg))
        else:
            launch_args.append(arg)
    outputs = [np.full(s.shape, _poison_value(s.dtype), dtype=s.dtype) for s in structs]
    launch_args += [_HostPointer(o, _triton_dtype(o.dtype)) for o in outputs]

    with _interpreter_lock, _faithful_bf16():
        fn = base.rewrite() if hasattr(base, "rewrite") else base.fn
        executor_args = (fn, base.arg_names, grid)
        if "pre_run_hooks" in inspect.signature(executor_class.__init__).parameters:
            hooks = list(getattr(base, "pre_run_hooks", []))
            executor = executor_class(*executor_args, pre_run_hooks=hooks)
        else:
            executor = executor_class(*executor_args)
        try:
            executor(*launch_args, **meta)
        except Exception as e:
            raise RuntimeError(f"{label}: Triton's interpreter failed: {e}") from e

    for i, (given, private) in enumerate(inputs):
        if not np.array_equal(_bytes_of(given), _bytes_of(private)):
            raise RuntimeError(
                f"{label}: the kernel wrote to its input array {i}; inputs are read-only (on "
                f"a GPU this corrupts a buffer JAX still owns)"
            )
    return tuple(outputs)


_ARRAY = object()  # marks where a host array goes in the launch template


def _interpreter_call(base, args, structs, grid, meta, label) -> tuple[jax.Array, ...]:
    arrays = [a for a in args if _is_array(a)]
    template = tuple(_ARRAY if _is_array(a) else a for a in args)
    host = functools.partial(
        _run_interpreter, base, template, structs=structs, grid=grid, meta=meta, label=label
    )

    @jax.custom_batching.custom_vmap
    def launch(*device_arrays):
        # A host callback (jax.pure_callback, or the dispatcher inside a partitioned body:
        # ejnsa.triton._host), never batched itself (see the rule below).
        return host_call(host, structs, *device_arrays)

    @launch.def_vmap
    def _refuse_vmap(axis_size, in_batched, *device_arrays):
        raise NotImplementedError(
            f"{label}: a Triton kernel call cannot be batched by jax.vmap (jax_triton cannot "
            f"either); give the operation a jax.custom_batching.custom_vmap rule"
        )

    return launch(*arrays)
