"""Where a repeated one-shot ``pya2a.Alltoallv`` on CuPy buffers spends its host time.

mpiexec -n 4 python bench/gpu_oneshot_profile.py [bytes_per_peer]

Rank 0 prints the host time per call (back to back, stream synchronize at the end), the
engine's own launch for comparison, and a cProfile of the one-shot calls.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import numpy as np
from mpi4py import MPI

import pya2a


def main() -> None:
    import cupy as cp

    comm = MPI.COMM_WORLD
    p, r = comm.Get_size(), comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cp.cuda.Device(local.Get_rank() % cp.cuda.runtime.getDeviceCount()).use()
    m = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    s = cp.ones(p * m, dtype=cp.uint8)
    d = cp.zeros(p * m, dtype=cp.uint8)
    counts = np.full(p, m, dtype=np.int64)
    smsg, rmsg = [s, counts], [d, counts]
    sync = cp.cuda.get_current_stream().synchronize

    def timed(fn, n=2000) -> float:
        for _ in range(200):
            fn()
        sync()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return comm.allreduce((time.perf_counter() - t0) / n * 1e6, op=MPI.MAX)

    def call() -> None:
        pya2a.Alltoallv(comm, smsg, rmsg)

    t_api = timed(call)
    x = np.zeros(2, dtype=np.int64)
    t_ar = timed(lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.MAX))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        call()
    sync()
    prof.disable()
    if r == 0:
        print(f"p={p} {m} B per peer: one-shot auto {t_api:.2f} us per call, "
              f"Allreduce(2 int64) {t_ar:.2f} us")
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
