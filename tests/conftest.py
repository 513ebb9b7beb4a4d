"""Shared test settings: GPU and data requirements, seeds, fuzzing profiles.

- ``requires_cuda``: GPU-only tests skip without a GPU, unless
  ``PYATTN_REQUIRE_CUDA=1`` (set by ``benchmarks/gpu_check.sh``), which turns
  the skip into a failure, so a GPU machine with a CPU-only torch cannot pass
  by skipping everything.
- ``DATA_DIR`` / ``requires_data(path)``: the data shipped in the repository's
  ``data/`` folder (``PYATTN_DATA_DIR`` overrides); with
  ``PYATTN_REQUIRE_DATA=1`` a missing file fails instead of skipping.
- Hypothesis profiles: ``ci`` (default, a CI-sized run) and ``fuzz`` (``make
  fuzz``: ``HYPOTHESIS_PROFILE=fuzz``), both derandomised per test.
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Without a GPU, Triton kernels run in the interpreter on CPU tensors (must be
    # set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("PYATTN_DATA_DIR", os.path.join(REPO, "data"))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_CUDA = _flag("PYATTN_REQUIRE_CUDA")
REQUIRE_DATA = _flag("PYATTN_REQUIRE_DATA")

# Markers, resolved at set-up by pytest_runtest_setup below.
requires_cuda = pytest.mark.requires_cuda


def data_path(*parts: str) -> str:
    """Path of a file or folder under DATA_DIR."""
    return os.path.join(DATA_DIR, *parts)


def requires_data(*parts: str):
    """Mark a test that reads DATA_DIR/parts (skips if missing, fails with PYATTN_REQUIRE_DATA=1)."""
    return pytest.mark.requires_data(data_path(*parts))


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_cuda") is not None and not CUDA:
        if REQUIRE_CUDA:
            pytest.fail("PYATTN_REQUIRE_CUDA=1 but no CUDA GPU is usable here")
        pytest.skip("needs a CUDA GPU")
    for marker in item.iter_markers("requires_data"):
        path = marker.args[0]
        if not os.path.exists(path):
            if REQUIRE_DATA:
                pytest.fail(f"PYATTN_REQUIRE_DATA=1 but {path} is missing")
            pytest.skip(f"needs {path}")


settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=1500, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
