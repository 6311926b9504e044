"""Every case of tests/edit_corpus/ gives its expected outcome (the corpus bench/edits.py measures is itself tested).

A case folder holds `before/` (the files), `reply.md` (a model reply), `case.json` (category, expect, protected,
optional editable) and, when files change, `after/` (every file as it must read afterwards). `expect` is one of
applied, already_applied, no_edits (ok, files as in after/ or unchanged) or rejected (not ok, nothing changed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.edits import DEFAULT_EDITABLE, apply_edits

CORPUS = Path(__file__).parent / "edit_corpus"
CASES = sorted(p for p in CORPUS.iterdir() if (p / "case.json").is_file())


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_corpus_is_big_and_varied_enough():
    metas = [json.loads((c / "case.json").read_text()) for c in CASES]
    assert len(CASES) >= 97
    assert {m["category"] for m in metas} >= {
        "well-formed",
        "sloppy-whitespace",
        "elision",
        "ambiguous",
        "already-applied",
        "malformed",
        "stray-divider",
        "empty-search",
        "repeated-search",
        "misnamed-file",
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(tmp_path, case):
    meta = json.loads((case / "case.json").read_text())
    root = tmp_path / "session"
    shutil.copytree(case / "before", root)
    before = tree(root)
    expected = tree(case / "after") if (case / "after").is_dir() else before
    reply = (case / "reply.md").read_bytes().decode("utf-8")
    result = apply_edits(
        root,
        reply,
        editable=tuple(meta.get("editable", DEFAULT_EDITABLE)),
        protected=tuple(meta.get("protected", ())),
    )
    assert tree(root) == expected
    if meta["expect"] == "rejected":
        assert not result.ok and result.changed == [] and "nothing was applied" in result.feedback.lower()
    else:
        assert result.ok, result.feedback
        assert sorted(result.changed) == sorted(k for k in expected if expected[k] != before.get(k))
        if meta["expect"] == "already_applied":
            assert result.blocks > 0 and result.already_applied == list(range(1, result.blocks + 1))
        if meta["expect"] == "no_edits":
            assert result.blocks == 0
