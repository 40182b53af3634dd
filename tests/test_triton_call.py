"""Tests of ejnsa.triton._call: the launcher every ejnsa Triton kernel goes through.

On a CPU they run the toy kernels below through Triton's interpreter, which is why
TRITON_INTERPRET must be set before triton is imported (and the kernels decorated); the
GPU branch is then checked against a stand-in jax_triton that records what it is given.
With `pytest --gpu` on a GPU machine the same toy kernels go through the real
jax_triton, and the tests of the interpreter bridge itself are skipped.
"""

import os
import sys

if os.environ.get("EJNSA_TEST_GPU") != "1":  # conftest does the same; --gpu sessions must compile kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.interpreter  # noqa: E402  (not imported by triton itself off the interpreter)

from ejnsa.triton import _call  # noqa: E402
from ejnsa.triton._call import (  # noqa: E402
    gpu_available,
    interpreter_enabled,
    require_triton,
    triton_call,
    triton_runnable,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------------------
# Toy kernels
# --------------------------------------------------------------------------------------


@triton.jit
def add_kernel(x_ptr, y_ptr, n, o_ptr, BS: tl.constexpr):
    i_n = tl.program_id(0) * BS + tl.arange(0, BS)  # [BS]
    m_n = i_n < n
    b_x = tl.load(x_ptr + i_n, mask=m_n).to(tl.float32)
    b_y = tl.load(y_ptr + i_n, mask=m_n).to(tl.float32)
    tl.store(o_ptr + i_n, (b_x + b_y).to(o_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    o_n = i_n * BN + tl.arange(0, BN)  # [BN]
    b_c = tl.zeros([BM, BN], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)  # [BK]
        m_a = (o_m[:, None] < M) & (o_k[None, :] < K)
        m_b = (o_k[:, None] < K) & (o_n[None, :] < N)
        b_a = tl.load(a_ptr + o_m[:, None] * K + o_k[None, :], mask=m_a, other=0.0).to(tl.float32)  # [BM, BK]
        b_b = tl.load(b_ptr + o_k[:, None] * N + o_n[None, :], mask=m_b, other=0.0).to(tl.float32)  # [BK, BN]
        b_c += tl.dot(b_a, b_b, input_precision=PRECISION)
    m_c = (o_m[:, None] < M) & (o_n[None, :] < N)
    tl.store(c_ptr + o_m[:, None] * N + o_n[None, :], b_c, mask=m_c)


@triton.jit
def bf16_kernel(a_ptr, b_ptr, c_ptr, p_ptr, e_ptr, r_ptr, g_ptr, M: tl.constexpr, N: tl.constexpr,
                K: tl.constexpr):
    """bf16 the way fast kernels use it: straight into tl.dot, probabilities cast back to bf16."""
    o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    b_a = tl.load(a_ptr + o_m[:, None] * K + o_k[None, :])  # [M, K] bf16
    b_b = tl.load(b_ptr + o_k[:, None] * N + o_n[None, :])  # [K, N] bf16
    tl.store(c_ptr + o_m[:, None] * N + o_n[None, :], tl.dot(b_a, b_b))
    b_p = tl.exp(b_a.to(tl.float32) - 1.0).to(tl.bfloat16)  # [M, K]
    tl.store(p_ptr + o_m[:, None] * N + o_n[None, :], tl.dot(b_p, b_b, out_dtype=tl.float32).to(tl.bfloat16))
    # bf16 arithmetic against Python floats, bf16 elementwise math, int -> bf16, comparisons
    tl.store(e_ptr + o_m[:, None] * K + o_k[None, :], b_a * 0.75 - b_a * b_a)
    b_i = (o_k - 16).to(tl.bfloat16)  # [K]
    tl.store(r_ptr + o_m[:, None] * K + o_k[None, :], b_i[None, :] * b_a / 3)
    tl.store(g_ptr + o_m[:, None] * K + o_k[None, :], (b_a > -0.5).to(tl.int32))


@triton.jit
def bf16_reduce_kernel(x_ptr, o_ptr, i_ptr, B: tl.constexpr):
    """Reductions of a bf16 tile [B, B] without casting first."""
    o_b = tl.arange(0, B)
    b_x = tl.load(x_ptr + o_b[:, None] * B + o_b[None, :])  # [B, B] bf16
    tl.store(o_ptr + o_b, tl.max(b_x, axis=1))
    tl.store(o_ptr + B + o_b, tl.sum(b_x, axis=1))
    tl.store(i_ptr + o_b, tl.argmax(b_x, axis=1))
    tl.store(i_ptr + B + o_b, tl.argmin(b_x, axis=1))


@triton.jit
def stats_kernel(x_ptr, n, sum_ptr, max_ptr, arg_ptr, BS: tl.constexpr):
    """Row statistics of x [R, n]: three outputs of different dtypes."""
    i_r = tl.program_id(0)
    o_n = tl.arange(0, BS)
    m_n = o_n < n
    b_x = tl.load(x_ptr + i_r * n + o_n, mask=m_n, other=float("-inf")).to(tl.float32)  # [BS]
    tl.store(sum_ptr + i_r, tl.sum(tl.where(m_n, b_x, 0.0), axis=0))
    tl.store(max_ptr + i_r, tl.max(b_x, axis=0).to(max_ptr.dtype.element_ty))
    tl.store(arg_ptr + i_r, tl.argmax(b_x, axis=0).to(tl.int32))


@triton.jit
def int64_kernel(x_ptr, big, shift, n, o_ptr, hi_ptr, lo_ptr, BS: tl.constexpr):
    """`big` (> 2**32) arrives as i64; offsets that pass through it must stay exact."""
    i_n = tl.program_id(0) * BS + tl.arange(0, BS)  # [BS] int32
    m_n = i_n < n
    o_n = i_n + big - big  # int64 offsets, through values far outside int32
    b_x = tl.load(x_ptr + o_n, mask=m_n)
    tl.store(o_ptr + o_n, b_x * big + shift, mask=m_n)
    b_p = i_n.to(tl.int64) * big + shift  # up to ~2**45
    tl.store(hi_ptr + i_n, (b_p >> 32).to(tl.int32), mask=m_n)
    tl.store(lo_ptr + i_n, (b_p & 0xFFFF).to(tl.int32), mask=m_n)


@triton.jit
def scale_kernel(x_ptr, s, flag, n, o_ptr, BS: tl.constexpr):
    i_n = tl.program_id(0) * BS + tl.arange(0, BS)
    m_n = i_n < n
    # No explicit cast: a bf16 tensor times an fp32 scalar promotes to fp32 on the GPU.
    b_o = tl.load(x_ptr + i_n, mask=m_n) * s
    if flag:
        b_o = -b_o
    tl.store(o_ptr + i_n, b_o, mask=m_n)


@triton.jit
def act_kernel(x_ptr, n, o_ptr, BS: tl.constexpr, ACT: tl.constexpr, SCALE: tl.constexpr):
    i_n = tl.program_id(0) * BS + tl.arange(0, BS)
    m_n = i_n < n
    b_x = tl.load(x_ptr + i_n, mask=m_n)
    if ACT == "relu":
        b_x = tl.maximum(b_x, 0.0)
    tl.store(o_ptr + i_n, b_x * SCALE, mask=m_n)


@triton.jit
def mul_fwd_kernel(x_ptr, y_ptr, s, n, o_ptr, BS: tl.constexpr):
    i_n = tl.program_id(0) * BS + tl.arange(0, BS)
    m_n = i_n < n
    b_x = tl.load(x_ptr + i_n, mask=m_n)
    b_y = tl.load(y_ptr + i_n, mask=m_n)
    tl.store(o_ptr + i_n, b_x * b_y * s, mask=m_n)


@triton.jit
def mul_bwd_kernel(x_ptr, y_ptr, do_ptr, s, n, dx_ptr, dy_ptr, BS: tl.constexpr):
    i_n = tl.program_id(0) * BS + tl.arange(0, BS)
    m_n = i_n < n
    b_x = tl.load(x_ptr + i_n, mask=m_n)
    b_y = tl.load(y_ptr + i_n, mask=m_n)
    b_do = tl.load(do_ptr + i_n, mask=m_n)
    tl.store(dx_ptr + i_n, b_do * b_y * s, mask=m_n)
    tl.store(dy_ptr + i_n, b_do * b_x * s, mask=m_n)


@triton.jit
def even_kernel(n, o_ptr, i_ptr, BS: tl.constexpr):
    """Writes only the even elements: the odd ones must stay poisoned."""
    i_n = tl.program_id(0) * BS + tl.arange(0, BS)
    m_n = (i_n < n) & (i_n % 2 == 0)
    tl.store(o_ptr + i_n, i_n.to(tl.float32), mask=m_n)
    tl.store(i_ptr + i_n, i_n, mask=m_n)


@triton.jit
def write_input_kernel(x_ptr, n, o_ptr, BS: tl.constexpr):
    i_n = tl.arange(0, BS)
    m_n = i_n < n
    tl.store(o_ptr + i_n, tl.load(x_ptr + i_n, mask=m_n), mask=m_n)
    tl.store(x_ptr + i_n, tl.zeros([BS], dtype=tl.float32), mask=m_n)  # a bug


@triton.jit
def scalar_last_kernel(x_ptr, o_ptr, n, BS: tl.constexpr):
    """A runtime scalar after the output pointer: reachable only by keyword, which is refused."""
    i_n = tl.arange(0, BS)
    tl.store(o_ptr + i_n, tl.load(x_ptr + i_n, mask=i_n < n), mask=i_n < n)


@triton.heuristics(values={"BS": lambda args: triton.next_power_of_2(args["n"])})
@triton.jit
def heuristic_kernel(x_ptr, n, o_ptr, BS: tl.constexpr):
    i_n = tl.arange(0, BS)
    m_n = i_n < n
    tl.store(o_ptr + i_n, tl.load(x_ptr + i_n, mask=m_n) + 1.0, mask=m_n)


# The toy kernels are interpreted (CPU tests) or compiled by jax_triton (pytest --gpu).
INTERPRETED = isinstance(add_kernel, triton.runtime.interpreter.InterpretedFunction)
pytestmark = pytest.mark.skipif(
    not (INTERPRETED or gpu_available()),
    reason="Triton cannot run: set TRITON_INTERPRET=1 before importing triton, or use a GPU",
)
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="checks the CPU interpreter bridge")


def add(x, y, bs=32):
    n = x.shape[0]
    return triton_call(x, y, n, kernel=add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       grid=lambda meta: (triton.cdiv(n, meta["BS"]),), BS=bs)


def matmul(a, b, precision="ieee"):
    (m, k), (_, n) = a.shape, b.shape
    return triton_call(a, b, kernel=matmul_kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
                       grid=(triton.cdiv(m, 16), triton.cdiv(n, 16)), num_warps=4, num_stages=2,
                       M=m, N=n, K=k, BM=16, BN=16, BK=16, PRECISION=precision)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


def test_detection_on_this_machine():
    assert triton_runnable()
    assert interpreter_enabled() == INTERPRETED
    if jax.default_backend() not in ("gpu", "cuda", "rocm"):
        assert not gpu_available()
    require_triton("a test")  # runnable: no error


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n", [1, 37, 130])
def test_vector_add_odd_sizes(n, dtype):
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.standard_normal(n), dtype)
    y = jnp.asarray(rng.standard_normal(n), dtype)
    out = add(x, y)
    assert out.dtype == dtype and out.shape == (n,)
    want = (np.asarray(x, np.float32) + np.asarray(y, np.float32)).astype(out.dtype)
    np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_tiled_dot_against_numpy(dtype):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((37, 50)), dtype)  # none a multiple of the tile
    b = jnp.asarray(rng.standard_normal((50, 29)), dtype)
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = matmul(a, b)
    assert got.dtype == jnp.float32 and got.shape == (37, 29)
    assert rel_err(got, want) < 1e-6
    # The interpreter ignores input_precision (the module docstring says so): TF32, the
    # GPU's default for fp32 dots, is only checked on a GPU.
    assert rel_err(matmul(a, b, "tf32"), want) < 5e-3


