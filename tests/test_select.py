"""The selector: deterministic, same answer on every rank, tuning tables read with provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pya2a
from pya2a import algorithms, select


def _stats(m: float, p: int = 64, **kw) -> select.Stats:
    base = dict(p=p, max_block=int(m), mean_block=float(m), device=False, contiguous=True,
                max_rank=int(m * p), ranks_per_node=p)
    base.update(kw)
    return select.Stats(**base)


def _table(corrections=(), **kw) -> dict:
    raw = {"params": dict(select.DEFAULT_PARAMS), "corrections": list(corrections)}
    raw.update(kw)
    return select._normalize(raw)


@pytest.mark.serial
def test_choose_is_a_pure_function_of_its_inputs():
    cands = algorithms.available(64)
    for m in (8, 256, 4096, 1 << 20):
        st = _stats(m)
        assert len({select.choose(st, list(cands)) for _ in range(5)}) == 1


@pytest.mark.serial
def test_noncontiguous_or_single_rank_picks_native():
    cands = algorithms.available(64)
    assert select.choose(_stats(8, contiguous=False), cands) == "native"
    assert select.choose(_stats(8, p=1), algorithms.available(1)) == "native"


@pytest.mark.serial
def test_measured_correction_reproduces_measurement_at_tuned_p():
    m = [8.0, 1024.0, 1 << 20]
    cost = algorithms.get("direct").cost
    params = dict(select.DEFAULT_PARAMS)
    want = [10e-6, 20e-6, 2e-3]
    ratio = [w / cost(64, x, params) for w, x in zip(want, m, strict=True)]
    t = _table([{"algorithm": "direct", "p": 64, "m": m, "ratio": ratio}])
    for x, w in zip(m, want, strict=True):
        assert select.predict("direct", _stats(x), t) == pytest.approx(w)


@pytest.mark.serial
def test_margin_keeps_native_unless_clearly_faster():
    m = [8.0, 1 << 20]
    params = dict(select.DEFAULT_PARAMS)

    def corr(name, times):
        cost = algorithms.get(name).cost
        return {"algorithm": name, "p": 64, "m": m,
                "ratio": [t / cost(64, x, params) for t, x in zip(times, m, strict=True)]}

    # direct 5 % faster than native: inside the 10 % margin, native stays
    t = _table([corr("native", [100e-6, 1e-2]), corr("direct", [95e-6, 0.5e-2])])
    assert select.choose(_stats(8), ["native", "direct"], t) == "native"
    assert select.choose(_stats(1 << 20), ["native", "direct"], t) == "direct"


@pytest.mark.serial
def test_busiest_rank_sets_the_size_models_see():
    st = select.Stats(p=4, max_block=100, mean_block=10.0, device=False, contiguous=True,
                      max_rank=400)
    assert st.m_eff == 100.0
    assert st.imbalance == pytest.approx(10.0)


@pytest.mark.serial
def test_from_records_uses_send_and_receive_totals():
    rows = np.array([[0, 1, 30, 60, 0, 1, 10], [0, 1, 5, 10, 0, 1, 60]], dtype=np.int64)
    st = select.Stats.from_records(rows, 2, False, 2)
    assert st.max_block == 30 and st.max_rank == 60 and st.mean_block == 70 / 4


@pytest.mark.serial
def test_table_file_env_and_provenance(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"provenance": {"host": "h", "command": "tune"},
                                "params": {"ts": 2e-6}, "margin": 0.2, "corrections": []}))
    monkeypatch.setenv("PYA2A_TUNING", str(path))
    assert select.table_path() == path
    t = select.load_table()
    assert t["params"]["ts"] == 2e-6 and t["margin"] == 0.2
    assert t["provenance"]["path"] == str(path) and t["provenance"]["host"] == "h"


def test_measurements_of_explicit_only_algorithms_are_ignored(tmp_path, monkeypatch):
    # hierarchical costs inf (auto never picks it): a measured entry for it has no finite
    # correction and must not break loading (log of a zero ratio)
    path = tmp_path / "t.json"
    entry = {"p": 16, "ranks_per_node": 16, "device": False, "m": [8, 64],
             "measured_us": [90.0, 70.0]}
    path.write_text(json.dumps({"corrections": [dict(entry, algorithm="hierarchical"),
                                                dict(entry, algorithm="direct")]}))
    monkeypatch.setenv("PYA2A_TUNING", str(path))
    t = select.load_table()
    assert [c["algorithm"] for c in t["corrections"]] == ["direct"]
    st = select.Stats(p=16, max_block=32, mean_block=32.0, device=False, contiguous=True)
    assert select.choose(st, algorithms.available(16), t) in algorithms.available(16)


@pytest.mark.serial
def test_broken_or_missing_table_falls_back_to_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("PYA2A_TUNING", str(tmp_path / "missing.json"))
    assert select.load_table()["provenance"]["path"] is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("PYA2A_TUNING", str(bad))
    t = select.load_table()
    assert "error" in t["provenance"] and t["params"] == select.DEFAULT_PARAMS
    with pytest.raises(FileNotFoundError):
        select.load_table(tmp_path / "nope.json")


@pytest.mark.serial
def test_xdg_cache_default(monkeypatch, tmp_path):
    monkeypatch.delenv("PYA2A_TUNING", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert select.table_path() == tmp_path / "pya2a" / "tuning.json"


def test_rank_dependent_counts_pick_the_same_algorithm(comm):
    """Counts differ per rank (even zero on some); every rank must choose the same name."""
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(1234)
    for scale in (1, 100, 10000, 1 << 18):
        # row j (what rank j sends) grows with j: every rank's counts differ
        c = rng.integers(0, 2 * scale + 1, size=(p, p)) * (np.arange(p)[:, None] + 1)
        c = np.asarray(c, dtype=np.int64)
        e = pya2a.explain(comm, c[r], c[:, r], "B")
        names = comm.allgather(e.choice)
        assert len(set(names)) == 1, names
        assert comm.allgather(e.stats) == [e.stats] * p


def test_algorithm_override_and_env(comm, monkeypatch):
    p = comm.Get_size()
    e = pya2a.explain(comm, [4] * p, [4] * p, "B", algorithm="pairwise")
    assert e.choice == "pairwise" and e.override == "algorithm="
    monkeypatch.setenv("PYA2A_ALGORITHM", "direct")
    e = pya2a.explain(comm, [4] * p, [4] * p, "B")
    assert e.choice == "direct" and e.override == "PYA2A_ALGORITHM"
    assert "direct" in str(e)
