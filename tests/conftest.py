"""Test-session setup: 8 forced CPU devices (for mesh tests) and shared paths.

XLA reads the device count once, at backend start, so it is set here before anything imports jax.
Computations that name no sharding still run on device 0, so unsharded tests are unaffected.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "data" / "demo"


@pytest.fixture(scope="session")
def demo_data_dir() -> pathlib.Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("the shared data folder beside the checkout is absent")
    return SHARED_DATA
