"""Reports of ``python -m pya2a bench``: the table, CSV and plot of a JSON report, host and
device alike. Nothing here needs MPI (``bench --replot`` runs without it).

A report is ``{"schema_version", "meta", "results", "summary"}``; ``results`` holds one
point per size (``bytes_per_peer``, ``bytes_per_rank``, ``rows``: label -> row) and a row
has ``avg_us`` / ``min_us`` / ``max_us`` (over ranks), ``busbw_GBps``, ``speedup_vs_native``
(against ``meta["baseline"]``), ``wrong`` (ranks with a wrong result, when checked),
``algorithm`` (what ``auto`` ran) or ``skipped`` (why the row was not timed).
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["SCHEMA_VERSION", "fmt_size", "parse_size", "mpi_short", "table_lines",
           "print_table", "write_csv", "write_plot", "CSV_COLUMNS"]

# 2: rows carry "wrong" (ranks with a wrong result) and "skipped" reasons; points carry
#    "bytes_per_rank"; device reports use the same layout. Files without the key are 1.
SCHEMA_VERSION = 2

CSV_COLUMNS = ["size_bytes_per_peer", "count_bytes_per_rank", "algorithm", "ran",
               "avg_us", "min_us", "max_us", "algbw_GBps", "busbw_GBps", "speedup",
               "wrong", "note"]


def parse_size(text: str) -> int:
    """'8', '4K', '4KiB', '1M', '2G' -> bytes (binary multiples). ValueError otherwise."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1 << (10 * ("KMG".index(t[-1]) + 1))
        t = t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 8, 64K, 4M)") from None
    if not math.isfinite(v) or v < 0 or v != int(v):
        raise ValueError(f"not a size: {text!r} (a whole number of bytes, e.g. 8, 64K, 4M)")
    return int(v)


def fmt_size(n: float) -> str:
    """Bytes as a short binary string: 8, 64K, 4M; 1.5K where not a whole multiple."""
    n = float(n)
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{int(v)}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{int(n)}" if n == int(n) else f"{n:.1f}"


def mpi_short(library: str) -> str:
    """'MPICH Version:      5.0.2' -> 'MPICH 5.0.2'; 'Open MPI v4.1.6, package: ...' ->
    'Open MPI v4.1.6'."""
    first = (library or "").replace("\x00", "").strip().splitlines()
    s = " ".join(first[0].split()) if first else "MPI ?"
    s = re.sub(r"\s*Version:\s*", " ", s)
    return s.split(",")[0].strip()


def _rows(report: dict) -> Iterator[dict[str, Any]]:
    """One dict per (size, row) in the table's order."""
    meta = report.get("meta", {})
    order = list(meta.get("algorithms", []))
    for pt in report.get("results", []):
        names = order + [k for k in pt.get("rows", {}) if k not in order]
        count = pt.get("bytes_per_rank")
        for name in names:
            row = pt.get("rows", {}).get(name)
            if row is None:
                continue
            out = {"size": pt["bytes_per_peer"], "count": count, "algorithm": name,
                   "ran": row.get("algorithm", ""), "avg": row.get("avg_us"),
                   "min": row.get("min_us"), "max": row.get("max_us"),
                   "algbw": row.get("algbw_GBps"), "busbw": row.get("busbw_GBps"),
                   "speedup": row.get("speedup_vs_native"),
                   "wrong": row.get("wrong", None if "check" not in row
                                    else (0 if row["check"] else "yes")),
                   "note": row.get("skipped") or row.get("error") or row.get("note", "")}
            yield out