def test_bf16_as_on_the_gpu():
    """bf16 straight into tl.dot, bf16 arithmetic and casts: as XLA computes them in bf16."""
    rng = np.random.default_rng(9)
    a = jnp.asarray(rng.standard_normal((16, 32)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((32, 16)), jnp.bfloat16)
    shapes = (jax.ShapeDtypeStruct((16, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.bfloat16),
              jax.ShapeDtypeStruct((16, 32), jnp.bfloat16), jax.ShapeDtypeStruct((16, 32), jnp.bfloat16),
              jax.ShapeDtypeStruct((16, 32), jnp.int32))
    c, p, e, r, g = triton_call(a, b, kernel=bf16_kernel, out_shape=shapes, grid=(1,), M=16, N=16, K=32)
    af, bf = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert rel_err(c, af @ bf) < 1e-6
    probs = jnp.exp(a.astype(jnp.float32) - 1.0).astype(jnp.bfloat16)  # rounded to nearest even
    want_p = np.asarray(probs, np.float32) @ bf
    assert rel_err(np.asarray(p, np.float32), want_p) < 2**-7
    # Elementwise bf16: exactly XLA's rounding on the interpreter; a GPU may fuse into fma.
    check = np.testing.assert_array_equal if INTERPRETED else (
        lambda x, y: np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2**-7, atol=1e-2))
    check(np.asarray(e), np.asarray(a * 0.75 - a * a))
    check(np.asarray(r), np.asarray(jnp.arange(-16, 16).astype(jnp.bfloat16)[None] * a / 3))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(a > -0.5).astype(np.int32))
    if INTERPRETED:  # the repairs last for the launch only: Triton's builder is as it was
        from triton.runtime.interpreter import interpreter_builder
        assert not {"cast_impl", "binary_op", "create_dot"} & set(vars(interpreter_builder))


