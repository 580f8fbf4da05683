"""``python -m pya2a {bench,tune,info}``: benchmark, tune the selector, describe the setup.

bench (OSU / nccl-tests style; run under mpiexec)::

    mpiexec -n 16 python -m pya2a bench -b 8 -e 4M -f 4 --pattern skew --json out.json

One row per algorithm per size. ``native`` is the MPI library's own Alltoallv called through
mpi4py exactly as an application would (always a row); every other row, ``auto`` included,
runs through a persistent :class:`pya2a.Plan` bound to the buffers (``--api oneshot`` times
``pya2a.Alltoallv`` instead). Per size: the mean / min / max over ranks of each rank's mean
time per call, algbw = mean bytes sent per rank / mean time, busbw = algbw * (p-1)/p (as
nccl-tests), the algorithm ``auto`` chose and every row's speed-up over ``native``
(``t_native / t``, > 1 is faster).

Patterns (bytes per (src, dst) block, the same matrix on every rank from a shared seed; mean
block = the size): ``uniform`` all equal; ``random`` uniform in [0, 2m]; ``skew`` Zipf over
destinations (block to rank j proportional to 1/(j+1): low ranks receive most, rank 0 about
p/H_p times the mean); ``hot`` rank 0 receives p/4 times the mean block from everyone.

tune: see :mod:`pya2a.tune`. info: versions, ranks and ranks per node, CUDA-awareness, GPUs
and their peer access, the tuning table in use.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .harness import Progress, provenance, time_call

__all__ = ["main", "bench", "info", "parse_size", "sizes", "counts_matrix",
           "register_allocator", "time_call", "write_plot", "PATTERNS"]

PATTERNS = ("uniform", "random", "skew", "hot")


# ---- helpers -----------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'8', '4K', '4KiB', '1M', '2G' -> bytes (binary multiples)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1 << (10 * ("KMG".index(t[-1]) + 1))
        t = t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8, 64K, 4M)") from None
    if v < 0 or v != int(v):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(v)


def fmt_size(n: float) -> str:
    """Bytes as a short binary string (8, 64K, 4M)."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{int(n) >> shift}{unit}"
    return f"{int(n)}"


def sizes(begin: int, end: int, factor: int) -> list[int]:
    """begin, begin*factor, ... up to end, end always included."""
    if begin < 1 or end < begin or factor < 2:
        raise ValueError("sizes: need 1 <= begin <= end and factor >= 2")
    out, m = [], begin
    while m < end:
        out.append(m)
        m *= factor
    out.append(end)
    return out


