"""PYA2A_DEBUG / the ``pya2a`` logger: rank 0 tells what each decision was and why."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import pya2a

SEED = 20


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def records():
    logger = logging.getLogger("pya2a")
    h = _Records()
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        yield h.lines
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)


def test_auto_decisions_are_logged_on_rank_0_only(comm, records):
    p = comm.Get_size()
    rng = np.random.default_rng(SEED)
    m = int(rng.integers(8, 64))
    s = np.ones(m * p, np.uint8)
    r = np.empty_like(s)
    pya2a.Alltoall(comm, s, r)
    with pya2a.plan(comm, m, m, MPI.BYTE, algorithm="pairwise") as pl:
        pl.run(s, r)
    if comm.Get_rank() != 0:
        assert records == []
        return
    one, plan = records[0], records[-1]
    assert one.startswith(f"Alltoall p={p} host") and f"largest block {m}" in one
    assert "auto -> " in one and "predicted us: " in one
    assert plan.startswith("plan") and "pairwise (from algorithm=)" in plan


def test_nothing_is_logged_by_default(comm, records):
    logging.getLogger("pya2a").setLevel(logging.WARNING)
    s = np.ones(8 * comm.Get_size(), np.uint8)
    pya2a.Alltoall(comm, s, np.empty_like(s), algorithm="direct")
    assert records == []


@pytest.mark.serial
def test_pya2a_debug_prints_to_stderr():
    code = ("import numpy as np; from mpi4py import MPI; import pya2a; s = np.ones(8, np.uint8);"
            " pya2a.Alltoall(MPI.COMM_WORLD, s, np.empty_like(s))")
    env = dict(os.environ, PYA2A_DEBUG="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("pya2a: Alltoall p=1") and "auto -> " in out.stderr
