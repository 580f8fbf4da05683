"""Pure schedules of the store-and-forward algorithms, simulated for p = 1..64 without MPI.

A simulation runs every rank's schedule in lock step: at each step all ranks send from what
they hold, then receive. It checks that sender and receiver agree on every message (peer and
block order), that nobody sends a block it does not hold, that every (source, destination)
block reaches its destination exactly once and ends nowhere else, and the textbook step
counts: ring p-1, mesh (r-1)+(c-1), hypercube ceil(log2 p).

Then the algorithms' ``run()`` itself, every rank in its own thread on a simulated network
(eager mailboxes per (source, destination, tag), a barrier for the counts Alltoall), for
p = 1..40 and larger primes and non-squares up to 64: self-describing data, variable counts
with empty and large blocks, every mesh grid for a few p. This covers what the oversubscribed
MPI runs (p <= 16) cannot.
"""

from __future__ import annotations

import collections
import math
import queue
import threading

import numpy as np
import pytest

from pya2a.algorithms import Context, _forward, direct, hypercube, mesh, ring
from pya2a.algorithms import get as get_algorithm
from pya2a.core.spec import parse_vector
from pya2a.core.transport import HostTransport

pytestmark = pytest.mark.serial

PS = list(range(1, 65))


def simulate(p: int, steps: list[list]) -> None:
    """Walk all ranks' schedules in lock step and check delivery (see module docstring)."""
    n = len(steps[0])
    assert all(len(s) == n for s in steps), "every rank has the same number of steps"
    held = np.zeros((p, p * p), dtype=bool)
    for r in range(p):
        held[r, r * p + np.arange(p)] = True
    arrivals = np.zeros(p * p, dtype=np.int64)
    for k in range(n):
        moves = []
        for r in range(p):
            st = steps[r][k]
            peer = steps[st.dst][k]
            assert peer.src == r, f"p={p} step {k}: {r} sends to {st.dst}, which expects " \
                                  f"{peer.src}"
            assert np.array_equal(st.send, peer.recv), f"p={p} step {k}: {r} -> {st.dst}"
            assert st.dst != r and st.src != r, "no messages to self"
            moves.append((r, st.dst, st.send[:, 0] * p + st.send[:, 1]))
        rs = np.concatenate([np.full(ids.size, r) for r, _, ids in moves])
        ds = np.concatenate([np.full(ids.size, d) for _, d, ids in moves])
        ids = np.concatenate([ids for _, _, ids in moves])
        # a block at most once per message and per step: each block is in one place
        assert np.unique(ids).size == ids.size, f"p={p} step {k}: a block sent twice"
        assert held[rs, ids].all(), f"p={p} step {k}: a rank sends blocks it lacks"
        assert (ids % p != rs).all(), "a rank forwards a block addressed to itself"
        held[rs, ids] = False
        assert not held[ds, ids].any(), "a block arrives where a copy already is"
        held[ds, ids] = True
        arrivals[ids[(ids % p) == ds]] += 1
    for r in range(p):
        want = np.zeros(p * p, dtype=bool)
        want[np.arange(p) * p + r] = True
        np.testing.assert_array_equal(held[r], want, err_msg=f"p={p}: rank {r} final blocks")
    off_diag = np.ones((p, p), dtype=bool)
    np.fill_diagonal(off_diag, False)
    np.testing.assert_array_equal(arrivals.reshape(p, p)[off_diag], 1)
    assert arrivals.reshape(p, p).diagonal().sum() == 0


@pytest.mark.parametrize("p", PS)
def test_ring_delivers_every_block_once_in_p_minus_1_steps(p):
    steps = [ring.schedule(r, p) for r in range(p)]
    assert len(steps[0]) == p - 1
    simulate(p, steps)


@pytest.mark.parametrize("p", [2, 3, 5, 8, 13, 31, 64])
def test_ring_messages_shrink_and_forward_the_tail_verbatim(p):
    for r in range(p):
        steps = ring.schedule(r, p)
        for k, st in enumerate(steps, start=1):
            assert st.dst == (r + 1) % p and st.src == (r - 1) % p
            assert len(st.send) == len(st.recv) == p - k
            assert tuple(st.recv[0]) == ((r - k) % p, r), "first block received is own"
            if k < p - 1:
                np.testing.assert_array_equal(st.recv[1:], steps[k].send)


