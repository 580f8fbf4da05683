"""The docs stay in step with the code: docs/api.md names every public name, and the model
parameters in docs/algorithms.md are the selector's defaults."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import pya2a
import pya2a.moe
from pya2a import select

DOCS = Path(__file__).resolve().parent.parent / "docs"
pytestmark = pytest.mark.serial


def _headings() -> set[str]:
    text = (DOCS / "api.md").read_text()
    return {m.group(1) for m in re.finditer(r"^### `([\w.]+)", text, re.M)}


@pytest.mark.parametrize("module", [pya2a, pya2a.moe], ids=lambda m: m.__name__)
def test_api_page_has_a_section_per_public_name(module):
    missing = [f"{module.__name__}.{n}" for n in module.__all__
               if f"{module.__name__}.{n}" not in _headings()]
    assert not missing, f"docs/api.md lacks sections for {missing}"


@pytest.mark.parametrize("module", [pya2a, pya2a.moe], ids=lambda m: m.__name__)
def test_api_page_names_every_public_method(module):
    """Methods a public class defines itself appear in its section as `name(` or `name`."""
    text = (DOCS / "api.md").read_text()
    sections = re.split(r"^### ", text, flags=re.M)
    missing = []
    for n in module.__all__:
        obj = getattr(module, n)
        if not inspect.isclass(obj):
            continue
        sec = next((s for s in sections if s.startswith(f"`{module.__name__}.{n}")), "")
        for attr, v in vars(obj).items():
            if attr.startswith("_") or not (callable(v) or isinstance(v, property)):
                continue
            if f"`{attr}" not in sec:
                missing.append(f"{n}.{attr}")
    assert not missing, f"docs/api.md does not name {missing}"


def test_algorithms_page_model_defaults_are_the_selectors():
    text = (DOCS / "algorithms.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+\| ([0-9.e+-]+) \|$", text, re.M))
    assert set(select.DEFAULT_PARAMS) <= set(rows), rows
    for key, value in select.DEFAULT_PARAMS.items():
        assert float(rows[key]) == pytest.approx(value, rel=1e-9), key
    assert f"`select.DEFAULT_MARGIN`, {select.DEFAULT_MARGIN:g}" in text


def test_algorithms_page_constants_are_the_codes():
    from pya2a.algorithms import direct, hypercube, mesh

    text = (DOCS / "algorithms.md").read_text()
    assert f"({mesh.CALL_PY} tp, `mesh.CALL_PY`" in text
    assert f"({hypercube.STEP_PY} tp per step, `hypercube.STEP_PY`" in text
    assert f"default {direct.DEFAULT_WINDOW} like MPICH's throttle" in text


def _expand(s: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", s)
    if not m:
        return [s]
    return [x for alt in m.group(1).split(",") for x in _expand(s[:m.start()] + alt + s[m.end():])]


def test_result_files_the_docs_cite_exist():
    """Every result file named in README.md or docs/ (`name.json`, `cpu_p*_*_h200x4.json`,
    `bench/results/...`) is in bench/results/."""
    root = DOCS.parent
    have = {p.name for p in (root / "bench" / "results").iterdir()}
    missing = []
    for doc in [root / "README.md", *sorted(DOCS.glob("*.md"))]:
        for m in re.finditer(r"`([^`\s]*?\.(?:json|png|log|txt|tgz))`", doc.read_text()):
            tok = m.group(1)
            if "/" in tok and not tok.startswith("bench/results/"):
                continue  # a path elsewhere (the tuning cache, ...)
            base = tok.rsplit("/", 1)[-1]
            if base.startswith("."):
                continue  # "`.png`": the same name with another extension
            for name in _expand(base):
                pat = re.escape(name).replace(r"\*", ".*")
                if not any(re.fullmatch(pat, h) for h in have):
                    missing.append(f"{doc.name}: {tok}")
    assert not missing, missing
