"""Shared fixtures. Kernel tests run through both backends and compare them.

With KPB_REQUIRE_EXT=1 (as `make test` and CI set it) a missing compiled kernel is an error,
not a skip, so CI fails when the extensions do not load.
"""
import importlib
import os

import pytest

import kernels

BACKENDS = ("cython", "python")


def compiled_available() -> bool:
    try:
        kernels.require_compiled()
        return True
    except ImportError:
        return False


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "cython" and not compiled_available():
        if os.environ.get("KPB_REQUIRE_EXT") == "1":
            pytest.fail("compiled kernels do not load (KPB_REQUIRE_EXT=1)")
        pytest.skip("compiled kernels not built")
    return request.param


def kernel(name: str, backend: str):
    return importlib.import_module(f"kernels.{name}" if backend == "cython" else f"kernels.reference.{name}")
