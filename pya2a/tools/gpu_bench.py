"""``python -m pya2a bench --device cuda``: pya2a on GPU buffers against NCCL (torch) in one
run, printed in the table of the host bench.

Run one process per GPU, e.g.::

    NCCL_NVLS_ENABLE=0 mpiexec -n 4 python -m pya2a bench --device cuda --json gpu.json

Each row: method, bytes per pair, time per call (CUDA events around ``iters``
back-to-back calls after warm-up, divided by ``iters``; the max over ranks),
single-call latency (barrier, host call, stream sync, barrier; median of reps, max
over ranks), algbw = bytes per pair * p / time and busbw = algbw * (p-1)/p as
nccl-tests defines them. Data is random, not zeros; at small sizes buffers sit in
L2 for every method alike. NCCL runs through ``torch.distributed.all_to_all_single``
when torch is importable (optional baseline).

Public-API rows (``staged=True``, the default; ``--algorithms`` picks them):
``api:pairwise`` (the staged MPI path through host MPI, or the CUDA-aware
path when :func:`pya2a.gpu.device.cuda_aware` holds: the transport is chosen by the library,
the row's ``transport`` says which), ``api:native`` (up to 1 MiB per pair), ``api:shm`` (the
node-shared pinned window, when every rank is on one node) and ``api:auto`` (the one-shot
``pya2a.Alltoallv(..., algorithm="auto")``; ``chose`` names the algorithm it ran), each a
one-shot ``pya2a.Alltoallv`` on CuPy buffers, timed on the host around ``iters``
back-to-back calls and a final stream synchronisation. ``pinned_d2h`` / ``pinned_h2d`` /
``pinned_bound`` time one pinned copy of the remote volume (p-1) m down, up, and both at
once on two streams, every rank at the same time: ``pinned_bound`` is what a perfectly
overlapped staging pipeline cannot beat, and each API row carries ``vs_pinned_bound`` =
bound time / row time (1.0 = the PCIe bound reached).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import numpy as np

__all__ = ["run_bench", "bench_cuda", "to_report", "label", "median_time"]

DEFAULT_SIZES = [128, 1024, 8192, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def _iters(nbytes: int) -> tuple[int, int]:
    if nbytes <= 1 << 20:
        return 20, 200
    if nbytes <= 16 << 20:
        return 5, 50
    return 3, 10


class _Timer:
    """CUDA events on one torch or CuPy stream; the best of ``passes`` measurements."""

    def __init__(self, cp: Any, stream_ptr: int, passes: int = 1) -> None:
        self.cp = cp
        self.passes = max(1, int(passes))
        self.last: list[float] = []  # every pass of the last time() call, seconds per call
        with warnings.catch_warnings():  # ExternalStream is deprecated in CuPy 14
            warnings.simplefilter("ignore", DeprecationWarning)
            self.stream = cp.cuda.ExternalStream(stream_ptr)

    def time(self, fn: Any, warm: int, iters: int) -> float:
        cp = self.cp
        for _ in range(warm):
            fn()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        self.last = []
        for _ in range(self.passes):
            e0.record(self.stream)
            for _ in range(iters):
                fn()
            e1.record(self.stream)
            e1.synchronize()
            self.last.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3 / iters)
        return min(self.last)

    def passes_us(self) -> list[float]:
        """The last measurement's passes in microseconds (for the JSON row)."""
        return [round(t * 1e6, 3) for t in self.last]


def _latency(comm: Any, fn: Any, sync: Any, reps: int = 20) -> float:
    ts = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        sync()
        t1 = time.perf_counter()
        comm.Barrier()
        ts.append(t1 - t0)
    return float(np.median(ts))


