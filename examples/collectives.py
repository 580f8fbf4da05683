"""Collectives stress sweep: time and bandwidth per message size, up to what memory holds.

    mpiexec -n 4 python -m mpi4py examples/collectives.py \
        --json collectives.json --png collectives.png

For each of Allreduce, Reduce, Bcast, Allgather, Gather, Reduce_scatter, Scatter, Alltoall
and Allreduce composed as Reduce_scatter + Allgather, the message size doubles from
--min-bytes upward. Before each size every rank works out what it would allocate (its
buffers plus an allowance for MPI's scratch space), and all ranks agree to stop when that
would not fit: host memory is MemAvailable (and the cgroup limit, if lower) shared by the
ranks of a node; device memory is CuPy's free memory shared by the ranks of a GPU. The
sweep stops cleanly there and reports the largest size reached. --max-bytes caps it, and
an MPI older than 4.0 (no large counts) stops it at 2**31 - 1 elements.

Conventions follow nccl-tests: "bytes" is the size of the largest buffer on a rank (float64
elements, rounded down to a multiple of 8 * p so blocks are equal); time is the slowest
rank's mean per call; algbw = bytes / time; busbw = algbw * factor, with factor 2(p-1)/p
for Allreduce, (p-1)/p for Allgather, Gather, Reduce_scatter, Scatter and Alltoall, and 1
for Bcast and Reduce. Each size is checked (sampled elements against the known answer).

Alltoall goes through pya2a (the communicator is a pya2a.Comm with --algorithm); the
others are the MPI library's, so with --device cuda they need a CUDA-aware MPI (pya2a's
detection, or PYA2A_CUDA_AWARE=1) and are reported as skipped otherwise.
run_suite(comm, ...) is the importable entry point (tests/test_examples.py imports it); it
returns the JSON-ready dict.

Options: --min-bytes, --max-bytes, --factor, --iters, --warmup, --target-seconds,
--mem-fraction, --only NAME..., --algorithm, --device {cpu,cuda}, --json PATH, --png PATH.
"""

# No `from __future__ import annotations`: the dataclasses below would then need this
# module in sys.modules, which a module loaded from its file path (as tests do) is not.
import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from common import array_module
from mpi4py import MPI

import pya2a

__all__ = ["COLLECTIVES", "run_suite", "write_png", "main"]

ITEM = 8  # bytes per element: every buffer is float64
SAMPLES = 1024  # elements checked per result


@dataclass(frozen=True)
class Buffers:
    """The arrays of one collective call; `out` is checked, `tmp` is scratch."""

    send: Any
    out: Any
    tmp: Any = None


@dataclass(frozen=True)
class Collective:
    """One collective of the suite.

    Attributes:
        name: the name in reports.
        busbw: p -> bus bandwidth factor.
        need: (n, p) -> float64 elements the worst rank allocates for a call on n elements,
            including an allowance for the MPI library's (or pya2a's) scratch space.
        setup: (comm, n, xp) -> Buffers filled with this rank's known input.
        call: (comm, Buffers) -> None, one collective call.
        expect: (idx, n, rank, p) -> expected values of `out` at indices idx (numpy),
            or None where this rank's `out` is not defined (non-root ranks).
        via_pya2a: goes through pya2a (runs on device buffers with any MPI).
    """

    name: str
    busbw: Callable[[int], float]
    need: Callable[[int, int], int]
    setup: Callable[[MPI.Intracomm, int, ModuleType], Buffers]
    call: Callable[[MPI.Intracomm, Buffers], None]
    expect: Callable[[np.ndarray, int, int, int], np.ndarray | None]
    via_pya2a: bool = False


