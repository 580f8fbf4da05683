"""Resharding a tensor on a 2D device mesh: 1D rows -> 2D blocks -> 1D columns.

    mpiexec -n 4 python -m mpi4py examples/reshard.py

The p ranks form an r x c mesh, by default the most square one with r <= c (1 x 3, 2 x 2,
2 x 4, ...: the grid pya2a's "mesh" algorithm picks); rank q sits at (i, j) = divmod(q, c).
comm.Split gives each rank its mesh-row communicator (the c ranks (i, *)) and its
mesh-column communicator (the r ranks (*, j)): the two communicators the "mesh" all-to-all
algorithm runs its two phases on. The N x M tensor T has T[a, b] = a * M + b, so each
rank can recompute the block it should hold. Layouts, named as DTensor placements (blocks
are uneven when the sizes do not divide):

    rows     Shard(0) on all p ranks      rank (i, j) holds T[R_ij, :], R_ij = part j of R_i
    2D       [Shard(0), Shard(1)]         rank (i, j) holds T[R_i, C_j]
    columns  Shard(1) on all p ranks      rank (i, j) holds T[:, C_ji], C_ji = part i of C_j

Every step is the same move, "a panel goes from row-sharded to column-sharded over a
communicator", which is one Alltoallv (rows_to_columns below):

    1. rows -> 2D:         inside each mesh row, on panel T[R_i, :]
    2. 2D -> columns:      inside each mesh column, on panel T[:, C_j]
    3. rows -> columns:    in one step on all p ranks (1 + 2 is the mesh algorithm's
                           two-phase schedule; try --algorithm mesh)

Options: --shape N M, --small, --grid R C, --algorithm NAME, --device {cpu,cuda},
--repeat K.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from common import add_run_options, array_module, best_time, block_range, to_host
from mpi4py import MPI

import pya2a


def sub_block(block: tuple[int, int], p: int, i: int) -> tuple[int, int]:
    """Part i of p of the index range `block`."""
    lo, hi = block_range(block[1] - block[0], p, i)
    return block[0] + lo, block[0] + hi


def rows_to_columns(comm: MPI.Intracomm, local, nrows: int, col_blocks, algorithm: str, xp):
    """Reshard a panel from row-sharded to column-sharded over comm, with one all-to-all.

    Args:
        comm: the ranks sharing the panel; their row blocks, in rank order, stack into it.
        local: this rank's rows of the panel, shape (m_rank, width).
        nrows: rows of the whole panel (sum of m over the ranks of comm).
        col_blocks: col_blocks[s] = (lo, hi), panel columns rank s holds afterwards.
        algorithm: pya2a algorithm name.
        xp: array module of `local`.

    Returns:
        The panel's columns col_blocks[rank], all rows: shape (nrows, hi - lo).
    """
    sendbuf = xp.concatenate([local[:, lo:hi].ravel() for lo, hi in col_blocks])
    sendcounts = [local.shape[0] * (hi - lo) for lo, hi in col_blocks]
    recvbuf, _ = pya2a.alltoallv(comm, sendbuf, sendcounts, algorithm=algorithm)
    lo, hi = col_blocks[comm.Get_rank()]
    return recvbuf.reshape(nrows, hi - lo)  # blocks from ranks 0..k-1 stack by rows


def tensor_block(rows: tuple[int, int], cols: tuple[int, int], m: int) -> np.ndarray:
    """T[rows, cols] of the global tensor T[a, b] = a * m + b (float64)."""
    a = np.arange(*rows, dtype=np.float64)[:, None]
    return a * m + np.arange(*cols, dtype=np.float64)[None, :]


def main(argv: list[str] | None = None) -> int:
    """Run the three reshards, check each, print timing; 0 if all correct everywhere, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("N", "M"))
    parser.add_argument("--small", action="store_true", help="shape 29 x 23, for tests")
    add_run_options(parser)
    parser.add_argument("--grid", type=int, nargs=2, metavar=("R", "C"), help="mesh shape")
    args = parser.parse_args(argv)
    n, m = (29, 23) if args.small else args.shape
    if n < 0 or m < 0 or args.repeat < 1:
        parser.error("--shape needs sizes >= 0 and --repeat >= 1")

    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    c, r = args.grid[::-1] if args.grid else MPI.Compute_dims(p, 2)  # r <= c by default
    if r * c != p:
        parser.error(f"--grid {r} {c} does not match {p} ranks")
    i, j = divmod(rank, c)
    row_comm = world.Split(color=i, key=j)  # ranks (i, 0..c-1), rank j in it
    col_comm = world.Split(color=j, key=i)  # ranks (0..r-1, j), rank i in it
    xp = array_module(args.device, world)

    row_block = block_range(n, r, i)  # R_i
    col_block = block_range(m, c, j)  # C_j
    my_rows = sub_block(row_block, c, j)  # R_ij
    my_cols = sub_block(col_block, r, i)  # C_ji
    t_rows = xp.asarray(tensor_block(my_rows, (0, m), m))

    def timed(step, *step_args):
        return best_time(world, xp, args.repeat, step, *step_args)

    # 1. rows -> 2D inside the mesh row: panel T[R_i, :], rank j' ends with columns C_j'.
    row_cols = [block_range(m, c, jj) for jj in range(c)]
    t_2d, dt1 = timed(
        rows_to_columns, row_comm, t_rows, row_block[1] - row_block[0], row_cols, args.algorithm, xp
    )
    # 2. 2D -> columns inside the mesh column: panel T[:, C_j] (columns relative to C_j).
    col_cols = [block_range(col_block[1] - col_block[0], r, ii) for ii in range(r)]
    t_cols, dt2 = timed(rows_to_columns, col_comm, t_2d, n, col_cols, args.algorithm, xp)
    # 3. rows -> columns on all ranks at once: rank q' = (i', j') ends with C_j'i'.
    world_cols = [sub_block(block_range(m, c, q % c), r, q // c) for q in range(p)]
    t_cols_direct, dt3 = timed(rows_to_columns, world, t_rows, n, world_cols, args.algorithm, xp)

    ok = (
        np.array_equal(to_host(t_2d), tensor_block(row_block, col_block, m))
        and np.array_equal(to_host(t_cols), tensor_block((0, n), my_cols, m))
        and np.array_equal(to_host(t_cols_direct), tensor_block((0, n), my_cols, m))
    )
    ok = world.allreduce(bool(ok), op=MPI.LAND)

    if rank == 0:
        print(
            f"reshard {n}x{m} on a {r}x{c} mesh, algorithm={args.algorithm} device={args.device}: "
            f"rows->2D {dt1 * 1e3:.3f} ms, 2D->columns {dt2 * 1e3:.3f} ms, "
            f"rows->columns in one all-to-all {dt3 * 1e3:.3f} ms (best of {args.repeat}), "
            f"{'OK' if ok else 'WRONG'}"
        )
    row_comm.Free()
    col_comm.Free()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
