"""pya2a: portable all-to-all (Alltoall / Alltoallv) for Python HPC and ML codes.

Quick use::

    from mpi4py import MPI
    import pya2a
    comm = pya2a.Comm(MPI.COMM_WORLD)        # drop-in: Alltoall/Alltoallv go through pya2a
    comm.Alltoallv([sbuf, scounts], [rbuf, rcounts])
    pya2a.Alltoallv(MPI.COMM_WORLD, smsg, rmsg, algorithm="pairwise")

pya2a needs an MPI library that mpi4py can load: ``pip install "pya2a[mpich]"`` brings the
MPICH wheel; a system MPI works too (``MPI4PY_LIBMPI``, or mpi4py built against it). Without
one, ``import pya2a`` raises :class:`ImportError` saying so; only the command line
(``python -m pya2a --help``, ``--version``, ``bench --replot``) runs without MPI.
"""

from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"

__all__ = ["Alltoall", "Alltoallv", "Alltoallw", "Comm", "alltoallv", "available_algorithms",
           "plan", "Plan", "explain", "Explanation", "__version__"]

NO_MPI_HELP = (
    "pya2a needs an MPI library, and mpi4py could not load one:\n    {why}\nInstall one with\n"
    "    pip install \"pya2a[mpich]\"        (or: pip install mpich; from a clone: "
    "pip install \".[mpich]\")\n"
    "or use a system MPI: MPI4PY_LIBMPI=/path/to/libmpi.so, or build mpi4py against it with\n"
    "    pip install --no-binary=mpi4py mpi4py")


def _no_mpi(exc: BaseException) -> bool:
    """Is this the failure of mpi4py to load (or to exist), not some other import error?"""
    if isinstance(exc, ModuleNotFoundError):
        return (exc.name or "").split(".")[0] == "mpi4py"
    return isinstance(exc, RuntimeError) and "MPI library" in str(exc)


def _starting_cli() -> bool:
    """True while ``python -m pya2a ...`` or the ``pya2a`` script imports this package."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or Path(argv0).stem == "pya2a"


try:
    from .api import Alltoall, Alltoallv, Alltoallw, Comm, alltoallv, available_algorithms
    from .plan import Explanation, Plan, explain, plan
except (RuntimeError, ImportError) as _exc:  # mpi4py raises RuntimeError when libmpi is absent
    if not _no_mpi(_exc):
        raise
    _NO_MPI = ImportError(NO_MPI_HELP.format(why=str(_exc).strip().replace("\n", "\n    ")))
    if not _starting_cli():
        raise _NO_MPI from None

    def __getattr__(name: str):  # the command line without MPI: fail on first real use
        if name in __all__:
            raise _NO_MPI
        raise AttributeError(f"module 'pya2a' has no attribute {name!r}")
