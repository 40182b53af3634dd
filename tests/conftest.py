"""Test session setup.

Without --gpu (CI, any CPU machine) the Triton kernels run under Triton's interpreter,
which must be switched on before triton decorates any kernel, so it is set here, before
ejnsa is imported by any test module. With --gpu (a GPU machine) the real kernels
run and the tests marked `gpu` (large sizes) are enabled as well.
"""

import os
import sys

# Decide before anything imports triton: conftest is imported first by pytest. The choice
# travels in EJNSA_TEST_GPU to pytest-xdist's workers (their argv lacks --gpu) and to the
# test modules that must also see it before importing triton.
_GPU = "--gpu" in sys.argv or os.environ.get("EJNSA_TEST_GPU") == "1"
if _GPU:
    os.environ["EJNSA_TEST_GPU"] = "1"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests compile many small programs: XLA's cheaper CPU code generation cuts
    # their CPU time by about a third (shapes are tiny, so the slower code costs nothing).
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast).strip()

import pytest  # noqa: E402

# tests/multidevice needs 8 host devices, fixed when JAX starts: tests/test_multidevice.py
# runs it in a process of its own, which sets EJNSA_MULTIDEVICE=1.
collect_ignore = [] if os.environ.get("EJNSA_MULTIDEVICE") == "1" else ["multidevice"]


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False, help="run on a CUDA GPU: real Triton kernels and the tests marked gpu")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    # The multi-device run (a subprocess of several minutes) goes first: under xdist the
    # other worker runs the rest meanwhile, instead of everyone waiting on it at the end.
    items.sort(key=lambda item: item.name != "test_multidevice")
    skip = pytest.mark.skip(reason="needs --gpu (a CUDA GPU with jax-triton)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
