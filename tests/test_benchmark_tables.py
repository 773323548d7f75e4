"""docs/benchmarks.md's generated tables equal what `bench/render_tables.py` renders from the JSON
files in bench/results/ (so a table cannot drift from its measurement), and the check notices a
stale table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _render_tables():
    spec = importlib.util.spec_from_file_location("render_tables", ROOT / "bench" / "render_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_page_is_rendered_from_the_results():
    render = _render_tables()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert set(render.RENDERERS) <= {m.group("name") for m in render.BLOCK.finditer(page)}
    assert render.main(["--check"]) == 0


def test_a_stale_table_is_found_and_rewritten(tmp_path):
    render = _render_tables()
    results = tmp_path / "results"
    results.mkdir()
    source = json.loads((ROOT / "bench" / "results" / "peer_serving.json").read_text())
    source["helix"]["batch1"]["decode_tok_s"] = 12345.6
    (results / "peer_serving.json").write_text(json.dumps(source))
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- table:peer_serving -->\n| old | table |\n<!-- /table:peer_serving -->\nend\n")
    args = ["--page", str(page), "--results", str(results)]
    assert render.main([*args, "--check"]) == 1
    assert render.main(args) == 0
    text = page.read_text()
    assert "12345.6" in text and "| old | table |" not in text and text.endswith("end\n")
    assert render.main([*args, "--check"]) == 0


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=False, capture_output=True, text=True)


def test_the_tables_sources_are_exactly_the_results_git_keeps():
    """.gitignore keeps bench/results/ local except each generated table's JSON, which is committed."""
    if _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("not a git checkout")
    sources = {f"bench/results/{name}.json" for name in _render_tables().RENDERERS}
    assert set(_git("ls-files", "bench/results").stdout.split()) == sources
    for path in sources:  # --no-index: the patterns themselves, not the force-added index entry
        assert _git("check-ignore", "--no-index", "-q", path).returncode == 1, f"{path} is gitignored"
    assert _git("check-ignore", "--no-index", "-q", "bench/results/other.json").returncode == 0