def test_bf16_reductions():
    x = jnp.asarray(np.random.default_rng(11).standard_normal((8, 8)), jnp.bfloat16)
    shapes = (jax.ShapeDtypeStruct((16,), jnp.bfloat16), jax.ShapeDtypeStruct((16,), jnp.int32))
    o, i = triton_call(x, kernel=bf16_reduce_kernel, out_shape=shapes, grid=(1,), B=8)
    xf, o = np.asarray(x, np.float32), np.asarray(o, np.float32)
    np.testing.assert_array_equal(o[:8], xf.max(1))
    np.testing.assert_allclose(o[8:], xf.sum(1), rtol=2**-7, atol=2**-5)  # bf16 sums round
    np.testing.assert_array_equal(np.asarray(i), np.concatenate([xf.argmax(1), xf.argmin(1)]))


def test_multiple_outputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 23)), jnp.bfloat16)
    shapes = (jax.ShapeDtypeStruct((5,), jnp.float32), jax.ShapeDtypeStruct((5,), jnp.bfloat16),
              jax.ShapeDtypeStruct((5,), jnp.int32))
    s, mx, arg = triton_call(x, 23, kernel=stats_kernel, out_shape=shapes, grid=(5,), BS=32)
    assert (s.dtype, mx.dtype, arg.dtype) == (jnp.float32, jnp.bfloat16, jnp.int32)
    xf = np.asarray(x, np.float32)
    np.testing.assert_allclose(np.asarray(s), xf.sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mx, np.float32), xf.max(1))
    np.testing.assert_array_equal(np.asarray(arg), xf.argmax(1))
    # A list of one struct is a sequence: the result is a tuple of one array.
    (only,) = triton_call(x, 23, kernel=stats_kernel, out_shape=list(shapes), grid=(5,), BS=32)[:1]
    assert only.shape == (5,)


