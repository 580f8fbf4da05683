"""Choosing an algorithm for ``algorithm="auto"``: cost models corrected by measurements.

Every rank must reach the same answer without further communication, so the choice is a pure
function of :class:`Stats`, values that are identical on every rank because they come from the
all-gathered agreement record (largest block, mean and busiest-rank bytes, p, ranks per node,
buffer kind), and of the tuning table, which every rank reads from the same file.

Prediction for algorithm ``a`` at p ranks and ``m`` effective bytes per peer::

    t_a(p, m) = r_a(m) * cost_a(p, m, params)

``cost_a`` is the algorithm's own textbook model (``algorithms/<name>.py``) in the machine
parameters ``o`` (per-call software overhead), ``ts`` (message start-up), ``tw`` (seconds per
byte), ``tp`` (our per-message Python overhead) and ``tr`` (local rearrangement, seconds per
byte). ``r_a(m)`` is the measured correction, ``measured / model``, recorded by
``python -m pya2a tune`` at the tuned p and interpolated log-log in ``m`` (clamped at the
ends); for another p the correction of the nearest tuned p is used. At the tuned p the
prediction is therefore the measurement itself, elsewhere the model carries it. An algorithm
other than ``native`` is only chosen when predicted faster than ``native`` by the table's
``margin`` (default 10 %), so noise in the table cannot make ``auto`` lose to the library.

``m`` is the *busiest* rank's bytes per peer, ``max(send or receive bytes of one rank) / p``:
an exchange ends when its busiest rank is done, so a skewed or hot exchange is priced like a
uniform one of the busiest rank's size. An algorithm may name another size
(``AlgorithmInfo.model_m``): ``padded`` carries every block in a slot of the largest block,
so it is priced, model and correction alike, at ``max_block``.

Tuning table: ``PYA2A_TUNING=path``, else ``$XDG_CACHE_HOME/pya2a/tuning.json`` (default
``~/.cache/pya2a/tuning.json``), else the built-in :data:`DEFAULT_TABLE`; docs/selection.md
says where its numbers come from. ``PYA2A_ALGORITHM`` or ``algorithm=`` bypass all of this.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import algorithms

__all__ = ["Stats", "choose", "ranking", "predict", "load_table", "table_path", "DEFAULT_TABLE",
           "DEFAULT_PARAMS", "DEFAULT_MARGIN"]

# Built-in defaults, used when no tuning table is found: `python -m pya2a tune --quick` on
# the lent 64-core machine (nvidia-h200-x4, MPICH 5.0.2 wheel, one node, shared memory),
# 2026-11-21, at p = 64, 32 and 16 (bench/results/cpu_tune.json; docs/selection.md).
# Parameters from the first round's p = 16 run (least contention); the measured times below
# are the third round (session 3, after bound plans moved to per-phase copy lists, every
# algorithm warmed up first): uniform exchanges through plans, in microseconds, at
# 8 B .. 1 MiB per peer.
DEFAULT_PARAMS: dict[str, float] = {
    "o": 5.1e-7,  # per-call software overhead of a plan run (COMM_SELF, 8 B), s
    "ts": 2.9e-6,  # 8-byte Sendrecv with a partner, every rank at once, s
    "tw": 1.29e-10,  # s per byte from the same at 1 MiB (~7.8 GB/s per rank, all busy)
    "tp": 6.1e-7,  # persistent send/recv Startall + Waitall per message, s
    "tr": 4.4e-11,  # _pack.gather of 64 blocks, s per byte (~23 GB/s)
}
DEFAULT_MARGIN = 0.10
_DEFAULT_M = [8, 64, 512, 4096, 32768, 262144, 1048576]
_DEFAULT_US: list[tuple[str, int, list[float]]] = [
    ("native", 64, [180.6, 174.6, 203.7, 291.9, 1002.6, 12815.5, 48835.7]),
    ("direct", 64, [136.6, 149.6, 198.3, 240.5, 944.6, 12901.3, 47757.8]),
    ("mesh", 64, [35.6, 45.9, 63.7, 338.4, 4171.6]),
    ("hypercube", 64, [29.1, 34.9, 118.0, 499.7, 7420.6]),
    ("padded", 64, [35.9, 65.9, 152.6, 231.3, 962.6, 17424.0, 172026.7]),
    ("pairwise", 64, [255.2, 253.9, 260.7, 346.9, 1302.0, 17860.7, 71832.1]),
    ("ring", 64, [277.4, 311.0, 943.5, 6033.0]),
    ("native", 32, [77.2, 72.9, 77.8, 114.0, 398.3, 3946.7, 18933.6]),
    ("direct", 32, [59.7, 60.4, 65.2, 93.8, 355.9, 3382.6, 18614.0]),
    ("mesh", 32, [28.4, 24.8, 32.8, 130.7, 912.1, 16524.4]),
    ("hypercube", 32, [18.1, 19.5, 58.3, 170.2, 1463.4, 22136.9]),
    ("padded", 32, [22.1, 32.1, 62.5, 95.9, 382.5, 4957.3, 21844.6]),
    ("pairwise", 32, [107.2, 101.6, 117.4, 146.8, 490.3, 4637.5, 22137.4]),
    ("ring", 32, [98.5, 107.1, 267.2, 975.2]),
    ("native", 16, [38.4, 35.4, 39.4, 50.1, 155.2, 800.7, 5982.1]),
    ("direct", 16, [31.7, 29.3, 31.9, 41.4, 130.5, 721.4, 5161.9]),
    ("mesh", 16, [14.5, 14.9, 22.5, 63.4, 362.2, 3174.9, 18213.3]),
    ("hypercube", 16, [12.8, 14.6, 21.7, 78.4, 511.0, 4780.0]),
    ("padded", 16, [17.7, 20.3, 30.8, 41.9, 147.8, 1009.3, 6824.1]),
    ("pairwise", 16, [43.7, 45.5, 46.6, 61.6, 168.1, 963.8, 6552.9]),
    ("ring", 16, [42.7, 44.2, 61.6, 226.2]),
]

DEFAULT_TABLE: dict = {
    "version": 1,
    "provenance": {"source": "built-in defaults (pya2a/select.py): tune --quick on "
                             "nvidia-h200-x4, 64 cores, MPICH 5.0.2, p = 16/32/64, "
                             "2026-11-21; see docs/selection.md"},
    "params": DEFAULT_PARAMS,
    "margin": DEFAULT_MARGIN,
    "corrections": [{"algorithm": a, "p": p, "ranks_per_node": p, "device": False,
                     "m": _DEFAULT_M[:len(us)], "measured_us": us}
                    for a, p, us in _DEFAULT_US],
}


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


_PATHS: dict[tuple, Path] = {}


def table_path() -> Path:
    """Where the tuning table is read from and ``tune`` writes by default."""
    key = (os.environ.get("PYA2A_TUNING"), os.environ.get("XDG_CACHE_HOME"),
           os.environ.get("HOME"))
    hit = _PATHS.get(key)
    if hit is None:
        if key[0]:
            hit = Path(key[0]).expanduser()
        else:
            base = key[1] or os.path.join(os.path.expanduser("~"), ".cache")
            hit = Path(base) / "pya2a" / "tuning.json"
        if len(_PATHS) > 16:
            _PATHS.clear()
        _PATHS[key] = hit
    return hit


_CACHE: dict[tuple[str, float], dict] = {}


def load_table(path: str | os.PathLike | None = None) -> dict:
    """The tuning table in use: ``path``, else :func:`table_path` if it exists, else defaults.

    The returned dict has ``params``, ``margin``, ``corrections`` and ``provenance`` (with
    ``path`` set to the file read, or None for the built-in table). A file that cannot be
    read or parsed falls back to the defaults with ``provenance["error"]`` saying why: a
    broken cache file must not make every rank fail.
    """
    p = Path(path) if path is not None else table_path()
    try:
        mtime = os.stat(p).st_mtime
    except OSError:
        if path is not None:
            raise FileNotFoundError(f"tuning table {str(p)!r} not found") from None
        return _builtin()
    key = (str(p), mtime)
    if key in _CACHE:
        return _CACHE[key]
    try:
        with open(p) as f:
            raw = json.load(f)
        table = _normalize(raw)
        table["provenance"] = dict(raw.get("provenance", {}), path=str(p))
    except (OSError, ValueError, TypeError, KeyError) as e:
        table = dict(_builtin())
        table["provenance"] = dict(table["provenance"], error=f"{p}: {e}")
    _CACHE.clear()
    _CACHE[key] = table
    return table


_BUILTIN: list[dict] = []


def _builtin() -> dict:
    """The built-in table, normalised once (callers must not modify it)."""
    if not _BUILTIN:
        t = _normalize(DEFAULT_TABLE)
        t["provenance"] = dict(DEFAULT_TABLE["provenance"], path=None)
        _BUILTIN.append(t)
    return _BUILTIN[0]


def _normalize(raw: dict) -> dict:
    if not isinstance(raw, dict):
        raise TypeError("tuning table must be a JSON object")
    params = dict(DEFAULT_PARAMS)
    params.update({k: float(v) for k, v in raw.get("params", {}).items()})
    corr = []
    for c in raw.get("corrections", []):
        m = [float(x) for x in c["m"]]
        if "measured_us" in c:  # ratios against this table's params (runs may be merged)
            try:
                cost = algorithms.get(str(c["algorithm"])).cost
            except ValueError:
                continue  # an algorithm this installation does not have
            r = [float(t) * 1e-6 / max(cost(int(c["p"]), x, params), 1e-12)
                 for t, x in zip(c["measured_us"], m, strict=True)]
        else:
            r = [float(x) for x in c["ratio"]]
        if len(m) != len(r) or not m:
            raise ValueError("correction entries need equal-length non-empty m and ratio")
        if not all(math.isfinite(x) and x > 0 for x in r):
            continue  # no finite model to correct (explicit-only algorithms cost inf)
        entry = {"algorithm": str(c["algorithm"]), "p": int(c["p"]),
                 "device": bool(c.get("device", False)),
                 "ranks_per_node": int(c.get("ranks_per_node", 0)), "m": m, "ratio": r}
        if "measured_us" in c:
            entry["measured_s"] = [float(t) * 1e-6 for t in c["measured_us"]]
        corr.append(entry)
    return {"version": int(raw.get("version", 1)), "params": params,
            "margin": float(raw.get("margin", DEFAULT_MARGIN)), "corrections": corr,
            "provenance": dict(raw.get("provenance", {}))}


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


# Device buffers, staged through host memory (measured on nvidia-h200-x4, 4 ranks, Open MPI
# 4.1.6; docs/gpu.md): native (one staged MPI call) is best below about 1 MiB per pair,
# pairwise (chunked, pipelined staging) above.
DEVICE_PAIRWISE_FROM = 1 << 20
# shm against staged native, 4 x H200, Open MPI 4.1.6 (bench/results/gpu_shm_bench_h200x4_
# ompi.json): 151 vs 89 us at 128 B, 158 vs 141 us at 64 KiB, 210 vs 516 us at 512 KiB per
# pair (shm's small-size cost is its Python polling loop).
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
