"""The tuning table: built-in defaults (with where they came from) and ``tune`` files.

``PYA2A_TUNING=path``, else ``$XDG_CACHE_HOME/pya2a/tuning.json`` (default
``~/.cache/pya2a/tuning.json``), else :data:`DEFAULT_TABLE`. ``python -m pya2a tune``
writes the file, with its provenance (host, MPI, p, ranks per node, date, command).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .. import algorithms

__all__ = ["DEFAULT_PARAMS", "DEFAULT_MARGIN", "DEFAULT_TABLE", "table_path", "load_table"]

# Built-in defaults, used when no tuning table is found: `python -m pya2a tune --quick` on
# one node of 64 cores (Intel Xeon, 4 x H200 host, MPICH 5.0.2 wheel, shared memory) at
# p = 64, 32 and 16 (bench/results/cpu_tune_h200x4.json, docs/selection.md). Parameters
# from a p = 16 run (least contention); measured times: uniform exchanges through plans,
# every algorithm warmed up first, in microseconds, at 8 B .. 1 MiB per peer.
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
    "provenance": {"source": "built-in defaults (pya2a/select/table.py): tune --quick "
                             "on one 64-core node, MPICH 5.0.2, p = 16/32/64, "
                             "2026-11-21; run `python -m pya2a tune` for this "
                             "machine; see docs/selection.md"},
    "params": DEFAULT_PARAMS,
    "margin": DEFAULT_MARGIN,
    "corrections": [{"algorithm": a, "p": p, "ranks_per_node": p, "device": False,
                     "m": _DEFAULT_M[:len(us)], "measured_us": us}
                    for a, p, us in _DEFAULT_US],
}


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
