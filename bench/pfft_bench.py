"""Parallel FFT forward + backward per call: pya2a's Alltoallw against the MPI library's own.

    mpiexec -n 4 python bench/pfft_bench.py --sizes 32 64 96 128 --json out.json
    mpiexec -n 16 python bench/pfft_bench.py --sizes 32 64 128 256 512 --max-seconds 15
    mpiexec -n 4 python bench/pfft_bench.py --device cuda --sizes 64 128 256 --json out.json

Host (default): mpi4py-fft's ``PFFT`` (numpy backend) on ``MPI.COMM_WORLD`` (its
redistributions are the MPI's own ``Alltoallw`` with subarray types) against the same
transform on ``pya2a.Comm(MPI.COMM_WORLD)`` (every redistribution through
``pya2a.Alltoallw``), slab and pencil decompositions of an N^3 array. Without mpi4py-fft (or
with ``--impl pencil``) the pencil FFT of ``examples/pfft.py`` runs instead; it makes the
same subarray exchanges. ``--device cuda``: that pencil FFT on CuPy arrays, pya2a on device
buffers against copying each array to the host around the MPI's own Alltoallw.

Per size and decomposition the two exchanges alternate call by call (which one goes first
flips every repetition), each call timed between barriers as the slowest rank's time;
``--max-seconds`` ends a measurement early (after at least 3 samples) so that one command
can span 32^3 to 512^3. A size whose arrays would not fit in the node's available memory
(estimated generously) is skipped with a note and a ``"skipped"`` row.
Reported: median and minimum of forward + backward, and of the redistributions alone (the
same calls without the FFTs), in microseconds, with pya2a's algorithm(s). JSON carries the
command, the host, the MPI library and whether ranks outnumber cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

import pya2a

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _slowest(comm: MPI.Intracomm, t: float) -> float:
    return comm.allreduce(t, op=MPI.MAX)


class _Mpi4pyFFT:
    """mpi4py-fft's PFFT: forward + backward, and its redistributions alone."""

    def __init__(self, comm, n: int, grid: str, dtype, xp) -> None:
        from mpi4py_fft import PFFT, newDistArray

        kw = {"grid": (-1,)} if grid == "slab" else {}
        self.fft = PFFT(comm, (n, n, n), axes=(0, 1, 2), dtype=dtype, backend="numpy", **kw)
        self.u = newDistArray(self.fft, False)
        self.u[...] = np.random.default_rng(comm.Get_rank()).standard_normal(self.u.shape)
        self.uh = newDistArray(self.fft, True)
        f, b = self.fft.forward, self.fft.backward
        for x in (f, b):  # finite values everywhere: exchanges() moves these arrays
            for xf in x._xfftn:
                xf.input_array[...] = 0
                xf.output_array[...] = 0
        # each transform's redistributions: bound Transfer.forward / .backward methods
        self.moves = [(move, x._xfftn[i].output_array, x._xfftn[i + 1].input_array)
                      for x in (f, b) for i, move in enumerate(x._transfer)]
        self.sync = lambda: None

    def transform(self) -> None:
        self.fft.forward(self.u, self.uh)
        self.fft.backward(self.uh, self.u)

    def exchanges(self) -> None:
        for move, a, b in self.moves:
            move(a, b)

    def free(self) -> None:
        self.fft.destroy()


class _PencilFFT:
    """examples/pfft.py's pencil FFT (NumPy or CuPy)."""

    def __init__(self, comm, n: int, grid: str, dtype, xp, exchange: str,
                 algorithm: str) -> None:
        sys.path.insert(0, str(EXAMPLES))
        import pfft

        dims = (comm.Get_size(), 1) if grid == "slab" else None
        self.fft = pfft.PencilFFT(comm, (n, n, n), xp, dims, exchange, algorithm)
        rng = np.random.default_rng(comm.Get_rank())
        self.u = xp.asarray(rng.standard_normal(self.fft.z_shape) + 0j)
        self.xp = xp
        self.zb = xp.fft.fft(self.u, axis=2)
        self.yb = self.fft.zy.forward(self.zb, xp)
        self.xb = self.fft.yx.forward(self.yb, xp)
        self.sync = (lambda: xp.cuda.get_current_stream().synchronize()) if xp is not np \
            else (lambda: None)

    def transform(self) -> None:
        self.fft.backward(self.fft.forward(self.u))

    def exchanges(self) -> None:
        xp, f = self.xp, self.fft
        f.yx.forward(f.zy.forward(self.zb, xp), xp)
        f.zy.backward(f.yx.backward(self.xb, xp), xp)

    def free(self) -> None:
        self.fft.free()


def _algorithms() -> list[str]:
    """Algorithms pya2a's Alltoallw plans made in this process chose."""
    from pya2a import _alltoallw

    return sorted(_alltoallw.chosen)


def _time(comm, runs: dict, what: str, repeat: int, warmup: int,
          max_seconds: float | None = None) -> dict:
    names = list(runs)
    times: dict[str, list[float]] = {k: [] for k in names}
    spent = 0.0  # the same on every rank (sums of all-reduced times): every rank stops together
    for rep in range(warmup + repeat):
        if max_seconds is not None and rep >= warmup + 3 and spent > max_seconds:
            break
        order = names if rep % 2 == 0 else names[::-1]
        for k in order:
            obj = runs[k]
            fn = obj.transform if what == "transform" else obj.exchanges
            comm.Barrier()
            t0 = MPI.Wtime()
            fn()
            obj.sync()
            dt = _slowest(comm, MPI.Wtime() - t0)
            spent += dt
            if rep >= warmup:
                times[k].append(dt)
    return {k: {"median_us": float(np.median(v) * 1e6), "min_us": float(np.min(v) * 1e6),
                "samples": len(v)} for k, v in times.items()}


