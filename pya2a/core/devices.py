"""The one seam between core and :mod:`pya2a.gpu`: imported lazily, where a device buffer is met.

Nothing else below the public face imports ``pya2a.gpu``; host-only installs never load it
(and never need CuPy).
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["gpu_device", "load_device_algorithms"]


def gpu_device() -> ModuleType:
    """:mod:`pya2a.gpu.device` (imports without CuPy)."""
    from ..gpu import device

    return device


def load_device_algorithms() -> None:
    """Register the device-only algorithms (``ipc``, ``shm``); idempotent."""
    from ..gpu import algorithms  # noqa: F401  (registration)