def _blocks(xp: ModuleType, n: int, p: int, value: Callable[[Any], Any]):
    """float64 array of n = p * b elements whose block s holds value(s)."""
    s = xp.arange(p, dtype=xp.float64)
    return xp.repeat(value(s), n // p)


def _tri(p: int) -> float:
    return p * (p + 1) / 2  # sum of (rank + 1) over the ranks


def _ring(p: int) -> float:
    return (p - 1) / p


def _allreduce_rsag(comm: MPI.Intracomm, b: Buffers) -> None:
    comm.Reduce_scatter_block(b.send, b.tmp, op=MPI.SUM)
    comm.Allgather(b.tmp, b.out)


def _full(xp: ModuleType, n: int, v: float):
    return xp.full(n, v, dtype=xp.float64)


def _empty(xp: ModuleType, n: int):
    return xp.empty(n, dtype=xp.float64)


COLLECTIVES: tuple[Collective, ...] = (
    Collective(
        "Allreduce",
        lambda p: 2 * _ring(p),
        lambda n, p: 3 * n,
        lambda c, n, xp: Buffers(_full(xp, n, c.Get_rank() + 1.0), _empty(xp, n)),
        lambda c, b: c.Allreduce(b.send, b.out, op=MPI.SUM),
        lambda idx, n, r, p: np.full(len(idx), _tri(p)),
    ),
    Collective(
        "Reduce",
        lambda p: 1.0,
        lambda n, p: 3 * n,
        lambda c, n, xp: Buffers(_full(xp, n, c.Get_rank() + 1.0), _empty(xp, n)),
        lambda c, b: c.Reduce(b.send, b.out, op=MPI.SUM, root=0),
        lambda idx, n, r, p: np.full(len(idx), _tri(p)) if r == 0 else None,
    ),
    Collective(
        "Bcast",
        lambda p: 1.0,
        lambda n, p: 2 * n,
        lambda c, n, xp: Buffers(None, _full(xp, n, 42.0 if c.Get_rank() == 0 else -1.0)),
        lambda c, b: c.Bcast(b.out, root=0),
        lambda idx, n, r, p: np.full(len(idx), 42.0),
    ),
    Collective(
        "Allgather",
        _ring,
        lambda n, p: 2 * n + n // p,
        lambda c, n, xp: Buffers(_full(xp, n // c.Get_size(), c.Get_rank()), _empty(xp, n)),
        lambda c, b: c.Allgather(b.send, b.out),
        lambda idx, n, r, p: (idx // (n // p)).astype(np.float64),
    ),
    Collective(
        "Gather",
        _ring,
        lambda n, p: 2 * n + n // p,
        lambda c, n, xp: Buffers(_full(xp, n // c.Get_size(), c.Get_rank()), _empty(xp, n)),
        lambda c, b: c.Gather(b.send, b.out, root=0),
        lambda idx, n, r, p: (idx // (n // p)).astype(np.float64) if r == 0 else None,
    ),
    Collective(
        "Reduce_scatter",
        _ring,
        lambda n, p: 2 * n + n // p,
        lambda c, n, xp: Buffers(
            _blocks(xp, n, c.Get_size(), lambda s: (c.Get_rank() + 1.0) * (s + 1.0)),
            _empty(xp, n // c.Get_size()),
        ),
        lambda c, b: c.Reduce_scatter_block(b.send, b.out, op=MPI.SUM),
        lambda idx, n, r, p: np.full(len(idx), _tri(p) * (r + 1.0)),
    ),
    Collective(
        "Scatter",
        _ring,
        lambda n, p: 2 * n + n // p,
        lambda c, n, xp: Buffers(
            _blocks(xp, n, c.Get_size(), lambda s: s + 1.0), _empty(xp, n // c.Get_size())
        ),
        lambda c, b: c.Scatter(b.send, b.out, root=0),
        lambda idx, n, r, p: np.full(len(idx), r + 1.0),
    ),
    Collective(
        "Alltoall",
        _ring,
        lambda n, p: 4 * n,  # pya2a's store-and-forward algorithms stage up to 2n
        lambda c, n, xp: Buffers(
            _blocks(xp, n, c.Get_size(), lambda s: c.Get_rank() * c.Get_size() + s),
            _empty(xp, n),
        ),
        lambda c, b: c.Alltoall(b.send, b.out),
        lambda idx, n, r, p: (idx // (n // p)) * p + r,
        via_pya2a=True,
    ),
    Collective(
        "Allreduce(RS+AG)",
        lambda p: 2 * _ring(p),
        lambda n, p: 3 * n + n // p,
        lambda c, n, xp: Buffers(
            _full(xp, n, c.Get_rank() + 1.0), _empty(xp, n), _empty(xp, n // c.Get_size())
        ),
        _allreduce_rsag,
        lambda idx, n, r, p: np.full(len(idx), _tri(p)),
    ),
)


# ---------------------------------------------------------------- memory limits


def _host_available() -> int:
    """Bytes this node can still give: MemAvailable, or the cgroup's headroom if lower."""
    avail = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:  # not Linux-like: be conservative rather than guess
        return 0
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            avail = min(avail, int(limit) - usage)
        break
    return max(avail, 0)


def _device_available(xp: ModuleType) -> int:
    """Free bytes on the current GPU, counting blocks CuPy's pool holds but does not use."""
    pool = xp.get_default_memory_pool()
    pool.free_all_blocks()
    free, _total = xp.cuda.runtime.memGetInfo()
    return int(free)


def _budget(comm: MPI.Intracomm, xp: ModuleType, mem_fraction: float) -> int:
    """Bytes each rank may allocate, the same on every rank (minimum over the nodes/GPUs)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if xp is np:
        sharers = local.Get_size()
        avail = _host_available()
    else:
        device = xp.cuda.Device().id
        same_gpu = local.Split(color=device, key=local.Get_rank())
        sharers = same_gpu.Get_size()
        same_gpu.Free()
        avail = _device_available(xp)
    local.Free()
    return comm.allreduce(int(avail * mem_fraction) // sharers, op=MPI.MIN)


# ---------------------------------------------------------------- one size


def _sizes(min_bytes: int, p: int, factor: float):
    """Message sizes in elements, growing by `factor`, each a positive multiple of p."""
    target = max(min_bytes // ITEM, p)
    last = 0
    while True:
        n = max(p, int(target) // p * p)
        if n > last:
            yield n
            last = n
        target = max(target * factor, target + 1)


def _measure(
    comm: MPI.Intracomm,
    coll: Collective,
    bufs: Buffers,
    *,
    warmup: int,
    iters: int,
    target_seconds: float,
    sync: Callable[[], None],
) -> tuple[float, int]:
    """Mean seconds per call (slowest rank) and the number of timed calls."""
    for _ in range(warmup):
        coll.call(comm, bufs)
    sync()
    comm.Barrier()
    t0 = MPI.Wtime()
    coll.call(comm, bufs)
    sync()
    once = comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX)
    count = int(max(1, min(iters, target_seconds / once if once > 0 else iters)))
    comm.Barrier()
    t0 = MPI.Wtime()
    for _ in range(count):
        coll.call(comm, bufs)
    sync()
    return comm.allreduce((MPI.Wtime() - t0) / count, op=MPI.MAX), count


def _check(comm: MPI.Intracomm, coll: Collective, bufs: Buffers, n: int, xp: ModuleType) -> bool:
    """True on every rank if every rank's sampled output elements are right."""
    p, rank = comm.Get_size(), comm.Get_rank()
    size = len(bufs.out)
    idx = np.unique(np.linspace(0, size - 1, min(size, SAMPLES)).astype(np.int64))
    want = coll.expect(idx, n, rank, p)
    ok = True
    if want is not None:
        got = bufs.out[xp.asarray(idx)]
        got = got.get() if xp is not np else got
        ok = bool(np.array_equal(got, want))
    return comm.allreduce(ok, op=MPI.LAND)


# ---------------------------------------------------------------- the suite


def _mpi_takes_device_buffers(comm: MPI.Intracomm) -> tuple[bool, str]:
    """Whether the MPI library may be handed GPU pointers (agreed over comm), and why.

    An MPI that is not CUDA-aware crashes on device pointers, so without this only the
    pya2a collective (Alltoall, which stages through host memory itself) runs on device.
    """
    try:
        from pya2a.gpu.device import comm_cuda_aware, cuda_aware_reason
    except ImportError:  # a pya2a without device detection: only the override counts
        aware = os.environ.get("PYA2A_CUDA_AWARE") == "1"
        return bool(comm.allreduce(int(aware), op=MPI.MIN)), "PYA2A_CUDA_AWARE"
    return comm_cuda_aware(comm), cuda_aware_reason()


def _provenance(comm: MPI.Intracomm, device: str, algorithm: str) -> dict[str, Any]:
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    nodes = comm.allreduce(int(local.Get_rank() == 0))
    local.Free()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": shlex.join(sys.argv),
        "mpi": MPI.Get_library_version().replace("\0", "").splitlines()[0].strip(),
        "mpi4py": __import__("mpi4py").__version__,
        "numpy": np.__version__,
        "pya2a": getattr(pya2a, "__version__", "unknown"),
        "nprocs": comm.Get_size(),
        "nodes": nodes,
        "device": device,
        "alltoall_algorithm": algorithm,
        "dtype": "float64",
    }


def run_suite(
    comm: MPI.Intracomm,
    *,
    collectives: list[str] | None = None,
    min_bytes: int = ITEM,
    max_bytes: int | None = None,
    factor: float = 2.0,
    warmup: int = 2,
    iters: int = 20,
    target_seconds: float = 0.2,
    mem_fraction: float = 0.8,
    device: str = "cpu",
    algorithm: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sweep every collective over growing sizes until memory (or max_bytes) stops it.

    Collective: call it on every rank of comm with the same arguments.

    Args:
        comm: the communicator; pass a pya2a.Comm to send Alltoall through pya2a.
        collectives: names to run (default all, in COLLECTIVES order).
        min_bytes: first size in bytes (rounded to a positive multiple of 8 * p).
        max_bytes: stop before sizes above this (default: memory is the only limit).
        factor: growth factor between sizes (> 1).
        warmup: untimed calls per size.
        iters: at most this many timed calls per size ...
        target_seconds: ... and about this much time per size (at least one call).
        mem_fraction: fraction of the available memory the sweep may use.
        device: "cpu" (NumPy) or "cuda" (CuPy); with an MPI that is not CUDA-aware only
            Alltoall runs (pya2a stages it), the others are reported as skipped.
        algorithm: recorded in the provenance (default: comm.algorithm if any, else "native").
        log: called with one line per size on rank 0 (e.g. print); None for quiet.

    Returns:
        JSON-ready dict: "suite", "provenance", "ok", "peak_rss_bytes_per_rank",
        "summary": name -> {"largest_bytes", "peak_busbw_GBps", "stopped"}, and
        "collectives": name ->
        {"busbw_factor", "results": [{"bytes", "count", "time_s", "algbw_GBps",
        "busbw_GBps", "iters", "ok"}], "largest_bytes", "stopped": {"reason", ...}}.
        The same on every rank.

    Raises:
        ValueError: unknown collective name or a bad numeric argument (on every rank).
    """
    names = [c.name for c in COLLECTIVES]
    chosen = names if collectives is None else list(collectives)
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise ValueError(f"run_suite: unknown collective(s) {unknown}; known: {names}")
    if factor <= 1 or iters < 1 or warmup < 0 or not 0 < mem_fraction <= 1:
        raise ValueError(
            "run_suite: need factor > 1, iters >= 1, warmup >= 0, 0 < mem_fraction <= 1"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"run_suite: device must be 'cpu' or 'cuda', not {device!r}")

    p, rank = comm.Get_size(), comm.Get_rank()
    xp = array_module(device, comm)
    mpi_device_ok, why = _mpi_takes_device_buffers(comm) if xp is not np else (True, "")
    sync = (lambda: None) if xp is np else xp.cuda.Device().synchronize
    say = log if (log is not None and rank == 0) else (lambda line: None)
    algorithm = algorithm or getattr(comm, "algorithm", "native")
    # Before MPI 4 there are no large-count calls: a count must fit in a C int.
    max_count = 2**63 - 1 if MPI.Get_version() >= (4, 0) else 2**31 - 1

    report: dict[str, Any] = {
        "suite": "collectives",
        "provenance": _provenance(comm, device, algorithm),
        "ok": True,
        "collectives": {},
    }
    for coll in (c for c in COLLECTIVES if c.name in chosen):
        if not (mpi_device_ok or coll.via_pya2a):
            say(f"# {coll.name}: skipped, MPI is not CUDA-aware ({why})")
            report["collectives"][coll.name] = {
                "busbw_factor": coll.busbw(p),
                "results": [],
                "largest_bytes": 0,
                "stopped": {"reason": "skipped", "why": f"MPI is not CUDA-aware ({why})"},
            }
            continue
        say(f"# {coll.name} (p={p}, busbw factor {coll.busbw(p):.3f})")
        say(
            f"# {'bytes':>14} {'count':>12} {'time(us)':>12} {'algbw(GB/s)':>12} "
            f"{'busbw(GB/s)':>12} {'iters':>6} check"
        )
        rows: list[dict[str, Any]] = []
        stopped: dict[str, Any] = {}
        for n in _sizes(min_bytes, p, factor):
            nbytes = n * ITEM
            need = coll.need(n, p) * ITEM
            if max_bytes is not None and nbytes > max_bytes:
                stopped = {"reason": "max_bytes", "next_bytes": nbytes, "max_bytes": max_bytes}
                break
            if n > max_count:
                stopped = {
                    "reason": "count_limit",
                    "next_bytes": nbytes,
                    "max_count": max_count,
                    "mpi_version": list(MPI.Get_version()),
                }
                break
            budget = _budget(comm, xp, mem_fraction)
            if need > budget:
                stopped = {
                    "reason": "memory",
                    "next_bytes": nbytes,
                    "need_bytes_per_rank": need,
                    "budget_bytes_per_rank": budget,
                }
                break
            try:
                bufs = coll.setup(comm, n, xp)
                failed = False
            except MemoryError:  # the estimate was too optimistic on some rank
                bufs, failed = None, True
            if comm.allreduce(failed, op=MPI.LOR):
                stopped = {
                    "reason": "MemoryError",
                    "next_bytes": nbytes,
                    "need_bytes_per_rank": need,
                    "budget_bytes_per_rank": budget,
                }
                break
            t, count = _measure(
                comm,
                coll,
                bufs,
                warmup=warmup,
                iters=iters,
                target_seconds=target_seconds,
                sync=sync,
            )
            ok = _check(comm, coll, bufs, n, xp)
            del bufs  # free before the next, larger size is budgeted
            algbw = nbytes / t / 1e9 if t > 0 else 0.0
            rows.append(
                {
                    "bytes": nbytes,
                    "count": n,
                    "time_s": t,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * coll.busbw(p),
                    "iters": count,
                    "ok": ok,
                }
            )
            report["ok"] = report["ok"] and ok
            say(
                f"  {nbytes:>14} {n:>12} {t * 1e6:>12.2f} {algbw:>12.3f} "
                f"{algbw * coll.busbw(p):>12.3f} {count:>6} {'OK' if ok else 'WRONG'}"
            )
        largest = rows[-1]["bytes"] if rows else 0
        say(f"# {coll.name}: largest size {largest} bytes; stopped: {stopped}")
        report["collectives"][coll.name] = {
            "busbw_factor": coll.busbw(p),
            "results": rows,
            "largest_bytes": largest,
            "stopped": stopped,
        }
    report["summary"] = {
        name: {
            "largest_bytes": entry["largest_bytes"],
            "peak_busbw_GBps": max((r["busbw_GBps"] for r in entry["results"]), default=0.0),
            "stopped": entry["stopped"].get("reason"),
        }
        for name, entry in report["collectives"].items()
    }
    # Peak resident memory of the fattest rank, to compare with the need estimates above.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    report["peak_rss_bytes_per_rank"] = comm.allreduce(peak, op=MPI.MAX)
    return report


def write_png(report: dict[str, Any], path: str) -> bool:
    """Plot bus bandwidth and time against size; False (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_bw, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, entry in report["collectives"].items():
        sizes = [r["bytes"] for r in entry["results"]]
        ax_bw.plot(sizes, [r["busbw_GBps"] for r in entry["results"]], marker=".", label=name)
        ax_t.plot(sizes, [r["time_s"] * 1e6 for r in entry["results"]], marker=".", label=name)
    prov = report["provenance"]
    for ax, label in ((ax_bw, "bus bandwidth (GB/s)"), (ax_t, "time per call (us)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per rank (largest buffer)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_bw.legend(fontsize=7)
    fig.suptitle(f"collectives, p={prov['nprocs']}, {prov['device']}, {prov['mpi']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table, write JSON/PNG; 0 if every check passed, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-bytes", type=int, default=ITEM)
    parser.add_argument("--max-bytes", type=int, default=None, help="cap (default: memory)")
    parser.add_argument("--factor", type=float, default=2.0, help="size growth factor")
    parser.add_argument("--iters", type=int, default=20, help="max timed calls per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per size")
    parser.add_argument("--target-seconds", type=float, default=0.2, help="time per size")
    parser.add_argument("--mem-fraction", type=float, default=0.8, help="of available memory")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="collectives to run")
    parser.add_argument("--algorithm", default="auto", help="pya2a algorithm for Alltoall")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    parser.add_argument("--png", metavar="PATH", help="plot (needs matplotlib)")
    args = parser.parse_args(argv)

    comm = pya2a.Comm(MPI.COMM_WORLD, algorithm=args.algorithm)
    rank = comm.Get_rank()
    try:
        report = run_suite(
            comm,
            collectives=args.only,
            min_bytes=args.min_bytes,
            max_bytes=args.max_bytes,
            factor=args.factor,
            warmup=args.warmup,
            iters=args.iters,
            target_seconds=args.target_seconds,
            mem_fraction=args.mem_fraction,
            device=args.device,
            algorithm=args.algorithm,
            log=print,
        )
    except ValueError as exc:  # raised on every rank alike
        if rank == 0:
            print(f"collectives: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
            print(f"wrote {args.json}")
        if args.png:
            if write_png(report, args.png):
                print(f"wrote {args.png}")
            else:
                print(f"matplotlib is not installed: skipped {args.png}")
        print("collectives:", "all checks OK" if report["ok"] else "WRONG results")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
