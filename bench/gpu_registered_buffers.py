"""Public API ``auto`` on device buffers (CuPy pool arrays) at large sizes against NCCL.

    mpiexec -n 4 python bench/gpu_registered_buffers.py --out gpu_registered_buffers.json

Eager one-shot ``pya2a.Alltoallv(comm, [s, c], [d, c], algorithm="auto")`` into ordinary
CuPy memory-pool arrays (registered with the peers, ``ce``/``push`` straight into place),
against ``torch.distributed.all_to_all_single`` (NCCL) on the same data in the same run.
Time per call = CUDA events around ``iters`` back-to-back calls after warm-up / iters, max
over ranks; busbw = bytes per pair * p / time * (p-1)/p. Rows ``auto_alt`` alternate
between two receive buffers (double buffering: the registration cache must keep both).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
from _common import nccl_group, per_call_us
from mpi4py import MPI

import pya2a
from pya2a.core.state import live_states
from pya2a.gpu import ipc_algorithm as ipc_alg


def _measure(cp, torch, dist, comm, per_peer: int) -> dict:
    p = comm.Get_size()
    n = per_peer * p
    s = cp.random.randint(0, 255, size=n, dtype=cp.uint8)
    d = [cp.empty(n, dtype=cp.uint8), cp.empty(n, dtype=cp.uint8)]
    counts = np.full(p, per_peer, dtype=np.int64)
    warm, iters = (3, 20) if per_peer >= 1 << 26 else (5, 50)
    row: dict = {"bytes_per_pair": per_peer}
    ts = torch.as_tensor(s, device="cuda")
    tr = torch.empty(n, dtype=torch.uint8, device="cuda")
    # CuPy's and torch's default streams are both the legacy default stream
    turn = itertools.count()
    calls = {"nccl_us": lambda: dist.all_to_all_single(tr, ts),
             "auto_us": lambda: pya2a.Alltoallv(comm, [s, counts], [d[0], counts]),
             "auto_alt_us": lambda: pya2a.Alltoallv(comm, [s, counts],
                                                    [d[next(turn) % 2], counts])}
    for k, fn in calls.items():
        row[k] = per_call_us(comm, cp, fn, iters, warm)[0]
    # correctness of the last call against NCCL's answer
    pya2a.Alltoallv(comm, [s, counts], [d[0], counts])
    dist.all_to_all_single(tr, ts)
    same = bool(cp.array_equal(d[0], cp.asarray(tr)))
    row["correct"] = comm.allreduce(int(same), op=MPI.MIN) == 1
    eng = next(e for st in live_states() for e in (st.slot(ipc_alg._ENGINE) or {}).values())
    reg = eng._reg
    row["registered_everyone"] = bool(reg is not None and reg.everyone)
    row["method"] = type(eng).choose(per_peer, direct=row["registered_everyone"])
    row["engine_slot_bytes"] = eng.slot_bytes
    for k in calls:
        row[k.replace("_us", "_busbw_GBs")] = per_peer * (p - 1) / (row[k] * 1e-6) / 1e9
    row["auto_over_nccl_time"] = row["auto_us"] / row["nccl_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--sizes", default=",".join(str(x) for x in
                                               (1 << 22, 1 << 24, 1 << 26, 1 << 28)))
    a = ap.parse_args()
    import cupy as cp

    comm = MPI.COMM_WORLD
    p, r = comm.Get_size(), comm.Get_rank()
    dev = r % cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(dev).use()
    torch, dist = nccl_group(comm, dev)
    rows = []
    for per_peer in (int(x) for x in a.sizes.split(",")):
        row = _measure(cp, torch, dist, comm, per_peer)
        rows.append(row)
        if r == 0:
            print(json.dumps(row), flush=True)
        cp.get_default_memory_pool().free_all_blocks()
        comm.Barrier()
    ipc_alg.free_engines()
    dist.destroy_process_group()
    if r == 0 and a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"command": "mpiexec -n 4 python bench/gpu_registered_buffers.py",
                       "ranks": p,
                       "timing": "CUDA events around back-to-back calls / iters, max over "
                                 "ranks; one-shot public API, CuPy pool buffers",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
