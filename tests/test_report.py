"""The HTML report: rendered for completed, failed, interrupted and half-written sessions, opened in Chromium.

Sessions are driven for real (scripted replies, the toy template's runs as subprocesses, git checkpoints); the
browser checks run headless Chromium on the written file and look at its DOM, its console and its network log.
The builders and browser helpers live in tests/report_helpers.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from orchestrator.journal import META_DIR, load_state
from orchestrator.report_html import render_report, write_report
from tests.report_helpers import (
    ARTIFACTS,
    REASONING,
    completed_session,
    cut_journal_mid_run,
    drive_scripted,
    failed_session,
    interrupted_session,
    link_targets,
    load_page,
    measure_results_table,
    report_template,
    screenshot,
    text_of,
    wide_session,
)
from tests.session_helpers import edit

# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_sessions")
    return {"completed": completed_session(root / "completed"), "failed": failed_session(root / "failed"),
            "interrupted": interrupted_session(root / "interrupted")}


# --------------------------------------------------------------------------------------------------- tests


def test_the_sessions_built_here_end_as_named(sessions):
    assert {k: load_state(v).session.status for k, v in sessions.items()} == {
        "completed": "completed", "failed": "baseline_failed", "interrupted": "interrupted"}


def test_completed_report_holds_results_chart_diffs_attempts_figures_and_notes(sessions):
    session = sessions["completed"]
    path = write_report(session)
    assert path == session / "report.html"
    page = path.read_text()
    table = text_of(page, "results-table")
    assert all(f"run_{n}" in table for n in range(4))
    # Colour by direction: run_2 (score up, gap down) is better on both; run_3 (LR 0.6) is worse on both.
    start = page.index('id="results-table"')
    rows = page[start:page.index("</table>", start)].split("<tr")
    row2 = next(r for r in rows if 'href="#run-2"' in r)
    row3 = next(r for r in rows if 'href="#run-3"' in r)
    assert row2.count('class="better"') == 2 and row3.count('class="worse"') == 2
    # Each run's diff, highlighted; run_2's diff is against run_1 and holds the net change.
    run2 = text_of(page, "run-2")
    assert "-LR = 0.2" in run2 and "+LR = 0.3" in run2 and 'class="hl"' in page
    # The failed attempt is folded, with its error and the edits it tried.
    attempt = page[page.index('<details class="attempt">'):]
    attempt = attempt[:attempt.index("</details>")]
    assert "attempt 1 failed: error" in attempt and "exploded on purpose" in attempt
    assert "1 edit(s) that did not apply" in run2
    # One chart per key metric, one point per successful run.
    charts = re.findall(r'<svg[^>]*data-metric="([^"]+)".*?</svg>', page, re.S)
    assert charts == ["toy.score", "toy.gap"]
    first_chart = re.search(r"<svg.*?</svg>", page, re.S).group(0)  # type: ignore[union-attr]
    assert first_chart.count("<circle") == 4
    # The figure from plot.py, embedded; the notes the model wrote.
    assert re.search(r'<img alt="scores.png" src="data:image/png;base64,[A-Za-z0-9+/=]+">', page)
    assert "run_2 (LR 0.3) scored best" in page
    assert "Content-Security-Policy" in page
    assert not [u for u in link_targets(page) if not (u.startswith(("data:", "#")))]


def test_failed_and_interrupted_reports_say_why_and_how_to_go_on(sessions):
    failed = render_report(sessions["failed"])
    assert "The baseline failed: the baseline run_0 failed" in failed
    assert f"orchestrator resume {sessions['failed']}" in failed  # a plain resume runs it again
    assert "dataset not found: /data/toy.csv" in text_of(failed, "run-0")
    interrupted = render_report(sessions["interrupted"])
    assert "Interrupted: model error" in interrupted and "orchestrator resume" in interrupted
    run2 = text_of(interrupted, "run-2")
    assert "attempt 1 failed: error" in run2 and "exploded on purpose" in run2


def test_a_run_that_forges_git_history_fails_the_session_and_the_report_says_so(tmp_path):
    """Unsandboxed (--sandbox none), run 1 overwrites a git object: the guard cannot undo that, so the session
    ends `failed` and the report's banner says the session cannot be trusted past that run, with the file."""
    forge = ("    import pathlib\n"
             "    obj = next(p for p in sorted(pathlib.Path('.git/objects').rglob('*')) if p.is_file())\n"
             "    obj.chmod(0o644)\n"
             "    obj.write_bytes(b'forged')\n")
    replies = [{"content": edit("    os.makedirs(args.out_dir, exist_ok=True)\n",
                                "    os.makedirs(args.out_dir, exist_ok=True)\n" + forge, plan="Run 1: LR 0.1.")}]
    session = drive_scripted(tmp_path / "forged", replies, plots=False, sandbox="none")
    info = load_state(session).session
    assert info.status == "failed" and "cannot be trusted past this run" in info.reason
    page = render_report(session)
    banner = re.search(r'<div class="banner bad">(.*?)</div>', page, re.S)
    assert banner is not None and banner.group(1).startswith("Failed: ")
    text = banner.group(1)
    assert "cannot be trusted past this run" in text and re.search(r"\.git/objects/\S+,? which could not be restored", text)
    assert "; restored" not in text  # the one changed file was not restored: the banner must not say it was
    run1 = text_of(page, "run-1")  # the attempt's own banner says the same
    assert re.search(r"could not be restored: \.git/objects/\S+", run1) and "restored:" not in run1.replace(
        "could not be restored:", "")
    assert 'id="status">failed<' in page


