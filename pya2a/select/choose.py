"""The choice: the same name on every rank from :class:`~pya2a.select.model.Stats` and the table."""

from __future__ import annotations

from .model import Stats, ranking
from .table import load_table

__all__ = ["choose", "DEVICE_PAIRWISE_FROM", "DEVICE_SHM_FROM"]


def choose(stats: Stats, candidates: list[str], table: dict | None = None) -> str:
    """Pick an algorithm name among ``candidates`` (all usable for this exchange).

    Deterministic in (stats, candidates, table): every rank passes identical values, so
    every rank returns the same name. ``native`` wins unless another algorithm is predicted
    faster by more than the table's margin, and always for non-contiguous datatypes.
    """
    if not candidates:
        raise ValueError("choose: no usable algorithm")
    if stats.p <= 1 or not stats.contiguous:
        return "native" if "native" in candidates else candidates[0]
    if stats.device:
        return _choose_device(stats, candidates)
    table = load_table() if table is None else table
    order = ranking(stats, candidates, table)
    best = order[0]
    if "native" in candidates and best["algorithm"] != "native":
        t_native = next(r["predicted_s"] for r in order if r["algorithm"] == "native")
        if best["predicted_s"] > (1.0 - table["margin"]) * t_native:
            return "native"
    return best["algorithm"]


# Device buffers, staged through host memory (measured on 4 x H200, 4 ranks, Open MPI
# 4.1.6; docs/gpu.md): native (one staged MPI call) is best below about 1 MiB per pair,
# pairwise (chunked, pipelined staging) above.
DEVICE_PAIRWISE_FROM = 1 << 20
# shm against staged native, 4 x H200, Open MPI 4.1.6 (bench/results/gpu_shm_h200x4.json,
# docs/gpu.md): 151 vs 89 us at 128 B, 158 vs 141 us at 64 KiB, 210 vs 516 us at 512 KiB
# per pair (shm's small-size cost is its Python polling loop).
DEVICE_SHM_FROM = 128 << 10


def _choose_device(stats: Stats, candidates: list[str]) -> str:
    """``ipc`` when the caller found it available (one node, peer access); else ``shm``
    when every rank shares one node (node-shared pinned window, no host MPI) and blocks are
    large enough to pay for its polling (DEVICE_SHM_FROM); else staged."""
    if "ipc" in candidates:
        return "ipc"
    if "shm" in candidates and stats.ranks_per_node == stats.p and \
            stats.max_block >= DEVICE_SHM_FROM:
        return "shm"
    if stats.max_block >= DEVICE_PAIRWISE_FROM and "pairwise" in candidates:
        return "pairwise"
    return "native" if "native" in candidates else candidates[0]
