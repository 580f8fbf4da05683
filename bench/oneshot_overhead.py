"""The drop-in call's cost against mpi4py's own, and a plan's binding costs (host buffers).

Run (any p; the README's figures are p = 2 on a 2-core machine)::

    mpiexec -n 2 python bench/oneshot_overhead.py --json bench/results/oneshot_p2_local.json

Rows, per bytes per peer (8 B .. 16 KiB by default), each the mean per call of ``--iters``
calls, the slowest rank's, best of ``--passes`` passes in which the rows take turns (so
every ratio compares calls made in the same stretch of time):

- ``mpi4py``: ``comm.Alltoallv([s, counts], [r, counts])`` on the same buffers;
- ``oneshot``: ``pya2a.Comm(comm).Alltoallv`` with the same arguments (its signature is
  cached after the first call; every call still agrees on it across ranks);
- ``oneshot_native``: the same with ``algorithm="native"`` (only the call path differs
  from mpi4py's);
- ``oneshot_forward``: ``oneshot`` on a duplicate communicator whose repeated calls are
  confirmed in dissemination rounds (``pya2a._stamp.Forward``, made its mode whatever
  ``STAMP_MAX_P`` / ``FORWARD_MAX_P`` say), which carry a small ``hypercube`` exchange;
- ``plan``: ``pya2a.plan(...)`` of the algorithm ``auto`` chose, ``run`` on the same buffers;
- ``plan_new_recv``: the plan with a new receive array every call;
- ``plan_rebind``: the plan, ``cache_size=1``, alternating two receive buffers, so that every
  call binds a buffer;
- ``allreduce``: the all-reduce of two integers that confirms a repeated one-shot call on
  communicators of more than ``pya2a._stamp.FORWARD_MAX_P`` ranks (a persistent request);
  smaller ones carry that confirmation in the exchange or in dissemination rounds
  (``--stamp-max-p`` / ``--forward-max-p`` set the limits on every rank, to compare the ways
  at one p); ``allreduce_blocking``: the same as one blocking ``Allreduce``.

``--profile`` adds, on rank 0, the functions where a one-shot call's time goes (cProfile,
repeated calls at the smallest size) to the output and the JSON. ``--parts`` times the parts
of a repeated one-shot call on their own at every size (the slowest rank's mean, best of 5):
reading the two messages, finding the signature, the confirmation (with the blocks where it
carries them), the replay of the decision, and mpi4py's call and a ``Barrier`` beside them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time

import numpy as np
from mpi4py import MPI

import pya2a
import pya2a._stamp

SIZES = [8, 64, 512, 1024, 4096, 16384]


def _time(comm: MPI.Intracomm, fn, iters: int) -> float:
    """Mean seconds per call of ``fn`` over ``iters`` calls, the slowest rank's."""
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t0) / iters
    return comm.allreduce(dt, op=MPI.MAX)


