"""Communicators made from a pya2a.Comm stay pya2a, with the parent's algorithm and options.

Each derived communicator must be a ``pya2a.Comm`` (and still the mpi4py type its method
makes: ``Cartcomm``, ``Graphcomm``, ``Distgraphcomm``), carry ``algorithm`` and ``options``,
and run ``Alltoall`` / ``Alltoallv`` through pya2a (its pya2a state exists after the call)
with the result of MPI's own call on the same communicator.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a.core.state import state


def _derived(c: pya2a.Comm):
    p, r = c.Get_size(), c.Get_rank()
    yield "Dup", c.Dup(), MPI.Intracomm
    yield "Clone", c.Clone(), MPI.Intracomm
    new, req = c.Idup()
    req.Wait()
    yield "Idup", new, MPI.Intracomm
    yield "Split", c.Split(r % 2, r), MPI.Intracomm
    yield "Split_type", c.Split_type(MPI.COMM_TYPE_SHARED), MPI.Intracomm
    yield "Create", c.Create(c.Get_group()), MPI.Intracomm
    yield "Create_group", c.Create_group(c.Get_group()), MPI.Intracomm
    cart = c.Create_cart([p], periods=[True])
    yield "Create_cart(...).Sub", cart.Sub([True]), MPI.Cartcomm
    yield "Create_cart", cart, MPI.Cartcomm
    index = list(range(1, p + 1))
    edges = list(range(p))
    yield "Create_graph", c.Create_graph(index, edges), MPI.Graphcomm
    yield "Create_dist_graph_adjacent", c.Create_dist_graph_adjacent([r], [r]), \
        MPI.Distgraphcomm
    yield "Create_dist_graph", c.Create_dist_graph([r], [1], [r]), MPI.Distgraphcomm
    yield "Dup of a Cartcomm", cart.Dup(), MPI.Cartcomm


@pytest.mark.parametrize("algorithm", ["auto", "pairwise", "ring"])
def test_derived_communicators_stay_pya2a(comm, algorithm):
    parent = pya2a.Comm(comm, algorithm=algorithm, options={"window": 2})
    made = list(_derived(parent))
    for name, d, kind in made:
        assert isinstance(d, pya2a.Comm), name
        assert isinstance(d, kind), name
        assert d.algorithm == algorithm and d.options == {"window": 2}, name
        q, r = d.Get_size(), d.Get_rank()
        send = np.arange(3 * q, dtype="d") + 100 * r
        recv = np.zeros(3 * q)
        d.Alltoallv(send, recv)
        assert state(d).slot("oneshot.signatures") is not None, name  # went through pya2a
        want = np.zeros(3 * q)
        MPI.Intracomm.Alltoallv(d, send, want)
        np.testing.assert_array_equal(recv, want, err_msg=name)
        recv[:] = 0
        d.Alltoall([send, 3], [recv, 3])
        np.testing.assert_array_equal(recv, want, err_msg=name)
    for _, d, _ in made:
        d.Free()
    comm.Barrier()


def test_derived_null_and_intercomm_results_are_left_alone(comm):
    parent = pya2a.Comm(comm)
    assert parent.Split(MPI.UNDEFINED, 0) == MPI.COMM_NULL
