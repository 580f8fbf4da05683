"""Helpers shared by the GPU bench scripts: per-call timing and the NCCL baseline's group."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from mpi4py import MPI

__all__ = ["per_call_us", "nccl_group"]


def per_call_us(comm: Any, cp: Any, fn: Any, iters: int, warmup: int) -> tuple[float, float]:
    """(us per call from CUDA events, us per call of host wall time), max over ranks.

    ``warmup`` untimed calls, a device synchronize and a barrier, then ``iters``
    back-to-back calls between two events on CuPy's current stream.
    """
    for _ in range(warmup):
        fn()
    cp.cuda.runtime.deviceSynchronize()
    comm.Barrier()
    s = cp.cuda.get_current_stream()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    t0 = time.perf_counter()
    e0.record(s)
    for _ in range(iters):
        fn()
    e1.record(s)
    e1.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e6
    ev = cp.cuda.get_elapsed_time(e0, e1) * 1e3 / iters
    return comm.allreduce(ev, op=MPI.MAX), comm.allreduce(wall, op=MPI.MAX)


def nccl_group(comm: Any, dev: int) -> tuple[Any, Any]:
    """(torch, torch.distributed) with an NCCL process group over ``comm``'s ranks.

    Collective. Rank 0 picks a free TCP port on 127.0.0.1 (one node) and broadcasts it;
    NVLink multicast stays off unless the environment says otherwise.
    """
    import torch
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(dev)
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size(),
                            device_id=torch.device("cuda", dev))
    return torch, dist
