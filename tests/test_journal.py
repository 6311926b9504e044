"""The journal on disk: torn writes repaired before the next append, and the snapshot folded event by event."""

from __future__ import annotations

import json

import pytest

from orchestrator.journal import (
    Journal,
    JournalError,
    StateFold,
    read_jsonl,
    rebuild,
    repair_tail,
)
from tests.report_helpers import completed_session


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_an_append_after_a_torn_line_leaves_a_readable_journal(tmp_path):
    journal = Journal(tmp_path)
    journal.append("phase", phase="ask")
    with open(journal.path, "ab") as fh:
        fh.write(b'{"seq": 2, "ts": 1.0, "kind": "rep')  # SIGKILL mid-append
    later = Journal(tmp_path)  # a resumed driver
    later.append("phase", phase="run")
    assert [e["data"]["phase"] for e in lines(journal.path)] == ["ask", "run"]
    assert [e.seq for e in Journal(tmp_path).events()] == [1, 2]


def test_a_whole_line_that_lost_only_its_newline_is_kept(tmp_path):
    journal = Journal(tmp_path)
    journal.append("phase", phase="ask")
    journal.path.write_bytes(journal.path.read_bytes().rstrip(b"\n"))
    assert repair_tail(journal.path) is True
    Journal(tmp_path).append("phase", phase="run")
    assert [e["data"]["phase"] for e in lines(journal.path)] == ["ask", "run"]


def test_a_line_cut_inside_a_multibyte_character_is_a_torn_tail_not_an_error(tmp_path):
    journal = Journal(tmp_path)
    journal.append("reply", content="température")
    data = json.dumps({"seq": 2, "ts": 1.0, "kind": "reply", "data": {"content": "é"}}, ensure_ascii=False)
    raw = data.encode()
    with open(journal.path, "ab") as fh:
        fh.write(raw[: raw.index("é".encode()) + 1])  # half of the two-byte character
    assert [e["kind"] for e in read_jsonl(journal.path)] == ["reply"]
    Journal(tmp_path).append("phase", phase="run")
    assert len(lines(journal.path)) == 2


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    journal = Journal(tmp_path)
    journal.append("phase", phase="ask")
    with open(journal.path, "ab") as fh:
        fh.write(b"junk\n")
    journal.append("phase", phase="run")
    with pytest.raises(JournalError, match="line 2"):
        Journal(tmp_path).events()


def test_text_a_provider_sent_with_a_lone_surrogate_is_journaled_not_fatal(tmp_path):
    journal = Journal(tmp_path)
    journal.append("reply", content="bad \ud800 byte")
    journal.append("phase", phase="run")
    assert [e.kind for e in Journal(tmp_path).events()] == ["reply", "phase"]


def test_find_returns_the_last_event_of_a_step(tmp_path):
    journal = Journal(tmp_path)
    journal.append("reply", stage="experiment", run=1, attempt=1, retry=0, content="first")
    journal.append("reply", stage="experiment", run=1, attempt=1, retry=1, content="other step")
    journal.append("reply", stage="experiment", run=1, attempt=1, retry=0, content="again")
    found = Journal(tmp_path).find("reply", ("experiment", 1, 1, 0))
    assert found is not None and found.data["content"] == "again"
    assert Journal(tmp_path).find("reply", ("experiment", 2, 1, 0)) is None


def test_folding_event_by_event_gives_the_snapshot_a_full_rebuild_gives(tmp_path):
    session = completed_session(tmp_path)
    events = Journal(session).events()
    fold = StateFold(session)
    for n, event in enumerate(events, 1):
        fold.add(event)
        if n % 7 == 0 or n == len(events):
            assert fold.state() == rebuild(events[:n], session)
    assert fold.state().session.status == "completed"


def test_a_snapshot_taken_earlier_is_not_changed_by_later_events(tmp_path):
    session = completed_session(tmp_path)
    events = Journal(session).events()
    fold = StateFold(session)
    for event in events[:-1]:
        fold.add(event)
    before = fold.state()
    copy = before.model_copy(deep=True)
    fold.add(events[-1])
    assert before == copy
