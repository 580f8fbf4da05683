"""What each call decided, for people: ``PYA2A_DEBUG=1`` or the ``pya2a`` logger at INFO.

Lines go through :mod:`logging` (logger ``"pya2a"``), on rank 0 of the communicator only,
when a decision is made (a repeated one-shot call replays its cached decision silently)::

    pya2a: Alltoallv p=4 host, bytes per peer: mean 64, largest block 64, busiest rank 256:
    auto -> hypercube (predicted us: hypercube 12.1, mesh 14.0, native 20.3)

``PYA2A_DEBUG=1`` attaches a stderr handler to the logger if it has none and sets INFO; an
application's own logging configuration works too (``logging.getLogger("pya2a")``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

__all__ = ["logger", "enabled", "decision"]

logger = logging.getLogger("pya2a")
_SETUP: list[str | None] = []


def enabled() -> bool:
    """Are decisions being logged (checked where a decision is made, not on the fast path)?"""
    flag = os.environ.get("PYA2A_DEBUG")
    if _SETUP != [flag]:
        _SETUP[:] = [flag]
        if flag and flag not in ("0", "false", "no") and not logger.handlers:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("pya2a: %(message)s"))
            logger.addHandler(h)
            logger.setLevel(logging.INFO)
    return logger.isEnabledFor(logging.INFO)


def _sizes(records) -> str:
    """Message sizes from the all-gathered agreement records (int64 array, one row per rank:
    [error, algorithm code, largest block, bytes sent, device, contiguous, bytes received,
    ...], the layout :meth:`pya2a.select.Stats.from_records` reads)."""
    try:
        p = len(records)
        sent = records[:, 3]
        busiest = int(max(sent.max(), records[:, 6].max() if records.shape[1] > 6 else 0))
        kind = "device" if records[:, 4].any() else "host"
        return (f"{kind}, bytes per peer: mean {float(sent.sum()) / (p * p):.0f}, largest "
                f"block {int(records[:, 2].max())}, busiest rank {busiest}")
    except Exception:  # logging must never break a call
        return ""


def decision(comm, call: str, algorithm: str, records=None,
             ranking: Callable[[], list[dict]] | None = None, override: str = "",
             note: str = "") -> None:
    """Log one decision on rank 0 of ``comm`` (nothing unless :func:`enabled`).

    Args:
        call: the API entry ("Alltoallv", "plan", ...).
        algorithm: what will run.
        records: the all-gathered agreement records (message sizes come from them).
        ranking: returns the selector's ranking (dicts with ``algorithm`` and
            ``predicted_s``), called only when logging; its first entries are the why.
        override: where a fixed choice came from ("algorithm=", "PYA2A_ALGORITHM"); empty
            for ``auto``.
        note: why ``auto`` runs ``algorithm`` where that is not the ranking's first.
    """
    if not enabled() or comm.Get_rank() != 0:
        return
    why = ""
    if not override and ranking is not None:
        try:
            top = ranking()[:4]
            why = " (predicted us: " + ", ".join(
                f"{r['algorithm']} {r['predicted_s'] * 1e6:.1f}" for r in top)
            if note:
                why += f"; {note}"
            elif top and top[0]["algorithm"] != algorithm:
                why += (f"; {algorithm} by the selector's rules: native unless another is "
                        "faster by the margin, p = 1, datatype, device buffers")
            why += ")"
        except Exception as e:  # logging must never break a call
            why = f" (ranking unavailable: {type(e).__name__})"
    sizes = _sizes(records) if records is not None else ""
    head = f"{call} p={comm.Get_size()}" + (f" {sizes}" if sizes else "")
    how = f"{algorithm} (from {override})" if override else f"auto -> {algorithm}"
    logger.info("%s: %s%s", head, how, why)