@pytest.mark.parametrize("p", [1, 2, 3, 6, 7, 16, 33])
def test_ring_message_lengths_are_what_each_message_carries(p):
    rng = np.random.default_rng(p)
    counts = rng.integers(0, 100, (p, p)).astype(np.int64)
    counts[rng.random((p, p)) < 0.3] = 0
    lengths = np.stack([ring.message_lengths(counts[s], s) for s in range(p)])
    for r in range(p):
        for st in ring.schedule(r, p):
            s = st.recv[0, 0]
            assert lengths[s, r] == counts[st.recv[:, 0], st.recv[:, 1]].sum()
    assert (lengths.diagonal() == 0).all()


def _divisor_grids(p: int) -> list[tuple[int, int]]:
    return [(r, p // r) for r in range(1, p + 1) if p % r == 0]


@pytest.mark.parametrize("p", list(range(1, 25)) + [30, 36, 48, 60, 64])
def test_mesh_delivers_on_every_grid_in_r_plus_c_minus_2_steps(p):
    for r, c in _divisor_grids(p):
        steps = [mesh.schedule(q, p, grid=(r, c)) for q in range(p)]
        assert len(steps[0]) == (r - 1) + (c - 1)
        simulate(p, steps)
        for st in steps[0]:
            assert len(st.send) == (r if st.phase == 1 else c)


@pytest.mark.parametrize("p", PS)
def test_mesh_default_grid_is_nearest_sqrt_and_delivers(p):
    r, c = _forward.default_grid(p)
    assert r * c == p and r <= c
    assert all(not (r < d <= math.isqrt(p)) for d, _ in _divisor_grids(p))
    if p > 3 and all(p % d for d in range(2, p)):
        assert (r, c) == (1, p), "a prime degenerates to 1 x p"
    steps = [mesh.schedule(q, p) for q in range(p)]
    assert len(steps[0]) == (r - 1) + (c - 1)
    simulate(p, steps)


def test_mesh_grid_from_option_env_and_errors(monkeypatch):
    monkeypatch.delenv("PYA2A_MESH_GRID", raising=False)
    assert _forward.grid_from(12) == (3, 4)
    assert _forward.grid_from(12, {"grid": (2, 6)}) == (2, 6)
    assert _forward.grid_from(12, {"grid": "6,2"}) == (6, 2)
    monkeypatch.setenv("PYA2A_MESH_GRID", "4,3")
    assert _forward.grid_from(12) == (4, 3)
    assert _forward.grid_from(12, {"grid": (1, 12)}) == (1, 12), "option beats env"
    assert mesh.supports(12, None, None, False) is None
    assert "r * c = p" in mesh.supports(10, None, None, False)
    with pytest.raises(ValueError, match="does not match 10 ranks"):
        _forward.grid_from(10)
    monkeypatch.setenv("PYA2A_MESH_GRID", "three,4")
    with pytest.raises(ValueError, match="PYA2A_MESH_GRID must be"):
        _forward.grid_from(12)
    monkeypatch.delenv("PYA2A_MESH_GRID")
    for bad in [(0, 12), (5, 3), (2,), "x"]:
        with pytest.raises(ValueError, match="mesh: grid"):
            _forward.grid_from(12, {"grid": bad})


@pytest.mark.parametrize("p", PS)
def test_hypercube_delivers_in_ceil_log2_p_steps(p):
    steps = [hypercube.schedule(r, p) for r in range(p)]
    assert len(steps[0]) == math.ceil(math.log2(p))
    simulate(p, steps)


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8, 12, 16, 17, 32, 63, 64])
def test_hypercube_messages_carry_the_positions_with_bit_k(p):
    hops = 0
    for k, st in enumerate(hypercube.schedule(0, p)):
        o = hypercube.order(p, k)
        assert len(st.send) == len(o) == sum(1 for j in range(p) if j >> k & 1)
        held = hypercube._last_step(o, k)
        assert (np.diff(held) >= 0).all(), "grouped by holding buffer, one gather each"
        hops += len(o)
        if p & (p - 1) == 0:
            assert st.dst == st.src == 1 << k, "power of two: partner across dimension k"
    assert hops == hypercube._moved(p)


@pytest.mark.parametrize("name", ["ring", "mesh", "hypercube"])
def test_cost_models_are_positive_and_grow_with_message_size(name):
    mod = {"ring": ring, "mesh": mesh, "hypercube": hypercube}[name]
    params = {"o": 5e-6, "ts": 2e-6, "tw": 1e-10, "tp": 3e-6, "tr": 5e-11}
    for p in [1, 2, 3, 7, 16, 64]:
        small, big = mod.cost(p, 8, params), mod.cost(p, 1 << 20, params)
        assert 0 < small <= big


