"""Prompt-pair files: the three field-name schemes, clear errors with file and line, shipped pair sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from varejax.data.pairs import PairFileError, PromptPair, pool_pairs, read_pairs, write_pairs
from varejax.data.templates import RECIPES, generate_pairs

PAIRS_DIR = Path(__file__).resolve().parents[1] / "configs" / "pairs"


def test_jsonl_with_all_schemes(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"original_prompt": "a church", "modified_prompt": "a house"},
            {"unsafe_prompt": "x nude", "safe_prompt": "x dressed", "concept": "nudity"},
            {"target": "t", "anchor": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = read_pairs(path, concept="misc")
    assert [(p.target, p.anchor, p.concept) for p in pairs] == [
        ("a church", "a house", "misc"), ("x nude", "x dressed", "nudity"), ("t", "a", "misc")]
    assert pairs[1].source == f"{path}:2"


def test_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('original_prompt,modified_prompt\n"a church, at dusk",a house\nb,c\n')
    assert [(p.target, p.anchor) for p in read_pairs(path)] == [("a church, at dusk", "a house"), ("b", "c")]


@pytest.mark.parametrize("content, message", [
    ('{"original_prompt": "a"}\n', ":1: missing field 'modified_prompt'"),
    ('{"target": "a", "anchor": "b"}\n{"target": " ", "anchor": "b"}\n', ":2: field 'target' is empty"),
    ('{"target": "a", "anchor": "b"}\nnot json\n', ":2: invalid JSON"),
    ('{"prompt": "a"}\n', ":1: no prompt fields"),
    ('{"target": 3, "anchor": "b"}\n', "must be a string"),
    ('', "no prompt pairs"),
])
def test_bad_jsonl_rows(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PairFileError, match=message):
        read_pairs(path)


def test_bad_encoding_and_types(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"target": "a", "anchor": "b"}\n{"target": "\xff", "anchor": "b"}\n')
    with pytest.raises(PairFileError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_pairs(path)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("target,anchor\na,b,c\n")
    with pytest.raises(PairFileError, match=r"bad.csv:2: more values"):
        read_pairs(csv_path)
    with pytest.raises(PairFileError, match="unknown pair file type"):
        (tmp_path / "x.txt").write_text("a")
        read_pairs(tmp_path / "x.txt")


@pytest.mark.parametrize("name", ["nudity", "church", "van_gogh"])
def test_shipped_pair_files(name):
    pairs = read_pairs(PAIRS_DIR / f"{name}.jsonl")
    assert 45 <= len(pairs) <= 60
    assert len({p.target for p in pairs}) == len(pairs)
    assert all(p.target != p.anchor for p in pairs)
    # The shipped files are exactly what the generator writes (reproducible).
    assert [(p.target, p.anchor) for p in pairs] == [(p.target, p.anchor) for p in
                                                     generate_pairs(RECIPES[name], n=len(pairs), seed=0)]


def test_generator_and_pooling(tmp_path):
    church = generate_pairs(RECIPES["church"], n=10, seed=1)
    assert generate_pairs(RECIPES["church"], n=10, seed=1) == church
    assert generate_pairs(RECIPES["church"], n=10, seed=2) != church
    write_pairs(church, tmp_path / "c.jsonl")
    assert [p.target for p in read_pairs(tmp_path / "c.jsonl")] == [p.target for p in church]
    pooled = pool_pairs([church[:2], [PromptPair("n", "m", "x")]])
    assert [p.target for p in pooled] == [church[0].target, "n", church[1].target, "n"]
