"""Staged device all-to-all against the pinned host<->device bound and the same algorithm on
pinned host buffers, as JSON rows (the everyday device numbers come from
``python -m pya2a bench --device cuda``; this script adds the host-buffer comparison, the
staging-chunk sweep and a profile of small calls).

Run one process per GPU (or several per GPU), e.g.::

    mpiexec -n 4 python bench/gpu_staged.py --out bench/results/gpu_staged_h200x4.json

For each size (bytes per (source, destination) pair, m) every rank measures, at the same
time as every other rank (barrier before each repetition):

* ``d2h`` / ``h2d``: one pinned copy of the remote volume (p-1) m, each direction alone;
* ``link``: both at once on two streams, the time a perfectly overlapped staging pipeline
  cannot beat (it must move (p-1) m down and (p-1) m up; the own block stays on the GPU);
* ``host_mpi``: MPI's own Alltoall on pinned host buffers of p m bytes (no GPU at all);
* one row per pya2a algorithm on CuPy device buffers (staged unless MPI is CUDA-aware),
  plus a staging-chunk sweep at the largest size.

Times are host wall-clock per call (pya2a returns with the receive buffer complete),
median over repetitions of the max over ranks. ``vs_link`` = link time / call time (1.0 =
the PCIe bound reached); algbw = m p / time, busbw = algbw (p-1)/p as nccl-tests defines
them. Data is random bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from pya2a.tools.gpu_bench import median_time

__all__ = ["main", "run"]

SIZES = [4096, 65536, 1 << 20, 16 << 20, 64 << 20]


def _reps(m: int) -> tuple[int, int]:
    return (3, 30) if m <= 1 << 20 else (2, 8)


# median over repetitions of the slowest rank's time of one call, barrier before each
_time = median_time


def run(comm: MPI.Intracomm, sizes: list[int], algorithms: list[str],
        chunks: list[str]) -> dict[str, Any]:
    """All rows for ``sizes``; see the module doc for what each row is."""
    import cupy as cp

    import pya2a
    from pya2a.gpu import device as gdev

    p, r = comm.Get_size(), comm.Get_rank()
    ndev = cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(r % ndev).use()
    rows: list[dict] = []
    s1 = cp.cuda.Stream(non_blocking=True)
    s2 = cp.cuda.Stream(non_blocking=True)
    rng = cp.random.default_rng(r)
    rt = cp.cuda.runtime

    def row(kind: str, m: int, t: float, link: float | None, **extra: Any) -> None:
        algbw = m * p / t / 1e9 if t > 0 else 0.0
        d = {"method": kind, "bytes_per_pair": m, "time_us": t * 1e6,
             "algbw_GBps": algbw, "busbw_GBps": algbw * (p - 1) / p}
        if link:
            d["vs_link"] = link / t
        d.update(extra)
        rows.append(d)
        if r == 0:
            print(json.dumps(d), flush=True)

    for m in sizes:
        warm, reps = _reps(m)
        vol = (p - 1) * m
        dsrc = rng.integers(0, 255, size=max(vol, 1), dtype=cp.uint8)
        ddst = cp.empty(max(vol, 1), cp.uint8)
        hsrc = cp.cuda.alloc_pinned_memory(max(vol, 1))
        hdst = cp.cuda.alloc_pinned_memory(max(vol, 1))
        def d2h(dsrc=dsrc, hdst=hdst, vol=vol) -> None:
            rt.memcpyAsync(hdst.ptr, dsrc.data.ptr, vol, rt.memcpyDeviceToHost, s1.ptr)
            s1.synchronize()

        def h2d(hsrc=hsrc, ddst=ddst, vol=vol) -> None:
            rt.memcpyAsync(ddst.data.ptr, hsrc.ptr, vol, rt.memcpyHostToDevice, s2.ptr)
            s2.synchronize()

        def both(dsrc=dsrc, ddst=ddst, hsrc=hsrc, hdst=hdst, vol=vol) -> None:
            rt.memcpyAsync(hdst.ptr, dsrc.data.ptr, vol, rt.memcpyDeviceToHost, s1.ptr)
            rt.memcpyAsync(ddst.data.ptr, hsrc.ptr, vol, rt.memcpyHostToDevice, s2.ptr)
            s1.synchronize()
            s2.synchronize()

        t_d2h = _time(comm, d2h, warm, reps)
        t_h2d = _time(comm, h2d, warm, reps)
        t_link = _time(comm, both, warm, reps)
        row("d2h", m, t_d2h, None, GBps=vol / t_d2h / 1e9)
        row("h2d", m, t_h2d, None, GBps=vol / t_h2d / 1e9)
        row("link", m, t_link, t_link, GBps_each_way=vol / t_link / 1e9)
        hs = np.frombuffer(cp.cuda.alloc_pinned_memory(p * m), np.uint8, p * m)
        hr = np.frombuffer(cp.cuda.alloc_pinned_memory(p * m), np.uint8, p * m)
        hs[:] = np.random.default_rng(r).integers(0, 255, p * m, dtype=np.uint8)
        row("host_mpi", m, _time(comm, lambda hs=hs, hr=hr: comm.Alltoall(hs, hr), warm, reps),
            t_link)
        send = rng.integers(0, 255, size=p * m, dtype=cp.uint8)
        recv = cp.empty(p * m, cp.uint8)
        for name in algorithms:
            th = _time(comm, lambda name=name, hs=hs, hr=hr:
                       pya2a.Alltoall(comm, hs, hr, algorithm=name), warm, reps)
            row(f"host:{name}", m, th, t_link, buffers="pinned host")
            t = _time(comm, lambda name=name, send=send, recv=recv:
                      pya2a.Alltoall(comm, send, recv, algorithm=name), warm, reps)
            row(f"pya2a:{name}", m, t, t_link, vs_host_same=th / t,
                transport="aware" if gdev.comm_cuda_aware(comm) else "staged")
        ok = bool(comm.allreduce(int(_check(cp, comm, send, recv, m)), op=MPI.MIN))
        rows[-1]["checked"] = ok
        if m == sizes[-1]:
            old = os.environ.get("PYA2A_STAGE_CHUNK")
            for c in chunks:
                os.environ["PYA2A_STAGE_CHUNK"] = c
                t = _time(comm, lambda send=send, recv=recv:
                          pya2a.Alltoall(comm, send, recv, algorithm="pairwise"), warm, reps)
                row("pya2a:pairwise", m, t, t_link, chunk=c)
            if old is None:
                os.environ.pop("PYA2A_STAGE_CHUNK", None)
            else:
                os.environ["PYA2A_STAGE_CHUNK"] = old
        del dsrc, ddst, hsrc, hdst, send, recv
        cp.get_default_memory_pool().free_all_blocks()
    return {"rows": rows}


def _check(cp, comm: MPI.Intracomm, send, recv, m: int) -> bool:
    """The last algorithm's result against MPI's own Alltoall on host copies."""
    ref = np.empty(recv.size, np.uint8)
    comm.Alltoall(cp.asnumpy(send), ref)
    return bool(np.array_equal(cp.asnumpy(recv), ref))


def _profile(comm: MPI.Intracomm, name: str, nbytes: str) -> None:
    """Where the host time of a small staged call goes (rank 0's view)."""
    import cProfile
    import io
    import pstats

    import cupy as cp

    import pya2a

    p, r = comm.Get_size(), comm.Get_rank()
    cp.cuda.Device(r % cp.cuda.runtime.getDeviceCount()).use()
    m = int(nbytes)
    send = cp.ones(p * m, cp.uint8)
    recv = cp.empty(p * m, cp.uint8)
    for _ in range(20):
        pya2a.Alltoall(comm, send, recv, algorithm=name)
    prof = cProfile.Profile()
    comm.Barrier()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(200):
        pya2a.Alltoall(comm, send, recv, algorithm=name)
    prof.disable()
    dt = (time.perf_counter() - t0) / 200
    if r == 0:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        print(f"{name} {m} B/pair: {dt * 1e6:.1f} us per call under the profiler")
        print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python bench/gpu_staged.py [--sizes ...] [--out FILE]``."""
    ap = argparse.ArgumentParser(prog="bench/gpu_staged.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="bytes per pair, comma-separated")
    ap.add_argument("--algorithms", default="native,direct,pairwise,ring,mesh,hypercube")
    ap.add_argument("--chunks", default="1M,4M,16M", help="chunk sweep at the largest size")
    ap.add_argument("--out", default=None, help="JSON file (rank 0 writes)")
    ap.add_argument("--profile", default=None,
                    help="ALG:BYTES: cProfile 200 calls on rank 0, print the top entries")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    import cupy as cp

    import pya2a
    from pya2a.gpu import device as gdev

    if args.profile:
        _profile(comm, *args.profile.split(":"))
        return 0
    names = [a for a in args.algorithms.split(",") if a]
    avail = pya2a.available_algorithms(comm, device=True)
    names = [a for a in names if a in avail]
    res = run(comm, [int(s) for s in args.sizes.split(",")], names,
              [c for c in args.chunks.split(",") if c])
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    res["provenance"] = {
        "host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime()),
        "command": " ".join(["mpiexec", "-n", str(comm.Get_size()), "python",
                             "bench/gpu_staged.py", *(argv or sys.argv[1:])]),
        "ranks": comm.Get_size(), "gpus_visible": cp.cuda.runtime.getDeviceCount(),
        "gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "mpi4py": __import__("mpi4py").__version__, "cupy": cp.__version__,
        "python": platform.python_version(), "cuda_aware": gdev.cuda_aware(),
        "cuda_aware_reason": gdev.cuda_aware_reason(),
        "stage_chunk_default": os.environ.get("PYA2A_STAGE_CHUNK", "4M"),
        "timing": "host wall-clock per call, median over reps of max over ranks",
    }
    if comm.Get_rank() == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
