"""Bytes moved between ranks per MoE step, one copy per (token, expert) pair vs per rank.

    mpiexec -n 4 python bench/moe_bytes.py --out bench/results/moe_bytes_cpu_p4.json

The five shapes and the routing of bench/moe_dispatch_combine.py (same seed: tokens per
rank random in [1, max_tokens), distinct top-k experts, float32 weights), with bfloat16
rows (float16 moves the same bytes) on the host path. For each shape and mode ("per_expert",
"per_rank", and what "auto" picks) one training step runs through torch autograd:
dispatch, a per-expert scale as the expert op, combine, ``loss = y.sum()``, backward.
``ExpertParallel.traffic`` counts the bytes each rank sends to other ranks per phase
(rows plus the per-entry index / weight words of per_rank mode; the small count
agreement is not counted). Reported: the sum over ranks and the largest rank, forward
(dispatch + combine) and backward, and the host time per forward step and per backward
step (mean over ``--iters`` after ``--warmup``, max over ranks). The two modes must give
the same expert inputs and gradients to bfloat16 precision (checked, reported).

Times are CPU host-path times on whatever machine runs this; they say nothing about the
GPU paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_dispatch_combine import SHAPES, inputs  # noqa: E402 (same shapes and routing)

MODES = ("per_expert", "per_rank")


def step(ep, x, idx, w, torch):
    """One forward + backward; (expert_x, x.grad, w.grad, forward s, backward s)."""
    xt = x.clone().requires_grad_(True)
    wt = w.clone().requires_grad_(True)
    t0 = time.perf_counter()
    ex, counts, h = ep.dispatch(xt, idx)
    scale = torch.repeat_interleave(
        1 + torch.arange(ep.first_expert, ep.first_expert + ep.local_experts) % 5 / 4,
        torch.from_numpy(counts))
    y = ep.combine(ex * scale[:, None].to(ex.dtype), wt, h)
    t1 = time.perf_counter()
    y.float().sum().backward()
    t2 = time.perf_counter()
    return ex.detach(), xt.grad, wt.grad, h.mode, t1 - t0, t2 - t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file (rank 0 writes)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--shapes", default="all", help="comma list of shape numbers 0..4")
    a = ap.parse_args()
    import torch

    import pya2a.moe

    comm = MPI.COMM_WORLD
    p, me = comm.Get_size(), comm.Get_rank()
    torch.set_num_threads(1)
    pick = range(len(SHAPES)) if a.shapes == "all" else [int(s) for s in a.shapes.split(",")]
    rows = []
    for si in pick:
        E, K, H, T = SHAPES[si]
        xn, idxn, wn = inputs(si, SHAPES[si], me, a.seed)
        x = torch.from_numpy(xn.astype(np.float32)).bfloat16()
        idx, w = torch.from_numpy(idxn), torch.from_numpy(wn)
        recv = np.bincount(idxn.reshape(-1) // (E // p), minlength=p)
        cap = int(comm.allreduce(recv, op=MPI.SUM).max())
        row = {"experts": E, "topk": K, "hidden": H, "max_tokens": T,
               "tokens": comm.allgather(int(x.shape[0]))}
        ref = None
        for mode in (*MODES, "auto"):
            ep = pya2a.moe.ExpertParallel(comm, E, H, T, K, torch.bfloat16, mode=mode,
                                          max_recv_tokens=cap)
            fw, bw = [], []
            for it in range(a.warmup + a.iters):
                before = dict(ep.traffic)
                ex, gx, gw, used, tf, tb = step(ep, x, idx, w, torch)
                if it >= a.warmup:
                    fw.append(tf)
                    bw.append(tb)
            sent = {k: ep.traffic[k] - before[k] for k in ep.traffic}
            fwd = sent["dispatch"] + sent["combine"]
            bwd = sent["dispatch_backward"] + sent["combine_backward"]
            entry = {"mode_used": used,
                     "fwd_bytes_total": comm.allreduce(fwd),
                     "fwd_bytes_max_rank": comm.allreduce(fwd, op=MPI.MAX),
                     "bwd_bytes_total": comm.allreduce(bwd),
                     "bwd_bytes_max_rank": comm.allreduce(bwd, op=MPI.MAX),
                     "fwd_ms": comm.allreduce(1e3 * float(np.mean(fw)), op=MPI.MAX),
                     "bwd_ms": comm.allreduce(1e3 * float(np.mean(bw)), op=MPI.MAX)}
            if ref is None:
                ref = (ex, gx, gw)
            else:
                same_x = bool(torch.equal(ex, ref[0]))
                dgx = float((gx.float() - ref[1].float()).abs().max()) if gx.numel() else 0.0
                dgw = float((gw - ref[2]).abs().max()) if gw.numel() else 0.0
                entry["agrees_with_per_expert"] = {
                    "expert_x_equal": comm.allreduce(same_x, op=MPI.LAND),
                    "x_grad_max_abs_diff": comm.allreduce(dgx, op=MPI.MAX),
                    "w_grad_max_abs_diff": comm.allreduce(dgw, op=MPI.MAX)}
            row[mode] = entry
            ep.free()
        row["fwd_ratio"] = row["per_expert"]["fwd_bytes_total"] / max(
            1, row["per_rank"]["fwd_bytes_total"])
        rows.append(row)
        if me == 0:
            pe, pr = row["per_expert"], row["per_rank"]
            print(f"E={E:3d} k={K} H={H:4d} T={T:3d}  fwd MB per_expert "
                  f"{pe['fwd_bytes_total'] / 1e6:7.2f} per_rank {pr['fwd_bytes_total'] / 1e6:7.2f}"
                  f" ({row['fwd_ratio']:.2f}x)  bwd MB {pe['bwd_bytes_total'] / 1e6:7.2f} / "
                  f"{pr['bwd_bytes_total'] / 1e6:7.2f}  auto->{row['auto']['mode_used']}  "
                  f"fwd ms {pe['fwd_ms']:.1f} / {pr['fwd_ms']:.1f}  bwd ms {pe['bwd_ms']:.1f}"
                  f" / {pr['bwd_ms']:.1f}", flush=True)
    if me == 0 and a.out:
        meta = {"command": f"mpiexec -n {p} python bench/moe_bytes.py "
                           + " ".join(sys.argv[1:]),
                "nprocs": p, "seed": a.seed, "iters": a.iters, "warmup": a.warmup,
                "rows": "bfloat16", "path": "host", "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(), "torch": torch.__version__}
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "shapes": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
