"""Pieces shared by the point-to-point algorithm bodies."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..bufspec import VSpec

__all__ = ["Sides", "sides", "TAG_DIRECT", "TAG_PAIRWISE"]

# Fixed tags on the internal communicator: each call completes all its messages before it
# returns and MPI does not overtake on one (source, tag, comm), so one tag per algorithm is
# enough. Distinct values only make traces easier to read.
TAG_DIRECT = 7101
TAG_PAIRWISE = 7102


class Sides(NamedTuple):
    """Byte views and byte-level block tables of both sides of an exchange."""

    sb: object
    sc: np.ndarray
    sd: np.ndarray
    rb: object
    rc: np.ndarray
    rd: np.ndarray


def sides(send: VSpec, recv: VSpec, transport) -> Sides:
    """Buffers as flat bytes plus counts/displacements in bytes, as Python-friendly arrays."""
    return Sides(transport.buffer(send), send.bcounts, send.bdispls,
                 transport.buffer(recv), recv.bcounts, recv.bdispls)
