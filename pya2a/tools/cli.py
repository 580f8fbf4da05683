"""``python -m pya2a {bench,tune,info}`` (also the ``pya2a`` script).

bench (OSU / nccl-tests style; run under mpiexec)::

    mpiexec -n 16 python -m pya2a bench -b 8 -e 4M -f 4 --pattern skew --json out.json
    mpiexec -n 4 python -m pya2a bench --device cuda -b 128 -e 256M -f 8

See :mod:`pya2a.tools.bench` (host) and :mod:`pya2a.tools.gpu_bench` (``--device cuda``) for
what is timed, :mod:`pya2a.tools.report` for the table, CSV and plot. tune: see
:mod:`pya2a.tools.tune`. info: versions, ranks and ranks per node, CUDA-awareness, GPUs and
their peer access, the tuning table in use.

``--help``, ``--version`` and ``bench --replot`` need no MPI library: mpi4py is imported
only by the commands that run collectives. Bad arguments print one usage line and the
error on rank 0 (the rank is read from the launcher's environment) and exit with status 2
on every rank, before any MPI call.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .report import fmt_size, parse_size, print_table, write_csv, write_plot

__all__ = ["main", "info", "UsageError"]

PATTERNS = ("uniform", "random", "skew", "hot")
# how the user started us: the ``pya2a`` script or ``python -m pya2a``
PROG = "pya2a" if sys.argv and Path(sys.argv[0]).stem == "pya2a" else "python -m pya2a"


class UsageError(Exception):
    """A bad command line (exit status 2)."""


def _env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched)."""
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
                "SLURM_PROCID"):
        v = os.environ.get(key)
        if v and v.isdigit():
            return int(v)
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with every flag's default (flags without a meaningful default say none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        d = action.default
        if "%(default)" in h or "(default" in h or d is None or d is False \
                or d == argparse.SUPPRESS or not action.option_strings or d == "":
            return h
        return h + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one usage line on rank 0, status 2 everywhere
        raise UsageError(f"{self.prog}: {message}")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_list(text: str) -> list[int]:
    return [_size(s) for s in text.split(",") if s.strip()]


def _count(lo: int):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, not {v}")
        return v
    return conv


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return v


