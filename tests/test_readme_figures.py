"""README.md's measured figures are rendered from the files the code writes (benchmarks/readme_figures.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.fixtures import REPO

_spec = importlib.util.spec_from_file_location("readme_figures", REPO / "benchmarks" / "readme_figures.py")
readme_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_figures)


def test_readme_figures_match_their_source_files():
    text = readme_figures.README.read_text()
    assert readme_figures.render(text) == text, (
        "README.md figures differ from benchmarks/results/*.json or world.json: "
        "run `python benchmarks/readme_figures.py`")


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.stem)
def test_result_files_name_the_command_that_wrote_them(path):
    data = json.loads(path.read_text())
    assert data.get("command", "").split()[:1] in (["varejax"], ["python"]), f"{path}: no command recorded"


def test_a_changed_source_number_changes_the_readme(tmp_path, monkeypatch):
    """The check is not vacuous: editing one number in a source file makes the rendered README differ."""
    results = tmp_path / "results"
    results.mkdir()
    for path in (REPO / "benchmarks" / "results").glob("*.json"):
        (results / path.name).write_text(path.read_text())
    data = json.loads((results / "toy_circle.json").read_text())
    data["erasure_rate_seen_after"] = 1.0 - data["erasure_rate_seen_after"] + 0.001
    (results / "toy_circle.json").write_text(json.dumps(data))
    monkeypatch.setattr(readme_figures, "RESULTS", results)
    text = readme_figures.README.read_text()
    assert readme_figures.render(text) != text


def test_a_missing_block_is_an_error():
    text = readme_figures.README.read_text()
    stripped = readme_figures.BLOCK.sub("", text, count=1)
    with pytest.raises(KeyError, match="lacks the figure blocks"):
        readme_figures.render(stripped)
