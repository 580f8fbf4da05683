"""plan, explain, available_algorithms and one-shot ``auto`` never offer an algorithm that
the communicator refuses (``AlgorithmInfo.comm_available``).

The refusal is installed by re-registering an algorithm with a ``comm_available`` that says
no (the registry's own mechanism), and the original registration is restored after.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import pya2a
from pya2a.core import registry


@pytest.fixture
def refuse_auto_choice(comm):
    """Refuse, on every rank, the algorithm auto picks for the test exchange."""
    p = comm.Get_size()
    choice = pya2a.explain(comm, [4] * p, [4] * p, "d").choice
    original = registry.get(choice)
    registry.register(dataclasses.replace(
        original, comm_available=lambda icomm, device: (False, "refused by the test")))
    try:
        yield choice
    finally:
        registry.register(original)


def test_refused_algorithm_is_never_offered(comm, refuse_auto_choice):
    p, r = comm.Get_size(), comm.Get_rank()
    refused = refuse_auto_choice
    assert refused not in pya2a.available_algorithms(comm)
    ex = pya2a.explain(comm, [4] * p, [4] * p, "d")
    assert ex.choice != refused
    assert ex.excluded.get(refused) == "refused by the test"
    assert refused not in [row["algorithm"] for row in ex.ranking]
    pl = pya2a.plan(comm, [4] * p, [4] * p, "d")
    assert pl.algorithm != refused
    send = np.arange(4 * p, dtype="d") + 10 * r
    recv = np.empty(4 * p)
    pl.run(send, recv)
    want = np.empty(4 * p)
    comm.Alltoallv(send, want)
    np.testing.assert_array_equal(recv, want)
    pl.free()
    pya2a._oneshot.clear()
    recv[:] = 0
    used = pya2a._oneshot.exchange("Alltoallv", "alltoallv", comm, [send, 4], [recv, 4],
                                   "auto", False)
    assert used != refused
    np.testing.assert_array_equal(recv, want)


def test_asking_for_a_refused_algorithm_raises_everywhere(comm, refuse_auto_choice):
    p = comm.Get_size()
    with pytest.raises(ValueError, match="refused by the test"):
        pya2a.plan(comm, [4] * p, [4] * p, "d", algorithm=refuse_auto_choice)
    send, recv = np.zeros(4 * p), np.zeros(4 * p)
    with pytest.raises(ValueError, match="refused by the test"):
        pya2a.Alltoallv(comm, send, recv, algorithm=refuse_auto_choice)
    comm.Barrier()


@pytest.mark.serial
def test_device_algorithm_names_are_known_before_any_device_call():
    """``ipc`` and ``shm`` register on first need: naming one in a fresh process, before any
    device call (``pya2a.Comm(..., algorithm="ipc")``, a first call by name) finds it."""
    code = ("from mpi4py import MPI; import pya2a; "
            "print(pya2a.Comm(MPI.COMM_WORLD, algorithm='ipc').algorithm); "
            "from pya2a.core import registry; print(registry.get('shm').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ipc", "shm"]