def _version() -> str:
    from .. import __version__

    try:
        import mpi4py  # the package only: loads no MPI library

        mv = getattr(mpi4py, "__version__", "?")
    except ImportError:
        mv = "not installed"
    return f"pya2a {__version__} (mpi4py {mv}, Python {sys.version.split()[0]})"


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, formatter_class=_Formatter,
                 description="pya2a: benchmark, tune and describe all-to-all exchanges. "
                             "Run under mpiexec for more than one rank, e.g.\n"
                             "  mpiexec -n 4 python -m pya2a bench -b 8 -e 1M\n"
                             "  mpiexec -n 4 python -m pya2a tune --quick\n"
                             "  mpiexec -n 4 python -m pya2a info")
    ap.add_argument("-V", "--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="cmd", metavar="{bench,tune,info}")
    b = sub.add_parser(
        "bench", formatter_class=_Formatter,
        help="time every algorithm against the MPI library's own Alltoallv",
        description="Sweep over sizes; one table line per size and algorithm: avg / min / "
                    "max time over ranks, busbw, speed-up over the baseline (native on the "
                    "host, NCCL with --device cuda), #wrong.\n"
                    "SIZES ARE BYTES PER PEER: the mean block each rank sends to each rank "
                    "(OSU's message size; nccl-tests' -b/-e are bytes per rank). Sizes take "
                    "binary suffixes: 8, 64K, 4M, 1G.")
    g = b.add_argument_group("sizes (bytes per peer)")
    g.add_argument("-b", "--begin", "--minbytes", type=_size, default=8, metavar="SIZE",
                   help="smallest size, bytes per peer (default: 8)")
    g.add_argument("-e", "--end", "--maxbytes", type=_size, default=4 << 20, metavar="SIZE",
                   help="largest size, bytes per peer (default: 4M)")
    g.add_argument("-f", "--factor", "--stepfactor", type=_count(2), default=2, metavar="N",
                   help="multiply the size by N from one line to the next")
    g.add_argument("--sizes", type=_size_list, default=None, metavar="LIST",
                   help="comma-separated bytes per peer instead of -b/-e/-f (e.g. 128,1K,1M)")
    g = b.add_argument_group("timing")
    g.add_argument("-w", "--warmup", type=_count(0), default=None, metavar="N",
                   help="untimed calls before each timed point (default: 5; cuda: 20, 5 "
                        "from 1M, 3 from 16M per peer)")
    g.add_argument("-n", "--iters", type=_count(1), default=None, metavar="N",
                   help="timed calls per point (default: 50, at most: --max-time cuts them; "
                        "cuda: 200, 50 from 1M, 10 from 16M per peer)")
    g.add_argument("--max-time", type=_positive, default=0.5, metavar="S",
                   help="host: cut the calls so a point takes about S seconds")
    g.add_argument("--rounds", "--passes", type=_count(1), default=1, metavar="N",
                   help="time every row N times (interleaved on the host); report the best")
    g = b.add_argument_group("what to time")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: host buffers; cuda: CuPy device buffers, one GPU per rank "
                        "(rank %% visible GPUs), NCCL as the baseline")
    g.add_argument("--algorithms", default="", metavar="LIST",
                   help="comma-separated algorithms (default: every usable one; cuda: "
                        "pairwise,native,shm,auto)")
    g.add_argument("--pattern", choices=PATTERNS, default="uniform",
                   help="host: block sizes; uniform: all equal, random: uniform in [0, 2m], "
                        "skew: Zipf over destinations, hot: rank 0 receives p/4 times more")
    g.add_argument("-c", "--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare every row's received bytes with native's (#wrong column)")
    g.add_argument("--api", choices=("plan", "oneshot"), default="plan",
                   help="host: time persistent plans, or one-shot pya2a.Alltoallv calls")
    g.add_argument("--oneshot", action="store_true",
                   help="host: also time auto through one-shot calls (up to 64K per peer)")
    g.add_argument("--max-slowdown", type=_positive, default=4.0, metavar="X",
                   help="host: stop timing an algorithm at larger sizes once it is X times "
                        "slower than native (from 4K per peer)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random pattern")
    g = b.add_argument_group("cuda only")
    g.add_argument("--methods", default="ll,push,push_staged,pull,ce", metavar="LIST",
                   help="ipc engine methods timed directly ('' for none)")
    g.add_argument("--no-nccl", action="store_true", help="leave out the NCCL rows")
    g.add_argument("--nccl-graph", action="store_true", help="also time NCCL in a CUDA graph")
    g.add_argument("--no-graph", action="store_true",
                   help="leave out the ipc rows captured in CUDA graphs")
    g.add_argument("--no-staged", action="store_true",
                   help="leave out the public-API rows and the pinned host<->device bound")
    g = b.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write the report as JSON (schema_version 2)")
    g.add_argument("--csv", metavar="PATH", help="write the table as CSV")
    g.add_argument("--plot", metavar="PNG", help="write a plot (needs matplotlib: pya2a[plot])")
    g.add_argument("--replot", metavar="JSON",
                   help="no MPI: print (and with --plot / --csv write) an earlier --json")
    g.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    t = sub.add_parser("tune", formatter_class=_Formatter,
                       help="measure this machine's parameters, write the table auto reads")
    t.add_argument("--quick", action="store_true", help="fewer sizes and iterations (< 2 min)")
    t.add_argument("-o", "--output", metavar="PATH",
                   help="table path (default: $PYA2A_TUNING, else the user cache)")
    t.add_argument("--merge", action="store_true",
                   help="keep other p's corrections already in the output file")
    t.add_argument("--algorithms", default="", metavar="LIST",
                   help="comma-separated algorithms (default: every usable one)")
    t.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    i = sub.add_parser("info", formatter_class=_Formatter,
                       help="versions, layout, CUDA-awareness, GPUs, tuning table")
    i.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="JSON instead of text, to PATH or ('--json' alone) to stdout")
    return ap


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return f"{PROG} " + shlex.join(args)


def _check_bench_args(args) -> None:
    """What argparse cannot see: the sweep's shape, names of algorithms (MPI-free part)."""
    if args.replot:
        if not Path(args.replot).is_file():
            raise UsageError(f"{PROG} bench: --replot {args.replot}: no such file")
        return
    if args.sizes is not None:
        if not args.sizes or min(args.sizes) < 1:
            raise UsageError(f"{PROG} bench: --sizes needs sizes >= 1")
    elif args.begin < 1 or args.end < args.begin:
        raise UsageError(f"{PROG} bench: need 1 <= --begin <= --end (bytes per peer), got "
                         f"-b {fmt_size(args.begin)} -e {fmt_size(args.end)}")


