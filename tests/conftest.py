"""Test session setup.

Without --gpu (CI, any CPU machine) the Triton kernels run under Triton's interpreter,
which must be switched on before triton decorates any kernel, so it is set here, before
ejnsa is imported by any test module. With --gpu (a GPU machine) the real kernels
run and the tests marked `gpu` (large sizes) are enabled as well.
"""

import os
import sys

# Decide before anything imports triton: conftest is imported first by pytest.
_GPU = "--gpu" in sys.argv
if not _GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False, help="run on a CUDA GPU: real Triton kernels and the tests marked gpu")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs --gpu (a CUDA GPU with jax-triton)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
