"""What the command line says about itself and about mistakes: --version, --help, one-line errors, honest rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.cli import DEFAULT_MODEL
from orchestrator.config import Settings
from tests.report_helpers import completed_session
from tests.session_helpers import REPO, orchestrator, run_in_a_terminal, status_json


def one_error_line(res) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def test_version():
    from orchestrator import __version__

    res = orchestrator("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"orchestrator {__version__}"


def test_launch_help_names_the_default_model_and_where_settings_come_from():
    assert Settings.model_fields["model"].default == DEFAULT_MODEL
    res = orchestrator("launch", "--help", env={"COLUMNS": "200"})
    text = " ".join(res.stdout.replace("│", " ").split())
    assert res.returncode == 0
    assert f"(default: {DEFAULT_MODEL})" in text
    assert "orchestrator.toml" in text and "ORCH_MODEL" in text and "ORCH_*" in text and "[env]" in text


def test_list_of_a_missing_folder_is_an_error(tmp_path):
    assert "does not exist" in one_error_line(orchestrator("list", str(tmp_path / "nowhere")))
    (tmp_path / "file").write_text("x")
    assert "not a folder" in one_error_line(orchestrator("list", str(tmp_path / "file")))
    res = orchestrator("list", str(tmp_path))
    assert res.returncode == 0 and "No sessions" in res.stdout


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return completed_session(tmp_path_factory.mktemp("messages") / "completed")


def test_report_to_a_missing_folder_is_an_error_and_makes_no_folders(session, tmp_path):
    target = tmp_path / "missing" / "dir" / "x.html"
    assert "does not exist" in one_error_line(orchestrator("report", str(session), "-o", str(target)))
    assert not (tmp_path / "missing").exists()


def test_a_session_closed_with_all_completed_has_no_pending_run(session):
    state = status_json(session)
    assert state["session"]["status"] == "completed"
    assert {r["status"] for r in state["runs"]} <= {"ok", "failed"}
    assert sum(r["calls"] for r in state["runs"]) < state["session"]["totals"]["calls"]  # the closing reply
    res = orchestrator("report", str(session), "-o", str(session / "r.html"))
    assert res.returncode == 0, res.stderr
    html = (session / "r.html").read_text()
    assert "not run" not in html and not re.search(r">\s*pending\s*<", html)


def test_the_sae_explained_variance_figure_is_titled_for_both_conditions():
    text = (REPO / "templates" / "sae" / "plot.py").read_text()
    title = re.search(r'"explained_variance.png": \("([^"]+)"\s*"([^"]*)"', text)
    assert title and "contaminated" in title.group(1) + title.group(2)


def test_a_killed_session_is_not_shown_as_running(tmp_path):
    """SIGKILL leaves no record of why the session stopped: status shows it interrupted, its run stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.session_helpers import make_idea, make_template, stop_waiting_run, waiting_run_script

    go, script = waiting_run_script(tmp_path)
    # unsandboxed: the run writes its pid file into this test's folder, which a sandboxed run cannot see
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPO), "ORCH_SANDBOX": "none"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "launch", str(make_idea(tmp_path)), "--template",
         str(make_template(tmp_path)), "--model", f"scripted:{script}", "--root", str(tmp_path / "sessions"),
         "--no-plots", "--env", f"TOY_GO_FILE={go}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    run_pid = None
    try:
        deadline = time.monotonic() + 120
        pid_file = Path(f"{go}.pid")
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "run 1 never started"
            time.sleep(0.05)
        run_pid = int(pid_file.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        (session,) = (tmp_path / "sessions").iterdir()
        state = status_json(session)
        assert state["session"]["status"] == "interrupted" and "killed" in state["session"]["reason"]
        run1 = next(r for r in state["runs"] if r["run"] == 1)
        assert run1["status"] == "stopped"
    finally:
        stop_waiting_run(go, proc, run_pid)  # the orphaned run ends by itself; stopped by pid if it does not


def test_a_crashed_attempt_stays_on_the_terminal(tmp_path):
    """In a terminal the live view is one overwritten line; each finished attempt also leaves a permanent line
    with its outcome and the error's last line, so a crash and its fix can be seen afterwards."""
    import json
    import os

    from tests.session_helpers import edit, make_idea, make_template

    crash = edit("LR = 0.1\n", "LR = 0.2\nraise ValueError('bad shape')\n", plan="Run 1: LR 0.2.")
    fix = edit("raise ValueError('bad shape')\n", "", plan="Fix the crash.")
    script = tmp_path / "replies.json"
    script.write_text(json.dumps([crash, fix, {"content": "ALL_COMPLETED"}]))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPO), "TERM": "xterm-256color",
           "COLUMNS": "160", "LINES": "40"}
    env.pop("NO_COLOR", None)
    code, text = run_in_a_terminal(
        ["launch", str(make_idea(tmp_path)), "--template", str(make_template(tmp_path)), "--model",
         f"scripted:{script}", "--root", str(tmp_path / "sessions"), "--no-plots"], env)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text).replace("\r", "\n")
    assert code == 0, plain
    lines = [line.strip() for line in plain.splitlines()]
    assert any(line.startswith("run 1 attempt 1: error") and "ValueError: bad shape" in line for line in lines), plain
    assert any(line.startswith("run 1 attempt 2: ok") for line in lines), plain
    assert any(line.startswith("baseline: ok") for line in lines), plain