def _algorithm_list(text: str, comm, device: bool) -> list[str] | None:
    from .. import algorithms as registry

    algs = [a.strip() for a in text.split(",") if a.strip()]
    if not algs:
        return None
    if device:
        from ..core.devices import load_device_algorithms

        load_device_algorithms()
    known = set(registry.names()) | {"auto"}
    bad = [a for a in algs if a not in known]
    if bad:
        raise UsageError(f"{PROG}: unknown algorithm(s) {', '.join(bad)}; known: "
                         f"{', '.join(sorted(known))}")
    return algs


def _bench_main(args, argv) -> int:
    _check_bench_args(args)
    if args.replot:
        try:
            with open(args.replot) as f:
                report = _upgrade(json.load(f))
        except (OSError, ValueError) as e:
            raise UsageError(f"{PROG} bench: --replot {args.replot}: {e}") from None
        _outputs(report, args, written=False)
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    algs = _algorithm_list(args.algorithms, comm, args.device == "cuda")
    if args.device == "cuda":
        from .gpu_bench import bench_cuda

        report = bench_cuda(comm, args, algs, _command(argv))
        if report is None:
            return 2
    else:
        from .bench import bench

        report = bench(comm, begin=args.begin, end=args.end, factor=args.factor,
                       size_list=args.sizes,
                       warmup=5 if args.warmup is None else args.warmup,
                       iters=50 if args.iters is None else args.iters,
                       algorithms=algs, pattern=args.pattern, check=args.check, api=args.api,
                       oneshot=args.oneshot, max_time=args.max_time,
                       max_slowdown=args.max_slowdown, progress=not args.no_progress,
                       seed=args.seed, command=_command(argv), partial=args.json,
                       rounds=args.rounds)
    if comm.Get_rank() == 0:
        _outputs(report, args, written=True)
    wrong = any(r.get("wrong") or r.get("check") is False or r.get("checked") is False
                for pt in report["results"] for r in pt["rows"].values())
    return 1 if wrong else 0


def _upgrade(report: dict) -> dict:
    """An older report in the current layout: schema 1 host reports (no ``bytes_per_rank``,
    ``check`` booleans), and device files holding only ``rows`` of the GPU bench."""
    if "results" not in report and "rows" in report:
        from .gpu_bench import to_report

        meta = dict(report.get("meta", {}))
        meta.setdefault("p", meta.get("ranks", 1))
        meta.setdefault("ranks_per_node", meta.get("ranks", "?"))
        meta.setdefault("mpi_library", meta.get("mpi", ""))
        if "timing" in meta:
            meta.setdefault("time", meta["timing"])
        return to_report(report["rows"], meta)
    p = report.get("meta", {}).get("p")
    for pt in report.get("results", []):
        if "bytes_per_rank" not in pt and p and "mean_block" in pt:
            pt["bytes_per_rank"] = pt["mean_block"] * p
    return report


def _outputs(report: dict, args, written: bool) -> None:
    """Table on stdout, then the files asked for (rank 0)."""
    print_table(report)
    if written and args.json:
        from .bench import write_json

        write_json(args.json, report)
        print(f"# wrote {args.json}")
    if args.csv:
        write_csv(report, args.csv)
        print(f"# wrote {args.csv}")
    if args.plot:
        if write_plot(report, args.plot):
            print(f"# wrote {args.plot}")
        else:
            print(f"# matplotlib is not importable (pip install 'pya2a[plot]'): no plot; "
                  f"later: {PROG} bench --replot JSON --plot PNG", file=sys.stderr)


# ---- info --------------------------------------------------------------------------------------
def info(comm=None) -> dict:
    """Versions, layout, CUDA-awareness, GPUs and the tuning table (collective)."""
    from mpi4py import MPI

    from .. import algorithms as registry
    from .. import select
    from ..algorithms._bound import executor_status
    from ..core.state import internal_comm, ranks_per_node
    from .harness import provenance

    comm = MPI.COMM_WORLD if comm is None else comm
    out = provenance(comm, "")
    del out["command"], out["date"]
    out["mpi_library_full"] = MPI.Get_library_version().strip()
    out["c_executor"] = executor_status()
    local = internal_comm(comm).Split_type(MPI.COMM_TYPE_SHARED)
    out["nodes"] = comm.allreduce(1 if local.Get_rank() == 0 else 0)
    local.Free()
    out["ranks_per_node"] = ranks_per_node(internal_comm(comm))
    out["algorithms"] = registry.available(comm.Get_size())
    out["cuda_aware_mpi"] = _cuda_aware()
    out["gpus"] = _gpus()
    t = select.load_table()
    out["tuning_table"] = {"path": t["provenance"].get("path") or "built-in defaults",
                           "builtin": not t["provenance"].get("path"),
                           "provenance": t["provenance"], "params": t["params"],
                           "margin": t["margin"],
                           "corrections": sorted({(c["algorithm"], c["p"])
                                                  for c in t["corrections"]})}
    out["tuning_path_searched"] = str(select.table_path())
    return out


