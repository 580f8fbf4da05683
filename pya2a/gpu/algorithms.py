"""The device-only algorithms, ``ipc`` and ``shm``; importing this module registers them.

Each registers itself, with its capabilities, in its own module (:mod:`.ipc_algorithm`,
:mod:`.shm_algorithm`). The host algorithms that also run on device buffers (through the
staged or CUDA-aware transports of :mod:`.staging`) say so in their own registrations.
"""

from __future__ import annotations

from . import ipc_algorithm, shm_algorithm

__all__ = ["ipc_algorithm", "shm_algorithm"]
