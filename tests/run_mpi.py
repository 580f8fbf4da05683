"""Run pytest on every rank of an mpiexec job; only rank 0 prints the report.

Usage: ``mpiexec -n N python -m mpi4py tests/run_mpi.py [pytest args]``. ``python -m mpi4py``
aborts the whole job if a rank dies with an exception; the conftest hook aborts it when a
test fails on any rank. The exit status is the worst over all ranks.
"""

import os
import sys

from mpi4py import MPI


def main() -> int:
    comm = MPI.COMM_WORLD
    if comm.Get_size() > 1 and comm.Get_rank() > 0:
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    import pytest

    rc = int(pytest.main(sys.argv[1:]))
    rc = 0 if rc == 5 and os.environ.get("PYA2A_ALLOW_EMPTY") else rc
    return comm.allreduce(rc, op=MPI.MAX)


if __name__ == "__main__":
    sys.exit(main())
