"""python -m pya2a bench / tune / info: flags, patterns, the table, JSON, CSV, errors, running
without MPI; never timing assertions."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pya2a import select
from pya2a.tools import bench as hbench
from pya2a.tools import cli, gpu_bench, report, tune
from pya2a.tools.harness import Progress

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=e, cwd=ROOT,
                          **kw)


NO_MPI = {"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}


@pytest.mark.serial
def test_parse_size_and_sweep():
    assert [report.parse_size(s) for s in ("8", "4K", "4KiB", "1M", "2G")] == \
        [8, 4096, 4096, 1 << 20, 2 << 30]
    for bad in ("lots", "1.5", "-8"):
        with pytest.raises(ValueError):
            report.parse_size(bad)
    assert [report.fmt_size(n) for n in (8, 1024, 1536, 1 << 20, 4 << 30)] == \
        ["8", "1K", "1.5K", "1M", "4G"]
    assert hbench.sizes(8, 64, 2) == [8, 16, 32, 64]
    assert hbench.sizes(8, 100, 4) == [8, 32, 100]


@pytest.mark.serial
def test_mpi_library_names_are_short():
    assert report.mpi_short("MPICH Version:      5.0.2\nMPICH Release date: x") == "MPICH 5.0.2"
    assert report.mpi_short("Open MPI v4.1.6, package: Debian, ident: 4.1.6") == \
        "Open MPI v4.1.6"


@pytest.mark.serial
@pytest.mark.parametrize("pattern", hbench.PATTERNS)
def test_patterns_have_the_requested_mean_and_are_deterministic(pattern):
    p, m = 16, 1024
    c = hbench.counts_matrix(pattern, p, m, seed=3)
    assert c.shape == (p, p) and (c >= 0).all()
    np.testing.assert_array_equal(c, hbench.counts_matrix(pattern, p, m, seed=3))
    if pattern != "hot":
        assert abs(c.mean() - m) / m < 0.1
    if pattern in ("skew", "hot"):
        assert c[:, 0].sum() > 2 * c[:, -1].sum()  # rank 0 receives the most


def test_bench_small_sweep_reports_every_row_checked(comm):
    rep = hbench.bench(comm, begin=8, end=64, factor=8, warmup=1, iters=2, pattern="random",
                       oneshot=True, progress=False, command="test")
    assert rep["schema_version"] == report.SCHEMA_VERSION
    assert [pt["bytes_per_peer"] for pt in rep["results"]] == [8, 64]
    for pt in rep["results"]:
        assert "native" in pt["rows"] and "auto" in pt["rows"]
        assert pt["auto_choice"] in pya2a_algorithms()
        for name, row in pt["rows"].items():
            if "avg_us" in row:
                assert row["min_us"] <= row["avg_us"] * (1 + 1e-9) <= row["max_us"] * (1 + 1e-9)
                assert row["wrong"] == 0, name
    assert rep["meta"]["p"] == comm.Get_size() and rep["meta"]["pattern"] == "random"
    json.dumps(rep)
    lines = report.table_lines(rep)
    header = next(ln for ln in lines if ln.startswith("#") and "#wrong" in ln and "avg(us)" in ln)
    assert "busbw(GB/s)" in header and "vs native" in header
    auto = [ln for ln in lines if " auto->" in ln and not ln.startswith("#")]
    assert len(auto) == 2  # one per size, naming what auto ran


def test_bench_with_only_the_library_row(comm):
    """``--algorithms native``: no pya2a row to rank, the sweep still reports."""
    rep = hbench.bench(comm, begin=8, end=8, warmup=1, iters=1, algorithms=["native"],
                       progress=False, command="test", check=False)
    pt = rep["results"][0]
    assert pt["best"] is None and pt["best_speedup_vs_native"] is None
    assert set(pt["rows"]) == {"native", "auto"}
    assert "wrong" not in pt["rows"]["native"]


def test_bench_rounds_report_the_best_pass(comm):
    rep = hbench.bench(comm, size_list=[64], warmup=1, iters=2, algorithms=["direct"],
                       rounds=3, progress=False, command="test")
    assert rep["meta"]["rounds"] == 3 and rep["meta"]["sizes"] == [64]
    for row in rep["results"][0]["rows"].values():
        passes = sorted(row["passes_us"])
        assert len(passes) == 3 and row["avg_us"] == passes[0]
        assert row["wrong"] == 0


def pya2a_algorithms():
    import pya2a

    return pya2a.available_algorithms()


def _self_report(tmp_path) -> Path:
    from mpi4py import MPI

    rep = hbench.bench(MPI.COMM_SELF, begin=8, end=32, factor=4, warmup=1, iters=1,
                       progress=False, algorithms=["direct"], command="test")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    return path


@pytest.mark.serial
def test_replot_table_csv_and_plot_from_json(tmp_path, capsys):
    path = _self_report(tmp_path)
    out_csv = tmp_path / "r.csv"
    assert cli.main(["bench", "--replot", str(path), "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "bytes each rank sends to each peer" in out and "#wrong" in out
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert list(rows[0]) == report.CSV_COLUMNS
    assert {r["algorithm"] for r in rows} == {"native", "direct", "auto"}
    assert {r["size_bytes_per_peer"] for r in rows} == {"8", "32"}
    png = tmp_path / "r.png"
    rc = cli.main(["bench", "--replot", str(path), "--plot", str(png)])
    assert rc == 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in capsys.readouterr().err
    else:
        assert png.stat().st_size > 0


@pytest.mark.serial
def test_help_version_and_replot_need_no_mpi_library(tmp_path):
    path = _self_report(tmp_path)
    py = [sys.executable, "-m", "pya2a"]
    for args in ([], ["--help"], ["bench", "--help"], ["--version"],
                 ["bench", "--replot", str(path)]):
        out = _run(py + args, NO_MPI)
        assert out.returncode == 0, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert "usage:" in _run(py, NO_MPI).stdout  # no subcommand: the help
    assert _run(py + ["--version"], NO_MPI).stdout.startswith("pya2a ")
    assert "(default: 8)" in _run(py + ["bench", "--help"], NO_MPI).stdout


@pytest.mark.serial
def test_without_mpi_import_says_how_to_get_one():
    out = _run([sys.executable, "-c", "import pya2a"], NO_MPI)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and 'pip install "pya2a[mpich]"' in out.stderr
    out = _run([sys.executable, "-m", "pya2a", "info"], NO_MPI)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "pya2a[mpich]" in out.stderr


@pytest.mark.serial
@pytest.mark.parametrize("args", [["--algorithms", "foo"], ["-b", "4M", "-e", "8"],
                                  ["-f", "1"], ["--frobnicate"], ["-b", "lots"],
                                  ["--pattern", "zipf"]])
def test_bad_bench_flags_usage_on_rank_0_status_2(args):
    out = _run([sys.executable, "-m", "pya2a", "bench", *args])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage:") and lines[1].startswith("error:")


@pytest.mark.serial
def test_bad_flags_under_mpiexec_every_rank_exits_2_one_message():
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec next to this Python")
    out = _run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "pya2a", "bench",
                "--algorithms", "foo"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("usage:") == 1 and out.stderr.count("unknown algorithm") == 1


@pytest.mark.serial
def test_output_closed_early_is_not_an_error(tmp_path):
    path = _self_report(tmp_path)
    p1 = subprocess.Popen([sys.executable, "-m", "pya2a", "bench", "--replot", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert p1.stdout is not None
    p1.stdout.readline()
    p1.stdout.close()  # as `| head -1` does
    _, err = p1.communicate(timeout=120)
    assert p1.returncode == 0 and b"Traceback" not in err


@pytest.mark.serial
def test_progress_totals_follow_dropped_work_and_logs_stay_short():
    buf = io.StringIO()  # not a terminal: a few lines, not one per step
    bar = Progress(100, True, stream=buf)
    for i in range(60):
        bar.step(f"s{i}")
    bar.drop(40)  # the rest is not run
    bar.close()
    lines = buf.getvalue().splitlines()
    assert 2 <= len(lines) <= 6
    assert lines[-1].split("]")[1].split()[0] == "60/60"


@pytest.mark.serial
def test_device_rows_become_the_bench_table():
    """``bench --device cuda`` prints the host table: public names, NCCL as the baseline."""
    rows = []
    for n in (128, 1 << 20):
        rows += [{"method": "nccl", "bytes_per_pair": n, "time_us": 20.0, "avg_us": 18.0,
                  "min_us": 17.0},
                 {"method": "api:auto", "bytes_per_pair": n, "time_us": 10.0, "avg_us": 9.0,
                  "min_us": 8.0, "chose": "ipc", "wrong": 0, "checked": True},
                 {"method": "api:shm", "bytes_per_pair": n, "time_us": 0.0,
                  "error": "RuntimeError: no window"},
                 {"method": "ll_pdl_graph", "bytes_per_pair": n, "time_us": 2.5},
                 {"method": "pinned_bound", "bytes_per_pair": n, "time_us": 5.0}]
    rep = gpu_bench.to_report(rows, {"p": 4, "ranks_per_node": 4, "gpu": "GPU",
                                     "mpi_library": "MPICH Version: 5.0.2"})
    assert rep["meta"]["baseline"] == "nccl"
    pt = rep["results"][0]
    assert set(pt["rows"]) == {"nccl", "auto", "shm", "ipc.ll pdl graph", "pinned bound"}
    assert pt["rows"]["auto"]["speedup_vs_native"] == pytest.approx(2.0)
    assert pt["auto_choice"] == "ipc"
    text = "\n".join(report.table_lines(rep))
    assert "auto->ipc" in text and "error: RuntimeError" in text and "vs nccl" in text
    assert gpu_bench.label("ce_inplace_plan") == "ipc.ce_inplace plan"


def test_tune_table_round_trips_through_the_selector(comm, tmp_path_factory):
    table = tune.tune(comm, quick=True, algorithms=["native", "direct"], progress=False,
                      command="test")
    prov = table["provenance"]
    for key in ("host", "mpi_library", "p", "ranks_per_node", "date", "command"):
        assert key in prov
    assert set(table["params"]) == {"o", "ts", "tw", "tp", "tr"}
    if comm.Get_rank() == 0:
        path = tmp_path_factory.mktemp("tune") / "t.json"
        path.write_text(json.dumps(table))
        t = select.load_table(path)
        assert t["provenance"]["command"] == "test"
        if comm.Get_size() > 1:
            assert {c["algorithm"] for c in t["corrections"]} == {"native", "direct"}
        out = io.StringIO()
        tune.print_summary(table, path, file=out)
        text = out.getvalue()
        assert "1M:" in text or comm.Get_size() == 1
        assert "1048576B" not in text
        if comm.Get_size() > 1:
            assert "auto now chooses" in text


def test_info_reports_layout(comm):
    d = cli.info(comm)
    assert d["p"] == comm.Get_size() and d["ranks_per_node"] >= 1
    assert "cuda_aware_mpi" in d and "visible" in d["gpus"]
    assert d["tuning_table"]["path"]
    assert d["c_executor"] == "built for this MPI"  # make test builds pya2a for each MPI


@pytest.mark.serial
def test_c_executor_built_for_another_mpi_is_not_used_and_says_so(monkeypatch):
    """pya2a.core._exec built against another MPI library than mpi4py loaded: the mpi4py
    paths run instead, a RuntimeWarning says why and how to rebuild, and info reports it."""
    from pya2a.algorithms import _bound
    from pya2a.core import _exec

    monkeypatch.setattr(_bound, "_EXEC", [])
    monkeypatch.setattr(_exec, "library_version", lambda: "Some Other MPI 9.9\nbuild")
    with pytest.warns(RuntimeWarning, match="Some Other MPI 9.9.*rebuild it"):
        assert _bound.exec_module() is None
    assert _bound.executor_status() == "built for Some Other MPI 9.9 (mpi4py paths in use)"


@pytest.mark.serial
def test_module_entry_point_info_suggests_tune_with_the_builtin_table(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), "PYA2A_TUNING": ""}
    out = _run([sys.executable, "-m", "pya2a", "info"], env)
    assert out.returncode == 0, out.stderr
    assert "MPI:" in out.stdout and "tuning table" in out.stdout
    assert "measured on another machine" in out.stdout and "pya2a tune" in out.stdout
    out = _run([sys.executable, "-m", "pya2a", "info", "--json"], env)
    assert json.loads(out.stdout)["tuning_table"]["builtin"] is True


@pytest.mark.serial
@pytest.mark.parametrize("name", ["cpu_p16_uniform_h200x4.json", "gpu_alltoallv_h200x4.json"])
def test_replot_reads_the_cited_results(name, capsys):
    """Reports written before schema_version 2 (host) and GPU row files still print."""
    assert cli.main(["bench", "--replot", str(ROOT / "bench" / "results" / name)]) == 0
    out = capsys.readouterr().out
    assert "auto->" in out and "#wrong" in out


@pytest.mark.serial
def test_device_bench_without_cupy_says_so(tmp_path):
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is importable here: the device bench would run")
    out = _run([sys.executable, "-m", "pya2a", "bench", "--device", "cuda", "-b", "8", "-e", "8"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "CuPy is not importable" in out.stderr and "gpu-cuda13" in out.stderr
