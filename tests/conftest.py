"""Test session setup: a private cache folder, the hypothesis profile, and the real MNIST."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings


def _user_mnist() -> Path | None:
    """Where the programs would find MNIST: $LENET_DATA_DIR, else the user's cache (looked up
    before this session points XDG_CACHE_HOME elsewhere)."""
    env = os.environ.get("LENET_DATA_DIR")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    places = [Path(env), Path(env) / "mnist"] if env else []
    for place in [*places, Path(base) / "lenet" / "mnist"]:
        if (place / "t10k-images-idx3-ubyte").is_file() or (
                place / "t10k-images-idx3-ubyte.gz").is_file():
            return place
    return None


_MNIST = _user_mnist()
if _MNIST is not None:  # the programs the tests start look there too
    os.environ["LENET_DATA_DIR"] = str(_MNIST)

# Programs the tests start keep their caches (JAX's compiled programs) in one folder of this
# session's, shared by the tests and removed at the end, never the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="lenet-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)


# "lenet" (the default) draws the same examples every run, so that a suite that passes keeps
# passing; LENET_HYPOTHESIS=explore draws new ones each run, to search for failures.
for _name, _fixed in (("lenet", True), ("explore", False)):
    settings.register_profile(_name, deadline=None, derandomize=_fixed,
                              suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LENET_HYPOTHESIS", "lenet"))


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The folder of the real MNIST IDX files: $LENET_DATA_DIR, else the user's cache
    (~/.cache/lenet/mnist, where the programs put it); skips where there is none."""
    if _MNIST is None:
        pytest.skip("real MNIST not found in $LENET_DATA_DIR or ~/.cache/lenet/mnist: run "
                    "`python -m lenet_jax.train --epochs 1` once (it fetches MNIST into the "
                    "cache) or set LENET_DATA_DIR to a folder holding its four IDX files")
    return str(_MNIST)
