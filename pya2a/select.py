"""Choosing an algorithm for ``algorithm="auto"``.

The choice is made from values that are identical on every rank (the all-gathered agreement
record: largest block in bytes over all ranks, mean bytes per peer, p, buffer kind), so every
rank reaches the same answer without further communication. This is the built-in size rule;
the cost-model selector with measured parameters replaces it (issue: selection and tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stats", "choose", "LARGE_BLOCK"]

# Above this many bytes in the largest block, pairwise exchange (one peer per step, no
# receiver contention) is the safer default than posting every message at once.
LARGE_BLOCK = 64 * 1024


@dataclass(frozen=True)
class Stats:
    """Global facts about one exchange, identical on every rank."""

    p: int
    max_block: int  # largest block any rank sends, bytes
    mean_block: float  # mean bytes per (src, dst) pair
    device: bool
    contiguous: bool


def choose(stats: Stats, candidates: list[str]) -> str:
    """Pick an algorithm name among ``candidates`` (all usable for this exchange)."""
    if not stats.contiguous or "native" in candidates and stats.max_block < LARGE_BLOCK:
        if "native" in candidates:
            return "native"
    if stats.p > 2 and "pairwise" in candidates:
        return "pairwise"
    return "native" if "native" in candidates else candidates[0]
