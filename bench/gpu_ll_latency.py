"""Where the time of a small ``ll`` exchange goes: launch costs, kernel variants, NCCL.

One process per GPU::

    NCCL_NVLS_ENABLE=0 mpiexec -n 4 python bench/gpu_ll_latency.py --out gpu_ll_latency.json

Sections (every figure is the max over ranks, best of ``--passes`` interleaved passes):

* ``launch``: host time per kernel launch, no communication, for a no-op kernel with the
  engine's 512-byte by-value argument block and with one 8-byte argument, through CuPy's
  ``driver.launchKernel`` and through the Cython launcher (plain and with programmatic
  dependent launch). ``chain``: GPU time per launch of that no-op in a CUDA graph.
* ``ll``: the engine's ``ll`` method per variant (``default``; ``default_nopdl``: without
  programmatic dependent launch), ``ll_min_chunk`` and size: eager call, plan and CUDA
  graph time per call (CUDA events around back-to-back calls), the eager call's host
  time, and a check of the received bytes.
* ``nccl``: ``torch.distributed.all_to_all_single`` at the same sizes, for the ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time

import numpy as np

NOOP = r"""
struct Big { unsigned long long v[64]; };
__device__ __forceinline__ void pdl() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
extern "C" __global__ void noop_big(const Big a) {
    pdl();
    if (a.v[63] == 0x123456789ull && threadIdx.x == 1000) *(volatile int*)a.v[0] = 1;
}
extern "C" __global__ void noop_small(const unsigned long long x) {
    pdl();
    if (x == 0x123456789ull && threadIdx.x == 1000) *(volatile int*)x = 1;
}
"""

VARIANTS = {"default": True, "default_nopdl": False}  # name -> programmatic dependent launch


def main() -> int:
    from _common import nccl_group
    from mpi4py import MPI

    from pya2a.gpu import _launch
    from pya2a.gpu import cupy as get_cupy
    from pya2a.gpu.ipc_alltoallv import IpcAlltoallv, pdl_supported
    from pya2a.tools.gpu_bench import _capture, _gpu_name, _Timer

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="128,1024,8192,65536,262144")
    ap.add_argument("--chunks", default="2048,4096,8192,16384")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--out", default="gpu_ll_latency.json")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]

    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    cp = get_cupy()
    cp.cuda.Device(rank % cp.cuda.runtime.getDeviceCount()).use()
    dev = cp.cuda.Device().id
    stream = cp.cuda.Stream(non_blocking=True)
    sptr = int(stream.ptr)
    timer = _Timer(cp, sptr)
    out: dict = {"meta": {"ranks": p, "gpu": _gpu_name(cp, dev),
        "pdl": pdl_supported(cp, dev), "launcher": _launch.available(),
        "passes": args.passes, "iters": args.iters, "date": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, "launch": [], "chain": [], "ll": [],
        "nccl": []}

    def mx(x: float) -> float:
        return comm.allreduce(x, op=MPI.MAX)

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    # ---------------------------------------------------------------- launch cost
    mod = cp.RawModule(code=NOOP, options=("-std=c++17",))
    big = np.zeros(64, dtype=np.uint64)
    small = ctypes.c_uint64(0)
    params_big = (ctypes.c_void_p * 1)(big.ctypes.data)
    params_small = (ctypes.c_void_p * 1)(ctypes.addressof(small))
    fns = {k: mod.get_function(k).kernel.ptr for k in ("noop_big", "noop_small")}
    drv = cp.cuda.driver.launchKernel
    cases = {
        "cupy_big": lambda: drv(fns["noop_big"], 4, 1, 1, 512, 1, 1, 0, sptr,
                                ctypes.addressof(params_big), 0),
        "cupy_small": lambda: drv(fns["noop_small"], 4, 1, 1, 512, 1, 1, 0, sptr,
                                  ctypes.addressof(params_small), 0),
    }
    if _launch.available():
        lb = _launch.Launcher(fns["noop_big"], 4, 512, big.ctypes.data, big)
        ls = _launch.Launcher(fns["noop_small"], 4, 512, ctypes.addressof(small), small)
        cases["cython_big"] = lambda: lb.run(sptr, False)
        cases["cython_small"] = lambda: ls.run(sptr, False)
        if _launch.has_launch_ex():
            cases["cython_big_pdl"] = lambda: lb.run(sptr, True)
            cases["cython_small_pdl"] = lambda: ls.run(sptr, True)
    for name, fn in cases.items():
        host, gpu, graph = [], [], []
        for _ in range(args.passes):
            stream.synchronize()
            t0 = time.perf_counter()
            for _ in range(400):
                fn()
            host.append((time.perf_counter() - t0) / 400 * 1e6)
            stream.synchronize()
            gpu.append(timer.time(fn, 10, 400) * 1e6)
            g = _capture(cp, timer.stream, fn, 100)
            if g is not None:
                graph.append(timer.time(lambda g=g: g.launch(timer.stream), 2, 10) / 100 * 1e6)
        row = {"case": name, "host_us": mx(min(host)), "events_us": mx(min(gpu)),
               "graph_us": mx(min(graph)) if graph else None}
        out["launch"].append(row)
        log(f"launch {name:>18}: host {row['host_us']:6.2f} us  back-to-back "
            f"{row['events_us']:6.2f} us  graph {row['graph_us']} us")

    # ---------------------------------------------------------------- ll variants
    maxb = max(sizes)
    eng = IpcAlltoallv(comm, capacity_bytes=maxb, ll_bytes=maxb)
    pdl_default = eng.pdl
    idx = cp.arange(p * maxb, dtype=np.int64)
    for v in args.variants.split(","):
        eng.pdl = pdl_default and VARIANTS[v]
        for chunk in chunks:
            eng.ll_min_chunk = chunk
            eng._cache.clear()
            for n in sizes:
                counts = np.full(p, n, dtype=np.int64)
                displs = np.arange(p, dtype=np.int64) * n
                i = idx[: p * n]
                send = ((rank * 31 + (i // n) * 7 + i % n) % 251).astype(np.uint8)
                want = (((i // n) * 31 + rank * 7 + i % n) % 251).astype(np.uint8)
                recv = cp.zeros(p * n, dtype=np.uint8)
                cp.cuda.Device().synchronize()
                comm.Barrier()
                plan = eng.plan(send, counts, displs, recv, counts, displs, method="ll")
                plan.run(stream=sptr)
                stream.synchronize()
                ok = comm.allreduce(bool((recv == want).all()), op=MPI.LAND)

                def f_plan(plan=plan) -> None:
                    plan.run(stream=sptr)

                def f_eager(s=send, r=recv, c=counts, d=displs) -> None:
                    eng.alltoallv(s, c, d, r, c, d, stream=sptr, method="ll")

                te, tp, tg, he = [], [], [], []
                g = _capture(cp, timer.stream, f_plan, 100)
                for _ in range(args.passes):
                    te.append(timer.time(f_eager, 20, args.iters) * 1e6)
                    tp.append(timer.time(f_plan, 20, args.iters) * 1e6)
                    if g is not None:
                        tg.append(timer.time(lambda g=g: g.launch(timer.stream), 2, 10)
                                  / 100 * 1e6)
                    stream.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(50):
                        f_eager()
                    he.append((time.perf_counter() - t0) / 50 * 1e6)
                    stream.synchronize()
                row = {"variant": v, "ll_min_chunk": chunk, "bytes_per_pair": n, "ok": ok,
                       "eager_us": mx(min(te)), "plan_us": mx(min(tp)),
                       "graph_us": mx(min(tg)) if tg else None, "eager_host_us": mx(min(he))}
                out["ll"].append(row)
                log(f"ll {v:>14} chunk {chunk:>6} {n:>7} B: eager {row['eager_us']:6.2f}  "
                    f"plan {row['plan_us']:6.2f}  graph {row['graph_us']}  host "
                    f"{row['eager_host_us']:5.2f}  {'ok' if ok else 'WRONG'}")
    eng.pdl = pdl_default
    eng.free()

    # ---------------------------------------------------------------- NCCL reference
    try:
        torch, dist = nccl_group(comm, dev)
        ts = torch.cuda.Stream()
        tt = _Timer(cp, int(ts.cuda_stream))
        for n in sizes:
            a = torch.randint(0, 255, (p * n,), dtype=torch.uint8, device="cuda")
            b = torch.empty_like(a)
            with torch.cuda.stream(ts):
                t = [tt.time(lambda a=a, b=b: dist.all_to_all_single(b, a), 20, 200) * 1e6
                     for _ in range(args.passes)]
            row = {"bytes_per_pair": n, "eager_us": mx(min(t)), "eager_passes_us": t}
            out["nccl"].append(row)
            log(f"nccl {n:>7} B: eager {row['eager_us']:6.2f} us (passes {t})")
        dist.destroy_process_group()
    except Exception as exc:  # optional baseline
        log(f"# NCCL reference off: {exc}")
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