def _num(x: Any, fmt: str, width: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return f"{'-':>{width}}"
    return f"{x:>{width}{fmt}}"


def table_lines(report: dict) -> list[str]:
    """The human-readable table, one line per size and algorithm, fixed columns."""
    meta = report.get("meta", {})
    base = meta.get("baseline", "native")
    dev = meta.get("device", "cpu")
    p = meta.get("p", "?")
    where = f"{meta.get('host', '?')} ({meta.get('cpu_count', '?')} cores)"
    if meta.get("gpu"):
        where = f"{meta['gpu']}"
    ref = "native's" if dev == "cpu" else "MPI's own Alltoall (first row) or the first row's"
    out = [f"# pya2a bench: Alltoallv, p={p} ({meta.get('ranks_per_node', '?')} per node), "
           f"pattern={meta.get('pattern', 'uniform')}, device={dev}"
           + (f", api={meta['api']}" if dev == "cpu" and "api" in meta else "")
           + f"; {mpi_short(meta.get('mpi_library', ''))}; {where}"]
    if meta.get("command"):
        out.append(f"# {meta['command']}")
    out += ["# size: bytes each rank sends to each peer (mean block); count: bytes each rank "
            "sends per call (mean)",
            f"# time: {meta.get('time', _TIME)}, us",
            "# busbw: count / avg time * (p-1)/p, GB/s (as nccl-tests); "
            f"vs {base}: {base}'s avg time / this row's (> 1: faster)",
            f"# #wrong: ranks whose received bytes differ from {ref} ('-': not checked); "
            "auto->X: auto ran X"]
    for w in meta.get("warnings", []):
        out.append(f"# warning: {w}")
    vs = f"vs {base}"
    out.append(f"#{'size':>8} {'count':>8}  {'algorithm':<24}{'avg(us)':>11}{'min(us)':>11}"
               f"{'max(us)':>11}{'busbw(GB/s)':>13}{vs:>11}{'#wrong':>8}")
    for r in _rows(report):
        name = r["algorithm"] + (f"->{r['ran']}" if r["ran"] and r["ran"] != r["algorithm"]
                                 else "")
        count = fmt_size(r["count"]) if r["count"] is not None else "-"
        head = f"{fmt_size(r['size']):>9} {count:>8}  {name:<24}"
        if r["avg"] is None:
            out.append(head + (r["note"] or "not timed"))
            continue
        x = r["speedup"]
        xs = f"{x:.2f}x" if x else ("1.00x" if r["algorithm"] == base else "-")
        w = r["wrong"]
        out.append(head + _num(r["avg"], ".2f", 11) + _num(r["min"], ".2f", 11)
                   + _num(r["max"], ".2f", 11) + _num(r["busbw"], ".3f", 13) + f"{xs:>11}"
                   + f"{'-' if w is None else w!s:>8}" + (f"  {r['note']}" if r["note"] else ""))
    s = report.get("summary", {})
    if s.get("auto_geomean_speedup"):
        out.append(f"# auto vs {base}: geomean {s['auto_geomean_speedup']:.2f}x, "
                   f"worst {s['auto_min_speedup']:.2f}x over the sizes")
    if s.get("best_small_min_speedup"):
        out.append(f"# best pya2a algorithm vs {base} at <= 256 B per peer: worst "
                   f"{s['best_small_min_speedup']:.2f}x, geomean "
                   f"{s['best_small_geomean_speedup']:.2f}x")
    return out


def print_table(report: dict, file=None) -> None:
    """Print :func:`table_lines` (rank 0)."""
    file = sys.stdout if file is None else file
    for line in table_lines(report):
        print(line, file=file)


def write_csv(report: dict, path: str) -> None:
    """The table's rows as CSV (``CSV_COLUMNS``), one line per size and algorithm."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in _rows(report):
            w.writerow([r["size"], r["count"], r["algorithm"], r["ran"], r["avg"], r["min"],
                        r["max"], r["algbw"], r["busbw"], r["speedup"],
                        "" if r["wrong"] is None else r["wrong"], r["note"]])


_MARKERS = "os^vDPX*h<>p"
_TIME = "each rank's mean time per call; avg / min / max over ranks"


def write_plot(report: dict, path: str) -> bool:
    """PNG: time per call (avg, min-max band) and busbw against bytes per peer, one line per
    row, log scales with byte ticks. False when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    except ImportError:
        return False
    meta = report.get("meta", {})
    base = meta.get("baseline", "native")
    order = list(meta.get("algorithms", []))
    for pt in report.get("results", []):
        order += [k for k in pt.get("rows", {}) if k not in order]
    if meta.get("plot_rows"):  # a device report: the rows worth a line
        order = [k for k in meta["plot_rows"] if k in order]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    k = 0
    for name in order:
        pts = [(pt["bytes_per_peer"], pt["rows"][name]) for pt in report.get("results", [])
               if pt.get("rows", {}).get(name, {}).get("avg_us")]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        avg = [r["avg_us"] for _, r in pts]
        if name == base:
            style = dict(color="black", lw=2.4, marker="o", ms=4)
        else:
            style = dict(color=colours[k % len(colours)], lw=1.6,
                         marker=_MARKERS[k % len(_MARKERS)], ms=4,
                         ls="--" if name.startswith("auto") else "-")
            k += 1
        ax1.plot(xs, avg, label=name, **style)
        lo = [r.get("min_us", r["avg_us"]) for _, r in pts]
        hi = [r.get("max_us", r["avg_us"]) for _, r in pts]
        if any(a != b for a, b in zip(lo, hi, strict=True)):
            ax1.fill_between(xs, lo, hi, color=style["color"], alpha=0.12, lw=0)
        bw = [(x, r.get("busbw_GBps")) for x, r in pts if (r.get("busbw_GBps") or 0) > 0]
        if bw:  # zero on one rank: nothing crosses a link
            ax2.plot([x for x, _ in bw], [b for _, b in bw], label=name, **style)
    ticks = FuncFormatter(lambda v, _: fmt_size(v) if v >= 1 else "")
    sizes = sorted({pt["bytes_per_peer"] for pt in report.get("results", [])})
    step = max(1, math.ceil(len(sizes) / 12))  # at most about 12 labelled sizes
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sizes[::step]))
        ax.xaxis.set_major_formatter(ticks)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bytes per peer (mean block each rank sends to each rank)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("time per call (µs); band: min-max over ranks")
    if ax2.lines:
        ax2.set_yscale("log")
    ax2.set_ylabel("bus bandwidth (GB/s)")
    ax1.legend(fontsize=8, ncol=2)
    where = meta.get("gpu") or f"{meta.get('host', '?')}, {meta.get('cpu_count', '?')} cores"
    fig.suptitle(f"pya2a Alltoallv: {meta.get('p', '?')} ranks "
                 f"({meta.get('ranks_per_node', '?')} per node), "
                 f"{meta.get('pattern', 'uniform')}; {where}; "
                 f"{mpi_short(meta.get('mpi_library', ''))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
