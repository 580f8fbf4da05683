"""3D FFT in pencils: FFT along z, Alltoallw in process-grid rows, FFT along y, Alltoallw in
process-grid columns, FFT along x.

    mpiexec -n 4 python -m mpi4py examples/pfft.py
    mpiexec -n 4 python -m mpi4py examples/pfft.py --device cuda     # CuPy FFT + pya2a.Alltoallw

The complex N0 x N1 x N2 array is distributed over a P0 x P1 process grid (MPI.Compute_dims)
in z-pencils: rank (c0, c1) holds rows block c0 of axis 0 and block c1 of axis 1, all of
axis 2. Each redistribution is one ``Alltoallw`` on a sub-communicator of the Cartesian
communicator, with one subarray datatype per peer (as mpi4py-fft does): no packing code in
the application. ``pya2a.Alltoallw`` decodes the subarrays once, packs them into contiguous
runs (a kernel on device arrays: no CUDA-aware MPI needed) and moves them with its Alltoallv
algorithms. The output is in x-pencils: all of axis 0, blocks c0 of axis 1 and c1 of axis 2.

Checks: backward(forward(u)) == u on every rank, and at sizes up to 2^21 points the forward
result against numpy.fft.fftn of the gathered array on rank 0. ``--exchange mpi`` uses the
MPI library's own Alltoallw (host arrays; device arrays are copied to the host around it).

Options: --shape N0 N1 N2, --small, --grid P0 P1, --exchange {pya2a,mpi}, and the common
--algorithm NAME, --device {cpu,cuda}, --repeat K, --seed S.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from common import add_run_options, array_module, best_time, block_range, to_host
from mpi4py import MPI

import pya2a


def _subarrays(local: tuple[int, ...], axis: int, p: int) -> list[MPI.Datatype]:
    """Datatypes cutting a local array into p blocks along ``axis`` (as block_range does)."""
    out = []
    for i in range(p):
        lo, hi = block_range(local[axis], p, i)
        sub, start = list(local), [0] * len(local)
        sub[axis], start[axis] = hi - lo, lo
        out.append(MPI.C_DOUBLE_COMPLEX.Create_subarray(list(local), sub, start).Commit())
    return out


class Transpose:
    """Redistribute between an array whole along ``a`` and one whole along ``b`` on ``comm``.

    ``A`` (local shape ``shape_a``) is whole along axis ``a`` and distributed along ``b`` over
    the ranks of ``comm``; ``B`` (``shape_b``) is whole along ``b``, distributed along ``a``.
    """

    def __init__(self, comm: MPI.Intracomm, shape_a: tuple, a: int, shape_b: tuple, b: int,
                 exchange: str, algorithm: str) -> None:
        p = comm.Get_size()
        self.comm, self.exchange, self.algorithm = comm, exchange, algorithm
        self.shape_a, self.shape_b = shape_a, shape_b
        self.types_a, self.types_b = _subarrays(shape_a, a, p), _subarrays(shape_b, b, p)
        self.cd = ([1] * p, [0] * p)

    def _move(self, src, types_src, dst, types_dst) -> None:
        smsg, rmsg = [src, self.cd, types_src], [dst, self.cd, types_dst]
        if self.exchange == "pya2a":
            pya2a.Alltoallw(self.comm, smsg, rmsg, algorithm=self.algorithm)
        elif isinstance(src, np.ndarray):
            self.comm.Alltoallw(smsg, rmsg)
        else:  # device arrays through the host around the MPI's own call
            hdst = np.empty(dst.shape, dst.dtype)
            self.comm.Alltoallw([to_host(src), self.cd, types_src], [hdst, self.cd, types_dst])
            dst.set(hdst)

    def forward(self, xa, xp):
        # the subarray types describe a C-ordered array; CuPy's FFT along any axis but the
        # last returns a strided view (swapaxes of its output), which no Alltoallw takes
        xa = xp.ascontiguousarray(xa)
        xb = xp.empty(self.shape_b, dtype=xa.dtype)
        self._move(xa, self.types_a, xb, self.types_b)
        return xb

    def backward(self, xb, xp):
        xb = xp.ascontiguousarray(xb)
        xa = xp.empty(self.shape_a, dtype=xb.dtype)
        self._move(xb, self.types_b, xa, self.types_a)
        return xa

    def free(self) -> None:
        for t in (*self.types_a, *self.types_b):
            t.Free()


class PencilFFT:
    """3D complex-to-complex FFT of an N0 x N1 x N2 array on a P0 x P1 process grid."""

    def __init__(self, comm: MPI.Intracomm, shape: tuple[int, int, int], xp,
                 grid: tuple[int, int] | None = None, exchange: str = "pya2a",
                 algorithm: str = "auto") -> None:
        n0, n1, n2 = shape
        dims = list(grid) if grid else MPI.Compute_dims(comm.Get_size(), 2)
        self.cart = comm.Create_cart(dims)
        c0, c1 = self.cart.Get_coords(self.cart.Get_rank())
        self.cols = self.cart.Sub([True, False])  # the P0 ranks sharing c1
        self.rows = self.cart.Sub([False, True])  # the P1 ranks sharing c0
        b00, b10, b21 = (block_range(n0, dims[0], c0), block_range(n1, dims[1], c1),
                         block_range(n2, dims[1], c1))
        b01 = block_range(n1, dims[0], c0)
        self.xp, self.dims = xp, tuple(dims)
        self.z_slice = (slice(*b00), slice(*b10), slice(None))
        self.x_slice = (slice(None), slice(*b01), slice(*b21))
        z = (b00[1] - b00[0], b10[1] - b10[0], n2)
        y = (b00[1] - b00[0], n1, b21[1] - b21[0])
        x = (n0, b01[1] - b01[0], b21[1] - b21[0])
        self.z_shape = z
        self.zy = Transpose(self.rows, z, 2, y, 1, exchange, algorithm)
        self.yx = Transpose(self.cols, y, 1, x, 0, exchange, algorithm)

    def forward(self, u):
        xp = self.xp
        v = xp.fft.fft(u, axis=2)
        v = xp.fft.fft(self.zy.forward(v, xp), axis=1)
        return xp.fft.fft(self.yx.forward(v, xp), axis=0)

    def backward(self, uh):
        xp = self.xp
        v = xp.fft.ifft(uh, axis=0)
        v = xp.fft.ifft(self.yx.backward(v, xp), axis=1)
        return xp.fft.ifft(self.zy.backward(v, xp), axis=2)

    def free(self) -> None:
        self.zy.free()
        self.yx.free()
        for c in (self.rows, self.cols, self.cart):
            c.Free()


def main(argv: list[str] | None = None) -> int:
    """Run, check, time; 0 if correct on every rank, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--small", action="store_true", help="shape 10 x 9 x 7, for tests")
    parser.add_argument("--grid", type=int, nargs=2, default=None, metavar=("P0", "P1"))
    parser.add_argument("--exchange", choices=["pya2a", "mpi"], default="pya2a")
    add_run_options(parser, seed=2024)
    args = parser.parse_args(argv)
    shape = (10, 9, 7) if args.small else tuple(args.shape)
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    if args.grid and args.grid[0] * args.grid[1] != p:
        parser.error(f"--grid {args.grid[0]} x {args.grid[1]} is not {p} ranks")
    xp = array_module(args.device, comm)
    fft = PencilFFT(comm, shape, xp, args.grid, args.exchange, args.algorithm)

    rng = np.random.default_rng([args.seed, rank])
    u_host = rng.standard_normal(fft.z_shape) + 1j * rng.standard_normal(fft.z_shape)
    u = xp.asarray(u_host)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    def step():
        h = fft.forward(u)
        return h, fft.backward(h)

    (uh, back), best = best_time(comm, xp, args.repeat, step)
    ok = bool(np.allclose(to_host(back), u_host, rtol=1e-10, atol=1e-12))
    if np.prod(shape) <= 1 << 21:  # serial check of the forward transform on rank 0
        u_parts = comm.gather((fft.z_slice, u_host))
        uh_parts = comm.gather((fft.x_slice, to_host(uh)))
        if rank == 0:
            whole = np.zeros(shape, complex)
            for sl, part in u_parts:
                whole[sl] = part
            want = np.fft.fftn(whole)
            ok = ok and all(np.allclose(part, want[sl], rtol=1e-10, atol=1e-8 * np.sqrt(
                whole.size)) for sl, part in uh_parts)
    ok = comm.allreduce(ok, op=MPI.LAND)
    if rank == 0:
        print(f"pfft {'x'.join(map(str, shape))} p={p} grid={fft.dims[0]}x{fft.dims[1]} "
              f"device={args.device} exchange={args.exchange} algorithm={args.algorithm}: "
              f"forward + backward {best * 1e3:.3f} ms (best of {args.repeat}), "
              f"{'OK' if ok else 'WRONG'}")
    fft.free()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
