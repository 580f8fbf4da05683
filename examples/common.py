"""Helpers the example programs share (imported from the examples' own directory).

Each example runs as ``mpiexec -n P python -m mpi4py examples/<name>.py``, so this directory is
``sys.path[0]`` and ``from common import ...`` finds this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType
from typing import Any

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


def add_run_options(parser: argparse.ArgumentParser, seed: int | None = None) -> None:
    """The options every example takes: --algorithm, --device, --repeat (--seed if given)."""
    parser.add_argument("--algorithm", default="auto", help="pya2a algorithm (default auto)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions")


def device_sync(xp: ModuleType) -> None:
    """Wait until the current GPU has done its queued work (CuPy); nothing for NumPy."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def best_time(comm: MPI.Intracomm, xp: ModuleType, repeat: int, step: Callable[..., Any],
              *args: Any) -> tuple[Any, float]:
    """(what the last ``step(*args)`` returned, its best time in s over ``repeat`` runs).

    Each run starts after a barrier and ends when the GPU's queued work is done; its time is
    the slowest rank's. The first run also warms up plans, buffers and GPU kernels.
    """
    best = float("inf")
    out = None
    for _ in range(repeat):
        comm.Barrier()
        t0 = MPI.Wtime()
        out = step(*args)
        device_sync(xp)
        best = min(best, comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX))
    return out, best
