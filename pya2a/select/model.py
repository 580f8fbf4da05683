"""The cost model: per-algorithm textbook costs corrected by measured ratios.

See :mod:`pya2a.select` for the formula; :func:`ranking` orders candidates by prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import algorithms
from .table import load_table

__all__ = ["Stats", "predict", "ranking"]


@dataclass(frozen=True)
class Stats:
    """Global facts about one exchange, identical on every rank.

    Attributes:
        p: number of ranks.
        max_block: largest block any rank sends, bytes.
        mean_block: mean bytes per (src, dst) pair over the whole exchange.
        device: device (GPU) buffers.
        contiguous: every rank's datatypes are dense (byte-level algorithms can run).
        max_rank: bytes sent or received by the busiest rank (max over ranks and sides);
            0 means unknown and is taken as ``mean_block * p``.
        ranks_per_node: ranks sharing this node (0: unknown); part of the tuning key.
    """

    p: int
    max_block: int
    mean_block: float
    device: bool
    contiguous: bool
    max_rank: int = 0
    ranks_per_node: int = 0

    @property
    def m_eff(self) -> float:
        """Bytes per peer of the busiest rank: the size the models are evaluated at."""
        busiest = self.max_rank if self.max_rank else self.mean_block * self.p
        return max(float(busiest) / max(self.p, 1), float(self.mean_block))

    @classmethod
    def from_records(cls, table, p: int, device: bool, ranks_per_node: int = 0) -> Stats:
        """Stats from the all-gathered agreement records (identical on every rank).

        Args:
            table: int64 array (p, >= 6): columns [error, algorithm code, largest block,
                bytes sent, device, contiguous] and optionally [bytes received] (bytes).
        """
        send_tot = table[:, 3]
        busiest = int(send_tot.max()) if p else 0
        if table.shape[1] > 6:
            busiest = max(busiest, int(table[:, 6].max()))
        return cls(p=p, max_block=int(table[:, 2].max()) if p else 0,
                   mean_block=float(send_tot.sum()) / (p * p) if p else 0.0, device=device,
                   contiguous=bool(table[:, 5].all()), max_rank=busiest,
                   ranks_per_node=ranks_per_node)

    @property
    def imbalance(self) -> float:
        """Busiest rank's bytes over the mean rank's bytes (1.0 = balanced)."""
        mean = self.mean_block * self.p
        return float(self.max_rank) / mean if mean and self.max_rank else 1.0


def _interp_loglog(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear interpolation in (log x, log y), clamped outside [xs[0], xs[-1]]."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    lx = math.log(x)
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1 = math.log(xs[i - 1]), math.log(xs[i])
            y0, y1 = math.log(ys[i - 1]), math.log(ys[i])
            w = (lx - x0) / (x1 - x0) if x1 > x0 else 0.0
            return math.exp(y0 + w * (y1 - y0))
    return ys[-1]  # pragma: no cover


def _model_m(info: algorithms.AlgorithmInfo, stats: Stats) -> float:
    """Bytes per peer at which ``info``'s model and correction are read (AlgorithmInfo.model_m)."""
    return stats.m_eff if info.model_m is None else float(info.model_m(stats))


def _correction(table: dict, name: str, stats: Stats,
                m: float | None = None) -> tuple[float, dict | None]:
    best = None
    for c in table["corrections"]:
        if c["algorithm"] != name or c["device"] != stats.device:
            continue
        # nearest p in log scale; same ranks-per-node layout preferred
        d = abs(math.log(c["p"]) - math.log(max(stats.p, 1)))
        if stats.ranks_per_node and c["ranks_per_node"] and \
                c["ranks_per_node"] != stats.ranks_per_node:
            d += 10.0
        if best is None or d < best[0]:
            best = (d, c)
    if best is None:
        return 1.0, None
    c = best[1]
    m = stats.m_eff if m is None else m
    return _interp_loglog(c["m"], c["ratio"], max(m, 1.0)), c


def _estimate(name: str, stats: Stats, table: dict) -> tuple[float, float, dict | None]:
    """(predicted seconds, uncorrected model seconds, correction entry used) for ``name``.

    Between two sizes measured at this very p (and layout) the prediction interpolates the
    measured times themselves; elsewhere (other p, outside the measured range) it is the
    model times the interpolated measured/model ratio. Ratios do not interpolate across a
    change of regime inside the model: ``padded``'s model switches from Bruck rounds to
    p - 1 messages at BRUCK_MAX = 256 B, so the 64 B and 512 B ratios of a tune averaged
    two different models and priced a 252 B slot at half its measured cost (auto chose
    ``padded`` at p = 32, 32 B per peer Zipf-skewed and ran 0.86x native).
    """
    info = algorithms.get(name)
    m = _model_m(info, stats)
    model = info.cost(stats.p, m, table["params"])
    ratio, c = _correction(table, name, stats, m)
    if c is not None and c.get("measured_s") and c["p"] == stats.p and \
            (not stats.ranks_per_node or c["ranks_per_node"] in (0, stats.ranks_per_node)) \
            and c["m"][0] <= m <= c["m"][-1]:
        return _interp_loglog(c["m"], c["measured_s"], m), model, c
    return ratio * model, model, c


def predict(name: str, stats: Stats, table: dict | None = None) -> float:
    """Predicted seconds of algorithm ``name`` for the exchange described by ``stats``."""
    table = load_table() if table is None else table
    return _estimate(name, stats, table)[0]


def ranking(stats: Stats, candidates: list[str], table: dict | None = None) -> list[dict]:
    """All ``candidates`` with predicted times, fastest first (ties keep candidate order).

    Returns:
        list of dicts: ``algorithm``, ``predicted_s``, ``model_s`` (uncorrected cost model),
        ``correction`` (measured/model factor applied) and ``tuned_p`` (p of the correction
        used, or None).
    """
    table = load_table() if table is None else table
    rows = []
    for i, name in enumerate(candidates):
        pred, model, c = _estimate(name, stats, table)
        rows.append({"algorithm": name, "predicted_s": pred, "model_s": model,
                     "correction": pred / model if model > 0 else 1.0,
                     "tuned_p": c["p"] if c else None, "_i": i})
    rows.sort(key=lambda r: (r["predicted_s"], r["_i"]))
    for r in rows:
        del r["_i"]
    return rows