def test_models_order_the_regimes():
    """Small blocks over a network with a large start-up: fewest messages wins; large blocks:
    fewest bytes wins."""
    shm = {"o": 5e-6, "ts": 1e-6, "tw": 2e-10, "tp": 1.5e-6, "tr": 1e-10}
    net = dict(shm, ts=5e-5)
    small = {n: m.cost(64, 8, net) for n, m in
             [("hypercube", hypercube), ("mesh", mesh), ("ring", ring), ("direct", direct)]}
    assert small["hypercube"] < small["mesh"] < small["direct"] < small["ring"]
    large = {n: m.cost(64, 1 << 20, shm) for n, m in
             [("hypercube", hypercube), ("mesh", mesh), ("ring", ring), ("direct", direct)]}
    assert large["direct"] < large["mesh"] < large["hypercube"] < large["ring"]
    assert mesh.cost(256, 64, shm) < direct.cost(256, 64, shm)


def test_pack_index_builders_match_numpy():
    from pya2a.core import _pack

    rng = np.random.default_rng(3)
    offset = rng.integers(0, 1000, 50).astype(np.int64)
    length = rng.integers(0, 9, 50).astype(np.int64)
    index = rng.permutation(50)[:20].astype(np.int64)
    cuts = np.array([0, 5, 5, 12, 20], dtype=np.int64)
    runs, total = _pack.take_runs(offset, length, index, cuts)
    assert total == length[index].sum() and len(runs) == 4
    for (offs, lens), a, b in zip(runs, cuts[:-1], cuts[1:], strict=True):
        np.testing.assert_array_equal(offs, offset[index[a:b]])
        np.testing.assert_array_equal(lens, length[index[a:b]])
    incoming = rng.integers(0, 7, 20).astype(np.int64)
    done = np.array([0, 3, 19], dtype=np.int64)
    home = rng.integers(0, 10**6, 50).astype(np.int64)
    so, ln, do = _pack.record_arrival(offset, length, index, incoming, done, home)
    starts = np.cumsum(incoming) - incoming
    np.testing.assert_array_equal(offset[index], starts)
    np.testing.assert_array_equal(length[index], incoming)
    np.testing.assert_array_equal(so, starts[done])
    np.testing.assert_array_equal(ln, incoming[done])
    np.testing.assert_array_equal(do, home[index[done]])
    with pytest.raises(ValueError, match="outside"):
        _pack.take_runs(offset, length, np.array([50], np.int64), np.array([0, 1], np.int64))
    with pytest.raises(ValueError, match="outside"):
        _pack.record_arrival(offset, length, index, incoming, np.array([20], np.int64), home)


# ---- run() of every rank on a simulated network (threads), p up to 64 without mpiexec ---------
class _Net:
    """Mailboxes per (source, destination, tag); eager sends; a barrier for Alltoall."""

    TIMEOUT = 20.0

    def __init__(self, p: int) -> None:
        self.p = p
        self.boxes: dict = collections.defaultdict(queue.Queue)
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(p, timeout=self.TIMEOUT)
        self.slots: list = [None] * p

    def box(self, key: tuple) -> queue.Queue:
        with self.lock:
            return self.boxes[key]


class _Req:
    def __init__(self, fn=None) -> None:
        self.fn = fn

    def Wait(self) -> None:  # noqa: N802 (mpi4py's name)
        if self.fn is not None:
            fn, self.fn = self.fn, None
            fn()


def _bytes_of(msg) -> np.ndarray:
    buf = msg[0] if isinstance(msg, list) else msg
    return np.asarray(buf).reshape(-1).view(np.uint8)


class _Comm:
    """The few internal-communicator calls the bodies make, over a :class:`_Net`."""

    def __init__(self, net: _Net, rank: int) -> None:
        self.net, self.rank = net, rank

    def Isend(self, msg, dest: int, tag: int) -> _Req:  # noqa: N802
        self.net.box((self.rank, dest, tag)).put(_bytes_of(msg).copy())
        return _Req()

    def Irecv(self, msg, source: int, tag: int) -> _Req:  # noqa: N802
        view = _bytes_of(msg)

        def land() -> None:
            data = self.net.box((source, self.rank, tag)).get(timeout=self.net.TIMEOUT)
            if data.size != view.size:
                raise RuntimeError(f"rank {self.rank}: {data.size} bytes from {source} tag {tag}"
                                   f" into a receive of {view.size}")
            view[...] = data

        return _Req(land)

    def Alltoall(self, sendbuf, recvbuf) -> None:  # noqa: N802
        # arrays of p elements (ring's counts) or [bytes, MPI.BYTE] messages (padded)
        p = self.net.p
        self.net.slots[self.rank] = _bytes_of(sendbuf).reshape(p, -1).copy()
        self.net.barrier.wait()
        _bytes_of(recvbuf).reshape(p, -1)[...] = [self.net.slots[s][self.rank]
                                                  for s in range(p)]
        self.net.barrier.wait()


