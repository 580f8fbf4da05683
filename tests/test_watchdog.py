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
