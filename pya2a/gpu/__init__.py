"""GPU support for pya2a: imported lazily so that host-only installs need no CuPy."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["cupy", "have_cupy"]

_CUPY: ModuleType | None = None


def cupy() -> ModuleType:
    """Return the CuPy module, importing it on first use.

    Raises:
        ImportError: CuPy is not installed or cannot initialise; the message says
            how to install the GPU extra.
    """
    global _CUPY
    if _CUPY is None:
        try:
            _CUPY = importlib.import_module("cupy")
        except Exception as exc:  # ImportError, or CUDA driver errors at import
            raise ImportError(
                "pya2a GPU support needs CuPy: pip install 'pya2a[gpu]' "
                "(or cupy-cuda12x / cupy-cuda13x matching your CUDA driver)"
            ) from exc
    return _CUPY


def have_cupy() -> bool:
    """True if CuPy imports; never raises."""
    try:
        cupy()
    except ImportError:
        return False
    return True