class _Transport(HostTransport):
    def isend(self, buf, off, n, dest, tag):
        return self.comm.Isend([buf[off:off + n]], dest, tag)

    def irecv(self, buf, off, n, source, tag):
        return self.comm.Irecv([buf[off:off + n]], source, tag)

    def sendrecv(self, sbuf, soff, sn, dest, rbuf, roff, rn, source, tag):
        req = self.irecv(rbuf, roff, rn, source, tag)
        self.isend(sbuf, soff, sn, dest, tag)
        req.Wait()

    @staticmethod
    def waitall(reqs) -> None:
        for q in reqs:
            q.Wait()


def _named(c: np.ndarray, src: int) -> np.ndarray:
    return np.concatenate([src * 10**9 + d * 10**6 + np.arange(c[src, d], dtype=np.int64)
                           for d in range(c.shape[0])])


def simulate_run(name: str, c: np.ndarray, options: dict | None = None) -> None:
    """Every rank's ``run()`` in its own thread; checks every receive buffer."""
    p = c.shape[0]
    net, info = _Net(p), get_algorithm(name)
    errors: list = []

    def rank_main(r: int) -> None:
        try:
            out = np.full(int(c[:, r].sum()), -1, dtype=np.int64)
            send = parse_vector([_named(c, r), c[r]], p, readonly=True)
            recv = parse_vector([out, c[:, r]], p, readonly=False, what="receive message",
                                name="recv")
            comm = _Comm(net, r)
            info.run(send, recv, Context(comm=comm, rank=r, size=p, kind="alltoallv",
                                         transport=_Transport(comm), options=options or {}))
            want = np.concatenate([s * 10**9 + r * 10**6 + np.arange(c[s, r], dtype=np.int64)
                                   for s in range(p)])
            if not np.array_equal(out, want):
                bad = int(np.flatnonzero(out != want)[0])
                raise AssertionError(f"{name} p={p}: rank {r} element {bad} is {out[bad]}, "
                                     f"expected {want[bad]}")
        except BaseException as e:  # reported below; the others time out instead of hanging
            errors.append(e)
            net.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(p)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(2 * _Net.TIMEOUT)
    assert not any(th.is_alive() for th in threads), f"{name} p={p}: a rank hung"
    if errors:
        raise errors[0]


def _sim_counts(p: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([p, seed])
    c = rng.integers(0, 6, (p, p)) * (rng.random((p, p)) < 0.7)
    c[rng.integers(0, p), rng.integers(0, p)] += 300  # one big block
    return c.astype(np.int64)


SIM_PS = list(range(1, 41)) + [45, 48, 53, 61, 63, 64]


@pytest.mark.parametrize("p", SIM_PS)
@pytest.mark.parametrize("name", ["ring", "mesh", "hypercube", "padded"])
def test_run_on_a_simulated_network(name, p):
    c = _sim_counts(p, 1)
    # padded's slot size is a global value, from the agreement record in real calls
    simulate_run(name, c, {"max_block": int(c.max()) * 8} if name == "padded" else None)


@pytest.mark.parametrize("p", [6, 12, 16, 30, 36])
def test_mesh_run_on_a_simulated_network_every_grid(p):
    for grid in _divisor_grids(p):
        simulate_run("mesh", _sim_counts(p, 2), {"grid": grid})


@pytest.mark.parametrize("p", [2, 3, 8, 17])
def test_padded_in_rounds_on_a_simulated_network(monkeypatch, p):
    """Scratch above the limit: the slots move in rounds of SCRATCH_LIMIT // p bytes."""
    from pya2a.algorithms import padded

    monkeypatch.setattr(padded, "SCRATCH_LIMIT", 16 * p)
    c = _sim_counts(p, 3)
    assert padded.chunking(p, int(c.max()) * 8)[1] > 1
    simulate_run("padded", c, {"max_block": int(c.max()) * 8})
