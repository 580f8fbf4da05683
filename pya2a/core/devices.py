"""The one seam between core and :mod:`pya2a.gpu`: imported lazily, where a device buffer is met.

Nothing else below the public face imports ``pya2a.gpu``; host-only installs never load it
(and never need CuPy).
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["array_family", "gpu_device", "load_device_algorithms"]


def gpu_device() -> ModuleType:
    """:mod:`pya2a.gpu.device` (imports without CuPy)."""
    from ..gpu import device

    return device


def load_device_algorithms() -> None:
    """Register the device-only algorithms (``ipc``, ``shm``); idempotent."""
    from ..gpu import algorithms  # noqa: F401  (registration)


def array_family(obj: object) -> str:
    """Which library an array comes from: ``"torch"``, ``"cupy"`` or ``"other"`` (by its
    type's module; imports nothing)."""
    mod = (type(obj).__module__ or "").split(".")[0]
    return mod if mod in ("torch", "cupy") else "other"
