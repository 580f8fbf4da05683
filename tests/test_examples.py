"""The example programs, run under their own mpiexec at small sizes; each checks its answer.

Serial pytest only: the tests start `mpiexec -n {1,3,4}` themselves, so under an outer
mpiexec (COMM_WORLD size > 1) they skip. The child gets an environment without the outer
launcher's PMI_*/PMIX_*/MPI_*/HYDRA_*/OMPI_* variables and with the pya2a this process
imports first on PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from mpi4py import MPI

import pya2a

pytestmark = [
    pytest.mark.serial,
    pytest.mark.skipif(
        MPI.COMM_WORLD.Get_size() > 1, reason="starts its own mpiexec: serial pytest only"
    ),
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NPROCS = (1, 3, 4)
TIMEOUT = 90  # seconds per mpiexec run; they take about 1 s each

# (program, arguments): every program at its test size, plus the skewed-input variants.
CASES = [
    ("transpose.py", ["--small"]),
    ("fft2d.py", ["--small"]),
    ("sample_sort.py", ["--small"]),
    ("sample_sort.py", ["--small", "--dist", "skewed"]),
    ("hash_join.py", ["--small"]),
    ("hash_join.py", ["--small", "--skew"]),
    ("reshard.py", ["--small"]),
    ("moe.py", ["--small"]),
    ("moe_train.py", ["--small"]),
    ("demo.py", ["--small"]),
    ("pfft.py", ["--small"]),
    ("pfft.py", ["--small", "--algorithm", "pairwise"]),
]

# Loaded by the child through PYTHONPATH: after every pya2a exchange, rank 0 adds 1 to the
# first element it received, so each example must see a wrong answer and exit 1 everywhere.
CORRUPT = """
import numpy as np
from mpi4py import MPI
import pya2a

def _spoil(buf):
    if MPI.COMM_WORLD.Get_rank() == 0:
        arr = np.asarray(buf[0] if isinstance(buf, (list, tuple)) else buf)
        if arr.size:
            arr.reshape(-1)[0] += 1

def _wrap(fn, recv_index):
    def spoiled(*args, **kwargs):
        out = fn(*args, **kwargs)
        _spoil(out[0] if recv_index is None else args[recv_index])
        return out
    return spoiled

pya2a.alltoallv = _wrap(pya2a.alltoallv, None)
pya2a.Alltoallv = _wrap(pya2a.Alltoallv, 2)
pya2a.Comm.Alltoallv = _wrap(pya2a.Comm.Alltoallv, 2)
pya2a.Comm.Alltoall = _wrap(pya2a.Comm.Alltoall, 2)
pya2a.Alltoallw = _wrap(pya2a.Alltoallw, 2)
pya2a.Comm.Alltoallw = _wrap(pya2a.Comm.Alltoallw, 2)
"""


def _mpiexec() -> list[str]:
    """The launcher next to this Python (else on PATH), with flags to oversubscribe."""
    local = Path(sys.executable).with_name("mpiexec")
    exe = str(local) if local.exists() else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec next to sys.executable or on PATH")
    extra = []
    if "Open MPI" in MPI.Get_library_version():  # MPICH's hydra needs neither flag
        extra = ["--oversubscribe", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])]
    return [exe, *extra]


def _env(*prepend: str) -> dict[str, str]:
    """os.environ without launcher variables; `prepend` and pya2a's root on PYTHONPATH."""
    strip = ("PMI_", "PMIX_", "MPI_", "HYDRA_", "OMPI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(strip)}
    root = str(Path(pya2a.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([*prepend, root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(nprocs: int, program: str, args: list[str], env: dict[str, str] | None = None):
    cmd = [*_mpiexec(), "-n", str(nprocs), sys.executable, str(EXAMPLES / program), *args]
    proc = subprocess.run(
        cmd, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    return proc, f"{shlex.join(cmd)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


NEEDS_TORCH = {"moe_train.py"}


def _skip_without_torch(program: str) -> None:
    if program in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        pytest.skip(f"{program} needs torch")


@pytest.mark.parametrize("nprocs", NPROCS)
@pytest.mark.parametrize(("program", "args"), CASES, ids=[" ".join([p, *a]) for p, a in CASES])
def test_example_passes_its_own_check(program: str, args: list[str], nprocs: int) -> None:
    _skip_without_torch(program)
    proc, log = _run(nprocs, program, args)
    assert proc.returncode == 0, log
    assert "OK" in proc.stdout, log


@pytest.mark.parametrize("program", sorted({p for p, _ in CASES} | {"collectives.py"}))
def test_example_exits_1_on_every_rank_when_the_exchange_is_wrong(
    program: str, tmp_path: Path
) -> None:
    _skip_without_torch(program)
    (tmp_path / "sitecustomize.py").write_text(CORRUPT)
    args = ["--max-bytes", "1024", "--only", "Alltoall"] if program == "collectives.py" else []
    proc, log = _run(3, program, args or ["--small"], env=_env(str(tmp_path)))
    assert proc.returncode != 0, log
    assert "WRONG" in proc.stdout, log


@pytest.mark.parametrize("nprocs", NPROCS)
def test_collectives_sweep_writes_json(nprocs: int, tmp_path: Path) -> None:
    out = tmp_path / "collectives.json"
    args = ["--max-bytes", "4096", "--iters", "2", "--warmup", "1", "--json", str(out)]
    proc, log = _run(nprocs, "collectives.py", [*args, "--png", str(tmp_path / "c.png")])
    assert proc.returncode == 0, log
    report = json.loads(out.read_text())
    assert report["ok"] and report["provenance"]["nprocs"] == nprocs
    assert len(report["collectives"]) == 9
    for name, entry in report["collectives"].items():
        assert entry["results"], name
        assert all(r["bytes"] <= 4096 and r["ok"] for r in entry["results"]), name
        assert entry["stopped"]["reason"] == "max_bytes", name
    assert (tmp_path / "c.png").exists() or "matplotlib is not installed" in proc.stdout


def _load_collectives() -> ModuleType:
    """examples/collectives.py as a module (it is not part of the installed package).

    It imports ``common`` from its own directory, as it does when run as a script.
    """
    name = "pya2a_examples_collectives"
    if name not in sys.modules:
        if str(EXAMPLES) not in sys.path:
            sys.path.append(str(EXAMPLES))
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / "collectives.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_run_suite_stops_at_the_memory_budget() -> None:
    coll = _load_collectives()
    # A budget of about 1e-8 of the free memory (a few hundred bytes): every sweep stops early.
    report = coll.run_suite(MPI.COMM_SELF, mem_fraction=1e-8, warmup=0, iters=1)
    for name, entry in report["collectives"].items():
        stop = entry["stopped"]
        assert stop["reason"] == "memory", name
        assert stop["need_bytes_per_rank"] > stop["budget_bytes_per_rank"], name
        assert entry["largest_bytes"] < stop["next_bytes"], name
    json.dumps(report)  # JSON-ready


def test_run_suite_rejects_unknown_collective() -> None:
    coll = _load_collectives()
    with pytest.raises(ValueError, match="unknown collective"):
        coll.run_suite(MPI.COMM_SELF, collectives=["Allreduce", "Barrier"])
