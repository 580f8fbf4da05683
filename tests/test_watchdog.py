"""PYA2A_TIMEOUT: a job whose rank stops or fails mid-run ends, with a message, not a hang.

Serial tests: each starts its own ``mpiexec -n 3`` job in which rank 1 sleeps or raises
before its sixth exchange while the others go on. The job must end (the subprocess limit is
only a guard against a hang) with a non-zero status, and each waiting rank must say which
call it waits in and which rank has not arrived (when a rank raises, the launcher may end
the job on that rank's exit before the watchdog fires: that too ends it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.serial

MPIEXEC = Path(sys.executable).with_name("mpiexec")
GUARD_S = 120  # a hung job is killed here; the watchdog ends it after PYA2A_TIMEOUT

SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mpi4py import MPI
    import pya2a

    mode, api = sys.argv[1], sys.argv[2]
    comm = MPI.COMM_WORLD
    r, p = comm.Get_rank(), comm.Get_size()
    send, recv = np.arange(float(p)), np.zeros(p)
    pl = pya2a.plan(comm, [1] * p, [1] * p, np.float64) if api == "plan" else None
    for i in range(10):
        if i == 5 and r == 1:
            if mode == "sleep":
                time.sleep(600)
            raise RuntimeError("rank 1 fails in the middle of the run")
        if pl is not None:
            pl.run(send, recv)
        else:
            pya2a.Alltoallv(comm, send, recv)
    print("finished", r, flush=True)
""")


def _job(tmp_path: Path, mode: str, api: str, launcher: list[str], timeout: str = "3"):
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec next to the interpreter")
    script = tmp_path / "stall.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYA2A_TIMEOUT=timeout)
    return subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, *launcher, str(script),
                           mode, api], capture_output=True, text=True, env=env,
                          timeout=GUARD_S)


@pytest.mark.parametrize("api", ["oneshot", "plan"])
@pytest.mark.parametrize("mode", ["sleep", "raise"])
def test_a_stalled_or_failed_rank_ends_the_job_with_a_message(tmp_path, mode, api):
    out = _job(tmp_path, mode, api, [])
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "finished" not in out.stdout
    if mode == "raise":
        assert "rank 1 fails in the middle of the run" in text, text
        if "pya2a watchdog" not in text:  # the launcher ended the job first: also not hung
            return
    assert "pya2a watchdog" in text, text
    call = "Plan.run" if api == "plan" else "Alltoallv"
    assert f"in {call} (call " in text, text
    assert "ranks that have not arrived: 1" in text, text


# Each call pya2a watches, entered by every rank but rank 1 (which sleeps instead). A
# warm-up call first makes the communicator's state, except for "dup", where the stall is
# the first call's Dup of the communicator.
CALLS = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mpi4py import MPI
    import pya2a
    from pya2a.moe import ExpertParallel

    call = sys.argv[1]
    comm = MPI.COMM_WORLD
    r, p = comm.Get_rank(), comm.Get_size()
    send, recv = np.arange(float(p)), np.zeros(p)
    if call != "dup":
        pya2a.Alltoallv(comm, send, recv)
    ep = None
    if call in ("dispatch", "combine"):
        ep = ExpertParallel(comm, 2 * p, 4, 4, 1, np.float32)
        x = np.ones((4, 4), dtype=np.float32)
        idx = (np.arange(4) % (2 * p)).reshape(4, 1)
    if call == "combine":
        ex, _, h = ep.dispatch(x, idx)
    if call in ("bind", "buffer_error"):
        pl = pya2a.plan(comm, [1] * p, [1] * p, np.float64)
    if call == "buffer_error" and r == 1:  # fails on this rank alone, which goes on
        try:
            pl.run(send, np.zeros(1))
        except ValueError:
            time.sleep(600)
    if r == 1:
        time.sleep(600)
    if call in ("dup", "oneshot"):
        pya2a.Alltoallv(comm, send, recv)
    elif call == "plan":
        pya2a.plan(comm, [1] * p, [1] * p, np.float64)
    elif call == "bind":
        pl.bind(send, recv)
    elif call == "buffer_error":
        pl.run(send, recv)
    elif call == "array_alltoallv":
        pya2a.alltoallv(comm, send, [1] * p)
    elif call == "explain":
        pya2a.explain(comm, [1] * p)
    elif call == "expert_parallel":
        ExpertParallel(comm, 2 * p, 4, 4, 1, np.float32)
    elif call == "alltoallw":
        t = [MPI.DOUBLE] * p
        pya2a.Alltoallw(comm, [send, ([1] * p, [8 * j for j in range(p)]), t],
                        [recv, ([1] * p, [8 * j for j in range(p)]), t])
    elif call == "dispatch":
        ep.dispatch(x, idx)
    elif call == "combine":
        ep.combine(ex, np.ones((4, 1), dtype=np.float32), h)
    print("finished", r, flush=True)
""")

WATCHED = {"dup": "Alltoallv", "plan": "plan", "bind": "Plan.bind", "buffer_error": "Plan.run",
           "alltoallw": "Alltoallw", "dispatch": "ExpertParallel.dispatch",
           "combine": "ExpertParallel.combine", "array_alltoallv": "alltoallv",
           "explain": "explain", "expert_parallel": "ExpertParallel"}


@pytest.mark.parametrize("call", sorted(WATCHED))
def test_every_collective_call_is_watched(tmp_path, call):
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec next to the interpreter")
    script = tmp_path / "calls.py"
    script.write_text(CALLS)
    env = dict(os.environ, PYA2A_TIMEOUT="3")
    out = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, str(script), call],
                         capture_output=True, text=True, env=env, timeout=GUARD_S)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "finished" not in out.stdout, text
    assert f"in {WATCHED[call]} (" in text, text
    if call == "dup":
        assert "MPI_Comm_dup" in text, text
    elif call == "buffer_error":  # rank 1 arrived, failed, and said so
        assert "rank 1 failed in its call" in text and "ValueError: Plan.run" in text, text
    else:
        assert "ranks that have not arrived: 1" in text, text


def test_an_exception_under_python_m_mpi4py_ends_the_job_at_once(tmp_path):
    out = _job(tmp_path, "raise", "oneshot", ["-m", "mpi4py"], timeout="600")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "rank 1 fails in the middle of the run" in text, text
    assert "pya2a watchdog" not in text, text


def test_a_bad_timeout_setting_is_refused():
    env = dict(os.environ, PYA2A_TIMEOUT="soon")
    out = subprocess.run([sys.executable, "-c", "import pya2a"], capture_output=True,
                         text=True, env=env, timeout=GUARD_S)
    assert out.returncode != 0 and "PYA2A_TIMEOUT" in out.stderr
