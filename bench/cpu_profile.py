"""Where the time of one small exchange goes (8 B per peer): run under mpiexec.

    mpiexec -n 64 python bench/cpu_profile.py > cpu_profile_p64.txt

Prints (rank 0) the mean over ranks of each rank's mean time per call for the MPI library's
own Alltoallv, the one-shot pya2a API and plans (auto, each algorithm, and native's
persistent MPI_Alltoallv_init through Plan.bind), then a cProfile of rank 0 for the one-shot
call and for the best store-and-forward plan, split into Python, packing and MPI.
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

comm = MPI.COMM_WORLD
p, rank = comm.Get_size(), comm.Get_rank()
m = int(sys.argv[1]) if len(sys.argv) > 1 else 8
N = 400
s = np.ones(p * m, dtype=np.uint8)
r = np.empty(p * m, dtype=np.uint8)


def timed(fn, n=N) -> float:
    for _ in range(20):
        fn()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    return comm.allreduce(t, op=MPI.SUM) / p * 1e6


rows = [("MPI Alltoallv (mpi4py)", timed(lambda: comm.Alltoallv(s, r)))]
rows.append(("pya2a.Alltoallv one-shot auto",
             timed(lambda: pya2a.Alltoallv(comm, s, r))))
auto = pya2a.plan(comm, m, m, MPI.BYTE)
rows.append((f"plan auto ({auto.algorithm})", timed(lambda: auto.run(s, r))))
for name in pya2a.available_algorithms(comm):
    pl = pya2a.plan(comm, m, m, MPI.BYTE, algorithm=name)
    rows.append((f"plan {name}", timed(lambda pl=pl: pl.run(s, r))))
    if name == "native":
        b = pl.bind(s, r)
        rows.append(("bound native (Alltoallv_init)", timed(b.run)))
        b.free()
    pl.free()
if rank == 0:
    print(f"# p={p} bytes/peer={m} {MPI.Get_library_version().splitlines()[0]}")
    for name, t in rows:
        print(f"{name:<34} {t:9.1f} us")


def profile(label: str, fn, n=N) -> None:
    for _ in range(20):
        fn()
    comm.Barrier()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    if rank == 0:
        out = io.StringIO()
        st = pstats.Stats(pr, stream=out)
        st.sort_stats("tottime").print_stats(12)
        print(f"\n## cProfile rank 0: {label}, {n} calls (profiler overhead included)")
        print("\n".join(out.getvalue().splitlines()[4:22]))


profile("pya2a.Alltoallv one-shot auto", lambda: pya2a.Alltoallv(comm, s, r))

# Split a bound store-and-forward plan into its local part (Python loop + _pack gathers and
# unpacks, no MPI) and its MPI part (Startall/Waitall of the same persistent requests).
def split(name: str) -> None:
    pl = pya2a.plan(comm, m, m, MPI.BYTE, algorithm=name)
    pl.run(s, r)
    fn = pl._last.bound.run
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__),
                     strict=True))
    if "plan_steps" not in cells:
        pl.free()
        return
    steps, out, inc, rb = cells["plan_steps"], cells["out"], cells["inc_all"], cells["rb"]
    gather, pack = cells["gather"], cells["pack"]
    startall, waitall = MPI.Prequest.Startall, MPI.Request.Waitall

    def local_only():
        for gathers, _, unpacks in steps:
            for src, offs, lens, at in gathers:
                gather(src, offs, lens, out, at)
            for offs, lens, dst in unpacks:
                pack(inc, offs, lens, rb, dst)

    def mpi_only():
        for _, reqs, _ in steps:
            if reqs:
                startall(reqs)
                waitall(reqs)

    full = timed(lambda: pl.run(s, r))
    loc = timed(local_only)
    mpi = timed(mpi_only)
    nmsg = sum(len(q) for _, q, _ in steps)
    ncall = sum(len(g) + len(u) for g, _, u in steps)
    if rank == 0:
        print(f"\n## plan {name}: full {full:.1f} us = local (Python + {ncall} pack calls) "
              f"{loc:.1f} us + MPI ({len(steps)} phases, {nmsg} persistent requests) "
              f"{mpi:.1f} us + rest {full - loc - mpi:.1f} us")
    pl.free()


for name in ("hypercube", "mesh"):
    split(name)

e = pya2a.explain(comm, [m] * p)
if rank == 0:
    print()
    print(e)