def test_int32_int64_scalars_and_offsets():
    n, big, shift = 45, 2**33 + 5, -7
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(2).integers(-1000, 1000, n), jnp.int64)
        shapes = (jax.ShapeDtypeStruct((n,), jnp.int64), jax.ShapeDtypeStruct((n,), jnp.int32),
                  jax.ShapeDtypeStruct((n,), jnp.int32))
        o, hi, lo = triton_call(x, big, np.int32(shift), n, kernel=int64_kernel, out_shape=shapes,
                                grid=(triton.cdiv(n, 16),), BS=16)
        assert o.dtype == jnp.int64
        np.testing.assert_array_equal(np.asarray(o), np.asarray(x) * big + shift)
    p = np.arange(n, dtype=np.int64) * big + shift
    np.testing.assert_array_equal(np.asarray(hi), (p >> 32).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(lo), (p & 0xFFFF).astype(np.int32))


def test_int64_output_needs_x64():
    with pytest.raises(TypeError, match="jax_enable_x64"):
        triton_call(jnp.zeros(4, jnp.int32), 1, 0, 4, kernel=int64_kernel,
                    out_shape=(jax.ShapeDtypeStruct((4,), np.int64),) * 3, grid=(1,), BS=16)


@pytest.mark.parametrize("s", [0.3, np.float32(0.3), np.float64(0.3)], ids=["py", "np32", "np64"])
def test_float_scalar_is_fp32(s):
    x = jnp.asarray(np.random.default_rng(3).standard_normal(40), jnp.bfloat16)
    shape = jax.ShapeDtypeStruct((40,), jnp.float32)
    out = triton_call(x, s, False, 40, kernel=scale_kernel, out_shape=shape, grid=(3,), BS=16)
    want = np.asarray(x, np.float32) * np.float32(0.3)
    np.testing.assert_array_equal(np.asarray(out), want)
    neg = triton_call(x, s, True, 40, kernel=scale_kernel, out_shape=shape, grid=(3,), BS=16)
    np.testing.assert_array_equal(np.asarray(neg), -want)


