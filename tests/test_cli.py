"""python -m pya2a bench / tune / info: flags, patterns, JSON; never timing assertions."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from pya2a import select
from pya2a.tools import cli, tune


@pytest.mark.serial
def test_parse_size_and_sweep():
    assert [cli.parse_size(s) for s in ("8", "4K", "4KiB", "1M", "2G")] == \
        [8, 4096, 4096, 1 << 20, 2 << 30]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size("lots")
    assert cli.sizes(8, 64, 2) == [8, 16, 32, 64]
    assert cli.sizes(8, 100, 4) == [8, 32, 100]


@pytest.mark.serial
@pytest.mark.parametrize("pattern", cli.PATTERNS)
def test_patterns_have_the_requested_mean_and_are_deterministic(pattern):
    p, m = 16, 1024
    c = cli.counts_matrix(pattern, p, m, seed=3)
    assert c.shape == (p, p) and (c >= 0).all()
    np.testing.assert_array_equal(c, cli.counts_matrix(pattern, p, m, seed=3))
    if pattern != "hot":
        assert abs(c.mean() - m) / m < 0.1
    if pattern in ("skew", "hot"):
        assert c[:, 0].sum() > 2 * c[:, -1].sum()  # rank 0 receives the most


def test_bench_small_sweep_reports_every_row(comm):
    rep = cli.bench(comm, begin=8, end=64, factor=8, warmup=1, iters=2, pattern="random",
                    check=True, oneshot=True, progress=False, command="test")
    assert [pt["bytes_per_peer"] for pt in rep["results"]] == [8, 64]
    for pt in rep["results"]:
        assert "native" in pt["rows"] and "auto" in pt["rows"]
        assert pt["auto_choice"] in pya2a_algorithms()
        for name, row in pt["rows"].items():
            if "avg_us" in row:
                assert row["min_us"] <= row["avg_us"] * (1 + 1e-9) <= row["max_us"] * (1 + 1e-9)
                assert row.get("check", True), name
    assert rep["meta"]["p"] == comm.Get_size() and rep["meta"]["pattern"] == "random"
    json.dumps(rep)


def test_bench_with_only_the_library_row(comm):
    """``--algorithms native``: no pya2a row to rank, the sweep still reports (was a crash)."""
    rep = cli.bench(comm, begin=8, end=8, warmup=1, iters=1, algorithms=["native"],
                    progress=False, command="test")
    pt = rep["results"][0]
    assert pt["best"] is None and pt["best_speedup_vs_native"] is None
    assert set(pt["rows"]) == {"native", "auto"}


def test_bench_rounds_report_the_best_pass(comm):
    rep = cli.bench(comm, begin=64, end=64, warmup=1, iters=2, algorithms=["direct"], rounds=3,
                    check=True, progress=False, command="test")
    assert rep["meta"]["rounds"] == 3
    for row in rep["results"][0]["rows"].values():
        passes = sorted(row["passes_us"])
        assert len(passes) == 3 and row["avg_us"] == passes[0]
        assert row.get("check", True)


def pya2a_algorithms():
    import pya2a

    return pya2a.available_algorithms()


@pytest.mark.serial
def test_replot_and_table_from_json(tmp_path, capsys):
    from mpi4py import MPI

    rep = cli.bench(MPI.COMM_SELF, begin=8, end=32, factor=4, warmup=1, iters=1,
                    progress=False, algorithms=["direct"])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    assert cli.main(["bench", "--replot", str(path)]) == 0
    assert "bytes/peer" in capsys.readouterr().out
    png = tmp_path / "r.png"
    rc = cli.main(["bench", "--replot", str(path), "--plot", str(png)])
    assert rc == (0 if png.exists() else 1)


@pytest.mark.serial
def test_device_without_allocator_says_where_gpu_benchmarks_are():
    from mpi4py import MPI

    with pytest.raises(SystemExit, match="pya2a.tools.gpu_bench"):
        cli.bench(MPI.COMM_SELF, begin=8, end=8, device="tpu", progress=False)


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


def test_info_reports_layout(comm):
    d = cli.info(comm)
    assert d["p"] == comm.Get_size() and d["ranks_per_node"] >= 1
    assert "cuda_aware_mpi" in d and "visible" in d["gpus"]
    assert d["tuning_table"]["path"]


@pytest.mark.serial
def test_module_entry_point_info():
    out = subprocess.run([sys.executable, "-m", "pya2a", "info"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MPI:" in out.stdout and "tuning table" in out.stdout


@pytest.mark.serial
def test_suite_collectives_runs_the_example_or_says_why(tmp_path, capsys):
    out = tmp_path / "c.json"
    rc = cli.main(["bench", "--suite", "collectives", "-b", "64", "-e", "1K", "-n", "1",
                   "-w", "1", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())
    rc = cli.main(["bench", "--suite", "collectives", "--suite-path", str(tmp_path / "no.py")])
    assert rc == 2 and "not found" in capsys.readouterr().err
