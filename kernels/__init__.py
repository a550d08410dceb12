"""Data-plane kernels: Cython modules and their pure-Python twins.

``kernels.load("iptables")`` returns the compiled module ``kernels.iptables`` or, with
``KPB_PURE_PYTHON=1`` (or when the extension is missing), the twin
``kernels.reference.iptables``. Both expose the same classes and give identical results.
``KPB_REQUIRE_EXT=1`` turns a missing extension into an error, so a broken build can never
silently benchmark the slow path. ``BACKEND`` says which one is active.
"""
import importlib
import os

KERNELS = ("iptables", "conntrack", "hashset", "ipvs", "nftables", "ebpf")


class KernelBuildError(ImportError):
    pass


def _choose_backend() -> str:
    if os.environ.get("KPB_PURE_PYTHON") == "1":
        return "python"
    try:
        for name in KERNELS:
            importlib.import_module(f"kernels.{name}")
    except ImportError as exc:
        if os.environ.get("KPB_REQUIRE_EXT") == "1":
            raise KernelBuildError(
                f"compiled kernels failed to load ({exc}); build them with `make build`"
            ) from exc
        return "python"
    return "cython"


BACKEND = _choose_backend()


def load(name: str, backend: str | None = None):
    """The kernel module ``name`` for ``backend`` ("cython" or "python"; default: BACKEND)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}")
    backend = backend or BACKEND
    if backend == "cython":
        return importlib.import_module(f"kernels.{name}")
    if backend == "python":
        return importlib.import_module(f"kernels.reference.{name}")
    raise ValueError(f"unknown backend {backend!r}")


def require_compiled() -> None:
    """Fail loudly unless every compiled kernel imports (used by `make build` and CI)."""
    for name in KERNELS:
        try:
            importlib.import_module(f"kernels.{name}")
        except ImportError as exc:
            raise KernelBuildError(f"kernels.{name} is not built: {exc}") from exc