def test_constexpr_keywords():
    x = jnp.asarray(np.random.default_rng(4).standard_normal(20), jnp.float32)
    shape = jax.ShapeDtypeStruct((20,), jnp.float32)
    relu = triton_call(x, 20, kernel=act_kernel, out_shape=shape, grid=(1,), BS=32, ACT="relu", SCALE=2)
    ident = triton_call(x, 20, kernel=act_kernel, out_shape=shape, grid=(1,), BS=32, ACT="none", SCALE=3)
    np.testing.assert_array_equal(np.asarray(relu), np.maximum(np.asarray(x), 0) * 2)
    np.testing.assert_array_equal(np.asarray(ident), np.asarray(x) * 3)
    heur = triton_call(x, 20, kernel=heuristic_kernel, out_shape=shape, grid=(1,))
    np.testing.assert_array_equal(np.asarray(heur), np.asarray(x) + 1)


def test_signature_mistakes_are_type_errors():
    x = jnp.ones(8, jnp.float32)
    shape = jax.ShapeDtypeStruct((8,), jnp.float32)
    with pytest.raises(TypeError, match="not annotated `tl.constexpr`"):
        triton_call(x, kernel=scalar_last_kernel, out_shape=shape, grid=(1,), n=8, BS=8)
    with pytest.raises(TypeError, match="pass constexprs by keyword"):
        triton_call(x, x, 8, 16, kernel=add_kernel, out_shape=shape, grid=(1,))
    with pytest.raises(TypeError, match="cannot take"):
        triton_call(x, x, 8, kernel=add_kernel, out_shape=shape, grid=(1,), BS=8, NOPE=1)
    with pytest.raises(TypeError, match="cannot take"):
        triton_call(x, 8, kernel=add_kernel, out_shape=shape, grid=(1,), BS=8)
    with pytest.raises(TypeError, match="argument 1"):
        triton_call(x, "y", 8, kernel=add_kernel, out_shape=shape, grid=(1,), BS=8)


