"""``python -m pya2a tune``: measure this machine and communicator, write the tuning table.

What is measured (all ranks of MPI.COMM_WORLD, collectively):

``o``   software overhead of one plan run with nothing to send (COMM_SELF, 8-byte self copy).
``ts``  message start-up: every rank exchanges 8 bytes with a partner at once (Sendrecv).
``tw``  seconds per byte: the same with 1 MiB, ``(t(1M) - t(8)) / 1M``; all ranks busy, so it
        is the per-rank share of the node's bandwidth, as it is inside an all-to-all.
``tp``  our per-message cost: ``Startall`` + ``Waitall`` of a persistent send/receive pair to
        self, per message.
``tr``  local rearrangement: ``_pack.gather`` of 64 blocks, seconds per byte.

Then, per algorithm, the time of a uniform exchange through a plan at a ladder of sizes
(``--quick``: 8 B .. 1 MiB by 8x; full: 8 B .. 4 MiB by 4x), after an untimed warm-up of
every algorithm; the table stores each measured time (and its ratio to the algorithm's cost
model, which :mod:`pya2a.select` recomputes from the times and the table's own parameters
when it loads the table, so merged runs stay consistent).
An algorithm more than 4x slower than native at >= 4 KiB is not timed at larger sizes (the
last ratio is then carried, and the margin keeps it from being chosen there).

The JSON records its provenance (host, MPI library and version, p, ranks per node, date,
command line). ``auto`` reads it from ``PYA2A_TUNING`` or the user cache path
(:func:`pya2a.select.table_path`); ``--merge`` keeps other p's entries of an existing file.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["measure_params", "measure_corrections", "tune", "main"]


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_params(comm, quick: bool = True) -> dict[str, float]:
    """The machine parameters o, ts, tw, tp, tr (seconds; identical on every rank)."""
    from mpi4py import MPI

    from ..core import _pack
    from ..plan import Plan

    reps = 200 if quick else 1000
    # o: a plan run that only copies 8 bytes to itself
    one = np.ones(8, dtype=np.uint8)
    out = np.empty(8, dtype=np.uint8)
    pl = Plan(MPI.COMM_SELF, [8], [8], MPI.BYTE, algorithm="direct")
    pl.run(one, out)
    o = _best(lambda: [pl.run(one, out) for _ in range(20)], reps // 10) / 20
    pl.free()
    # tp: persistent send/recv pair to self, per message
    sb, rb = np.ones(8, dtype=np.uint8), np.empty(8, dtype=np.uint8)
    reqs = [MPI.COMM_SELF.Recv_init(rb, 0, 7), MPI.COMM_SELF.Send_init(sb, 0, 7)]

    def pair():
        MPI.Prequest.Startall(reqs)
        MPI.Request.Waitall(reqs)

    pair()
    tp = _best(lambda: [pair() for _ in range(20)], reps // 10) / 20 / 2
    for q in reqs:
        q.Free()
    # tr: gather 64 blocks of 16 KiB
    src = np.ones(1 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    offs = (np.arange(64, dtype=np.int64) * (1 << 14))[::-1].copy()
    lens = np.full(64, 1 << 14, dtype=np.int64)
    _pack.gather(src, offs, lens, dst, 0)
    tr = _best(lambda: _pack.gather(src, offs, lens, dst, 0), 20) / src.size
    # ts, tw: all ranks exchange with a partner at once
    p, rank = comm.Get_size(), comm.Get_rank()
    ts = tw = None
    if p > 1:
        partner = rank ^ 1 if (rank ^ 1) < p else rank
        big = 1 << 20
        s = np.ones(big, dtype=np.uint8)
        r = np.empty(big, dtype=np.uint8)

        def ex(n: int) -> None:
            comm.Sendrecv([s[:n], MPI.BYTE], partner, 11, [r[:n], MPI.BYTE], partner, 11)

        def timed(n: int, k: int) -> float:
            ex(n)
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(k):
                ex(n)
            return comm.allreduce((time.perf_counter() - t0) / k, op=MPI.MAX)

        t_small = timed(8, reps)
        t_big = timed(big, 10 if quick else 40)
        ts = t_small
        tw = max(t_big - t_small, 0.0) / big
    vals = {"o": o, "tp": tp, "tr": tr}
    # every rank must hold identical numbers: take the max over ranks
    for k in list(vals):
        vals[k] = comm.allreduce(vals[k], op=MPI.MAX)
    from ..select import DEFAULT_PARAMS

    vals["ts"] = ts if ts is not None else DEFAULT_PARAMS["ts"]
    vals["tw"] = tw if tw else DEFAULT_PARAMS["tw"]
    return vals


def measure_corrections(comm, params: dict, sizes: list[int], algorithms: list[str],
                        warmup: int, iters: int, max_time: float, progress: bool = False,
                        max_slowdown: float = 4.0) -> list[dict]:
    """Time every algorithm through a plan at each size (uniform); ratio to its model."""
    from mpi4py import MPI

    from .. import algorithms as registry
    from ..core.state import internal_comm, ranks_per_node
    from ..plan import Plan
    from .harness import Progress, time_call
    from .report import fmt_size

    p, rank = comm.Get_size(), comm.Get_rank()
    rpn = ranks_per_node(internal_comm(comm))
    lib = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
    top = max(sizes) * p
    sbuf = np.ones(top, dtype=np.uint8)
    rbuf = np.ones(top, dtype=np.uint8)
    bar = Progress(len(sizes) * len(algorithms), progress and rank == 0)
    for a in algorithms:  # first use of each pattern is slow (connections, pages): not timed
        with Plan(comm, sizes[0], sizes[0], MPI.BYTE, algorithm=a) as pl:
            for _ in range(5):
                pl.run(sbuf[:sizes[0] * p], rbuf[:sizes[0] * p])
    meas: dict[str, list[tuple[int, float]]] = {a: [] for a in algorithms}
    dropped: set[str] = set()
    for si, m in enumerate(sizes):
        t_native = None
        for a in algorithms:
            if a in dropped:
                continue
            bar.step(f"{fmt_size(m)} {a}")
            pl = Plan(comm, m, m, MPI.BYTE, algorithm=a)
            s, r = sbuf[:m * p], rbuf[:m * p]
            avg, _, _, _ = time_call(comm, lambda pl=pl, s=s, r=r: pl.run(s, r), warmup,
                                     iters, max_time)
            pl.free()
            meas[a].append((m, avg))
            if a == "native":
                t_native = avg
            elif t_native and m >= 4096 and avg > max_slowdown * t_native:
                dropped.add(a)
                bar.drop(len(sizes) - si - 1)
    bar.close()
    out = []
    for a, pts in meas.items():
        if not pts:
            continue
        cost = registry.get(a).cost
        ms = [m for m, _ in pts]
        ts = [t for _, t in pts]
        ratio = [t / max(cost(p, float(m), params), 1e-12) for m, t in pts]
        out.append({"algorithm": a, "p": p, "ranks_per_node": rpn, "device": False,
                    "mpi_library": lib, "m": ms, "ratio": ratio,
                    "measured_us": [t * 1e6 for t in ts]})
    return out


def tune(comm, *, quick: bool = False, algorithms: list[str] | None = None,
         progress: bool = True, command: str = "") -> dict:
    """Measure and return the table (collective; identical on every rank)."""
    from .. import algorithms as registry
    from ..select import DEFAULT_MARGIN
    from .harness import provenance

    t0 = time.perf_counter()
    p = comm.Get_size()
    params = measure_params(comm, quick)
    # explicit-only algorithms (cost inf: auto never picks them) have nothing to correct
    names = algorithms or [n for n in registry.available(p)
                           if math.isfinite(registry.get(n).cost(max(p, 2), 64.0, params))]
    if "native" in names:  # native first: the others are dropped relative to it
        names = ["native", *[a for a in names if a != "native"]]
    if quick:
        sizes, warmup, iters, max_time = [8, 64, 512, 4096, 32768, 262144, 1 << 20], 2, 20, 0.1
    else:
        sizes = [8 * 4 ** k for k in range(11)] + [4 << 20]
        warmup, iters, max_time = 5, 100, 0.4
    corr = measure_corrections(comm, params, sizes, names, warmup, iters, max_time,
                               progress) if p > 1 else []
    prov = provenance(comm, command)
    prov["quick"] = quick
    prov["seconds"] = round(time.perf_counter() - t0, 1)
    return {"version": 1, "provenance": prov, "params": params, "margin": DEFAULT_MARGIN,
            "corrections": corr}


def main(args, command: str) -> int:
    """``tune`` subcommand (argparse namespace from :mod:`pya2a.cli`)."""
    from mpi4py import MPI

    from .. import select

    comm = MPI.COMM_WORLD
    algs = [a for a in args.algorithms.split(",") if a] if args.algorithms else None
    table = tune(comm, quick=args.quick, algorithms=algs, progress=not args.no_progress,
                 command=command)
    if comm.Get_rank() == 0:
        path = Path(args.output) if args.output else select.table_path()
        if args.merge and path.exists():
            try:
                old = json.loads(path.read_text())
                prov = table["provenance"]
                keep = [c for c in old.get("corrections", [])
                        if (c.get("p"), c.get("ranks_per_node")) !=
                        (prov["p"], prov["ranks_per_node"])
                        and c.get("mpi_library", prov["mpi_library"]) == prov["mpi_library"]]
                table["corrections"] = keep + table["corrections"]
                earlier = old.get("provenance", {})
                runs = earlier.pop("merged_runs", [])
                earlier.pop("merged_from", None)
                prov["merged_runs"] = runs + [earlier]
            except (OSError, ValueError) as e:
                print(f"tune: not merging {path}: {e}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
        print_summary(table, path)
    return 0


def choices(table: dict, p: int, ranks_per_node: int, sizes: list[int]) -> list[tuple[int, str]]:
    """What ``auto`` picks with ``table`` for a uniform host exchange at each bytes-per-peer
    size on ``p`` ranks (every algorithm that can run there is a candidate)."""
    from .. import algorithms as registry
    from ..select import Stats, choose

    cands = registry.available(p)
    out = []
    for m in sizes:
        st = Stats(p=p, max_block=m, mean_block=float(m), device=False, contiguous=True,
                   max_rank=m * p, ranks_per_node=ranks_per_node)
        out.append((m, choose(st, list(cands), table)))
    return out


def print_summary(table: dict, path, file=None) -> None:
    """What was measured (sizes as bench prints them) and what ``auto`` now chooses."""
    from .. import select
    from .report import fmt_size

    file = sys.stdout if file is None else file
    prov = table["provenance"]
    print(f"tune: p={prov['p']} ({prov['ranks_per_node']} per node) in {prov['seconds']} s; "
          + ", ".join(f"{k}={v:.3g}" for k, v in table["params"].items()), file=file)
    print("  measured time per call (us) at bytes per peer:", file=file)
    for c in table["corrections"]:
        print(f"  {c['algorithm']:<13} p={c['p']}: " + "  ".join(
            f"{fmt_size(m)}:{t:.1f}" for m, t in zip(c["m"], c["measured_us"], strict=True)),
            file=file)
    print(f"tune: wrote {path}", file=file)
    try:  # read back through the selector, as auto will
        loaded = select.load_table(path)
    except (OSError, ValueError) as e:
        print(f"tune: cannot read {path} back: {e}", file=file)
        return
    if prov["p"] > 1:
        sizes = [8 * 8 ** k for k in range(7)] + [4 << 20]
        picks = choices(loaded, prov["p"], prov["ranks_per_node"], sizes)
        print(f"auto now chooses, p={prov['p']}, uniform host exchanges: " + ", ".join(
            f"{fmt_size(m)} {a}" for m, a in picks), file=file)
    default = select.table_path()
    if Path(path).resolve() != Path(default).resolve():
        print(f"  auto reads it when PYA2A_TUNING={path} (default path: {default})", file=file)
