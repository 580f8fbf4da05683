"""Per-call time of the public API on device buffers vs the IPC engine called directly.

mpiexec -n 4 python bench/gpu_api_overhead.py --out bench/results/gpu_api_overhead.json
Host wall time per call, median over ranks' means, after warm-up; the device work is
stream-ordered, so each timing ends with a stream synchronize.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import pya2a
from pya2a.gpu import ipc_algorithm as ipc_alg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--iters", type=int, default=300)
    a = ap.parse_args()
    import cupy as cp

    comm = MPI.COMM_WORLD
    p, r = comm.Get_size(), comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cp.cuda.Device(local.Get_rank() % cp.cuda.runtime.getDeviceCount()).use()
    rows = []
    for per_peer in (128, 1024, 65536, 1 << 20):
        n = per_peer * p
        s = cp.ones(n, dtype=cp.uint8)
        d = cp.zeros(n, dtype=cp.uint8)
        counts = np.full(p, per_peer, dtype=np.int64)
        displs = np.arange(p, dtype=np.int64) * per_peer
        row = {"bytes_per_peer": per_peer}
        for label, alg in (("api_ipc", "ipc"), ("api_auto", "auto")):
            smsg, rmsg = [s, counts], [d, counts]

            def call(alg=alg, smsg=smsg, rmsg=rmsg):
                pya2a.Alltoallv(comm, smsg, rmsg, algorithm=alg)
            for _ in range(30):
                call()
            cp.cuda.get_current_stream().synchronize()
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                call()
            cp.cuda.get_current_stream().synchronize()
            t = (time.perf_counter() - t0) / a.iters
            row[label + "_us"] = comm.allreduce(t, op=MPI.MAX) * 1e6
        icomm = pya2a.api.internal_comm(comm)
        eng = ipc_alg._engine(icomm, cp.cuda.Device().id, per_peer)
        method = type(eng).choose(per_peer)
        for _ in range(30):
            eng.alltoallv(s, counts, displs, d, counts, displs, method=method)
        cp.cuda.get_current_stream().synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            eng.alltoallv(s, counts, displs, d, counts, displs, method=method)
        cp.cuda.get_current_stream().synchronize()
        t = (time.perf_counter() - t0) / a.iters
        row["engine_us"] = comm.allreduce(t, op=MPI.MAX) * 1e6
        row["method"] = method
        rows.append(row)
        if r == 0:
            print(row, flush=True)
    if r == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump({"ranks": p, "mpi": MPI.Get_library_version().splitlines()[0],
                       "timing": "host wall time per call (max over ranks), back to back, "
                                 "stream synchronize at the end", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