def test_launch_option_and_grid_checks():
    x = jnp.ones(8, jnp.float32)
    shape = jax.ShapeDtypeStruct((8,), jnp.float32)
    call = lambda **kw: triton_call(x, x, 8, kernel=add_kernel, out_shape=shape, BS=8, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="num_warps"):
        call(grid=(1,), num_warps=3)
    with pytest.raises(ValueError, match="grid axis 1"):
        call(grid=(1, 70000))
    with pytest.raises(ValueError, match="1 to 3 dimensions"):
        call(grid=(1, 1, 1, 1))
    with pytest.raises(TypeError, match="no traced values"):
        jax.jit(lambda g: call(grid=(g,)))(1)
    np.testing.assert_array_equal(np.asarray(call(grid=1)), 2 * np.ones(8))


def test_under_jit_and_abstract_inputs():
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((20, 33)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((33, 18)), jnp.bfloat16)
    eager = matmul(a, b)
    jitted = jax.jit(matmul)(a, b)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    abstract = jax.eval_shape(matmul, jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(b.shape, b.dtype))
    assert abstract.shape == (20, 18) and abstract.dtype == jnp.float32


@jax.custom_vjp
def scaled_mul(x, y):
    return _scaled_mul_fwd(x, y)[0]


def _scaled_mul_fwd(x, y):
    n = x.shape[0]
    out = triton_call(x, y, 1.5, n, kernel=mul_fwd_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                      grid=(triton.cdiv(n, 16),), BS=16)
    return out, (x, y)


def _scaled_mul_bwd(res, do):
    x, y = res
    n = x.shape[0]
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return triton_call(x, y, do, 1.5, n, kernel=mul_bwd_kernel, out_shape=(shape, shape),
                       grid=(triton.cdiv(n, 16),), BS=16)


scaled_mul.defvjp(_scaled_mul_fwd, _scaled_mul_bwd)


def test_custom_vjp_grad_matches_autodiff():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal(50), jnp.float32)
    y = jnp.asarray(rng.standard_normal(50), jnp.float32)
    loss = lambda f: lambda x, y: jnp.sum(jnp.sin(f(x, y)))  # noqa: E731
    want = jax.grad(loss(lambda x, y: x * y * 1.5), argnums=(0, 1))(x, y)
    got = jax.jit(jax.grad(loss(scaled_mul), argnums=(0, 1)))(x, y)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


@needs_interpreter
def test_vmap_is_refused_clearly():
    x = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(NotImplementedError, match="custom_vmap"):
        jax.vmap(lambda v: add(v, v))(x)


@needs_interpreter
def test_unwritten_outputs_are_poisoned():
    n = 21
    shapes = (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32))
    o, i = triton_call(n, kernel=even_kernel, out_shape=shapes, grid=(2,), BS=16)
    o, i = np.asarray(o), np.asarray(i)
    even = np.arange(n) % 2 == 0
    np.testing.assert_array_equal(np.isnan(o), ~even)
    np.testing.assert_array_equal(o[even], np.arange(n)[even])
    np.testing.assert_array_equal(i[~even], np.iinfo(np.int32).min)
    np.testing.assert_array_equal(i[even], np.arange(n)[even])
    # An empty grid launches nothing: everything is poison.
    o, i = triton_call(n, kernel=even_kernel, out_shape=shapes, grid=(0,), BS=16)
    assert np.isnan(np.asarray(o)).all() and (np.asarray(i) == np.iinfo(np.int32).min).all()