# Arrays of the global size both transforms hold together (their inputs, outputs and every
# intermediate, pya2a's node-shared window), counted generously: a size whose estimate
# exceeds the node's available memory is skipped, not run into the OOM killer.
ARRAYS_HELD = 32


def _available_bytes() -> int | None:
    """MemAvailable of this host (Linux), or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fits(world: MPI.Intracomm, n: int, itemsize: int) -> tuple[bool, int, int | None]:
    """(fits, bytes needed on the busiest node, bytes available there): the same on every
    rank. The need is ARRAYS_HELD global arrays (complex: 16-byte items) shared by the ranks
    of the node in proportion to their number."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    share = node.Get_size() / world.Get_size()
    node.Free()
    need = int(ARRAYS_HELD * n ** 3 * max(itemsize, 16) * share)
    avail = _available_bytes()
    ok = world.allreduce(avail is None or need <= avail, op=MPI.LAND)
    return ok, need, avail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128])
    ap.add_argument("--grids", nargs="+", choices=["slab", "pencil"],
                    default=["slab", "pencil"])
    ap.add_argument("--dtype", choices=["complex128", "float64"], default="complex128",
                    help="input type (mpi4py-fft: float64 is a real-to-complex transform)")
    ap.add_argument("--impl", choices=["auto", "mpi4py-fft", "pencil"], default="auto")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--algorithm", default="auto", help="pya2a algorithm (default auto)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop repeating a measurement (at least 3 samples) once its calls "
                         "took this long: large sizes get fewer samples")
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = ap.parse_args(argv)

    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    impl = args.impl
    if impl == "auto":
        try:
            import mpi4py_fft  # noqa: F401

            impl = "mpi4py-fft" if args.device == "cpu" else "pencil"
        except ImportError:
            impl = "pencil"
    if args.device == "cuda":
        if impl != "pencil":
            ap.error("--device cuda runs the pencil FFT of examples/pfft.py (--impl pencil)")
        sys.path.insert(0, str(EXAMPLES))
        from common import array_module

        xp = array_module("cuda", world)
    else:
        xp = np
    dtype = np.dtype(args.dtype)
    if impl == "pencil" and dtype.kind != "c":
        ap.error("the pencil FFT of examples/pfft.py is complex-to-complex: --dtype complex128")

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for n in args.sizes:
        ok, need, avail = _fits(world, n, dtype.itemsize)
        if not ok:
            if rank == 0:
                print(f"{n}^3 skipped: needs about {need / 2**30:.1f} GiB on a node, "
                      f"{(avail or 0) / 2**30:.1f} GiB available", flush=True)
            rows.append({"n": n, "skipped": "memory", "need_bytes": need,
                         "available_bytes": avail})
            continue
        for grid in args.grids:
            if impl == "mpi4py-fft":
                runs = {"mpi": _Mpi4pyFFT(world, n, grid, dtype, xp),
                        "pya2a": _Mpi4pyFFT(pya2a.Comm(world, algorithm=args.algorithm), n,
                                            grid, dtype, xp)}
            else:
                runs = {"mpi": _PencilFFT(world, n, grid, dtype, xp, "mpi", args.algorithm),
                        "pya2a": _PencilFFT(world, n, grid, dtype, xp, "pya2a",
                                            args.algorithm)}
            tr = _time(world, runs, "transform", args.repeat, args.warmup, args.max_seconds)
            ex = _time(world, runs, "exchanges", args.repeat, args.warmup, args.max_seconds)
            algs = sorted(set().union(*world.allgather(_algorithms())))
            for r in runs.values():
                r.free()
            row = {"n": n, "shape": [n, n, n], "grid": grid, "dtype": str(dtype), "impl": impl,
                   "device": args.device, "p": p, "pya2a_algorithms": algs,
                   "transform": tr, "exchanges": ex,
                   "speedup_transform": tr["mpi"]["median_us"] / tr["pya2a"]["median_us"],
                   "speedup_exchanges": ex["mpi"]["median_us"] / ex["pya2a"]["median_us"]}
            rows.append(row)
            if rank == 0:
                print(f"{impl} {grid:6s} {n:4d}^3 {dtype} p={p} {args.device}: "
                      f"fwd+bwd mpi {tr['mpi']['median_us']:10.1f} us  pya2a "
                      f"{tr['pya2a']['median_us']:10.1f} us  x{row['speedup_transform']:.2f}"
                      f" | exchanges mpi {ex['mpi']['median_us']:10.1f} us  pya2a "
                      f"{ex['pya2a']['median_us']:10.1f} us  x{row['speedup_exchanges']:.2f}"
                      f"  [{','.join(algs)}]", flush=True)
    if args.json:
        from pya2a.tools.harness import provenance

        meta = provenance(world, f"mpiexec -n {p} python {shlex.join(sys.argv)}")  # collective
        meta.update({"oversubscribed": p > (os.cpu_count() or p), "numpy": np.__version__,
                     "impl": impl, "device": args.device, "algorithm": args.algorithm,
                     "repeat": args.repeat, "warmup": args.warmup,
                     "max_seconds": args.max_seconds,
                     "loadavg_before_after": [load_before, os.getloadavg()
                                              if hasattr(os, "getloadavg") else None],
                     "timing": "per call, slowest rank, between barriers; pya2a and MPI "
                               "alternate call by call",
                     # ranks sharing a GPU reach the MPS daemon through this directory
                     "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))})
        if args.device == "cuda":
            meta["mpi_path"] = "'mpi' rows copy to the host around the MPI's own Alltoallw"
        if impl == "mpi4py-fft":
            import mpi4py_fft

            meta["mpi4py_fft"] = getattr(mpi4py_fft, "__version__", "?")
        if rank == 0:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1)
                                       + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
