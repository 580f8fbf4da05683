"""Shared fixtures and the MPI harness.

The same test files run serially and under ``mpiexec -n N python -m mpi4py -m pytest``.
Under mpiexec (through ``tests/run_mpi.py``) only rank 0 reports; a
failure on any rank prints its traceback to stderr and
aborts the whole job, so a rank that failed never leaves the others hanging in a collective.
Tests marked ``serial`` (they spawn mpiexec themselves, or need no MPI at all) are deselected
in the MPI runs with ``-m "not serial"``.
"""

from __future__ import annotations

import sys

import pytest
from mpi4py import MPI

WORLD = MPI.COMM_WORLD


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "serial: run only in the serial (non-mpiexec) pass")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and WORLD.Get_size() > 1:
        sys.stderr.write(f"\n[rank {WORLD.Get_rank()}] FAILED {item.nodeid}\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        WORLD.Abort(1)


@pytest.fixture
def comm() -> MPI.Intracomm:
    """MPI.COMM_WORLD (size 1 in the serial pass)."""
    return WORLD
