"""Throughput of the Cython block mover (pya2a._pack) against plain NumPy copies.

For each block size B, a source buffer of ``--total`` bytes is cut into blocks of B bytes
and the blocks are moved in a random order (the access pattern of an all-to-all regroup):

- ``gather``: ``_pack.gather`` packs them back to back (one call, memcpy per block);
- ``gather_in_order``: the same with the blocks in address order (no random access: what is
  left is the per-block cost);
- ``scatter``: ``_pack.scatter`` unpacks back-to-back blocks to the permuted offsets;
- ``numpy_copy``: one contiguous ``np.copyto`` of the same number of bytes (memcpy speed,
  the ceiling for any rearrangement);
- ``numpy_take``: ``np.take(src.reshape(n, B), perm, axis=0, out=...)``, the vectorised
  NumPy way to gather equal blocks (only possible when all blocks have the same size);
- ``python_loop``: a Python loop of slice assignments, one per block (what the Cython call
  replaces), run on at most 20 000 blocks and scaled.

GB/s = bytes moved / seconds (each byte counted once), best and median of ``--repeat``
interleaved rounds after a warm-up.
Usage: ``python bench/pack_throughput.py [--total MiB] [--repeat N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from pya2a.core import _pack

SIZES = [64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20]


def measure(total: int, bsize: int, repeat: int, rng: np.random.Generator) -> dict:
    """GB/s of every variant for one block size: best and median of ``repeat`` rounds.

    The variants run interleaved, one trial each per round, so a burst of load from other
    processes hits all of them alike; the best round is the least disturbed one.
    """
    n = total // bsize
    nbytes = n * bsize
    src = rng.integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    perm = rng.permutation(n).astype(np.int64)
    offs = perm * bsize
    seq = np.arange(n, dtype=np.int64) * bsize
    lens = np.full(n, bsize, dtype=np.int64)
    s2, d2 = src.reshape(n, bsize), dst.reshape(n, bsize)
    k = min(n, 20000)  # the Python loop runs on a prefix and is scaled
    ol = offs[:k].tolist()

    def loop() -> None:
        pos = 0
        for o in ol:
            dst[pos:pos + bsize] = src[o:o + bsize]
            pos += bsize

    variants = {
        "gather": (lambda: _pack.gather(src, offs, lens, dst, 0), nbytes),
        "gather_in_order": (lambda: _pack.gather(src, seq, lens, dst, 0), nbytes),
        "scatter": (lambda: _pack.scatter(src, dst, offs, lens, 0), nbytes),
        "numpy_copy": (lambda: np.copyto(dst, src), nbytes),
        "numpy_take": (lambda: np.take(s2, perm, axis=0, out=d2), nbytes),
        "python_loop": (loop, k * bsize),
    }
    _pack.gather(src, offs, lens, dst, 0)
    assert np.array_equal(dst, s2[perm].reshape(-1)), "gather moved the wrong bytes"
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn, _ in variants.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, (fn, _) in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    res: dict = {"block_bytes": bsize, "blocks": int(n), "bytes": int(nbytes)}
    for name, (_, moved) in variants.items():
        res[f"{name}_GBps"] = moved / min(times[name]) / 1e9
        res[f"{name}_median_GBps"] = moved / float(np.median(times[name])) / 1e9
    res["gather_vs_numpy_copy"] = res["gather_GBps"] / res["numpy_copy_GBps"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=64, help="MiB moved per trial (default 64)")
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "pack_throughput_local.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(20261121)
    rows = []
    for b in SIZES:
        row = measure(args.total << 20, b, args.repeat, rng)
        rows.append(row)
        print(f"{b:>8} B  gather {row['gather_GBps']:6.2f} (in order "
              f"{row['gather_in_order_GBps']:6.2f})  scatter {row['scatter_GBps']:6.2f}"
              f"  numpy copy {row['numpy_copy_GBps']:6.2f}  numpy take "
              f"{row['numpy_take_GBps']:6.2f}  python loop {row['python_loop_GBps']:6.3f} GB/s",
              flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {
        "benchmark": "pack_throughput",
        "provenance": {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(),
            "loadavg": load, "python": platform.python_version(), "numpy": np.__version__,
        },
        "total_MiB": args.total, "repeat": args.repeat, "unit": "GB/s (1e9 bytes/s)",
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
