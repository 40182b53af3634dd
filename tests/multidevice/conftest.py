"""The multi-device tests: 8 CPU host devices, in a process of their own.

JAX fixes its device count when it starts, so these tests cannot share a process with the
others (which expect one device). `tests/test_multidevice.py` runs this directory in a
subprocess; to run it by hand: `EJNSA_MULTIDEVICE=1 python -m pytest tests/multidevice`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates ejnsa's kernels