def _rows(comm: MPI.Intracomm, m: int):
    p = comm.Get_size()
    n = max(m // 8, 1)
    counts = [n] * p
    s = np.arange(n * p, dtype="d")
    r = np.empty(n * p)
    pc = pya2a.Comm(comm)
    pn = pya2a.Comm(comm, algorithm="native")
    fwd = comm.Dup()
    limits = pya2a._stamp.STAMP_MAX_P, pya2a._stamp.FORWARD_MAX_P
    pya2a._stamp.STAMP_MAX_P, pya2a._stamp.FORWARD_MAX_P = 0, 1 << 30
    pf = pya2a.Comm(fwd)
    pf.Alltoallv([s, counts], [r, counts])  # its first call fixes its mode
    pya2a._stamp.STAMP_MAX_P, pya2a._stamp.FORWARD_MAX_P = limits
    pl = pya2a.plan(comm, counts, counts, "d")
    pl1 = pya2a.plan(comm, counts, counts, "d", algorithm=pl.algorithm, cache_size=1)
    alt = [np.empty(n * p), np.empty(n * p)]
    k = [0]

    def rebind():
        k[0] ^= 1
        pl1.run(s, alt[k[0]])

    word = np.zeros(2, dtype=np.int64)
    agree = None
    if MPI.Get_version() >= (4, 0):  # as the library: persistent where MPI has it
        agree = comm.Allreduce_init(MPI.IN_PLACE, word, op=MPI.MAX)

    def allreduce():
        if agree is None:
            comm.Allreduce(MPI.IN_PLACE, word, op=MPI.MAX)
        else:
            agree.Start()
            agree.Wait()

    rows = {
        "mpi4py": lambda: comm.Alltoallv([s, counts], [r, counts]),
        "oneshot": lambda: pc.Alltoallv([s, counts], [r, counts]),
        "oneshot_native": lambda: pn.Alltoallv([s, counts], [r, counts]),
        "oneshot_forward": lambda: pf.Alltoallv([s, counts], [r, counts]),
        "plan": lambda: pl.run(s, r),
        "plan_new_recv": lambda: pl.run(s, np.empty(n * p)),
        "plan_rebind": rebind,
        "allreduce": allreduce,
        "allreduce_blocking": lambda: comm.Allreduce(MPI.IN_PLACE, word, op=MPI.MAX),
    }
    return rows, pl, pl1, agree, fwd


def measure(comm: MPI.Intracomm, sizes: list[int], iters: int, passes: int) -> list[dict]:
    out = []
    for m in sizes:
        rows, pl, pl1, agree, fwd = _rows(comm, m)
        for fn in rows.values():  # warm up: signatures cached, buffers bound
            for _ in range(20):
                fn()
        best = {name: float("inf") for name in rows}
        for _ in range(passes):
            for name, fn in rows.items():
                best[name] = min(best[name], _time(comm, fn, iters))
        rec = {"bytes_per_peer": m, "auto_algorithm": pl.algorithm,
               **{f"{k}_us": round(v * 1e6, 3) for k, v in best.items()}}
        base = best["mpi4py"]
        rec["oneshot_over_mpi4py"] = round(best["oneshot"] / base, 3)
        rec["oneshot_native_over_mpi4py"] = round(best["oneshot_native"] / base, 3)
        rec["oneshot_forward_over_mpi4py"] = round(best["oneshot_forward"] / base, 3)
        rec["new_recv_over_plan"] = round(best["plan_new_recv"] / best["plan"], 3)
        rec["rebind_over_plan"] = round(best["plan_rebind"] / best["plan"], 3)
        out.append(rec)
        pl.free()
        pl1.free()
        if agree is not None:
            agree.Free()
        fwd.Free()
        if comm.Get_rank() == 0:
            print(f"{m:>6} B/peer  mpi4py {rec['mpi4py_us']:8.2f} us  oneshot "
                  f"{rec['oneshot_us']:8.2f} ({rec['oneshot_over_mpi4py']:.2f}x)  native "
                  f"{rec['oneshot_native_us']:8.2f} ({rec['oneshot_native_over_mpi4py']:.2f}x)"
                  f"  forward {rec['oneshot_forward_us']:8.2f} "
                  f"({rec['oneshot_forward_over_mpi4py']:.2f}x)"
                  f"  plan[{pl.algorithm}] {rec['plan_us']:8.2f}  new recv "
                  f"{rec['new_recv_over_plan']:.2f}x  rebind {rec['rebind_over_plan']:.2f}x  "
                  f"allreduce {rec['allreduce_us']:.2f} / blocking "
                  f"{rec['allreduce_blocking_us']:.2f}",
                  flush=True)
    return out


def _repeated(comm: MPI.Intracomm, m: int, warm: int):
    """A ``pya2a.Comm`` and the messages of a call at ``m`` bytes per peer, repeated
    ``warm`` times so that its signature is cached."""
    p = comm.Get_size()
    n = max(m // 8, 1)
    counts = [n] * p
    s, r = np.arange(n * p, dtype="d"), np.empty(n * p)
    pc = pya2a.Comm(comm)
    for _ in range(warm):
        pc.Alltoallv([s, counts], [r, counts])
    return pc, [s, counts], [r, counts]


def profile(comm: MPI.Intracomm, m: int, calls: int, top: int = 18) -> str:
    """cProfile of ``calls`` repeated one-shot calls on rank 0 (every rank calls)."""
    pc, smsg, rmsg = _repeated(comm, m, 50)
    prof = cProfile.Profile() if comm.Get_rank() == 0 else None
    comm.Barrier()
    if prof is not None:
        prof.enable()
    for _ in range(calls):
        pc.Alltoallv(smsg, rmsg)
    if prof is None:
        return ""
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def parts(comm: MPI.Intracomm, m: int, iters: int) -> dict:
    """The parts of a repeated one-shot call at ``m`` bytes per peer, timed on their own
    (every rank runs each part together with the others; they are collective)."""
    from pya2a import _oneshot
    from pya2a.core import _msg

    p = comm.Get_size()
    pc, smsg, rmsg = _repeated(comm, m, 30)
    st = pc._state
    icomm, fast = st.comm, st.slot("oneshot.signatures")
    sm, rm, _ = _msg.read_pair("Alltoallv", True, smsg, rmsg, False, p)
    key = _oneshot.signature("alltoallv", smsg, rmsg, False, "auto", False, None, p)
    number, d = fast.entries[key]
    mode = fast.mode(icomm)
    confirm = d.stamped(icomm, number, mode).run if mode else \
        (lambda: fast.agree(icomm, number))
    rows = {
        "call": lambda: pc.Alltoallv(smsg, rmsg),
        "read": lambda: _msg.read_pair("Alltoallv", True, smsg, rmsg, False, p),
        "lookup": lambda: fast.lookup(key),
        "confirm": confirm,
        "mpi4py": lambda: comm.Alltoallv(smsg, rmsg),
        "barrier": comm.Barrier,
    }
    carried = bool(mode and d.stamp.carries)
    if not carried:  # a carried exchange is its confirmation: nothing is replayed
        rows["replay"] = lambda: _oneshot._replay(icomm, "alltoallv", d, sm, rm, False)
    out = {"bytes_per_peer": m, "algorithm": d.info.name,
           "mode": {0: "allreduce", 1: "stamp", 2: "rounds"}[mode], "carried": carried}
    for name, fn in rows.items():
        out[f"{name}_us"] = round(min(_time(comm, fn, iters) for _ in range(5)) * 1e6, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="bytes per peer")
    ap.add_argument("--iters", type=int, default=2000, help="calls per timed row")
    ap.add_argument("--passes", type=int, default=5, help="passes (best one kept)")
    ap.add_argument("--profile", action="store_true", help="cProfile the one-shot call")
    ap.add_argument("--parts", action="store_true",
                    help="time the parts of a repeated one-shot call at every size")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--stamp-max-p", type=int, default=None,
                    help="largest p whose one-shot calls stamp their messages instead of "
                         "an all-reduce (default: the library's)")
    ap.add_argument("--forward-max-p", type=int, default=None,
                    help="largest p whose one-shot calls are confirmed in dissemination "
                         "rounds instead of an all-reduce (default: the library's)")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    if args.stamp_max_p is not None:  # the same on every rank, before any call
        pya2a._stamp.STAMP_MAX_P = args.stamp_max_p
    if args.forward_max_p is not None:
        pya2a._stamp.FORWARD_MAX_P = args.forward_max_p
    rows = measure(comm, args.sizes, args.iters, args.passes)
    prof = profile(comm, args.sizes[0], args.iters) if args.profile else ""
    split = [parts(comm, m, args.iters) for m in args.sizes] if args.parts else []
    if comm.Get_rank() == 0:
        if prof:
            print(prof)
        for row in split:
            print(f"{row['bytes_per_peer']:>6} B/peer  {row['algorithm']}, {row['mode']}"
                  f"{' (carried)' if row['carried'] else ''}:  "
                  + "  ".join(f"{k[:-3]} {v:.2f}" for k, v in row.items() if k.endswith("_us")),
                  flush=True)
        if args.json:
            lib = MPI.Get_library_version().splitlines()[0].strip("\x00 ")
            doc = {"command": f"mpiexec -n {comm.Get_size()} python bench/oneshot_overhead.py "
                              + " ".join(sys.argv[1:]),
                   "p": comm.Get_size(), "mpi_library": lib, "pya2a": pya2a.__version__,
                   "iters": args.iters, "passes": args.passes, "rows": rows}
            if prof:
                doc["profile"] = prof
            if split:
                doc["parts"] = split
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