def test_a_journal_cut_mid_run_still_renders(sessions, tmp_path):
    session = tmp_path / "cut"
    shutil.copytree(sessions["completed"], session, symlinks=True)
    cut_journal_mid_run(session, 2)
    page = render_report(session)
    assert "has not finished" in page
    assert re.search(r'id="run-2">.*?<span class="badge warn">running</span>', page, re.S)
    assert "+LR = 0.2" in text_of(page, "run-1")


def test_secrets_in_session_files_do_not_reach_the_report(sessions, tmp_path, monkeypatch):
    session = tmp_path / "secret"
    shutil.copytree(sessions["completed"], session, symlinks=True)
    (session / "notes.txt").write_text("token used: tok-report-9f8e7d6c5b4a\n")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-report-9f8e7d6c5b4a")
    page = render_report(session)
    assert "tok-report-9f8e7d6c5b4a" not in page and "token used: [REDACTED]" in page


def test_a_folder_that_is_not_a_session_is_one_clear_error(tmp_path):
    from orchestrator.journal import JournalError

    with pytest.raises(JournalError, match="not a session folder"):
        render_report(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["completed", "failed", "interrupted"])
def test_reports_open_in_chromium_offline_without_errors(kind, sessions, tmp_path):
    path = write_report(sessions[kind], tmp_path / f"{kind}.html")
    page = load_page(path, tmp_path / "chromium")
    assert page.console == [] and page.requests == []
    assert 'id="results-table"' in page.dom
    status = {"failed": "baseline_failed"}.get(kind, kind)
    assert re.search(r'<span class="badge \w+" id="status">' + status, page.dom)
    if kind == "failed":
        assert "dataset not found" in page.dom
    else:
        assert 'class="diff-block"' in page.dom and "+LR = 0.2" in re.sub(r"<[^>]+>", "", page.dom)
    if kind == "completed":
        assert 'src="data:image/png;base64,' in page.dom
        shot = ARTIFACTS / "report_completed.png"
        screenshot(path, shot, tmp_path / "chromium")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_browser_check_catches_requests_and_blocked_loads(tmp_path):
    """The check above can fail: a page that fetches is seen in the network log, a blocked load on the console."""
    fetching = tmp_path / "fetching.html"
    fetching.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    assert load_page(fetching, tmp_path / "a").requests == ["http://127.0.0.1:9/x.png"]
    blocked = tmp_path / "blocked.html"
    blocked.write_text(render_report_head_only() + '<img src="http://127.0.0.1:9/y.png"></body></html>')
    got = load_page(blocked, tmp_path / "b")
    assert got.requests == [] and any("Content Security Policy" in line for line in got.console)


def render_report_head_only() -> str:
    from orchestrator.report_html import CSP

    return f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}"></head><body>'


