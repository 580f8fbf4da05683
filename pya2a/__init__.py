"""pya2a: portable all-to-all (Alltoall / Alltoallv) for Python HPC and ML codes.

Quick use::

    from mpi4py import MPI
    import pya2a
    comm = pya2a.Comm(MPI.COMM_WORLD)        # drop-in: Alltoall/Alltoallv go through pya2a
    comm.Alltoallv([sbuf, scounts], [rbuf, rcounts])
    pya2a.Alltoallv(MPI.COMM_WORLD, smsg, rmsg, algorithm="pairwise")
"""

from .api import Alltoall, Alltoallv, Alltoallw, Comm, alltoallv, available_algorithms
from .plan import Explanation, Plan, explain, plan

__version__ = "0.1.0"

__all__ = ["Alltoall", "Alltoallv", "Alltoallw", "Comm", "alltoallv", "available_algorithms",
           "plan", "Plan", "explain", "Explanation", "__version__"]
