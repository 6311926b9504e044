"""Reviewing a session from the command line: `show`, `log` and `report`, run as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.journal import META_DIR
from tests.report_helpers import completed_session, interrupted_session
from tests.session_helpers import orchestrator, status_json


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return completed_session(tmp_path_factory.mktemp("review") / "completed")


def cli(*args: str, env: dict[str, str] | None = None) -> str:
    res = orchestrator(*args, env={"COLUMNS": "200", **(env or {})})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


def test_show_tells_the_story_of_one_run(session):
    text = cli("show", str(session), "2")
    status = status_json(session)
    run2 = next(r for r in status["runs"] if r["run"] == 2)
    assert "run_2 ok" in text and "(best run)" in text
    # The plan shown is the run's intent (its first attempt), not the later fix.
    assert "Run 2: LR 0.3." in text and run2["commit"][:12] in text and "tag run_2" in text
    # Metrics against the baseline and the previous run: score 0.8 -> 0.9 -> 1.0.
    score = next(line for line in text.splitlines() if "toy.score" in line)
    assert all(v in score for v in ("1 ± 0.01", "0.8", "+0.2", "0.9", "+0.1"))
    # The failed first attempt with its error, then the diff against run_1.
    failed = next(line for line in text.splitlines() if line.strip("│ ").startswith("1 ") and "error" in line)
    assert "RuntimeError: exploded on purpose" in failed
    assert "-LR = 0.2" in text and "+LR = 0.3" in text
    assert f"{run2['prompt_tokens']:,} prompt" in text and "in 3 calls" in text


def test_show_json_is_the_status_schema_with_one_run_and_its_diff(session):
    shown = json.loads(cli("show", str(session), "run_2", "--json"))
    status = status_json(session)
    assert shown.keys() == status.keys() == {"session", "runs"}
    assert shown["session"] == status["session"]
    (run,) = shown["runs"]
    expected = next(r for r in status["runs"] if r["run"] == 2)
    assert expected["diff"] is None and "+LR = 0.3" in run["diff"]
    assert {k: v for k, v in run.items() if k != "diff"} == {k: v for k, v in expected.items() if k != "diff"}
    assert [a["outcome"] for a in run["history"]] == ["error", "ok"]


def test_show_of_a_run_that_does_not_exist_is_one_line_and_exit_2(session, tmp_path):
    for args in (["show", str(session), "9"], ["show", str(session), "best"], ["show", str(tmp_path), "1"],
                 ["log", str(session), "--run", "7"], ["report", str(tmp_path)]):
        res = orchestrator(*args)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, (args, res.stderr)
    assert "run_9 does not exist" in orchestrator("show", str(session), "9").stderr


def test_log_is_a_readable_transcript_with_reasoning_folded(session):
    text = cli("log", str(session))
    # Markdown is rendered (no heading marks), every message is labelled with its place in the session.
    assert "Idea: Tune the toy LR" in text and "# Idea:" not in text
    assert "user · run_1 attempt 1" in text and "assistant · run_1 attempt 1 · 900+100 tokens · $0.0012" in text
    assert "user · run_2 attempt 1 retry 1" in text and "user · plots" in text and "user · notes" in text
    # Reasoning shows as a folded line with its size and first lines only.
    assert "reasoning (" in text and "reasoning line 1" in text and "reasoning line 6" not in text
    # The steps between messages: failed edits, runs and their outcomes, the end.
    assert "edits failed (run_2 attempt 1)" in text and "run_2 attempt 1 finished: error" in text
    assert "session completed" in text
    assert text.index("Run 1: raise LR to 0.2.") < text.index("Fix the crash.") < text.index("scored best")


def test_log_of_one_run_holds_only_that_run(session):
    text = cli("log", str(session), "--run", "run_2")
    assert "Fix the crash." in text and "exploded on purpose" in text
    assert "Run 1: raise LR to 0.2." not in text and "user · run_3" not in text and "system" not in text


def test_log_and_report_redact_secrets(session, tmp_path):
    """A key the environment holds now is hidden even where it was written before it was known to be one."""
    copy = tmp_path / "copy"
    shutil.copytree(session, copy, symlinks=True)
    journal = copy / META_DIR / "journal.jsonl"
    journal.write_text(journal.read_text().replace("Fix the crash.", "Fix the crash (token tok-cli-5e4d3c2b1a)."))
    env = {"MY_SERVICE_TOKEN": "tok-cli-5e4d3c2b1a"}
    text = cli("log", str(copy), env=env)
    assert "tok-cli-5e4d3c2b1a" not in text and "Fix the crash (token [REDACTED])." in text
    cli("report", str(copy), env=env)
    assert "tok-cli-5e4d3c2b1a" not in (copy / "report.html").read_text()


def test_report_writes_into_the_session_or_where_asked(session, tmp_path):
    default = cli("report", str(session)).strip()
    assert Path(default) == session / "report.html" and Path(default).stat().st_size > 0
    out = tmp_path / "out" / "r.html"
    out.parent.mkdir()
    assert cli("report", str(session), "-o", str(out)).strip() == str(out)
    assert 'id="results-table"' in out.read_text()


def test_an_interrupted_session_can_be_reviewed(tmp_path):
    session = interrupted_session(tmp_path)
    shown = cli("show", str(session), "2")
    assert "run_2 stopped" in shown and "exploded on purpose" in shown  # nothing runs once it is interrupted
    log = cli("log", str(session))
    assert "session interrupted: model error" in log
    cli("report", str(session))
    assert "Interrupted:" in (session / "report.html").read_text()


def test_a_long_plan_is_shown_whole_in_show_json_and_the_report(tmp_path):
    """A plan of several sentences is kept whole where there is room (show, status --json, the HTML report); only
    the commit subject is shortened, at a sentence boundary with an ellipsis."""
    import html

    from orchestrator.report_html import render_report
    from tests.report_helpers import drive_scripted
    from tests.session_helpers import edit, git

    plan = ("Run 1: raise the learning rate to 0.3 because the baseline underfits. We also keep the seed fixed so "
            "that the comparison with the baseline stays fair. Expect the score to rise to about 1.0.")
    session = drive_scripted(tmp_path, [{"content": edit("LR = 0.1\n", "LR = 0.3\n", plan=plan)},
                                        {"content": "ALL_COMPLETED"}], plots=False)
    shown = " ".join(cli("show", str(session), "1").split())  # rich wraps long values: compare words
    assert plan in shown
    run1 = next(r for r in status_json(session)["runs"] if r["run"] == 1)
    assert run1["plan"] == plan and all(a["plan"] == plan for a in run1["history"])
    assert plan in html.unescape(render_report(session))
    subjects = git(session, "log", "--format=%s", "run_1", "--").splitlines()
    assert "run 1 attempt 1: Run 1: raise the learning rate to 0.3 because the baseline underfits. …" in subjects