def test_ctrl_c_in_a_terminal_leaves_its_message_on_a_line_of_its_own(tmp_path):
    """Stopped with Ctrl-C while run 1 runs, in a terminal: the live progress line is cleared before the message
    saying the session is saved, so the message and its resume command are not glued onto the progress text."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    from tests.session_helpers import (
        default_stop_signals,
        make_idea,
        make_template,
        stop_waiting_run,
        waiting_run_script,
    )

    go, script = waiting_run_script(tmp_path)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPO), "ORCH_SANDBOX": "none",
           "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    env.pop("NO_COLOR", None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "launch", str(make_idea(tmp_path)), "--template",
         str(make_template(tmp_path)), "--model", f"scripted:{script}", "--root", str(tmp_path / "sessions"),
         "--no-plots", "--env", f"TOY_GO_FILE={go}"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=REPO, close_fds=True,
        preexec_fn=default_stop_signals)
    os.close(slave)
    chunks: list[bytes] = []
    run_pid = None

    def read_for(seconds: float) -> bool:
        """Read the terminal for up to `seconds`; False once every writer has closed it."""
        ready, _, _ = select.select([master], [], [], seconds)
        if not ready:
            return True
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process and its children have closed the terminal
            return False
        chunks.append(data)
        return bool(data)

    try:
        pid_file = Path(f"{go}.pid")
        deadline = time.monotonic() + 180
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(chunks).decode("utf-8", "replace")
            read_for(0.05)
        run_pid = int(pid_file.read_text())
        deadline = time.monotonic() + 5  # let the live view draw its line for run 1 (it refreshes 10 times a second)
        while time.monotonic() < deadline and b"run 1 of" not in b"".join(chunks):
            read_for(0.1)
        os.kill(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and read_for(0.5):
            if proc.poll() is not None and not select.select([master], [], [], 0.5)[0]:
                break
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 130
    finally:
        stop_waiting_run(go, proc, run_pid)
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text).replace("\r", "\n")
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    saved = [line for line in lines if "the session is saved" in line]
    assert saved and all(line.startswith("stopped by SIGINT") for line in saved), plain


COMMANDS = ["launch", "batch", "resume", "status", "diff", "list", "templates", "demo", "show", "log", "report"]


def test_a_command_line_is_answered_the_same_by_the_app_made_for_it(monkeypatch):
    """`main` runs each command line with an app that holds only the command it names: help, exit codes and the
    errors for a bad option are those of the whole app; anything else (no command, an option, a misspelled
    command) is answered by the whole app, which lists every command and suggests the one meant."""
    import typer.core
    import typer.main
    from typer.testing import CliRunner

    from orchestrator.cli import _app_for, app

    monkeypatch.setenv("COLUMNS", "120")
    for name in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup) and sorted(group.commands) == sorted(COMMANDS)
    runner = CliRunner()

    def answer(which, argv):
        res = runner.invoke(which, argv, prog_name="orchestrator")
        return res.exit_code, res.stdout, res.stderr

    lines = [[name, *rest] for name in COMMANDS for rest in (["--help"], ["--bogus"], ["-h"])]
    lines += [["lauch"], ["lauch", "--help"], ["--version"], ["--version", "launch"], [], ["--help"], ["--bogus"]]
    for argv in lines:
        whole = answer(app, argv)
        assert answer(_app_for(argv), argv) == whole, argv
        if argv[1:] == ["--help"] and argv[0] in COMMANDS:
            assert whole[0] == 0 and f"Usage: orchestrator {argv[0]} " in whole[1], whole
        if argv[1:] == ["--bogus"]:
            assert whole[0] == 2 and "No such option: --bogus" in whole[2], whole
    assert answer(app, ["lauch"])[0] == 2 and "Did you mean 'launch'" in answer(app, ["lauch"])[2]
    for name in COMMANDS:  # every command gets the app of its own, and the whole app is left whole
        assert len(_app_for([name, "--help"]).registered_commands) == 1
    code, listed, _ = answer(app, ["--help"])
    assert code == 0 and all(f" {name} " in listed for name in COMMANDS), listed


def test_the_whole_app_answers_a_misspelled_command_and_no_command():
    res = orchestrator("lauch", env={"COLUMNS": "120"})
    assert res.returncode == 2 and "No such command 'lauch'" in res.stderr and "Did you mean 'launch'" in res.stderr
    res = orchestrator(env={"COLUMNS": "120"})
    shown = res.stdout + res.stderr
    assert res.returncode == 2 and "Usage: " in shown and " [OPTIONS] COMMAND [ARGS]" in shown, shown
    assert all(f" {name} " in shown for name in COMMANDS), shown
    res = orchestrator("status", "--bogus", env={"COLUMNS": "120"})
    assert res.returncode == 2 and "No such option: --bogus" in res.stderr and "Traceback" not in res.stderr