def counts_matrix(pattern: str, p: int, m: int, seed: int = 0) -> np.ndarray:
    """Bytes of block (src, dst) as an int64 (p, p) matrix; the mean block is about ``m``."""
    if pattern == "uniform":
        return np.full((p, p), m, dtype=np.int64)
    if pattern == "random":
        rng = np.random.default_rng(seed + m)
        return rng.integers(0, 2 * m + 1, size=(p, p), dtype=np.int64)
    if pattern == "skew":
        w = 1.0 / np.arange(1, p + 1)
        row = np.floor(m * p * w / w.sum()).astype(np.int64)
        return np.tile(row, (p, 1))
    if pattern == "hot":
        c = np.full((p, p), m, dtype=np.int64)
        c[:, 0] = m * max(1, p // 4)
        return c
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


# Buffer allocation per device kind: GPU code extends this with register_allocator("cuda",
# alloc, sync) where alloc(nbytes) returns a writable device buffer (e.g. a CuPy uint8 array)
# and sync() completes outstanding device work before a timer is read.
_ALLOCATORS: dict[str, tuple[Callable[[int], Any], Callable[[], None] | None]] = {}


def register_allocator(device: str, alloc: Callable[[int], Any],
                       sync: Callable[[], None] | None = None) -> None:
    """Let ``bench --device <device>`` allocate its buffers with ``alloc(nbytes)``."""
    _ALLOCATORS[device] = (alloc, sync)


def _host_alloc(nbytes: int) -> np.ndarray:
    a = np.empty(max(int(nbytes), 1), dtype=np.uint8)
    a.fill(1)  # touch every page now, not inside the first timed call
    return a


register_allocator("cpu", _host_alloc)


def _allocator(device: str):
    if device not in _ALLOCATORS and device == "cuda":
        try:  # the GPU side registers its allocator when imported, if it provides one
            import pya2a.tools.gpu_bench  # noqa: F401
        except Exception:
            pass
    if device not in _ALLOCATORS:
        raise SystemExit(f"bench: no buffer allocator for --device {device}; GPU benchmarks "
                         f"run with: mpiexec -n N python -m pya2a.tools.gpu_bench")
    return _ALLOCATORS[device]


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python -m pya2a " + shlex.join(args)


# ---- bench -------------------------------------------------------------------------------------
def bench(comm, *, begin: int = 8, end: int = 4 << 20, factor: int = 2, warmup: int = 5,
          iters: int = 50, algorithms: list[str] | None = None, pattern: str = "uniform",
          check: bool = False, api: str = "plan", oneshot: bool = False,
          max_time: float = 0.5, max_slowdown: float = 4.0, device: str = "cpu",
          progress: bool = True, seed: int = 0, command: str = "",
          partial: str | None = None, rounds: int = 1) -> dict:
    """Run the sweep (collective); returns the JSON-ready report on every rank.

    Args:
        comm: communicator to benchmark on.
        begin, end, factor: bytes-per-peer sweep (mean block size), ``factor`` apart.
        warmup, iters: untimed and timed calls per point (iters cut to ~max_time seconds).
        algorithms: pya2a algorithms to time (default: all usable); native is always a row.
        pattern: uniform | random | skew | hot (see module docstring).
        check: compare every row's received bytes with native's.
        api: "plan" (persistent plans) or "oneshot" (``pya2a.Alltoallv`` per call).
        oneshot: also time auto through the one-shot API (sizes <= 64 KiB) as "auto/oneshot".
        max_slowdown: stop timing an algorithm at larger sizes once it is this many times
            slower than native (at >= 4 KiB per peer), or slower than native by 25 % with
            one call longer than ``max_time``.
        device: buffer kind ("cpu"; others through :func:`register_allocator`).
        partial: JSON path rewritten (rank 0) after every size, marked incomplete.
        rounds: interleaved timing passes per size (each ``max_time / rounds``); a row
            reports its best pass (``passes_us`` lists them all).
    """
    from mpi4py import MPI

    import pya2a

    from .. import algorithms as registry

    p, rank = comm.Get_size(), comm.Get_rank()
    rounds = max(1, int(rounds))
    alloc, sync = _allocator(device)
    avail = registry.available(p, device=device != "cpu")
    names = [a for a in (algorithms or avail) if a not in ("native", "auto")]
    for a in names:
        registry.get(a, "bench")
    rows = ["native", *names, "auto"] + (["auto/oneshot"] if oneshot else [])
    sweep = sizes(begin, end, factor)
    mats = {m: counts_matrix(pattern, p, m, seed) for m in sweep}
    max_send = max(int(c[rank].sum()) for c in mats.values())
    max_recv = max(int(c[:, rank].sum()) for c in mats.values())
    sbuf, rbuf = alloc(max_send), alloc(max_recv)
    if device == "cpu":
        sbuf[:] = (np.arange(sbuf.size, dtype=np.int64) * 7 + rank * 13).astype(np.uint8)
    ref = np.empty(max_recv, dtype=np.uint8) if check and device == "cpu" else None
    bar = Progress(len(sweep) * len(rows) * max(1, rounds), progress and rank == 0)
    dropped: dict[str, int] = {}
    results: list[dict] = []
    meta = provenance(comm, command)
    meta.update({"pattern": pattern, "api": api, "device": device, "warmup": warmup,
                 "iters": iters, "max_time_s": max_time, "seed": seed, "rounds": rounds,
                 "algorithms": rows, "sizes": sweep, "tuning_table": _table_meta()})
    # First use of a communication pattern pays connection and page set-up: do it for every
    # row before the sweep, so the first size is not timed cold.
    c0 = mats[sweep[0]]
    w_s = c0[rank].copy()
    w_r = c0[:, rank].copy()
    t0 = time.perf_counter()
    while True:  # about 0.3 s of the library's own call: launch noise settles meanwhile
        for _ in range(20):
            comm.Alltoallv([sbuf, w_s, MPI.BYTE], [rbuf, w_r, MPI.BYTE])
        if comm.allreduce(time.perf_counter() - t0, op=MPI.MAX) > 0.3:
            break
    for name in names:
        with pya2a.plan(comm, w_s, w_r, MPI.BYTE, algorithm=name) as pl:
            for _ in range(3):
                pl.run(sbuf, rbuf)
    for m in sweep:
        c = mats[m]
        sc, rc = c[rank].copy(), c[:, rank].copy()
        sd = np.concatenate(([0], np.cumsum(sc)[:-1])).astype(np.int64)
        rd = np.concatenate(([0], np.cumsum(rc)[:-1])).astype(np.int64)
        smsg = [sbuf, (sc, sd), MPI.BYTE]
        rmsg = [rbuf, (rc, rd), MPI.BYTE]
        mean_rank = float(c.sum()) / p
        point: dict[str, Any] = {"bytes_per_peer": m, "mean_block": float(c.mean()),
                                 "max_block": int(c.max()),
                                 "max_rank_bytes": int(max(c.sum(0).max(), c.sum(1).max())),
                                 "rows": {}}
        fns: dict[str, tuple[Callable[[], None], str, Any]] = {}
        for name in rows:
            if name in dropped:
                point["rows"][name] = {"skipped": f"slower than native at "
                                                  f"{fmt_size(dropped[name])}"}
                continue
            if name == "auto/oneshot" and m > 64 * 1024:
                continue
            pl = None
            if name == "native":
                def fn(smsg=smsg, rmsg=rmsg):
                    comm.Alltoallv(smsg, rmsg)
                chosen = "native"
            elif name == "auto/oneshot" or api == "oneshot":
                alg = "auto" if name.startswith("auto") else name
                def fn(smsg=smsg, rmsg=rmsg, alg=alg):
                    pya2a.Alltoallv(comm, smsg, rmsg, algorithm=alg)
                chosen = pya2a.explain(comm, sc, rc, "B", algorithm=alg).choice \
                    if alg == "auto" else alg
            else:
                pl = pya2a.plan(comm, sc, rc, MPI.BYTE, algorithm=name)
                chosen = pl.algorithm
                def fn(pl=pl, s=sbuf, r=rbuf):
                    pl.run(s, r)
            fns[name] = (fn, chosen, pl)
        # Rows are timed in `rounds` interleaved passes (native, a, b, ..., auto, native, ...)
        # and each row reports its best pass (least mean time per call): a fully subscribed
        # node has bursts of jitter (a rank descheduled stalls every rank) that hit whichever
        # row is being timed; the best of several interleaved passes is the reproducible
        # figure, and every row, native included, gets the same treatment.
        passes: dict[str, list] = {name: [] for name in fns}
        for k in range(rounds):
            for name, (fn, _, _) in fns.items():
                bar.step(f"{fmt_size(m)} {name}" + (f" {k + 1}/{rounds}" if rounds > 1 else ""))
                passes[name].append(time_call(comm, fn, warmup if k == 0 else 1, iters,
                                              max_time / rounds, sync))
        if ref is not None:  # every row's result against native's, after the timing
            fns["native"][0]()
            ref[:] = rbuf[:max_recv]
        t_native = None
        for name, (fn, chosen, pl) in fns.items():
            runs = passes[name]
            avg, tmin, tmax, _ = min(runs, key=lambda r: r[0])
            row = {"avg_us": avg * 1e6, "min_us": tmin * 1e6, "max_us": tmax * 1e6,
                   "iters": sum(r[3] for r in runs), "algbw_GBps": mean_rank / avg / 1e9,
                   "busbw_GBps": mean_rank / avg / 1e9 * (p - 1) / p}
            if rounds > 1:
                row["passes_us"] = [r[0] * 1e6 for r in passes[name]]
            if name.startswith("auto"):
                row["algorithm"] = chosen
            if ref is not None:
                if name == "native":
                    row["check"] = True
                else:
                    rbuf[:int(rc.sum())] = 0
                    fn()
                    ok = bool(np.array_equal(rbuf[:int(rc.sum())], ref[:int(rc.sum())]))
                    row["check"] = bool(comm.allreduce(ok, op=MPI.LAND))
            if pl is not None:
                pl.free()
            if name == "native":
                t_native = avg
            else:
                row["speedup_vs_native"] = t_native / avg if t_native else None
                # not timed at larger sizes: far slower than native, or slower and already
                # longer per call than a whole point may take (grows with the size)
                if not name.startswith("auto") and t_native and (
                        (m >= 4096 and avg > max_slowdown * t_native)
                        or (avg > 1.25 * t_native and avg > max_time)):
                    dropped[name] = m
            point["rows"][name] = row
        point["auto_choice"] = point["rows"]["auto"].get("algorithm")
        point["auto_speedup_vs_native"] = point["rows"]["auto"].get("speedup_vs_native")
        best = min(((r["avg_us"], k) for k, r in point["rows"].items()
                    if "avg_us" in r and k not in ("native", "auto", "auto/oneshot")),
                   default=None)  # none when only native was asked for, or all dropped
        point["best"] = best[1] if best else None
        point["best_speedup_vs_native"] = (point["rows"]["native"]["avg_us"] / best[0]
                                           if best else None)
        results.append(point)
        if partial and rank == 0:  # a sweep cut short still leaves every finished size
            _write_json(partial, {"meta": dict(meta, complete=False), "results": results,
                                  "summary": summarize(results)})
    meta["complete"] = True
    return {"meta": meta, "results": results, "summary": summarize(results)}


def _write_json(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _table_meta() -> dict:
    from .. import select

    t = select.load_table()
    return {k: t["provenance"].get(k) for k in ("path", "host", "mpi_library", "p", "date",
                                                 "command", "source", "error")
            if t["provenance"].get(k) is not None}


def summarize(results: list[dict]) -> dict:
    """Geometric-mean speed-ups over sizes, worst case, and small-size best speed-up."""
    def gmean(xs):
        xs = [x for x in xs if x]
        return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None

    auto = [r["auto_speedup_vs_native"] for r in results]
    small = [r["best_speedup_vs_native"] for r in results if r["bytes_per_peer"] <= 256]
    return {"auto_geomean_speedup": gmean(auto),
            "auto_min_speedup": min((x for x in auto if x), default=None),
            "best_small_min_speedup": min((x for x in small if x), default=None),
            "best_small_geomean_speedup": gmean(small)}


def print_table(report: dict, file=None) -> None:
    """The human-readable table (rank 0)."""
    file = sys.stdout if file is None else file
    meta = report["meta"]
    rows = [r for r in meta["algorithms"]]
    print(f"# pya2a bench: p={meta['p']} ranks/node={meta['ranks_per_node']} "
          f"pattern={meta['pattern']} api={meta['api']} mpi={meta['mpi_library']}", file=file)
    print(f"# {meta['command']}", file=file)
    print("# time: mean over ranks of each rank's mean us per call [min-max]; x: speed-up "
          "over native; busbw GB/s", file=file)
    head = f"{'bytes/peer':>10} " + " ".join(f"{r:>22}" for r in rows) + f" {'auto ->':>12}"
    print(head, file=file)
    for pt in report["results"]:
        cells = []
        for r in rows:
            row = pt["rows"].get(r)
            if not row or "avg_us" not in row:
                cells.append(f"{'-':>22}")
                continue
            x = row.get("speedup_vs_native")
            xs = f"x{x:.2f}" if x else f"{row['busbw_GBps']:.2f}G"
            cells.append(f"{row['avg_us']:>11.1f} {xs:>10}")
        print(f"{fmt_size(pt['bytes_per_peer']):>10} " + " ".join(cells) +
              f" {str(pt['auto_choice']):>12}", file=file)
    s = report["summary"]
    if s["auto_geomean_speedup"]:
        print(f"# auto vs native: geomean x{s['auto_geomean_speedup']:.2f}, "
              f"worst x{s['auto_min_speedup']:.2f}", file=file)
    if s["best_small_min_speedup"]:
        print(f"# best pya2a vs native at <= 256 B/peer: worst x{s['best_small_min_speedup']:.2f}"
              f", geomean x{s['best_small_geomean_speedup']:.2f}", file=file)


def write_plot(report: dict, path: str) -> bool:
    """PNG: time vs bytes per peer, one line per algorithm, log-log. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    meta = report["meta"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in meta["algorithms"]:
        xs = [pt["bytes_per_peer"] for pt in report["results"]
              if "avg_us" in pt["rows"].get(name, {})]
        ys = [pt["rows"][name]["avg_us"] for pt in report["results"]
              if "avg_us" in pt["rows"].get(name, {})]
        if not xs:
            continue
        style = {"native": dict(color="black", lw=2.2),
                 "auto": dict(ls="--", lw=2, color="magenta"),
                 "auto/oneshot": dict(ls=":", color="magenta")}.get(name, {})
        ax.plot(xs, ys, marker="o", ms=3, label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes per peer (mean block)")
    ax.set_ylabel("time per call (us, mean over ranks)")
    ax.set_title(f"pya2a Alltoallv, p={meta['p']}, {meta['pattern']}, "
                 f"{meta['mpi_library'][:40]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bench_cuda(args) -> int:
    """``--device cuda``: NCCL (torch), the IPC engine's methods and the public API's device
    paths (staged or CUDA-aware MPI, ``shm``, one-shot ``auto``) against the pinned bound.

    The generic sweep is host-only: its ``native`` row hands buffers to MPI, which must never
    see a device pointer unless the MPI is CUDA-aware. The per-algorithm staged sweep has its
    own driver, ``python -m pya2a.gpu.bench_staged``.
    """
    from ..gpu import have_cupy
    from . import gpu_bench

    if not have_cupy():
        print("bench --device cuda: CuPy is not importable (pip install 'pya2a[gpu]')",
              file=sys.stderr)
        return 2
    argv = ["--sizes", ",".join(str(m) for m in sizes(args.begin, args.end, args.factor))]
    if args.json:
        argv += ["--out", args.json]
    if args.plot:
        argv += ["--plot", args.plot]
    return gpu_bench.main(argv)


def _run_suite(comm, args) -> int:
    path = Path(args.suite_path) if args.suite_path else None
    cands = [path] if path else [Path.cwd() / "examples" / "collectives.py",
                                 Path(__file__).resolve().parent.parent / "examples" /
                                 "collectives.py"]
    found = next((c for c in cands if c.is_file()), None)
    if found is None:
        if comm.Get_rank() == 0:
            print("bench --suite collectives: examples/collectives.py not found (looked in "
                  + ", ".join(str(c) for c in cands) + "); run from a pya2a checkout or "
                  "pass --suite-path", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("pya2a_examples_collectives", found)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run_suite = getattr(mod, "run_suite", None)
    if run_suite is None:
        if comm.Get_rank() == 0:
            print(f"bench --suite collectives: {found} has no run_suite()", file=sys.stderr)
        return 2
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if comm.Get_rank() == 0 else None
    import pya2a

    algs = [a for a in (args.algorithms or "").split(",") if a]
    # Alltoall goes through pya2a (the other collectives are the MPI library's own)
    comm = pya2a.Comm(comm, algorithm=algs[0] if len(algs) == 1 else "auto")
    report = run_suite(comm, min_bytes=args.begin, max_bytes=args.end, factor=args.factor,
                       warmup=args.warmup, iters=args.iters, device=args.device, log=log)
    if comm.Get_rank() == 0:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        if args.plot and hasattr(mod, "write_png"):
            mod.write_png(report, args.plot)
        print(json.dumps(report.get("summary", {k: v for k, v in report.items()
                                                 if k != "results"}), indent=1, default=str))
    return 0 if report.get("ok", True) else 1


def _bench_main(args, argv) -> int:
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        if not args.plot:
            print_table(report)
            return 0
        if not write_plot(report, args.plot):
            print("bench: matplotlib is not importable; no plot written", file=sys.stderr)
            return 1
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if args.suite == "collectives":
        return _run_suite(comm, args)
    if args.device == "cuda":
        return _bench_cuda(args)
    algs = [a for a in args.algorithms.split(",") if a] if args.algorithms else None
    report = bench(comm, begin=args.begin, end=args.end, factor=args.factor,
                   warmup=args.warmup, iters=args.iters, algorithms=algs,
                   pattern=args.pattern, check=args.check, api=args.api, oneshot=args.oneshot,
                   max_time=args.max_time, max_slowdown=args.max_slowdown,
                   device=args.device, progress=not args.no_progress, seed=args.seed,
                   command=_command(argv), partial=args.json, rounds=args.rounds)
    if comm.Get_rank() == 0:
        print_table(report)
        if args.json:
            _write_json(args.json, report)
            print(f"# wrote {args.json}")
        if args.plot:
            if write_plot(report, args.plot):
                print(f"# wrote {args.plot}")
            else:
                print("# matplotlib not importable: no plot (replot later with "
                      "--replot JSON --plot PNG)", file=sys.stderr)
    failed = any(r.get("check") is False for pt in report["results"]
                 for r in pt["rows"].values())
    return 1 if failed else 0


# ---- info --------------------------------------------------------------------------------------
def info(comm=None) -> dict:
    """Versions, layout, CUDA-awareness, GPUs and the tuning table (collective)."""
    from mpi4py import MPI

    from .. import algorithms as registry
    from .. import select
    from ..core.state import internal_comm, ranks_per_node

    comm = MPI.COMM_WORLD if comm is None else comm
    out = provenance(comm, "")
    del out["command"], out["date"]
    out["mpi_library_full"] = MPI.Get_library_version().strip()
    local = internal_comm(comm).Split_type(MPI.COMM_TYPE_SHARED)
    out["nodes"] = comm.allreduce(1 if local.Get_rank() == 0 else 0)
    local.Free()
    out["ranks_per_node"] = ranks_per_node(internal_comm(comm))
    out["algorithms"] = registry.available(comm.Get_size())
    out["cuda_aware_mpi"] = _cuda_aware()
    out["gpus"] = _gpus()
    t = select.load_table()
    out["tuning_table"] = {"path": t["provenance"].get("path") or "built-in defaults",
                           "provenance": t["provenance"], "params": t["params"],
                           "margin": t["margin"],
                           "corrections": sorted({(c["algorithm"], c["p"])
                                                  for c in t["corrections"]})}
    out["tuning_path_searched"] = str(select.table_path())
    return out


def _cuda_aware() -> str:
    if importlib.util.find_spec("pya2a.gpu.device") is None:
        return "unknown (pya2a.gpu.device not available)"
    try:
        from ..gpu import device

        return str(device.cuda_aware())
    except Exception as e:
        return f"unknown ({type(e).__name__}: {e})"


def _gpus() -> dict:
    try:
        import cupy
        from cupy.cuda import runtime
    except Exception as e:
        return {"visible": 0, "note": f"CuPy not importable ({type(e).__name__})"}
    try:
        n = runtime.getDeviceCount()
        names = [runtime.getDeviceProperties(i)["name"].decode() for i in range(n)]
        peer = [[1 if i == j else int(runtime.deviceCanAccessPeer(i, j)) for j in range(n)]
                for i in range(n)]
        return {"visible": n, "names": names, "peer_access": peer,
                "cupy": cupy.__version__}
    except Exception as e:
        return {"visible": 0, "note": f"CUDA error: {e}"}


def _print_info(d: dict) -> None:
    print(f"pya2a {d['pya2a']}  mpi4py {d['mpi4py']}  Python {d['python']}")
    print(f"MPI: {d['mpi_library']} (standard {d['mpi_version']})")
    print(f"ranks: {d['p']}  nodes: {d['nodes']}  ranks per node: {d['ranks_per_node']}  "
          f"host: {d['host']} ({d['cpu_count']} cpus)")
    print(f"algorithms: {', '.join(d['algorithms'])}")
    print(f"CUDA-aware MPI: {d['cuda_aware_mpi']}")
    g = d["gpus"]
    print(f"GPUs visible: {g.get('visible', 0)}" + (f"  ({g['note']})" if "note" in g else ""))
    if g.get("peer_access"):
        for i, (name, row) in enumerate(zip(g["names"], g["peer_access"], strict=True)):
            print(f"  GPU{i} {name}: peer access " + " ".join(str(x) for x in row))
    t = d["tuning_table"]
    print(f"tuning table: {t['path']}  (searched {d['tuning_path_searched']})")
    prov = t["provenance"]
    for k in ("host", "mpi_library", "p", "date", "command", "source", "error"):
        if prov.get(k) is not None:
            print(f"  {k}: {prov[k]}")
    print("  params: " + ", ".join(f"{k}={v:.3g}" for k, v in t["params"].items()) +
          f"  margin={t['margin']:.2f}")
    if t["corrections"]:
        print("  measured corrections: " + ", ".join(f"{a}@p={p}" for a, p in t["corrections"]))


# ---- entry -------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pya2a",
                                 description="pya2a: benchmark, tune and describe (run under "
                                             "mpiexec for more than one rank)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="OSU / nccl-tests style sweep over bytes per peer")
    b.add_argument("-b", "--begin", type=parse_size, default=8, help="first bytes per peer")
    b.add_argument("-e", "--end", type=parse_size, default=4 << 20, help="last bytes per peer")
    b.add_argument("-f", "--factor", type=int, default=2, help="size multiplier")
    b.add_argument("-w", "--warmup", type=int, default=5, help="untimed calls per point")
    b.add_argument("-n", "--iters", type=int, default=50, help="timed calls per point (max)")
    b.add_argument("--max-time", type=float, default=0.5,
                   help="cut iterations so a point takes about this many seconds")
    b.add_argument("--rounds", type=int, default=1,
                   help="interleaved timing passes per size; rows report their best pass")
    b.add_argument("--algorithms", default="", help="comma list (default: all usable)")
    b.add_argument("--pattern", choices=PATTERNS, default="uniform")
    b.add_argument("-c", "--check", action="store_true", help="verify against native")
    b.add_argument("--api", choices=("plan", "oneshot"), default="plan")
    b.add_argument("--oneshot", action="store_true",
                   help="also time auto through the one-shot API (<= 64 KiB)")
    b.add_argument("--max-slowdown", type=float, default=4.0)
    b.add_argument("--json", metavar="PATH")
    b.add_argument("--plot", metavar="PNG")
    b.add_argument("--replot", metavar="JSON", help="no MPI: print/plot an earlier --json")
    b.add_argument("--suite", choices=("alltoallv", "collectives"), default="alltoallv")
    b.add_argument("--suite-path", help="path of examples/collectives.py")
    b.add_argument("--device", default="cpu", help="cpu (default) or a registered device")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("tune", help="measure this machine's parameters, write the table")
    t.add_argument("--quick", action="store_true", help="fewer sizes and iterations (< 2 min)")
    t.add_argument("-o", "--output", help="table path (default: PYA2A_TUNING or user cache)")
    t.add_argument("--merge", action="store_true",
                   help="keep other p's corrections already in the output file")
    t.add_argument("--algorithms", default="", help="comma list (default: all usable)")
    t.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("info", help="versions, layout, CUDA-awareness, GPUs, tuning table")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    if args.cmd == "bench":
        return _bench_main(args, argv)
    if args.cmd == "tune":
        from .tune import main as tune_main

        return tune_main(args, _command(argv))
    d = info()
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        if args.json:
            print(json.dumps(d, indent=1, default=str))
        else:
            _print_info(d)
    return 0
