"""What every Triton kernel file of ejnsa shares: the base-2 softmax constant, head-dim
tile padding, and the dot precision.

One definition each, so that every kernel agrees on them (fla's ops/utils plays this part).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

# log2(e). Kernels run the softmax in base 2 (exp2 is one instruction): scores are scaled
# by softmax_scale * LOG2E, and a natural-log lse is multiplied by LOG2E to compare with
# them. A tl.constexpr so that kernels may read it as a global; `.value` on the host.
LOG2E = tl.constexpr(math.log2(math.e))


def log2_scale(softmax_scale: float) -> np.float32:
    """softmax_scale in log2 units, as the fp32 scalar a kernel takes."""
    return np.float32(softmax_scale * LOG2E.value)


def head_tile(d: int) -> int:
    """The tile a head dim is padded to: a power of two, and >= 16 because tl.dot needs it."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`.

    float32: "tf32x3" (three TF32 products, about float32 accuracy, still on tensor cores);
    plain TF32 would leave ~1e-3 relative error, which a float32 user does not expect.
    16-bit operands ignore the setting ("tf32" is Triton's default).
    """
    return "tf32x3" if jnp.dtype(dtype) == jnp.float32 else "tf32"

