"""Distributed matrix transpose: block rows of A -> block rows of A.T, one all-to-all.

    mpiexec -n 4 python -m mpi4py examples/transpose.py

Rank r holds rows [lo_r, hi_r) of an n x n matrix A (uneven blocks when p does not divide
n). Viewing A as a p x p matrix of blocks A_rs, the transpose is an all-to-all: rank r
sends block A_rs to rank s. Stacking the received blocks A_sr (s = 0..p-1) gives the
column panel A[:, lo_r:hi_r]; one local transpose turns it into rows [lo_r, hi_r) of A.T.

pya2a.Comm is a drop-in for the mpi4py communicator: the Alltoallv call is mpi4py's.
A[i, j] = i * n + j, so every rank can recompute the block it should end up with.

Options: --n N, --small, --algorithm NAME, --device {cpu,cuda}, --repeat K.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

import numpy as np
from common import add_run_options, array_module, best_time, block_range, to_host
from mpi4py import MPI

import pya2a


def transpose_rows(comm: MPI.Intracomm, a_rows, n: int, xp: ModuleType):
    """Rows [lo_r, hi_r) of A (shape (m_r, n)) -> rows [lo_r, hi_r) of A.T (shape (m_r, n))."""
    p, rank = comm.Get_size(), comm.Get_rank()
    blocks = [block_range(n, p, s) for s in range(p)]
    m = [hi - lo for lo, hi in blocks]
    m_r = m[rank]
    # Pack: block A_rs = a_rows[:, lo_s:hi_s] is strided; make each one contiguous.
    sendbuf = xp.concatenate([a_rows[:, lo:hi].ravel() for lo, hi in blocks])
    recvbuf = xp.empty((n, m_r), dtype=a_rows.dtype)
    sendcounts = [m_r * m_s for m_s in m]
    recvcounts = [m_s * m_r for m_s in m]
    comm.Alltoallv(
        [sendbuf, (sendcounts, None), MPI.DOUBLE],
        [recvbuf, (recvcounts, None), MPI.DOUBLE],
    )
    return xp.ascontiguousarray(recvbuf.T)  # A[:, lo_r:hi_r] -> A.T[lo_r:hi_r, :]


def main(argv: list[str] | None = None) -> int:
    """Run the transpose, check it, print timing; 0 if correct on every rank, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="matrix order (default 4000)")
    parser.add_argument("--small", action="store_true", help="n = 37, for tests")
    add_run_options(parser)
    args = parser.parse_args(argv)
    n = 37 if args.small else args.n
    if n < 0 or args.repeat < 1:
        parser.error("--n must be >= 0 and --repeat >= 1")

    comm = pya2a.Comm(MPI.COMM_WORLD, algorithm=args.algorithm)
    p, rank = comm.Get_size(), comm.Get_rank()
    xp = array_module(args.device, comm)

    lo, hi = block_range(n, p, rank)
    a_rows = xp.arange(lo * n, hi * n, dtype=xp.float64).reshape(hi - lo, n)  # A[i, j] = i*n + j

    at_rows, t = best_time(comm, xp, args.repeat, transpose_rows, comm, a_rows, n, xp)

    # Expected: A.T[i, j] = A[j, i] = j * n + i for i in [lo, hi).
    i, j = np.arange(lo, hi)[:, None], np.arange(n)[None, :]
    want = (j * n + i).astype(np.float64)
    ok = comm.allreduce(bool(np.array_equal(to_host(at_rows), want)), op=MPI.LAND)

    if rank == 0:
        moved = 8.0 * n * n * (p - 1) / p  # bytes leaving their rank, whole matrix
        print(
            f"transpose n={n} p={p} algorithm={args.algorithm} device={args.device}: "
            f"{t * 1e3:.3f} ms (best of {args.repeat}), {moved / t / 1e9 if t else 0.0:.3f} GB/s, "
            f"{'OK' if ok else 'WRONG'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
