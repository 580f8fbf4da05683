"""Sample sort: local sort, sample, splitters, all-to-all of buckets, merge.

    mpiexec -n 4 python -m mpi4py examples/sample_sort.py

Each rank holds a block of N int64 keys (uneven when p does not divide N). It sorts them,
picks regularly spaced samples, and all ranks agree on p - 1 splitters from the gathered
samples. Bucket s (keys between splitters s-1 and s) goes to rank s: bucket sizes differ
from rank to rank, so this is an Alltoallv with variable counts; pya2a.alltoallv
exchanges the counts itself and returns the received keys. Each rank then merges its p
sorted runs. Rank 0 regenerates every input from the shared seed and compares the
gathered result with numpy.sort.

--dist skewed draws keys from a Zipf law (many duplicates, one hot key) and --dist
exponential from a lopsided range: the sort stays correct, the buckets get uneven, and the
program prints the imbalance (largest bucket / mean bucket).

Options: --n N (total keys), --small, --dist {uniform,skewed,exponential},
--oversample K, --algorithm NAME, --device {cpu,cuda}, --seed S, --repeat K.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

import numpy as np
from common import add_run_options, array_module, best_time, block_range, to_host
from mpi4py import MPI

import pya2a


def make_keys(n: int, p: int, rank: int, dist: str, seed: int) -> np.ndarray:
    """This rank's input keys (int64), reproducible on any rank from (seed, rank)."""
    lo, hi = block_range(n, p, rank)
    rng = np.random.default_rng([seed, rank])
    if dist == "skewed":
        return rng.zipf(1.5, size=hi - lo).astype(np.int64)
    if dist == "exponential":
        return (rng.exponential(1e6, size=hi - lo) ** 2).astype(np.int64)
    return rng.integers(-(2**62), 2**62, size=hi - lo, dtype=np.int64)


def sample_sort(comm: MPI.Intracomm, keys, oversample: int, algorithm: str, xp: ModuleType):
    """Globally sort keys; returns this rank's slice of the sorted sequence and the recvcounts."""
    p = comm.Get_size()
    local = xp.sort(keys)
    # Regular samples of the sorted local keys; every rank computes the same splitters.
    k = min(len(local), oversample * p)
    picks = local[(xp.arange(k) * len(local)) // max(k, 1)]
    samples = np.sort(np.concatenate(comm.allgather(to_host(picks))))
    if len(samples):
        splitters = samples[(np.arange(1, p) * len(samples)) // p]
    else:
        splitters = np.zeros(p - 1, dtype=np.int64)
    # Bucket s holds keys in (splitters[s-1], splitters[s]]: counts from the bucket edges.
    edges = xp.searchsorted(local, xp.asarray(splitters), side="right")
    bounds = np.concatenate([[0], to_host(edges), [len(local)]])
    sendcounts = np.diff(bounds)
    received, recvcounts = pya2a.alltoallv(comm, local, sendcounts, algorithm=algorithm)
    # Merge p sorted runs: a stable sort (timsort / radix for ints) exploits the runs.
    return xp.sort(received, kind="stable"), recvcounts


def main(argv: list[str] | None = None) -> int:
    """Run the sample sort, check it, print timing; 0 if correct on every rank, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_000_000, help="total number of keys")
    parser.add_argument("--small", action="store_true", help="n = 1001, for tests")
    parser.add_argument("--dist", choices=["uniform", "skewed", "exponential"], default="uniform")
    parser.add_argument("--oversample", type=int, default=16, help="samples per rank per bucket")
    add_run_options(parser, seed=2024)
    args = parser.parse_args(argv)
    n = 1001 if args.small else args.n
    if n < 0 or args.oversample < 1 or args.repeat < 1:
        parser.error("--n must be >= 0, --oversample and --repeat >= 1")

    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    xp = array_module(args.device, comm)
    keys = xp.asarray(make_keys(n, p, rank, args.dist, args.seed))

    (result, recvcounts), elapsed = best_time(comm, xp, args.repeat, sample_sort, comm, keys,
                                              args.oversample, args.algorithm, xp)

    # Serial check on rank 0: regenerate all inputs from the seed, compare with numpy.sort.
    parts = comm.gather(to_host(result))
    ok = True
    if rank == 0:
        inputs = [make_keys(n, p, r, args.dist, args.seed) for r in range(p)]
        expected = np.sort(np.concatenate(inputs))
        ok = bool(np.array_equal(np.concatenate(parts), expected))
    ok = comm.allreduce(ok, op=MPI.LAND)

    sizes = comm.gather(int(np.sum(recvcounts)))
    if rank == 0:
        imbalance = max(sizes) / (n / p) if n else 1.0
        print(
            f"sample_sort n={n} p={p} dist={args.dist} algorithm={args.algorithm} "
            f"device={args.device}: {elapsed * 1e3:.3f} ms (best of {args.repeat}), "
            f"{n / elapsed / 1e6 if elapsed else 0.0:.2f} Mkeys/s, "
            f"bucket imbalance {imbalance:.2f}, {'OK' if ok else 'WRONG'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
