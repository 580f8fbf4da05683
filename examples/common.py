"""Helpers the example programs share (imported from the examples' own directory).

Each example runs as ``mpiexec -n P python examples/<name>.py``, so this directory is
``sys.path[0]`` and ``from common import ...`` finds this file.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
from mpi4py import MPI


def block_range(n: int, p: int, i: int) -> tuple[int, int]:
    """Indices [lo, hi) of block i when n are split over p ranks (first n % p get one more)."""
    q, r = divmod(n, p)
    lo = i * q + min(i, r)
    return lo, lo + q + (i < r)


def array_module(device: str, comm: MPI.Intracomm) -> ModuleType:
    """NumPy, or CuPy on GPU (local rank modulo the node's GPUs) for --device cuda."""
    if device == "cpu":
        return np
    import cupy  # only needed for --device cuda

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cupy.cuda.Device(local.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
    local.Free()
    return cupy


def to_host(a) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "__cuda_array_interface__") else np.asarray(a)
