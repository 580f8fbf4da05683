"""Soak: communicators created and freed in a loop, and two threads on their own ones.

``mpiexec -n P python -m mpi4py bench/soak_comms.py dup N``: N iterations of ``Dup``, one
one-shot exchange with every host algorithm and one plan run on the duplicate, ``Free``;
prints the resident set size (VmRSS) every N/10 iterations and the live pya2a
communicator states at the end (0 expected), checking every result against MPI's own call.

``... soak_comms.py threads N``: two threads, each on its own duplicate of COMM_WORLD, run N
rounds each, alternating one-shot calls on a fresh duplicate (set-up included) and plan
runs; needs MPI_THREAD_MULTIPLE.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
from mpi4py import MPI

import pya2a
from pya2a import algorithms
from pya2a.core.state import live_states


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def data(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng([7, p])
    c = rng.integers(0, 9, (p, p))
    send = np.arange(int(c[r].sum()), dtype=np.float64) + 1000 * r
    want = np.empty(int(c[:, r].sum()))
    comm.Alltoallv([send, c[r]], [want, c[:, r]])
    return c, send, want


def dup_loop(n: int) -> None:
    world = MPI.COMM_WORLD
    p, r = world.Get_size(), world.Get_rank()
    c, send, want = data(world)
    names = algorithms.available(p)
    t0 = time.perf_counter()
    for i in range(n):
        d = world.Dup()
        for name in names:
            out = np.zeros_like(want)
            pya2a.Alltoallv(d, [send, c[r]], [out, c[:, r]], algorithm=name)
            if not np.array_equal(out, want):
                raise AssertionError(f"{name}: wrong result at iteration {i}")
        with pya2a.plan(d, c[r], c[:, r], np.float64) as pl:
            out = np.zeros_like(want)
            pl.run(send, out)
            assert np.array_equal(out, want)
        d.Free()
        if r == 0 and (i + 1) % max(1, n // 10) == 0:
            print(f"iteration {i + 1}: VmRSS {rss_kib()} KiB, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    live = len(list(live_states()))
    if r == 0:
        print(f"dup/free: {n} iterations x ({len(names)} algorithms + 1 plan) at p={p}; "
              f"live states left besides COMM_WORLD's: {live}", flush=True)


def thread_rounds(n: int) -> None:
    world = MPI.COMM_WORLD
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise SystemExit("needs MPI_THREAD_MULTIPLE")
    p, r = world.Get_size(), world.Get_rank()
    c, send, want = data(world)
    comms = [world.Dup(), world.Dup()]
    plans = [pya2a.plan(d, c[r], c[:, r], np.float64) for d in comms]
    names = algorithms.available(p)
    errors: list = []

    def work(k: int) -> None:
        try:
            for i in range(n):
                out = np.zeros_like(want)
                if i % 2:
                    plans[k].run(send, out)
                else:
                    fresh = comms[k].Dup()
                    pya2a.Alltoallv(fresh, [send, c[r]], [out, c[:, r]],
                                    algorithm=names[(i // 2) % len(names)])
                    fresh.Free()
                if not np.array_equal(out, want):
                    raise AssertionError(f"thread {k}: wrong result at round {i}")
        except Exception as e:
            errors.append(e)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for pl in plans:
        pl.free()
    for d in comms:
        d.Free()
    if errors:
        raise errors[0]
    if r == 0:
        print(f"threads: 2 x {n} rounds at p={p} in {time.perf_counter() - t0:.1f} s, "
              f"no deadlock", flush=True)


if __name__ == "__main__":
    mode, count = sys.argv[1], int(sys.argv[2])
    dup_loop(count) if mode == "dup" else thread_rounds(count)