def _cuda_aware() -> str:
    import importlib.util

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
        names = [runtime.getDeviceProperties(i)["name"] for i in range(n)]
        names = [x.decode() if isinstance(x, bytes) else x for x in names]
        peer = [[1 if i == j else int(runtime.deviceCanAccessPeer(i, j)) for j in range(n)]
                for i in range(n)]
        return {"visible": n, "names": names, "peer_access": peer,
                "cupy": cupy.__version__}
    except Exception as e:
        return {"visible": 0, "note": f"CUDA error: {e}"}


def _print_info(d: dict) -> None:
    from .report import mpi_short

    print(f"pya2a {d['pya2a']}  mpi4py {d['mpi4py']}  Python {d['python']}")
    print(f"MPI: {mpi_short(d['mpi_library'])} (MPI standard {d['mpi_version']})")
    print(f"ranks: {d['p']}  nodes: {d['nodes']}  ranks per node: {d['ranks_per_node']}  "
          f"host: {d['host']} ({d['cpu_count']} cores)")
    print(f"algorithms: {', '.join(d['algorithms'])}")
    print(f"C executor: {d['c_executor']}")
    print(f"CUDA-aware MPI: {d['cuda_aware_mpi']}")
    g = d["gpus"]
    print(f"GPUs visible: {g.get('visible', 0)}" + (f"  ({g['note']})" if "note" in g else ""))
    if g.get("peer_access"):
        for i, (name, row) in enumerate(zip(g["names"], g["peer_access"], strict=True)):
            print(f"  GPU{i} {name}: peer access " + " ".join(str(x) for x in row))
    t = d["tuning_table"]
    prov = t["provenance"]
    if t.get("builtin"):
        print("tuning table: built-in defaults, measured on another machine (no table found "
              f"at {d['tuning_path_searched']})")
        print(f"  run `mpiexec -n {max(d['p'], 2)} {PROG} tune` to measure this one; auto "
              "then reads the table it writes")
        if prov.get("error"):
            print(f"  error: {prov['error']}")
    else:
        print(f"tuning table: {t['path']}")
        for k in ("host", "mpi_library", "p", "date", "command", "error"):
            if prov.get(k) is not None:
                print(f"  {k}: {prov[k]}")
    print("  params: " + ", ".join(f"{k}={v:.3g}" for k, v in t["params"].items()) +
          f"  margin={t['margin']:.2f}")
    if t["corrections"]:
        print("  measured corrections: " + ", ".join(f"{a}@p={p}" for a, p in t["corrections"]))


def _info_main(args) -> int:
    d = info()
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        if args.json == "-":
            print(json.dumps(d, indent=1, default=str))
        elif args.json:
            Path(args.json).write_text(json.dumps(d, indent=1, default=str))
            print(f"# wrote {args.json}")
        else:
            _print_info(d)
    return 0


# ---- entry -------------------------------------------------------------------------------------
def _run(argv: list[str] | None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        return 0
    if args.cmd == "bench":
        return _bench_main(args, argv)
    if args.cmd == "tune":
        from mpi4py import MPI

        from .tune import main as tune_main

        _algorithm_list(args.algorithms, MPI.COMM_WORLD, False)
        return tune_main(args, _command(argv))
    return _info_main(args)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: bad arguments)."""
    try:
        return _run(argv)
    except UsageError as e:
        if _env_rank() == 0:
            cmd = next((a for a in (sys.argv[1:] if argv is None else argv)
                        if a in ("bench", "tune", "info")), "")
            print(f"usage: {PROG} {cmd + ' ' if cmd else ''}[options]   "
                  f"({PROG} {cmd + ' ' if cmd else ''}--help lists them)", file=sys.stderr)
            print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ImportError) as e:  # a command that needs MPI, without one
        from .. import NO_MPI_HELP, _no_mpi

        if not _no_mpi(e) and "could not load one" not in str(e):
            raise
        why = str(e).strip().replace("\n", "\n    ")
        msg = str(e) if isinstance(e, ImportError) else NO_MPI_HELP.format(why=why)
        print(f"{PROG}: {msg}", file=sys.stderr)
        return 1
