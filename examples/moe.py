"""Mixture-of-experts layer, expert parallel: dispatch tokens to their experts, combine back.

    mpiexec -n 4 python -m mpi4py examples/moe.py            # 64 experts, top-6, hidden 2048
    mpiexec -n 4 python -m mpi4py examples/moe.py --small    # tiny, for tests
    mpiexec -n 4 python -m mpi4py examples/moe.py --device cuda [--backend staged|fused]

Every rank holds num_experts / p experts (contiguous ranges). Each rank draws its tokens
(a random count in [1, max_tokens)), a router's top-k experts per token and softmax weights
from a seed. pya2a.moe.ExpertParallel.dispatch sends each token to its experts' ranks,
grouped by local expert; every expert multiplies its rows by its own factor (a stand-in for
the expert MLP); combine sends the results back and sums them weighted per token.

The check: pya2a.moe.reference all-gathers every rank's tokens and routing and computes
both the dispatched rows and the combined output locally; both must match exactly (the
dispatch moves bytes, the combine accumulates in the same order and precision, per the
transfer mode the dispatch used). Prints OK,
or WRONG and exits 1 on every rank. Then times dispatch + expert op + combine.

Options: --experts E, --topk K, --hidden H, --max-tokens T, --dtype, --iters, --warmup,
--seed, --small, --device {cpu,cuda}, --backend, --algorithm, --mode.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import to_host
from mpi4py import MPI

import pya2a.moe


def routing(n: int, num_experts: int, topk: int, rng: np.random.Generator):
    """Top-k of random router logits: (n, topk) int64 experts and float32 softmax weights."""
    logits = rng.standard_normal((n, num_experts)).astype(np.float32)
    idx = np.argsort(-logits, axis=1)[:, :topk]
    top = np.take_along_axis(logits, idx, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return idx.astype(np.int64), (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def factor(e: int, dtype: np.dtype) -> np.generic:
    """Expert e's op multiplies its rows by this."""
    return np.dtype(dtype).type(1 + (e % 5) / 4)


def run_experts(ep: pya2a.moe.ExpertParallel, expert_x, counts, out):
    """Each local expert scales its contiguous segment of expert_x into out."""
    off = 0
    for le, c in enumerate(counts.tolist()):
        out[off:off + c] = expert_x[off:off + c] * factor(ep.first_expert + le, ep.dtype)
        off += c
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=None, help="default 16 * p")
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="tiny sizes, few iterations")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="auto", choices=list(pya2a.moe.BACKENDS))
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--mode", default="auto", choices=list(pya2a.moe.MODES))
    a = ap.parse_args()
    comm = MPI.COMM_WORLD
    p, me = comm.Get_size(), comm.Get_rank()
    if a.small:
        a.hidden, a.max_tokens, a.topk, a.iters, a.warmup = 16, 12, 3, 3, 1
    E = a.experts or 4 * p * (1 if a.small else 4)
    a.topk = min(a.topk, E)
    dtype = np.dtype(a.dtype)

    rng = np.random.default_rng([a.seed, me])
    n = int(rng.integers(1, max(a.max_tokens, 2)))
    x = rng.standard_normal((n, a.hidden)).astype(dtype)
    idx, w = routing(n, E, a.topk, rng)

    device = None
    xp = np
    if a.device == "cuda":
        import cupy as xp

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        device = local.Get_rank() % xp.cuda.runtime.getDeviceCount()
        local.Free()
        xp.cuda.Device(device).use()
    ep = pya2a.moe.ExpertParallel(comm, E, a.hidden, a.max_tokens, a.topk, dtype, device,
                                  backend=a.backend if device is not None else "auto",
                                  algorithm=a.algorithm,
                                  mode=a.mode if a.backend != "fused" else "auto")
    xd, idxd, wd = (xp.asarray(x), xp.asarray(idx), xp.asarray(w))

    def layer():
        ex, counts, h = ep.dispatch(xd, idxd)
        hc = to_host(counts)
        rows = int(hc.sum())
        ey = run_experts(ep, ex[:rows], hc, ep.expert_output(rows))
        return ex[:rows], hc, ep.combine(ey, wd, h), getattr(h, "mode", "per_expert")

    ex, counts, y, mode = layer()
    ref_x, ref_y = pya2a.moe.reference(comm, x, idx, w, E, lambda e, r: r * factor(e, dtype),
                                       mode)
    got = np.split(to_host(ex), np.cumsum(counts)[:-1])
    ok = all(np.array_equal(g, r) for g, r in zip(got, ref_x, strict=True))
    if device is None or ep.backend != "fused":
        ok = ok and np.array_equal(to_host(y), ref_y)
    else:  # the fused kernel sums with FMAs: equal up to rounding
        ok = ok and np.allclose(to_host(y).astype(np.float32), ref_y.astype(np.float32),
                                rtol=1e-3, atol=1e-3)
    ok = comm.allreduce(ok, op=MPI.LAND)
    if not ok:
        if me == 0:
            print("WRONG: dispatch/combine differ from the all-gather reference", flush=True)
        ep.free()
        return 1

    for _ in range(a.warmup):
        layer()
    if device is not None:
        xp.cuda.runtime.deviceSynchronize()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        layer()
    if device is not None:
        xp.cuda.runtime.deviceSynchronize()
    dt = comm.allreduce((time.perf_counter() - t0) / max(a.iters, 1), op=MPI.MAX)
    tokens = comm.allreduce(n)
    if me == 0:
        print(f"OK  p={p} experts={E} topk={a.topk} hidden={a.hidden} dtype={dtype} "
              f"tokens={tokens} backend={ep.backend} mode={mode}: {dt * 1e6:.1f} us per "
              f"dispatch + expert op + combine", flush=True)
    ep.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
