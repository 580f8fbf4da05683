"""MoE dispatch + expert op + combine: pya2a's fused IPC path vs torch all_to_all_single.

    NCCL_NVLS_ENABLE=0 mpiexec -n 4 python bench/moe_dispatch_combine.py --iters 100 --out moe.json

One rank per GPU, all on one node. For each shape (experts, topk, hidden, max_tokens per
rank) every rank draws its token count from [1, max_tokens), float16 tokens, distinct top-k
experts per token and float32 weights, from (seed, shape, rank). One step is:

* fused: ``ExpertParallel(..., backend="fused")``: dispatch (one kernel), the trivial expert
  op (each local expert scales its rows by its own factor; a kernel that reads the row
  count from the device counts) into the symmetric output buffer, combine (one kernel).
  Timed with the default argument agreement (one small MPI Allgather per call) and
  without it (``agree_errors=False``: no host communication at all).
* baseline: torch.distributed (NCCL): counts all_to_all_single, counts to host, tokens
  all_to_all_single, regroup by local expert, the same expert op, inverse regroup, tokens
  back with all_to_all_single, weighted index_add in float32.

Both run in the same process on the same inputs; the fused expert inputs must equal the
baseline's exactly and the outputs agree to float16 rounding (reported). Time per step is
the mean over ``--iters`` back-to-back steps between CUDA events (max over ranks), after
``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import sys

import numpy as np
from _common import nccl_group, per_call_us
from mpi4py import MPI

SHAPES = [(8, 2, 6144, 16), (64, 6, 2048, 32), (128, 4, 2880, 128), (128, 8, 4096, 256),
          (256, 8, 7168, 256)]


def inputs(shape_i: int, shape: tuple, rank: int, seed: int):
    E, K, H, T = shape
    rng = np.random.default_rng([seed, shape_i, rank])
    n = int(rng.integers(1, T))
    x = rng.standard_normal((n, H)).astype(np.float16)
    idx = np.argsort(rng.random((n, E)), axis=1)[:, :K].astype(np.int64)
    w = rng.random((n, K)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    return x, idx, w


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file (rank 0 writes)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--shapes", default="all", help="comma list of shape numbers 0..4")
    ap.add_argument("--no-baseline", action="store_true", help="skip the NCCL baseline")
    ap.add_argument("--staged", action="store_true",
                    help="also time the staged backend (ranks sharing a GPU, where NCCL "
                         "refuses to run)")
    ap.add_argument("--fused-mode", default="per_expert", choices=["per_expert", "per_rank"],
                    help="transfer mode of the fused backend")
    ap.add_argument("--staged-mode", default="auto", choices=["auto", "per_expert", "per_rank"],
                    help="transfer mode of the staged backend (auto: by bytes, per dispatch)")
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import cupy as cp

    import pya2a.moe
    from pya2a.gpu.moe_fused import scale_experts

    comm = MPI.COMM_WORLD
    p, me = comm.Get_size(), comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    dev = local.Get_rank() % cp.cuda.runtime.getDeviceCount()
    local.Free()
    cp.cuda.Device(dev).use()

    torch = dist = None
    if not a.no_baseline:
        torch, dist = nccl_group(comm, dev)

    picks = range(len(SHAPES)) if a.shapes == "all" else [int(s) for s in a.shapes.split(",")]
    rows = []
    for si in picks:
        E, K, H, T = SHAPES[si]
        El = E // p
        x, idx, w = inputs(si, SHAPES[si], me, a.seed)
        n = x.shape[0]
        xd, idxd, wd = cp.asarray(x), cp.asarray(idx), cp.asarray(w)
        ep = pya2a.moe.ExpertParallel(comm, E, H, T, K, np.float16, device=dev,
                                      backend="fused", mode=a.fused_mode)
        ybuf = ep.expert_output(ep.max_recv_tokens)
        yd = cp.empty((n, H), dtype=np.float16)

        def fused_step(ep=ep, xd=xd, idxd=idxd, wd=wd, ybuf=ybuf, yd=yd):
            ex, _, h = ep.dispatch(xd, idxd)
            scale_experts(ep, ex, ybuf)
            ep.combine(ybuf, wd, h, out=yd)

        fused_step()
        cp.cuda.runtime.deviceSynchronize()
        rows_here = int(ep._fused.counts.sum().get())
        fused_x = cp.asnumpy(ep._fused.xbuf[:rows_here])
        fused_y = cp.asnumpy(yd)
        t_fused, wall_fused = per_call_us(comm, cp, fused_step, a.iters, a.warmup)
        ep._fused.agree_errors = False
        t_fast, wall_fast = per_call_us(comm, cp, fused_step, a.iters, a.warmup)
        ep.free()
        row = {"experts": E, "topk": K, "hidden": H, "max_tokens": T,
               "tokens": comm.allgather(n), "rows_received": comm.allgather(rows_here),
               "fused_us": t_fused, "fused_wall_us": wall_fused,
               "fused_noagree_us": t_fast, "fused_noagree_wall_us": wall_fast}
        if a.staged:
            eps = pya2a.moe.ExpertParallel(comm, E, H, T, K, np.float16, device=dev,
                                           backend="staged", mode=a.staged_mode)
            first = me * El
            fac = np.array([1 + ((first + le) % 5) / 4 for le in range(El)], np.float16)
            sout = {}

            def staged_step(eps=eps, xd=xd, idxd=idxd, wd=wd, fac=fac, sout=sout):
                ex, counts, h = eps.dispatch(xd, idxd)
                ey = cp.asarray(ex) * cp.asarray(np.repeat(fac, np.asarray(counts)))[:, None]
                sout["y"] = eps.combine(ey, wd, h)
                sout["mode"] = h.mode

            staged_step()
            cp.cuda.runtime.deviceSynchronize()
            sy = cp.asnumpy(cp.asarray(sout["y"]))
            t_st, wall_st = per_call_us(comm, cp, staged_step, a.iters, a.warmup)
            eps.free()
            err = float(np.max(np.abs(sy.astype(np.float32) - fused_y.astype(np.float32)),
                               initial=0.0))
            row.update({"staged_us": t_st, "staged_wall_us": wall_st, "staged_mode": sout["mode"],
                        "speedup_vs_staged": t_st / t_fused,
                        "speedup_vs_staged_noagree": t_st / t_fast,
                        "max_abs_diff_y_staged": comm.allreduce(err, op=MPI.MAX)})
        if torch is not None:
            xt, it, wt = (torch.as_tensor(xd, device="cuda"), torch.as_tensor(idxd, device="cuda"),
                          torch.as_tensor(wd, device="cuda"))
            first = me * El
            fac = torch.tensor([1 + ((first + le) % 5) / 4 for le in range(El)],
                               dtype=torch.float32, device="cuda")
            out = {}

            def base_step(xt=xt, it=it, wt=wt, fac=fac, out=out, El=El, E=E, K=K, H=H, n=n):
                e = it.reshape(-1)
                order = torch.argsort(e, stable=True)
                cnt = torch.bincount(e, minlength=E)
                rcnt = torch.empty_like(cnt)
                dist.all_to_all_single(rcnt, cnt)
                both = torch.stack([cnt, rcnt]).cpu()
                send = both[0].view(p, El).sum(1).tolist()
                recv = both[1].view(p, El).sum(1).tolist()
                sendbuf = xt[order // K]
                recvbuf = xt.new_empty((sum(recv), H))
                dist.all_to_all_single(recvbuf, sendbuf, recv, send)
                lex = torch.arange(El, device="cuda").repeat(p)
                le = torch.repeat_interleave(lex, rcnt.view(-1))
                perm = torch.argsort(le, stable=True)
                ex = recvbuf[perm]
                ey = (ex.float() * fac[le[perm]][:, None]).half()
                back_src = torch.empty_like(ey)
                back_src[perm] = ey
                back = xt.new_empty((e.numel(), H))
                dist.all_to_all_single(back, back_src, send, recv)
                tok = order // K
                wsorted = wt.reshape(-1)[order]
                y = torch.zeros((n, H), dtype=torch.float32, device="cuda")
                y.index_add_(0, tok, back.float() * wsorted[:, None])
                out["x"], out["y"] = ex, y.half()

            base_step()
            torch.cuda.synchronize()
            bx, by = out["x"].cpu().numpy(), out["y"].cpu().numpy()
            t_base, wall_base = per_call_us(comm, cp, base_step, a.iters, a.warmup)
            err = float(np.max(np.abs(by.astype(np.float32) - fused_y.astype(np.float32)),
                               initial=0.0))
            ok_x = bool(bx.shape == fused_x.shape and np.array_equal(bx, fused_x))
            row.update({"baseline_us": t_base, "baseline_wall_us": wall_base,
                        "speedup": t_base / t_fused, "speedup_noagree": t_base / t_fast,
                        "expert_x_equal": comm.allreduce(ok_x, op=MPI.LAND),
                        "max_abs_diff_y": comm.allreduce(err, op=MPI.MAX)})
        rows.append(row)
        if me == 0:
            print(json.dumps(row), flush=True)
            _write(a.out, _report(rows, p, a, cp, torch))
    if me == 0:
        rep = _report(rows, p, a, cp, torch)
        _write(a.out, rep)
        print(json.dumps(rep["summary"], indent=1), flush=True)
    if dist is not None:
        dist.destroy_process_group()
    return 0


def _geo(v: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def _report(rows: list, p: int, a, cp, torch) -> dict:
    s = {"fused_geomean_us": _geo([r["fused_us"] for r in rows]),
         "fused_noagree_geomean_us": _geo([r["fused_noagree_us"] for r in rows])}
    if rows and "staged_us" in rows[0]:
        s["staged_geomean_us"] = _geo([r["staged_us"] for r in rows])
        s["speedup_vs_staged_geomean"] = _geo([r["speedup_vs_staged"] for r in rows])
        s["speedup_vs_staged_noagree_geomean"] = _geo([r["speedup_vs_staged_noagree"]
                                                       for r in rows])
    if rows and "baseline_us" in rows[0]:
        s["baseline_geomean_us"] = _geo([r["baseline_us"] for r in rows])
        s["speedup_geomean"] = _geo([r["speedup"] for r in rows])
        s["speedup_noagree_geomean"] = _geo([r["speedup_noagree"] for r in rows])
        s["all_expert_x_equal"] = all(r["expert_x_equal"] for r in rows)
    prov = {"host": socket.gethostname(), "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "nprocs": p, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "cupy": cp.__version__, "python": platform.python_version(),
        "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "iters": a.iters, "warmup": a.warmup, "seed": a.seed, "fused_mode": a.fused_mode,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "ranks_per_gpu": p // max(1, cp.cuda.runtime.getDeviceCount()),
        "mps_thread_percentage": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}
    if torch is not None:
        prov["torch"] = torch.__version__
        v = torch.cuda.nccl.version()
        prov["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {"provenance": prov, "shapes": rows, "summary": s}


def _write(path: str | None, rep: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