def run_bench(comm: Any, sizes: list[int], methods: list[str], *, nccl: bool = True,
              graph: bool = True, nccl_graph: bool = False, log: Any = None,
              staged: bool = True, passes: int = 1, algorithms: list[str] | None = None,
              warmup: int | None = None, iters: int | None = None,
              step: Any = None) -> list[dict]:
    """Benchmark rows for every (method, size); collective over ``comm``.

    ``staged`` adds the public-API rows (``algorithms``, default pairwise, native up to 1
    MiB, shm where it runs, auto) and the pinned bound (module doc). ``passes``: every timed
    row (NCCL's too) is measured that many times back to back and reports each rank's best
    pass (``passes_us`` lists them), then the slowest rank (``time_us``; ``avg_us`` /
    ``min_us`` are the mean and least over ranks). ``warmup`` / ``iters`` replace the
    per-size defaults; ``step(label)`` is called as each size starts.
    """
    from pya2a.gpu import cupy as get_cupy
    from pya2a.gpu.ipc_alltoallv import IpcAlltoallv

    cp = get_cupy()
    p, rank = comm.Get_size(), comm.Get_rank()
    ndev = cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(rank % ndev).use()
    torch = dist = None
    if nccl:
        try:
            import torch
            import torch.distributed as dist

            torch.cuda.set_device(rank % ndev)
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            port = comm.bcast(29500 + (os.getpid() % 1000) if rank == 0 else None)
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                                    rank=rank, world_size=p)
        except Exception as exc:  # optional baseline
            if rank == 0:
                print(f"# NCCL baseline off: {exc}", file=sys.stderr)
            torch = dist = None
    if torch is not None:
        tstream = torch.cuda.Stream()
        sptr = int(tstream.cuda_stream)
    else:
        sstream = cp.cuda.Stream(non_blocking=True)
        sptr = int(sstream.ptr)
    timer = _Timer(cp, sptr, passes)

    ok, why = IpcAlltoallv.available(comm)
    maxb = max(sizes)
    api = _ApiRows(comm, cp, maxb, passes, algorithms) if staged else None
    eng = None
    pdl = pdl_default = False
    if ok:
        eng = IpcAlltoallv(comm, capacity_bytes=maxb, ll_bytes=min(maxb, 1 << 20))
        from ..gpu.ipc_alltoallv import pdl_supported

        pdl_default = eng.pdl
        pdl = pdl_supported(cp, eng.device)
        sym_send = eng.alloc_symmetric(p * maxb)
        sym_recv = eng.alloc_symmetric(p * maxb)
    send = cp.random.randint(0, 255, size=p * maxb, dtype=np.uint8)
    recv = cp.empty(p * maxb, dtype=np.uint8)
    if eng is not None:
        sym_send[...] = send
    rows: list[dict] = []

    def emit(row: dict) -> None:
        from mpi4py import MPI

        mine = row["time_us"]
        t = comm.allreduce(mine, op=MPI.MAX)
        row["min_us"] = comm.allreduce(mine, op=MPI.MIN)
        row["avg_us"] = comm.allreduce(mine, op=MPI.SUM) / p
        lat = comm.allreduce(row.get("latency_us", 0.0), op=MPI.MAX)
        row["time_us"], row["latency_us"] = t, lat
        algbw = row["bytes_per_pair"] * p / (t * 1e-6) / 1e9 if t > 0 else 0.0
        row["algbw_GBs"] = algbw
        row["busbw_GBs"] = algbw * (p - 1) / p
        rows.append(row)
        if rank == 0 and log is not None:
            extra = ""
            if "vs_pinned_bound" in row:
                extra = f"  {row['vs_pinned_bound']:.2f} of pinned bound"
            if "chose" in row:
                extra += f"  (auto chose {row['chose']})"
            if "error" in row:
                extra += f"  ERROR {row['error']}"
            print(f"{row['method']:>14} {row['bytes_per_pair']:>10} B  {t:10.2f} us  "
                  f"lat {lat:9.2f} us  busbw {row['busbw_GBs']:7.1f} GB/s{extra}", file=log,
                  flush=True)

    n_warm, n_iters = warmup, iters
    for n in sizes:
        warm, iters = _iters(n)
        warm = warm if n_warm is None else max(1, n_warm)
        iters = iters if n_iters is None else max(1, n_iters)
        if step is not None:
            step(n)
        counts = np.full(p, n, dtype=np.int64)
        displs = np.arange(p, dtype=np.int64) * n
        if torch is not None:
            ts = torch.as_tensor(send[: p * n], device="cuda")
            tr = torch.empty(p * n, dtype=torch.uint8, device="cuda")
            with torch.cuda.stream(tstream):
                def f_nccl(tr=tr, ts=ts) -> None:
                    dist.all_to_all_single(tr, ts)
                t = timer.time(f_nccl, warm, iters)
                pas = timer.passes_us()
                lat = _latency(comm, f_nccl, tstream.synchronize)
            emit({"method": "nccl", "bytes_per_pair": n, "time_us": t * 1e6,
                  "latency_us": lat * 1e6, "iters": iters, "passes_us": pas})
        if api is not None:
            for row in api.rows(n, send, recv, warm, iters) + api.copy_rows(
                    n, send, recv, warm, iters):
                emit(row)
        if eng is None:
            continue
        variants = []  # (name, method, sendbuf, recvbuf, eager path usable)
        for m in methods:
            if m == "ll" and n <= eng.ll_bytes:
                variants.append(("ll", "ll", send, recv, True))
                if pdl:  # the same calls through programmatic dependent launch
                    variants.append(("ll_pdl", "ll", send, recv, True))
            elif m == "push":
                variants.append(("push_inplace", "push", send, sym_recv, True))
            elif m == "push_staged" and n <= eng.slot_bytes:
                variants.append(("push_staged", "push", send, recv, True))
            elif m == "pull":
                variants.append(("pull", "pull", sym_send, recv, True))
            elif m == "ce" and n >= 1 << 20:
                variants.append(("ce_staged", "ce", send, recv, True))
                variants.append(("ce_inplace", "ce", send, sym_recv, False))
        for name, meth, sb, rb, eager in variants:
            # ll and ll_pdl compare the two launch paths; other methods launch as by default
            eng.pdl = name.endswith("_pdl") or (pdl_default and not (pdl and name == "ll"))
            plan = eng.plan(sb[: p * n], counts, displs, rb[: p * n], counts, displs,
                            method=meth)

            def f_eager(sb=sb[: p * n], rb=rb[: p * n], meth=meth, c=counts,
                        d=displs) -> None:
                eng.alltoallv(sb, c, d, rb, c, d, stream=sptr, method=meth)

            def f_plan(plan=plan) -> None:
                plan.run(stream=sptr)

            sync = timer.stream.synchronize
            if eager:
                t = timer.time(f_eager, warm, iters)
                pas = timer.passes_us()
                lat = _latency(comm, f_eager, sync)
                # host-side cost of one eager call (Python packing + launch)
                h0 = time.perf_counter()
                for _ in range(20):
                    f_eager()
                host_us = (time.perf_counter() - h0) / 20 * 1e6
                sync()
                emit({"method": name, "bytes_per_pair": n, "time_us": t * 1e6,
                      "latency_us": lat * 1e6, "iters": iters, "host_us": host_us,
                      "passes_us": pas})
            tp = timer.time(f_plan, warm, iters)
            pas = timer.passes_us()
            lat = _latency(comm, f_plan, sync)
            emit({"method": name + "_plan", "bytes_per_pair": n, "time_us": tp * 1e6,
                  "latency_us": lat * 1e6, "iters": iters, "passes_us": pas})
            if graph and n <= 1 << 20:
                g = _capture(cp, timer.stream, f_plan, iters)
                if g is not None:
                    g.launch(timer.stream)
                    timer.stream.synchronize()
                    tg = timer.time(lambda g=g: g.launch(timer.stream), 2, 10) / iters
                    emit({"method": name + "_graph", "bytes_per_pair": n,
                          "time_us": tg * 1e6, "iters": 10 * iters,
                          "passes_us": [t / iters for t in timer.passes_us()]})
        comm.Barrier()
    if eng is not None:
        eng.pdl = pdl_default
    if torch is not None and nccl_graph:
        rows += _nccl_graph(comm, torch, dist, timer, send, sizes, p, emit_fn=emit)
    if eng is not None:
        eng.free()
    if api is not None:
        api.free()
    if dist is not None:
        dist.destroy_process_group()
    return rows


