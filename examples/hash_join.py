"""Distributed equi-join of two tables: hash keys to ranks with an all-to-all, join locally.

    mpiexec -n 4 python -m mpi4py examples/hash_join.py

Tables R(key, rid) and S(key, sid) are spread over the ranks by row blocks (uneven when p
does not divide the row count); rid and sid are global row ids, so every output row
(key, rid, sid) names exactly one matching pair. Each rank sends every row to the rank
its key hashes to (rows grouped by destination; pya2a.alltoallv moves whole rows, counts
along axis 0, and exchanges the counts itself), so equal keys of R and S meet on one
rank, which joins them locally with sort + searchsorted. Rank 0 rebuilds both tables from
the shared seed, joins them serially with a plain dict, and compares the row sets.

--skew draws the keys of R from a Zipf law: one hot key sends many rows to one rank,
the uneven case that Alltoallv exists for.

Options: --rows NR NS, --small, --keys K, --skew, --algorithm NAME, --device {cpu,cuda},
--seed S, --repeat K.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from types import ModuleType

import numpy as np
from common import add_run_options, array_module, block_range, device_sync, to_host
from mpi4py import MPI

import pya2a


def make_table(nrows: int, nkeys: int, skew: bool, p: int, rank: int, seed: int, which: int):
    """This rank's rows of table `which` (0 = R, 1 = S): int64 array (m, 2) of (key, row id)."""
    lo, hi = block_range(nrows, p, rank)
    rng = np.random.default_rng([seed, which, rank])
    if skew:
        keys = (rng.zipf(1.3, size=hi - lo) - 1) % nkeys
    else:
        keys = rng.integers(0, nkeys, size=hi - lo)
    return np.column_stack([keys.astype(np.int64), np.arange(lo, hi, dtype=np.int64)])


def owner(keys, p: int, xp: ModuleType):
    """Rank that owns each key: Fibonacci hashing (multiply, keep high bits), then mod p."""
    h = keys.astype(xp.uint64) * xp.uint64(0x9E3779B97F4A7C15)
    return ((h >> xp.uint64(32)) % xp.uint64(p)).astype(xp.int64)


def shuffle(comm: MPI.Intracomm, rows, algorithm: str, xp: ModuleType):
    """Send each (key, id) row to the rank owning its key; returns the rows received here."""
    p = comm.Get_size()
    dest = owner(rows[:, 0], p, xp)
    order = xp.argsort(dest, kind="stable")
    sendcounts = to_host(xp.bincount(dest, minlength=p))
    received, _ = pya2a.alltoallv(comm, rows[order], sendcounts, algorithm=algorithm)
    return received


def local_join(r, s, xp: ModuleType):
    """Equi-join on column 0: rows (key, rid, sid) for every r-row and s-row with equal keys."""
    s = s[xp.argsort(s[:, 0], kind="stable")]
    first = xp.searchsorted(s[:, 0], r[:, 0], side="left")
    count = xp.searchsorted(s[:, 0], r[:, 0], side="right") - first
    # Output rows come in runs, one per r-row; output row t belongs to the r-row whose run
    # contains t and pairs it with the s-row at the same offset into that key's s-run.
    ends = xp.cumsum(count)
    t = xp.arange(int(ends[-1]) if len(ends) else 0)
    ri = xp.searchsorted(ends, t, side="right")
    si = first[ri] + t - (ends[ri] - count[ri])
    return xp.column_stack([r[ri, 0], r[ri, 1], s[si, 1]])


def serial_join(r: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The oracle: textbook build-and-probe hash join with a dict (no shared code)."""
    table: dict[int, list[int]] = defaultdict(list)
    for key, sid in s.tolist():
        table[key].append(sid)
    out = [(key, rid, sid) for key, rid in r.tolist() for sid in table.get(key, ())]
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def sorted_rows(a: np.ndarray) -> np.ndarray:
    """Rows of a (m, 3) array in lexicographic order, for comparing row sets."""
    return a[np.lexsort(a.T[::-1])]


def main(argv: list[str] | None = None) -> int:
    """Run the join, check it, print timing; 0 if correct on every rank, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs=2,
        default=[400_000, 200_000],
        metavar=("NR", "NS"),
        help="rows of R and S",
    )
    parser.add_argument("--small", action="store_true", help="rows 503 x 301, for tests")
    parser.add_argument("--keys", type=int, default=0, help="key range (default NS / 2)")
    parser.add_argument("--skew", action="store_true", help="Zipf-distributed keys in R")
    add_run_options(parser, seed=2024)
    args = parser.parse_args(argv)
    nr, ns = (503, 301) if args.small else args.rows
    nkeys = args.keys or max(1, ns // 2)
    if nr < 0 or ns < 0 or nkeys < 1 or args.repeat < 1:
        parser.error("--rows must be >= 0, --keys and --repeat >= 1")

    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    xp = array_module(args.device, comm)

    def tables(rk: int) -> tuple[np.ndarray, np.ndarray]:
        return (
            make_table(nr, nkeys, args.skew, p, rk, args.seed, 0),
            make_table(ns, nkeys, False, p, rk, args.seed, 1),
        )

    r_rows, s_rows = (xp.asarray(t) for t in tables(rank))

    t_shuffle = t_join = float("inf")
    for _ in range(args.repeat):  # best of --repeat: the first run also compiles GPU kernels
        comm.Barrier()
        t0 = MPI.Wtime()
        r_mine = shuffle(comm, r_rows, args.algorithm, xp)
        s_mine = shuffle(comm, s_rows, args.algorithm, xp)
        device_sync(xp)
        t1 = MPI.Wtime()
        joined = local_join(r_mine, s_mine, xp)
        device_sync(xp)
        t_join = min(t_join, comm.allreduce(MPI.Wtime() - t1, op=MPI.MAX))
        t_shuffle = min(t_shuffle, comm.allreduce(t1 - t0, op=MPI.MAX))

    # Every received key must be ours; then rank 0 compares with the serial join.
    ok = bool(xp.all(owner(joined[:, 0], p, xp) == rank))
    parts = comm.gather(to_host(joined))
    received = comm.gather(len(r_mine) + len(s_mine))
    if rank == 0:
        r_all, s_all = (np.concatenate(t) for t in zip(*map(tables, range(p)), strict=True))
        expected = sorted_rows(serial_join(r_all, s_all))
        ok = ok and bool(np.array_equal(sorted_rows(np.concatenate(parts)), expected))
    ok = comm.allreduce(ok, op=MPI.LAND)

    if rank == 0:
        imbalance = max(received) / ((nr + ns) / p) if nr + ns else 1.0
        print(
            f"hash_join R={nr} S={ns} keys={nkeys} skew={args.skew} p={p} "
            f"algorithm={args.algorithm} device={args.device}: shuffle {t_shuffle * 1e3:.3f} ms, "
            f"local join {t_join * 1e3:.3f} ms (best of {args.repeat}), "
            f"{sum(len(x) for x in parts)} rows out, "
            f"row imbalance {imbalance:.2f}, {'OK' if ok else 'WRONG'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