@needs_interpreter
def test_writing_an_input_is_caught():
    x = jnp.arange(8, dtype=jnp.float32)
    with pytest.raises(Exception, match="wrote to its input array 0"):
        jax.block_until_ready(triton_call(x, 8, kernel=write_input_kernel,
                                          out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), grid=(1,), BS=8))
    np.testing.assert_array_equal(np.asarray(x), np.arange(8))  # JAX's buffer is untouched


def test_non_contiguous_input():
    base = jnp.asarray(np.random.default_rng(7).standard_normal((12, 10)), jnp.float32)
    x = base.T  # a transposed view on NumPy's side; must arrive row-major
    y = jnp.ones_like(x)
    out = jax.jit(lambda x, y: add(x.reshape(-1), y.reshape(-1)))(x, y)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x).reshape(-1) + 1)


def test_concurrent_launches_from_threads():
    """XLA may run callbacks on several threads; the interpreter patches triton globally."""
    rng = np.random.default_rng(10)
    xs = [jnp.asarray(rng.standard_normal(70), jnp.bfloat16) for _ in range(4)]
    results = [None] * 4

    def work(i):
        results[i] = np.asarray(jax.jit(add)(xs[i], xs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, got in zip(xs, results):
        np.testing.assert_array_equal(got, np.asarray(x + x))


def test_deterministic():
    rng = np.random.default_rng(8)
    a = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((24, 17)), jnp.float32)
    first, second = np.asarray(matmul(a, b, "tf32")), np.asarray(matmul(a, b, "tf32"))
    assert first.tobytes() == second.tobytes()


# --------------------------------------------------------------------------------------
# Where Triton cannot run, and the GPU branch
# --------------------------------------------------------------------------------------


def test_require_triton_error_when_nothing_can_run(monkeypatch):
    monkeypatch.setattr(_call, "gpu_available", lambda: False)
    monkeypatch.setattr(_call, "interpreter_enabled", lambda: False)
    assert not _call.triton_runnable()
    with pytest.raises(RuntimeError) as info:
        require_triton("nsa_compression(platform='triton')")
    message = str(info.value)
    for part in ("nsa_compression(platform='triton')", "not a GPU", "TRITON_INTERPRET=1", "jax-triton"):
        assert part in message


def test_compiled_kernel_on_cpu_says_to_set_interpret_first():
    compiled = triton.runtime.jit.JITFunction(add_kernel.fn)  # as if decorated before the variable was set
    x = jnp.ones(8, jnp.float32)
    if gpu_available():
        pytest.skip("a GPU would compile it")
    with pytest.raises(RuntimeError, match="before TRITON_INTERPRET=1 was set"):
        triton_call(x, x, 8, kernel=compiled, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), grid=(1,), BS=8)


def test_without_interpreter_in_a_fresh_process(tmp_path):
    """The real situation: TRITON_INTERPRET unset, no GPU: a clear RuntimeError, no crash."""
    if gpu_available():
        pytest.skip("needs a machine without a GPU")
    (tmp_path / "toy.py").write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp, triton, triton.language as tl
        from ejnsa.triton._call import triton_call, triton_runnable

        @triton.jit
        def copy_kernel(x_ptr, o_ptr, BS: tl.constexpr):
            tl.store(o_ptr + tl.arange(0, BS), tl.load(x_ptr + tl.arange(0, BS)))

        assert not triton_runnable()
        try:
            triton_call(jnp.ones(8), kernel=copy_kernel, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                        grid=(1,), BS=8)
        except RuntimeError as e:
            print("ERROR:", e)
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, str(tmp_path / "toy.py")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "ERROR: triton_call(copy_kernel) needs Triton" in run.stdout
    assert "TRITON_INTERPRET=1" in run.stdout and "not a GPU" in run.stdout


