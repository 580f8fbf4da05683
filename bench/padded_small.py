"""Small-message plans: padded against native and hypercube (issue 4's target), under mpiexec.

    mpiexec -n 32 python bench/padded_small.py [--sizes 8,32,128,256] [--rounds 7] [--json F]

Per size, interleaved rounds of: the MPI library's Alltoallv and Alltoall through mpi4py,
plans (native, hypercube, padded; ``run(s, r)``), bound plans (``Plan.bind``: native's
MPI_Alltoallv_init, padded's MPI_Alltoall_init), and padded one-shot. Each round times N
calls per row; a row's time is the mean over ranks of each rank's mean per call, and the
table shows the median over rounds (rounds interleave the rows, so a noisy neighbour hits
them all alike). Uniform counts; ``--pattern random`` gives every block a random size up to
the given one (padded then pads). Prints a table on rank 0, optional JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

import pya2a

comm = MPI.COMM_WORLD
p, rank = comm.Get_size(), comm.Get_rank()


def timed(fn, n: int) -> float:
    """Mean over ranks of each rank's mean seconds per call, after 10 untimed calls."""
    for _ in range(10):
        fn()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    return comm.allreduce(t, op=MPI.SUM) / p


def rows_for(m: int, pattern: str) -> list[tuple[str, object, object]]:
    """(name, callable, cleanup) rows for ``m`` bytes per peer."""
    if pattern == "uniform":
        c = np.full((p, p), m, dtype=np.int64)
    else:
        c = np.random.default_rng([p, m]).integers(0, m + 1, (p, p))
        c[0, p - 1] = m  # the largest block is m
    sc, rc = c[rank], c[:, rank]
    s = np.ones(int(sc.sum()), dtype=np.uint8)
    r = np.empty(int(rc.sum()), dtype=np.uint8)
    sm, rm = [s, sc], [r, rc]
    out: list[tuple[str, object, object]] = [
        ("MPI Alltoallv (mpi4py)", lambda: comm.Alltoallv(sm, rm), None)]
    if pattern == "uniform":
        out.append(("MPI Alltoall (mpi4py)", lambda: comm.Alltoall(s, r), None))
    for name in ["native", "hypercube", "padded"]:
        pl = pya2a.plan(comm, sc, rc, MPI.BYTE, algorithm=name)
        out.append((f"plan {name}", lambda pl=pl: pl.run(s, r), pl.free))
        if name in ("native", "padded"):
            b = pl.bind(s, r)
            out.append((f"bound {name} ({'Alltoallv' if name == 'native' else 'Alltoall'}"
                        f"_init)", b.run, b.free))
    out.append(("one-shot padded",
                lambda: pya2a.Alltoallv(comm, sm, rm, algorithm="padded"), None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8,32,128,256")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-n", type=int, default=200, help="timed calls per row and round")
    ap.add_argument("--pattern", choices=["uniform", "random"], default="uniform")
    ap.add_argument("--json")
    a = ap.parse_args()
    result = {"p": p, "mpi": MPI.Get_library_version().splitlines()[0], "pattern": a.pattern,
              "rounds": a.rounds, "calls": a.n, "sizes": {}}
    for m in [int(x) for x in a.sizes.split(",")]:
        rows = rows_for(m, a.pattern)
        times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
        for _ in range(a.rounds):
            for name, fn, _ in rows:
                times[name].append(timed(fn, a.n))
        for _, _, free in rows:
            if free is not None:
                free()
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        result["sizes"][m] = {"median_us": med,
                              "all_us": {k: [t * 1e6 for t in v] for k, v in times.items()}}
        if rank == 0:
            base = med["MPI Alltoallv (mpi4py)"]
            print(f"# p={p} {m} B per peer ({a.pattern}), median of {a.rounds} rounds x "
                  f"{a.n} calls; x = MPI Alltoallv time / time")
            for k, t in med.items():
                print(f"  {k:<34} {t:9.1f} us  x{base / t:5.2f}")
    if rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
