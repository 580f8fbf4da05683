"""mpiexec -n 4 python -m mpi4py examples/demo.py

A real Alltoallv with uneven, random block sizes, run through every pya2a algorithm and the
MPI library's own call; checks each result against MPI's and prints what moved and how long
each took (median of repeated calls).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

import pya2a


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--kib", type=float, default=64.0, help="mean KiB per peer")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="1 KiB per peer, 2 calls (tests)")
    args = ap.parse_args()
    if args.small:
        args.kib, args.iters = 1.0, 2

    comm = MPI.COMM_WORLD
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(2026)  # same on every rank: everyone knows the count matrix
    mean = max(1, int(args.kib * 1024 / 8))
    counts = rng.integers(0, 2 * mean + 1, (p, p))
    sendcounts, recvcounts = counts[r], counts[:, r]
    send = np.random.default_rng([2026, r]).standard_normal(int(sendcounts.sum()))
    ref = np.empty(int(recvcounts.sum()))
    comm.Alltoallv([send, sendcounts], [ref, recvcounts])

    if r == 0:
        lib = MPI.Get_library_version().splitlines()[0]
        print(f"pya2a {pya2a.__version__} on {p} ranks, {lib}")
        print(f"Alltoallv of float64, random counts, mean {args.kib:g} KiB per peer, "
              f"{counts.sum() * 8 / 2**20:.2f} MiB in total; median of {args.iters} calls")
        print(f"{'algorithm':>12} {'time':>11} {'busbw':>10}  check")
    ok = True
    for alg in ["native", *[a for a in pya2a.available_algorithms() if a != "native"], "auto"]:
        out = np.empty_like(ref)
        times = []
        for _ in range(args.iters):
            comm.Barrier()
            t0 = time.perf_counter()
            pya2a.Alltoallv(comm, [send, sendcounts], [out, recvcounts], algorithm=alg)
            times.append(time.perf_counter() - t0)
        t = comm.allreduce(float(np.median(times)), op=MPI.MAX)
        good = comm.allreduce(bool(np.array_equal(out, ref)), op=MPI.LAND)
        ok &= good
        busbw = counts.sum() * 8 / p / t * (p - 1) / p / 1e9 if t > 0 else 0.0
        if r == 0:
            print(f"{alg:>12} {t * 1e6:9.1f} us {busbw:6.2f} GB/s  {'ok' if good else 'WRONG'}")
    if r == 0:
        print("OK: every algorithm matched MPI's own Alltoallv" if ok else
              "WRONG: some algorithm differed from MPI's own Alltoallv")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