class _ApiRows:
    """Public-API rows on device buffers and the pinned host<->device bound (module doc)."""

    def __init__(self, comm: Any, cp: Any, maxb: int, passes: int = 1,
                 algorithms: list[str] | None = None) -> None:
        import pya2a
        from pya2a.gpu import device as gdev
        from pya2a.gpu import shm_algorithm as shm

        self.comm, self.cp, self.pya2a = comm, cp, pya2a
        self.passes = max(1, int(passes))
        self.algorithms = algorithms
        self.p = p = comm.Get_size()
        self.aware = gdev.comm_cuda_aware(pya2a.api.internal_comm(comm))
        self.shm_ok, self.shm_why = shm.comm_available(pya2a.api.internal_comm(comm))
        vol = max((p - 1) * maxb, 1)
        self.dsrc = cp.random.randint(0, 255, size=vol, dtype=np.uint8)
        self.ddst = cp.empty(vol, dtype=np.uint8)
        self.hsrc = cp.cuda.alloc_pinned_memory(vol)
        self.hdst = cp.cuda.alloc_pinned_memory(vol)
        self.s1 = cp.cuda.Stream(non_blocking=True)
        self.s2 = cp.cuda.Stream(non_blocking=True)
        self.ref = cp.empty(p * maxb, dtype=np.uint8)

    def _bound(self, n: int, warm: int, iters: int) -> list[dict]:
        rt, vol = self.cp.cuda.runtime, (self.p - 1) * n
        s1, s2 = self.s1, self.s2
        if vol == 0:
            return []

        def d2h() -> None:
            rt.memcpyAsync(self.hdst.ptr, self.dsrc.data.ptr, vol, rt.memcpyDeviceToHost, s1.ptr)
            s1.synchronize()

        def h2d() -> None:
            rt.memcpyAsync(self.ddst.data.ptr, self.hsrc.ptr, vol, rt.memcpyHostToDevice, s2.ptr)
            s2.synchronize()

        def both() -> None:
            rt.memcpyAsync(self.hdst.ptr, self.dsrc.data.ptr, vol, rt.memcpyDeviceToHost, s1.ptr)
            rt.memcpyAsync(self.ddst.data.ptr, self.hsrc.ptr, vol, rt.memcpyHostToDevice, s2.ptr)
            s1.synchronize()
            s2.synchronize()

        reps = max(3, min(iters, 20))
        out = []
        for name, fn in (("pinned_d2h", d2h), ("pinned_h2d", h2d), ("pinned_bound", both)):
            t = median_time(self.comm, fn, min(warm, 3), reps)  # median of max over ranks
            out.append({"method": name, "bytes_per_pair": n, "time_us": t * 1e6,
                        "iters": reps, "GBps_each_way": vol / t / 1e9 if t > 0 else 0.0})
        self.bound_us = out[-1]["time_us"]
        return out

    def _call(self, alg: str, smsg: list, rmsg: list) -> str | None:
        """One one-shot call; returns the algorithm that ran (the one-shot path says)."""
        from pya2a._oneshot import exchange

        try:
            return exchange("Alltoallv", "alltoallv", self.comm, smsg, rmsg, alg, False)
        except TypeError:  # another signature: the public call, without the name
            self.pya2a.Alltoallv(self.comm, smsg, rmsg, algorithm=alg)
            return None

    def rows(self, n: int, send: Any, recv: Any, warm: int, iters: int) -> list[dict]:
        """Bound rows, then one row per public-API path at ``n`` bytes per pair."""
        from mpi4py import MPI

        cp, comm, p = self.cp, self.comm, self.p
        self.bound_us = 0.0
        out = self._bound(n, warm, iters)
        if self.algorithms:
            algs = [a for a in self.algorithms if a != "shm" or self.shm_ok]
        else:
            algs = ["pairwise"] + (["native"] if n <= 1 << 20 else [])
            algs += (["shm"] if self.shm_ok else []) + ["auto"]
        sync = cp.cuda.get_current_stream().synchronize
        first = True
        # the messages are made once, as an application with fixed buffers would (a CuPy
        # slice per call costs microseconds of host time that are not pya2a's)
        counts = np.full(p, n, dtype=np.int64)
        smsg, rmsg = [send[: p * n], counts], [recv[: p * n], counts]
        for alg in algs:
            chose = None
            try:
                for _ in range(warm):
                    chose = self._call(alg, smsg, rmsg) or chose
                sync()
                pas = []
                for _ in range(self.passes):
                    comm.Barrier()
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        self._call(alg, smsg, rmsg)
                    sync()
                    pas.append(comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))
                t = min(pas)
            except Exception as exc:  # a failing path is a row with its error, not a crash
                out.append({"method": f"api:{alg}", "bytes_per_pair": n, "time_us": 0.0,
                            "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            # correctness: the first row against MPI's own Alltoall on host copies, every
            # other row against the first row's output (on the device)
            if first:
                host = np.empty(p * n, dtype=np.uint8)
                comm.Alltoall(cp.asnumpy(send[: p * n]), host)
                good = bool(np.array_equal(cp.asnumpy(recv[: p * n]), host))
                self.ref[: p * n] = recv[: p * n]
                first = False
            else:
                good = bool(cp.array_equal(recv[: p * n], self.ref[: p * n]))
            wrong = int(comm.allreduce(0 if good else 1, op=MPI.SUM))
            row = {"method": f"api:{alg}", "bytes_per_pair": n, "time_us": t * 1e6,
                   "iters": iters, "passes_us": [round(x * 1e6, 3) for x in pas],
                   "checked": wrong == 0, "wrong": wrong, "api": "pya2a.Alltoallv one-shot",
                   "transport": "shm" if alg == "shm" else
                   ("aware" if self.aware else "staged")}
            if alg == "auto":
                row["chose"] = comm.bcast(chose)
            if self.bound_us and t > 0:
                row["pinned_bound_us"] = self.bound_us
                row["vs_pinned_bound"] = self.bound_us * 1e-6 / t
            if alg == "shm":
                from pya2a.core.state import state
                from pya2a.gpu import shm as gshm

                win = state(comm).slot(gshm._WINDOW)
                row["window_pinned"] = bool(win.pinned) if win is not None else None
                row["window_backing"] = win.backing if win is not None else None
            out.append(row)
        return out

    def copy_rows(self, n: int, send: Any, recv: Any, warm: int, iters: int) -> list[dict]:
        """One rank: CuPy copies of the same bytes, the yardstick of the p = 1 exchange.

        ``cupy_copy``: ``recv[...] = send`` back to back (asynchronous, one wait per pass,
        as the other rows are timed); ``cupy_copy_sync``: each copy waited for, which is
        what an exchange does before it returns (its receive buffer is complete).
        """
        cp = self.cp
        if self.p != 1:
            return []
        sync = cp.cuda.get_current_stream().synchronize
        dst, src = recv[:n], send[:n]

        def copy() -> None:
            dst[...] = src

        def copy_sync() -> None:
            dst[...] = src
            sync()

        out = []
        for name, fn in (("cupy_copy", copy), ("cupy_copy_sync", copy_sync)):
            for _ in range(warm):
                fn()
            sync()
            pas = []
            for _ in range(self.passes):
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync()
                pas.append((time.perf_counter() - t0) / iters)
            out.append({"method": name, "bytes_per_pair": n, "time_us": min(pas) * 1e6,
                        "iters": iters, "passes_us": [round(x * 1e6, 3) for x in pas]})
        return out

    def free(self) -> None:
        """Collective: release the shm windows this benchmark made."""
        from pya2a.gpu import shm_algorithm as shm

        shm.free_windows()


def _nccl_graph(comm, torch, dist, timer, send, sizes, p, emit_fn) -> list:
    """NCCL captured in a CUDA graph, small sizes only (fair comparison for graphs)."""
    for n in sizes:
        if n > 1 << 20:
            break
        try:
            ts = torch.as_tensor(send[: p * n], device="cuda")
            tr = torch.empty(p * n, dtype=torch.uint8, device="cuda")
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                for _ in range(3):
                    dist.all_to_all_single(tr, ts)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            iters = 100
            with torch.cuda.graph(g, stream=s):
                for _ in range(iters):
                    dist.all_to_all_single(tr, ts)
            torch.cuda.synchronize()
            s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay()
            torch.cuda.synchronize()
            pas = []
            for _ in range(timer.passes):
                s0.record()
                for _ in range(5):
                    g.replay()
                s1.record()
                s1.synchronize()
                pas.append(s0.elapsed_time(s1) * 1e-3 / (5 * iters))
            t = min(pas)
            emit_fn({"method": "nccl_graph", "bytes_per_pair": n, "time_us": t * 1e6,
                     "iters": 5 * iters, "passes_us": [round(x * 1e6, 3) for x in pas]})
        except Exception as exc:
            if comm.Get_rank() == 0:
                print(f"# nccl graph capture failed: {exc}", file=sys.stderr)
            break
    return []


def _capture(cp: Any, stream: Any, fn: Any, iters: int) -> Any:
    try:
        with stream:
            stream.begin_capture()
            try:
                for _ in range(iters):
                    fn()
            except Exception:
                try:  # leave capture mode, or every later call on the stream fails
                    stream.end_capture()
                except Exception:
                    pass
                raise
            return stream.end_capture()
    except Exception as exc:
        print(f"# graph capture failed: {exc}", file=sys.stderr)
        return None


def _gpu_name(cp: Any, device: int = 0) -> str:
    """The device's name as CUDA reports it (bytes in some CuPy versions)."""
    name = cp.cuda.runtime.getDeviceProperties(device)["name"]
    return name.decode() if isinstance(name, bytes) else name


def median_time(comm: Any, fn: Any, warm: int, reps: int) -> float:
    """Median over ``reps`` of the slowest rank's time of one call (barrier before each)."""
    from mpi4py import MPI

    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        out.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return float(np.median(out))


def label(method: str) -> str:
    """The table / plot name of a row: public algorithm names for the public-API rows
    (``auto``, ``pairwise``, ...), ``nccl``, ``ipc.<engine method>`` for the IPC engine's
    own methods (``plan``: a prepared engine plan, ``graph``: captured in a CUDA graph,
    ``pdl``: programmatic dependent launch), ``pinned d2h|h2d|bound``, ``cupy copy
    [sync]`` (one rank)."""
    if method.startswith("api:"):
        return method[4:]
    if method.startswith("pinned_"):
        return "pinned " + method[7:]
    if method in ("nccl", "nccl_graph"):
        return method.replace("_", " ")
    if method.startswith("cupy_copy"):
        return method.replace("_", " ")
    words = []
    for mode in ("_graph", "_plan"):
        if method.endswith(mode):
            method, words = method[: -len(mode)], [mode[1:]]
    if method.endswith("_pdl"):
        method, words = method[:-4], ["pdl", *words]
    return " ".join([f"ipc.{method}", *words])


# the rows the plot shows: the one-shot public call, the engine's small- and large-message
# paths, NCCL eager and in a graph
PLOT_ROWS = ["nccl", "nccl graph", "auto", "ipc.ll", "ipc.ll graph", "ipc.ll pdl",
             "ipc.ll pdl graph", "ipc.push_inplace", "ipc.ce_inplace plan"]


def to_report(rows: list[dict], meta: dict) -> dict:
    """``run_bench`` rows as a bench report (:mod:`pya2a.tools.report`): one point per size,
    rows by :func:`label`, speed-ups against NCCL's eager time when it ran."""
    from .bench import summarize
    from .report import SCHEMA_VERSION

    p = int(meta.get("p", 1))
    order: list[str] = []
    points: dict[int, dict] = {}
    for r in rows:
        n = int(r["bytes_per_pair"])
        pt = points.setdefault(n, {"bytes_per_peer": n, "bytes_per_rank": float(n * p),
                                   "rows": {}})
        name = label(r["method"])
        if "chunk" in r:
            name += f" chunk={r['chunk']}"
        if name not in order:
            order.append(name)
        t = float(r.get("time_us") or 0.0)
        row: dict[str, Any] = {"method": r["method"]}
        if r.get("error") or t <= 0:
            row["skipped"] = f"error: {r['error']}" if r.get("error") else "not timed"
        else:
            avg = float(r.get("avg_us", t))
            row.update({"avg_us": avg, "min_us": float(r.get("min_us", t)), "max_us": t,
                        "algbw_GBps": n * p / (avg * 1e-6) / 1e9,
                        "busbw_GBps": n * p / (avg * 1e-6) / 1e9 * (p - 1) / p})
        for k in ("latency_us", "host_us", "passes_us", "iters", "transport",
                  "vs_pinned_bound", "pinned_bound_us", "window_pinned", "window_backing"):
            if k in r:
                row[k] = r[k]
        if "chose" in r:
            row["algorithm"] = r["chose"]
        if "wrong" in r:
            row["wrong"] = r["wrong"]
        elif "checked" in r:
            row["check"] = bool(r["checked"])
        if "vs_pinned_bound" in r:
            row["note"] = f"{r['vs_pinned_bound']:.2f} of pinned bound"
        pt["rows"][name] = row
    base = "nccl" if "nccl" in order else None
    results = [points[n] for n in sorted(points)]
    for pt in results:
        b = pt["rows"].get(base, {}).get("avg_us") if base else None
        for name, row in pt["rows"].items():
            if b and row.get("avg_us") and name != base and not name.startswith("pinned"):
                row["speedup_vs_native"] = b / row["avg_us"]
        auto = pt["rows"].get("auto", {})
        pt["auto_choice"] = auto.get("algorithm")
        pt["auto_speedup_vs_native"] = auto.get("speedup_vs_native")
        pt["best_speedup_vs_native"] = None
    meta = dict(meta, algorithms=order, baseline=base or "-", plot_rows=PLOT_ROWS,
                device="cuda")
    return {"schema_version": SCHEMA_VERSION, "meta": meta, "results": results,
            "rows": rows, "summary": summarize(results)}


def bench_cuda(comm: Any, args: Any, algorithms: list[str] | None, command: str) -> dict | None:
    """``bench --device cuda`` (collective): run, return the report; None when CuPy is
    missing (every rank; rank 0 says why)."""
    from mpi4py import MPI

    from ..gpu import have_cupy
    from .bench import sizes as sweep_sizes
    from .harness import Progress, provenance
    from .report import fmt_size

    ok = bool(comm.allreduce(int(have_cupy()), op=MPI.MIN))
    if not ok:
        if comm.Get_rank() == 0:
            print("python -m pya2a bench --device cuda: CuPy is not importable on every rank "
                  "(pip install 'pya2a[gpu-cuda12]' or 'pya2a[gpu-cuda13]')", file=sys.stderr)
        return None
    from pya2a.gpu import cupy as get_cupy

    cp = get_cupy()
    sz = args.sizes or sweep_sizes(args.begin, args.end, args.factor)
    bar = Progress(len(sz), not args.no_progress and comm.Get_rank() == 0)
    rows = run_bench(comm, sz, [m for m in args.methods.split(",") if m],
                     nccl=not args.no_nccl, graph=not args.no_graph,
                     nccl_graph=args.nccl_graph, staged=not args.no_staged,
                     passes=args.rounds, algorithms=algorithms, warmup=args.warmup,
                     iters=args.iters, step=lambda n: bar.step(f"{fmt_size(n)} per peer"))
    bar.close()
    meta = provenance(comm, command)
    meta.update({"pattern": "uniform", "gpu": _gpu_name(cp), "cupy": cp.__version__,
                 "passes": args.rounds, "sizes": sz,
                 "size_unit": "bytes per peer (each rank sends this to each rank)",
                 "time": "CUDA events around back-to-back calls / calls, each rank's best of "
                         "passes; avg / min / max over ranks (public-API rows: host clock "
                         "around calls and a stream sync)"})
    return to_report(rows, meta)