@pytest.mark.slow
def test_a_ten_run_report_stays_under_5_mb(tmp_path):
    replies = [{"content": edit(f"LR = {0.1 + 0.02 * i:.2f}\n" if i else "LR = 0.1\n",
                                f"LR = {0.1 + 0.02 * (i + 1):.2f}\n", plan=f"Run {i + 1}: LR up a step."),
                "reasoning": REASONING * 20}
               for i in range(10)]
    replies += [{"content": "plot.py already compares every run."}, {"content": "No notes."}]
    session = drive_scripted(tmp_path, replies, max_runs=10)
    state = load_state(session)
    assert sum(r.status == "ok" for r in state.runs) == 11
    path = write_report(session)
    assert path.stat().st_size < 5_000_000
    assert all(f'id="run-{n}"' in path.read_text() for n in range(11))


@pytest.mark.slow
def test_every_column_of_a_wide_ten_run_results_table_is_visible_at_1400_px(tmp_path):
    """Five long key metric names with standard errors and changes, large token counts and costs: at 1400 px the
    whole results table (tokens and cost included) is on screen, with no horizontal scroll of the page or table."""
    path = write_report(wide_session(tmp_path / "wide"), tmp_path / "wide.html")
    layout = measure_results_table(path, tmp_path / "chromium", width=1400)
    assert [h for h, _ in layout["headers"]][-3:] == ["time", "tokens", "cost"]
    assert layout["page_scroll"] <= layout["page_client"], layout
    assert layout["box_scroll"] <= layout["box_client"], layout
    assert all(right <= min(layout["box_right"], layout["viewport"]) + 0.5 for _, right in layout["headers"]), layout
    shot = ARTIFACTS / "report_wide_1400.png"
    screenshot(path, shot, tmp_path / "chromium", size=(1400, 900), scrollbars=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------- plot and notes


def _events(session: Path, kind: str) -> list[dict]:
    lines = (session / META_DIR / "journal.jsonl").read_text().splitlines()
    return [e["data"] for e in map(json.loads, lines) if e["kind"] == kind]


RUN_1 = {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")}
DONE = {"content": "ALL_COMPLETED"}


def test_a_plot_py_the_model_broke_and_fixed_gives_figures_in_the_report(tmp_path):
    broken = edit('png("scores.png", width, height, pixel)\n', 'raise ValueError("no axes")\n', path="plot.py",
                  plan="Plot: compare runs.")
    fixed = edit('raise ValueError("no axes")\n', 'png("scores.png", width, height, pixel)\n', path="plot.py",
                 plan="Plot: fix.")
    session = drive_scripted(tmp_path, [RUN_1, DONE, {"content": broken}, {"content": fixed},
                                        {"content": "Nothing to add to the notes."}])
    state = load_state(session)
    assert state.session.status == "completed" and state.session.figures == ["scores.png"]
    outcomes = [d["outcome"] for d in _events(session, "run_finished") if d.get("stage") == "plots"]
    assert outcomes == ["error", "ok"]
    assert (session / "notes.txt").read_text() == "# Notes\n"  # a reply without edits ends the notes step
    page = render_report(session)
    assert '<img alt="scores.png" src="data:image/png;base64,' in page


def test_a_plot_failure_with_no_fix_offered_ends_the_step_not_the_session(tmp_path):
    broken = edit('png("scores.png", width, height, pixel)\n', 'raise ValueError("no axes")\n', path="plot.py",
                  plan="Plot: compare runs.")
    session = drive_scripted(tmp_path, [RUN_1, DONE, {"content": broken}, {"content": "I cannot fix plot.py."},
                                        {"content": edit("# Notes\n", "# Notes\nLR 0.2 helped.\n", path="notes.txt",
                                                         plan="Notes.")}])
    state = load_state(session)
    assert state.session.status == "completed" and state.session.figures == []
    assert "LR 0.2 helped." in (session / "notes.txt").read_text()
    assert "Figures" not in render_report(session)


@pytest.mark.parametrize("case", ["no_plots", "no_plot_py"])
def test_the_plot_step_is_skipped_without_plots_or_without_plot_py(case, tmp_path):
    template = report_template(tmp_path)
    if case == "no_plot_py":
        (template / "plot.py").unlink()
    replies = [RUN_1, DONE] + ([{"content": "No notes."}] if case == "no_plot_py" else [])
    session = drive_scripted(tmp_path, replies, plots=case != "no_plots", template=template)
    state = load_state(session)
    assert state.session.status == "completed" and state.session.figures == []
    stages = {d.get("stage") for d in _events(session, "prompt")}
    assert stages == ({"experiment", "notes"} if case == "no_plot_py" else {"experiment"})
