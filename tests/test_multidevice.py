"""Runs tests/multidevice (8 CPU host devices) in a process of its own.

JAX fixes the number of host devices when it starts and the other tests expect one, so
the multi-device tests cannot run in this process. Their output is shown on failure.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(os.environ.get("EJNSA_TEST_GPU") == "1", reason="CPU host devices; the GPU run covers the kernels")
def test_multidevice():
    env = dict(os.environ, EJNSA_MULTIDEVICE="1", TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "multidevice")],
                         cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