def _fake_jax_triton(tmp_path, monkeypatch, body):
    """Puts a stand-in `jax_triton` package on sys.path and forgets any earlier import."""
    package = tmp_path / "fake" / "jax_triton"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    monkeypatch.setattr(_call, "_jax_triton_result", [])


@pytest.mark.parametrize("before", [None, "my-triton-cache"])
def test_jax_triton_import_restores_triton_cache_dir(tmp_path, monkeypatch, before):
    _fake_jax_triton(tmp_path, monkeypatch, 'import os\nos.environ["TRITON_CACHE_DIR"] = ""\n')
    if before is None:
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_DIR", before)
    module, why = _call._load_jax_triton()
    assert module is not None and why is None
    assert os.environ.get("TRITON_CACHE_DIR") == before
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)


def test_jax_triton_import_failure_is_reported(tmp_path, monkeypatch):
    _fake_jax_triton(tmp_path, monkeypatch, """
        import os
        os.environ["TRITON_CACHE_DIR"] = ""
        raise ImportError("jax-triton requires JAX to be installed with GPU support")
    """)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    module, why = _call._load_jax_triton()
    assert module is None and "GPU support" in why
    assert "TRITON_CACHE_DIR" not in os.environ
    monkeypatch.setattr(_call, "_jax_backend", lambda: "gpu")
    assert not gpu_available()
    monkeypatch.setattr(_call, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="jax_triton does not import"):
        require_triton("a test")


def test_gpu_branch_hands_jax_triton_what_it_needs(monkeypatch):
    calls = []

    def fake_triton_call(*args, **kwargs):
        calls.append((args, kwargs))
        return tuple(jnp.zeros(s.shape, s.dtype) for s in kwargs["out_shape"])

    monkeypatch.setattr(_call, "_jax_backend", lambda: "gpu")
    monkeypatch.setattr(_call, "_jax_triton_result", [(types.SimpleNamespace(triton_call=fake_triton_call), None)])
    assert gpu_available()
    compiled = triton.runtime.jit.JITFunction(scale_kernel.fn)
    x = jnp.ones(40, jnp.bfloat16)
    shape = jax.ShapeDtypeStruct((40,), jnp.float32)
    out = triton_call(x, 0.3, np.bool_(True), np.int64(40), kernel=compiled, out_shape=shape,
                      grid=lambda meta: (triton.cdiv(40, meta["BS"]),), num_warps=8, name="scale", BS=16)
    assert out.shape == (40,)  # one struct in, one array out
    (args, kwargs), = calls
    assert args[0] is x
    assert type(args[1]) is np.float32 and args[1] == np.float32(0.3)  # not a Python float (fp64)
    assert type(args[2]) is bool and type(args[3]) is int
    assert kwargs["grid"] == (3, 1, 1) and kwargs["num_warps"] == 8 and "num_stages" not in kwargs
    assert kwargs["BS"] == 16 and kwargs["name"] == "scale" and kwargs["kernel"] is compiled
    assert kwargs["out_shape"] == (shape,)
    # Heuristic constexprs reach the grid callable, as jax_triton's own grid evaluation does.
    calls.clear()
    heuristic = triton.heuristics(values={"BS": lambda args: 64})(triton.runtime.jit.JITFunction(add_kernel.fn))
    triton_call(x, x, 40, kernel=heuristic, out_shape=x, grid=lambda meta: (triton.cdiv(40, meta["BS"]),))
    (args, kwargs), = calls
    assert kwargs["grid"] == (1, 1, 1) and "BS" not in kwargs and kwargs["kernel"] is heuristic
    # An interpreted kernel cannot be compiled: it runs through the interpreter, GPU or not.
    calls.clear()
    np.testing.assert_array_equal(np.asarray(add(x, x)), 2 * np.ones(40))
    assert not calls


def test_import_has_no_side_effects():
    code = ("import os, sys; before = dict(os.environ); import ejnsa.triton._call; "
            "assert dict(os.environ) == before; assert 'jax_triton' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
