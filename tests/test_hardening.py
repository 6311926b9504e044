"""Regression tests for the hardening change: the catch-all, signals, the lock, torn journals, limits, recovery that
keeps user data, the error family and settings repaired by `resume`.

Like tests/test_sessions.py these drive the CLI in a subprocess against the fake DeepSeek-rules provider over real
HTTP (or a scripted model where no provider is needed). Every process a test starts is stopped by pid at teardown
(the `reaper` fixture), also when the test fails; nothing waits with a sleep, everything polls with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.session_helpers import (
    REPO,
    TEST_KEY,
    UNSANDBOXED,
    WAITING_EXPERIMENT_PATCH,
    default_stop_signals,
    edit,
    git,
    make_idea,
    make_template,
    orchestrator,
    pid_alive,
    session_from,
    status_json,
    stopped_after_first_reply,
)

pytestmark = pytest.mark.slow

MODEL_ENV = {"DEEPSEEK_API_KEY": TEST_KEY}
DEADLINE_S = 120.0
CLI_TIMEOUT_S = 300.0

# --------------------------------------------------------------------------------------------------- helpers


def launch_args(tmp: Path, url: str | None, *extra: str, template: Path | None = None,
                model: str = "deepseek/deepseek-reasoner") -> list[str]:
    template = template or make_template(tmp)
    idea = make_idea(tmp)
    args = ["launch", str(idea), "--template", str(template), "--model", model, "--root", str(tmp / "sessions")]
    if url is not None:
        args += ["--api-base", url]
    return [*args, *extra]


def waiting_replies() -> list[dict]:
    """Run 1 waits for the go file (writing its pid to GO.pid first); run 2 changes LR; then the model is done."""
    return [
        {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.") + edit(*WAITING_EXPERIMENT_PATCH, plan="")},
        {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")},
        {"content": "ALL_COMPLETED"},
    ]


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"timed out after {deadline_s:.0f} s waiting for {what}"
        time.sleep(0.05)


def journal_lines(session: Path) -> list[str]:
    return (session / ".orchestrator" / "journal.jsonl").read_text(encoding="utf-8").splitlines()


def events(session: Path, kind: str | None = None) -> list[dict]:
    found = [json.loads(line) for line in journal_lines(session) if line.strip()]
    return [e for e in found if kind is None or e["kind"] == kind]


def settings_json(session: Path) -> dict:
    return json.loads((session / ".orchestrator" / "settings.json").read_text(encoding="utf-8"))


def assert_each_reply_requested_once(server, expected: int) -> None:
    answered = [json.dumps(r["messages"], sort_keys=True) for r in server.requests() if r["status"] == 200]
    assert len(answered) == len(set(answered)), "a journaled reply was requested again"
    assert len(answered) == expected, f"{len(answered)} replies requested, {expected} expected"


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def statuses(state: dict, last: int) -> list[str]:
    """Runs 0..last as `status --json` lists them (the slot in which the model said ALL_COMPLETED is listed too,
    as `pending`, with that reply's tokens)."""
    runs = {r["run"]: r["status"] for r in state["runs"]}
    return [runs.get(n, "missing") for n in range(last + 1)]


def run_status(session: Path, run: int) -> dict:
    return next(r for r in status_json(session)["runs"] if r["run"] == run)


class Reaper:
    """Stops at teardown, by pid, everything a test started: orchestrator process groups, helper processes and
    experiment processes named in pid files (those run in their own process groups). Go files are touched first
    so waiting experiments can end on their own."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pid_files: list[Path] = []
        self.go_files: list[Path] = []

    def spawn(self, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
        """The CLI in its own session (so signals sent to it reach nobody else), default SIGINT, output to files."""
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": pythonpath, **env}
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,
                preexec_fn=default_stop_signals,
            )
        self.procs.append(proc)
        return proc

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def watch_run(self, go: Path) -> None:
        self.go_files.append(go)
        self.pid_files.append(Path(str(go) + ".pid"))

    def stop_all(self) -> None:
        for go in self.go_files:
            go.touch()
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    proc.kill()
                proc.wait(timeout=30)
        for pid_file in self.pid_files:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text.isdigit() and pid_alive(int(text)) and _is_experiment(int(text)):
                os.kill(int(text), signal.SIGKILL)


def _is_experiment(pid: int) -> bool:
    try:
        return b"experiment.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    try:
        yield r
    finally:
        r.stop_all()


def read_pid(pid_file: Path, proc: subprocess.Popen | None = None) -> int:
    def ready() -> bool:
        if proc is not None:
            assert proc.poll() is None, f"the orchestrator exited ({proc.returncode}) before the run started"
        return pid_file.exists() and pid_file.read_text().strip().isdigit()

    wait_for(ready, f"the run to write {pid_file.name}")
    return int(pid_file.read_text())


# --------------------------------------------------------------------------------------------------- 1. catch-all

def test_an_unexpected_error_in_a_step_ends_the_session_interrupted_and_resumable(tmp_path, fake_provider):
    # A run that plants .git/index.lock is caught by the guard now (outcome tampered, see test_sandbox_hostile), so
    # the unexpected error here is injected: the step after run 1 is recorded fails with an OSError (a full disk).
    replies = [
        {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")},
        {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")},
        {"content": "ALL_COMPLETED"},
    ]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    first = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"),
                         env={**MODEL_ENV, "ORCH_TEST_CRASH_AT": "run_recorded:2:raise"}, timeout=CLI_TIMEOUT_S)
    session = session_from(first)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "Traceback" not in first.stderr and "Traceback" not in first.stdout
    state = status_json(session)["session"]
    assert state["status"] == "interrupted", state
    assert state["reason"] == "OSError: injected fault at run_recorded", state["reason"]
    named = [line for line in first.stdout.splitlines() if line.startswith("Session interrupted")]
    assert len(named) == 1 and "OSError: " in named[0], first.stdout
    assert f"orchestrator resume {session}" in first.stdout
    interrupted = events(session, "interrupted")
    assert len(interrupted) == 1
    assert interrupted[0]["data"]["error_type"] == "OSError"
    assert "Traceback" in interrupted[0]["data"]["traceback"] and "_crash_point" in interrupted[0]["data"]["traceback"]

    resumed = orchestrator("resume", str(session), env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = status_json(session)
    assert state["session"]["status"] == "completed"
    assert statuses(state, 2) == ["ok", "ok", "ok"]
    assert {"run_0", "run_1", "run_2"} <= set(git(session, "tag").split())
    assert_each_reply_requested_once(server, 3)


# --------------------------------------------------------------------------------------------------- 2. --python


def test_launch_with_a_missing_python_exits_2_and_creates_no_session(tmp_path):
    res = orchestrator(*launch_args(tmp_path, None, "--python", "/does/not/exist"), env=MODEL_ENV)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "/does/not/exist" in one_line(res.stderr)
    assert not (tmp_path / "sessions").exists() or not any((tmp_path / "sessions").iterdir())


# --------------------------------------------------------------------------------------------------- 3. torn journal


def test_a_torn_journal_line_is_repaired_and_the_journal_stays_valid_jsonl(tmp_path, fake_provider):
    replies = [{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1.")}, {"content": "ALL_COMPLETED"}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    first = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"),
                         env={**MODEL_ENV, "ORCH_TEST_CRASH_AT": "reply:1"}, timeout=CLI_TIMEOUT_S)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    session = session_from(first)
    journal = session / ".orchestrator" / "journal.jsonl"
    with open(journal, "ab") as fh:  # a crash in the middle of an append
        fh.write(b'{"seq": 999, "ts": 1.0, "kind": "pha')

    assert status_json(session)["session"]["status"] == "interrupted"  # killed: nobody drives it
    resumed = orchestrator("resume", str(session), env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert status_json(session)["session"]["status"] == "completed"
    raw = journal.read_bytes()
    assert raw.endswith(b"\n")
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        obj = json.loads(line)  # every line parses: nothing was glued onto the fragment
        assert isinstance(obj, dict) and obj["seq"] != 999, (number, line)
    assert_each_reply_requested_once(server, 2)


# --------------------------------------------------------------------------------------------------- 4. signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_the_run_and_leave_a_resumable_session(signum, tmp_path, fake_provider, reaper):
    go = tmp_path / "go"
    reaper.watch_run(go)
    server = fake_provider.start({"replies": waiting_replies()}, api_key=TEST_KEY)
    # the run talks to the test through files in tmp and its pid
    env = {**MODEL_ENV, **UNSANDBOXED, "TOY_GO_FILE": str(go)}
    proc = reaper.spawn(launch_args(tmp_path, server.url, "--no-plots", "--env", f"TOY_GO_FILE={go}"), env,
                        tmp_path / "launch")
    run_pid = read_pid(Path(str(go) + ".pid"), proc)
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=DEADLINE_S) == 130, (tmp_path / "launch" / "stdout").read_text()
    stdout = (tmp_path / "launch" / "stdout").read_text()
    stderr = (tmp_path / "launch" / "stderr").read_text()
    assert "Traceback" not in stderr, stderr
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in stdout and "orchestrator resume" in stdout, stdout
    wait_for(lambda: not pid_alive(run_pid), "the run's process to be stopped")
    session = Path(stdout.splitlines()[0])
    state = status_json(session)
    assert state["session"]["status"] == "interrupted"
    assert state["session"]["reason"] == f"stopped by {name}"

    go.touch()
    resumed = orchestrator("resume", str(session), env=env, timeout=CLI_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert status_json(session)["session"]["status"] == "completed"
    assert_each_reply_requested_once(server, 3)


# --------------------------------------------------------------------------------------------------- 5. run_started


def test_a_failure_to_journal_run_started_stops_the_run_it_started(tmp_path, fake_provider, reaper):
    go = tmp_path / "go"  # never touched: the run would wait forever
    reaper.watch_run(go)
    server = fake_provider.start({"replies": waiting_replies()}, api_key=TEST_KEY)
    # the run talks to the test through files in tmp and its pid
    env = {**MODEL_ENV, **UNSANDBOXED, "TOY_GO_FILE": str(go), "ORCH_TEST_CRASH_AT": "run_started:2:raise"}
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots", "--env", f"TOY_GO_FILE={go}"), env=env,
                       timeout=CLI_TIMEOUT_S)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    session = session_from(res)
    started = events(session, "run_started")
    assert [e["data"]["run"] for e in started] == [0, 1]
    run_pid = int(started[1]["data"]["pid"])
    wait_for(lambda: not pid_alive(run_pid), "the run the journal failed to record to be stopped")
    # the run is gated until run_started is on record, so the experiment never began
    assert not Path(str(go) + ".pid").exists()
    state = status_json(session)["session"]
    assert state["status"] == "interrupted" and "OSError" in state["reason"], state


def processes_in(folder: Path) -> list[int]:
    """Live processes whose working folder is `folder` (a run's, or a gated run's shim)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(os.readlink(f"/proc/{entry}/cwd")) == folder and pid_alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_a_kill_between_starting_a_run_and_journaling_it_leaves_no_run_behind(tmp_path, fake_provider, reaper):
    go = tmp_path / "go"
    reaper.watch_run(go)
    server = fake_provider.start({"replies": waiting_replies()}, api_key=TEST_KEY)
    # the run talks to the test through files in tmp and its pid
    env = {**MODEL_ENV, **UNSANDBOXED, "TOY_GO_FILE": str(go)}
    args = launch_args(tmp_path, server.url, "--no-plots", "--env", f"TOY_GO_FILE={go}")
    res = orchestrator(*args, env={**env, "ORCH_TEST_CRASH_AT": "run_spawned:2"}, timeout=CLI_TIMEOUT_S)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    session = session_from(res)
    assert [e["data"]["run"] for e in events(session, "run_started")] == [0]  # run 1 was never journaled...
    wait_for(lambda: not processes_in(session), "the unjournaled run's process to exit")
    assert not Path(str(go) + ".pid").exists()  # ...and its experiment never began
    go.touch()
    resumed = orchestrator("resume", str(session), env=env, timeout=CLI_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert status_json(session)["session"]["status"] == "completed"
    assert_each_reply_requested_once(server, 3)


# --------------------------------------------------------------------------------------------------- 6. the lock

LOCK_HOLDER = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, str(os.getpid()).encode(), 0)
print("locked", flush=True)
sys.stdin.read()
"""


def scripted(tmp: Path, replies: list, name: str = "replies.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(replies), encoding="utf-8")
    return path


def test_resume_refuses_a_locked_session_naming_the_holder_and_leaves_its_pid(tmp_path, reaper):
    script = scripted(tmp_path, ["ALL_COMPLETED"])
    first = orchestrator(*launch_args(tmp_path, None, "--no-plots", model=f"scripted:{script}"),
                         env={"ORCH_TEST_CRASH_AT": "drive_started:1"}, timeout=CLI_TIMEOUT_S)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    session = session_from(first)
    lock = session / ".orchestrator" / "lock"
    holder = reaper.track(subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock)], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, start_new_session=True))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = orchestrator("resume", str(session), timeout=CLI_TIMEOUT_S)
        assert busy.returncode == 2, busy.stdout + busy.stderr
        line = one_line(busy.stderr)
        assert "another orchestrator process" in line and f"pid {holder.pid}" in line, line
        assert lock.read_text() == str(holder.pid)  # opening the lock did not truncate it
        assert status_json(session)["session"]["status"] == "running"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


def test_two_drivers_built_before_either_drives_never_repeat_a_reply_or_a_run(tmp_path, monkeypatch):
    from orchestrator.config import load_settings
    from orchestrator.loop import Driver
    from orchestrator.models import ScriptedModel
    from orchestrator.new_session import create_session
    from orchestrator.spec import load_idea
    from orchestrator.template import find_template

    for name in list(os.environ):
        if name.upper().startswith("ORCH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no orchestrator.toml here
    script = scripted(tmp_path, [edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1."), "ALL_COMPLETED"])
    spare = scripted(tmp_path, [edit("LR = 0.1\n", "LR = 0.9\n", plan="A stale replay.")], name="spare.json")
    settings = load_settings({"model": f"scripted:{script}", "root": tmp_path / "sessions", "plots": False})
    session = create_session(load_idea(make_idea(tmp_path)), find_template(str(make_template(tmp_path))),
                             settings, max_runs=3)
    first = Driver(session, ScriptedModel(script), settings)
    second_model = ScriptedModel(spare)
    second = Driver(session, second_model, settings)

    assert first.drive().session.status == "completed"
    assert [e["data"]["run"] for e in events(session, "run_started")] == [0, 1]
    journal = journal_lines(session)

    state = second.drive()
    assert state.session.status == "completed"
    assert second_model.calls == [] and second_model.used == 0  # never asked for its (wrong) reply
    assert [e["data"]["run"] for e in events(session, "run_started")] == [0, 1]  # no run again
    assert journal_lines(session) == journal


# --------------------------------------------------------------------------------------------------- 7. limits


def test_the_wall_clock_stops_a_run_that_would_never_end_and_resume_runs_it_again(tmp_path, fake_provider, reaper):
    go = tmp_path / "go"
    reaper.watch_run(go)
    server = fake_provider.start({"replies": waiting_replies()}, api_key=TEST_KEY)
    # unsandboxed: the run writes its pid file into this test's folder, and the test checks that pid
    env = {**MODEL_ENV, "TOY_GO_FILE": str(go), "ORCH_SANDBOX": "none"}
    # no race between the budget and the run's start: the budget is set once run 1 is next (see the helper)
    session, used = stopped_after_first_reply(
        launch_args(tmp_path, server.url, "--no-plots", "--env", f"TOY_GO_FILE={go}"), env)
    res = orchestrator("resume", str(session), "--wall-clock", f"{used + 30:.1f}", env=env, timeout=CLI_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    pid_file = Path(str(go) + ".pid")
    assert pid_file.exists(), "run 1 never started: the resume used its 30 s margin before run 1"
    run_pid = int(pid_file.read_text())
    wait_for(lambda: not pid_alive(run_pid), "the run cut by the wall clock to be stopped")
    state = status_json(session)
    assert state["session"]["status"] == "wall_clock" and "wall-clock" in state["session"]["reason"]
    assert run_status(session, 1)["status"] == "stopped"
    assert len(server.requests()) == 1

    go.touch()
    resumed = orchestrator("resume", str(session), "--wall-clock", "600", env=env, timeout=CLI_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = status_json(session)
    assert state["session"]["status"] == "completed"
    assert statuses(state, 2) == ["ok", "ok", "ok"]
    assert [e["data"]["run"] for e in events(session, "run_started")] == [0, 1, 1, 2]  # run 1 ran again
    assert_each_reply_requested_once(server, 3)


def test_the_token_budget_stops_before_the_next_call_and_resume_can_raise_it(tmp_path, fake_provider):
    replies = [{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1."), "prompt_tokens": 50_000,
                "completion_tokens": 100}, {"content": "ALL_COMPLETED"}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots", "--max-tokens-total", "1000"),
                       env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    session = session_from(res)
    state = status_json(session)["session"]
    assert state["status"] == "max_tokens" and "token" in state["reason"], state
    assert len(server.requests()) == 1  # the next call was never made
    assert run_status(session, 1)["status"] == "ok"  # but the reply already paid for got its run

    more = orchestrator("resume", str(session), "--max-tokens-total", "10000000", env=MODEL_ENV,
                        timeout=CLI_TIMEOUT_S)
    assert more.returncode == 0, more.stdout + more.stderr
    assert status_json(session)["session"]["status"] == "completed"
    assert run_status(session, 1)["status"] == "ok"
    assert_each_reply_requested_once(server, 2)


def test_replies_without_edits_stall_the_session_until_resume_raises_the_limit(tmp_path, fake_provider):
    replies = [{"content": "I think we should try a higher LR."}, {"content": "Let me consider the options."},
               {"content": "Still thinking about it."}, {"content": "ALL_COMPLETED"}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots", "--stall-replies", "3"), env=MODEL_ENV,
                       timeout=CLI_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    session = session_from(res)
    assert status_json(session)["session"]["status"] == "stalled"
    assert len(server.requests()) == 3

    again = orchestrator("resume", str(session), env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    assert len(server.requests()) == 3

    more = orchestrator("resume", str(session), "--stall-replies", "10", env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert more.returncode == 0, more.stdout + more.stderr
    assert status_json(session)["session"]["status"] == "completed"
    assert_each_reply_requested_once(server, 4)


def test_all_completed_counts_only_as_the_replys_last_line(tmp_path, fake_provider):
    replies = [
        {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")
         + "\nI will reply ALL_COMPLETED once run 2 is done.\n"},
        {"content": "ALL_COMPLETED comes later: run 2 first. Let me think which LR to try."},
        {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")},
        {"content": "Both runs are done.\n\nALL_COMPLETED\n"},
    ]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"), env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    state = status_json(session_from(res))
    assert state["session"]["status"] == "completed" and "ALL_COMPLETED" in state["session"]["reason"]
    assert statuses(state, 2) == ["ok", "ok", "ok"]
    assert_each_reply_requested_once(server, 4)


# --------------------------------------------------------------------------------------------------- 8. user data

CACHE_WRITER = (
    "    os.makedirs(args.out_dir, exist_ok=True)\n",
    "    os.makedirs(args.out_dir, exist_ok=True)\n"
    "    os.makedirs('cache', exist_ok=True)\n"
    "    if not os.path.exists(os.path.join('cache', 'blob.bin')):\n"
    "        with open(os.path.join('cache', 'blob.bin'), 'wb') as fh:\n"
    "            fh.write(os.urandom(4096))\n"
    "    os.makedirs('cfg', exist_ok=True)\n"
    "    if not os.path.exists(os.path.join('cfg', 'generated.py')):\n"
    "        with open(os.path.join('cfg', 'generated.py'), 'w') as fh:\n"
    "            fh.write('SEED = 1\\n')\n",
)


def test_recovery_and_giving_up_a_run_never_delete_untracked_files(tmp_path, fake_provider):
    template = make_template(tmp_path)
    experiment = template / "experiment.py"
    experiment.write_text(experiment.read_text().replace(*CACHE_WRITER))
    toml = template / "template.toml"  # a generated, untracked file that matches the editable patterns
    toml.write_text(toml.read_text().replace('"notes.txt"]', '"notes.txt", "cfg/*.py"]'))
    crash = edit("    score = 1.0 - abs(LR - 0.3)\n", "    score = 1.0 - abs(LR - 0.3)\n    1 / 0\n", plan="Try.")
    again = edit("    1 / 0\n", "    [][1]\n", plan="Try again.")
    back = edit("    [][1]\n", "    1 / 0\n", plan="And again.")
    replies = [{"content": r} for r in (crash, again, back, again, "ALL_COMPLETED")]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    env = {**MODEL_ENV, **UNSANDBOXED}  # the runs write caches beside experiment.py, outside their run folder
    first = orchestrator(*launch_args(tmp_path, server.url, "--no-plots", template=template),
                         env={**env, "ORCH_TEST_CRASH_AT": "edits_written:1"}, timeout=CLI_TIMEOUT_S)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    session = session_from(first)
    blob = session / "cache" / "blob.bin"
    assert blob.is_file(), "the baseline did not write its cache file"
    written = blob.read_bytes()
    assert "cache/blob.bin" not in git(session, "ls-files").split()  # untracked: git could not bring it back

    resumed = orchestrator("resume", str(session), env=env, timeout=CLI_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = status_json(session)
    assert state["session"]["status"] == "completed"
    run1 = run_status(session, 1)
    assert run1["status"] == "failed" and run1["attempts"] == 4
    assert (session / "experiment.py").read_text() == git(session, "show", "run_0:experiment.py")
    assert blob.is_file() and blob.read_bytes() == written
    assert (session / "cfg" / "generated.py").read_text() == "SEED = 1\n"
    assert_each_reply_requested_once(server, 5)


# --------------------------------------------------------------------------------------------------- 9. errors


@pytest.mark.parametrize("case", ["bogus profile", "missing script", "root is a file"])
def test_launch_errors_are_one_line_and_exit_2(case, tmp_path):
    script = scripted(tmp_path, ["ALL_COMPLETED"])
    root_file = tmp_path / "not_a_folder"
    root_file.write_text("a file\n")
    if case == "bogus profile":
        args, env = launch_args(tmp_path, "http://127.0.0.1:9/v1"), {**MODEL_ENV, "ORCH_PROFILE": "bogus"}
    elif case == "missing script":
        args, env = launch_args(tmp_path, None, model="scripted:/missing/file.yaml"), {}
    else:
        args = [*launch_args(tmp_path, None, model=f"scripted:{script}"), "--root", str(root_file)]
        env = {}
    res = orchestrator(*args, env=env, timeout=CLI_TIMEOUT_S)
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_line(res.stderr)
    expected = {"bogus profile": "bogus", "missing script": "/missing/file.yaml", "root is a file": "is a file"}
    assert expected[case] in line, line
    assert not (tmp_path / "sessions").exists()
    assert root_file.read_text() == "a file\n"


def test_sessions_claimed_at_once_get_distinct_folders(tmp_path):
    from orchestrator.new_session import claim_session_dir

    root = tmp_path / "sessions"
    barrier = threading.Barrier(5)
    claimed: list[Path] = []
    failures: list[BaseException] = []

    def claim() -> None:
        try:
            barrier.wait(timeout=DEADLINE_S)
            claimed.append(claim_session_dir(root, "same"))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE_S)
    assert not failures and len(claimed) == 5
    assert len(set(claimed)) == 5 and all(p.is_dir() and p.parent == root for p in claimed)
    assert sorted(p.name for p in root.iterdir()) == sorted(["same", "same-2", "same-3", "same-4", "same-5"])


# --------------------------------------------------------------------------------------------------- 10. settings


def test_resume_repairs_saved_settings_and_asks_again_for_a_masked_api_base(tmp_path, fake_provider):
    replies = [{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1.")},
               {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2.")}, {"content": "ALL_COMPLETED"}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    crash = {**MODEL_ENV, "ORCH_TEST_CRASH_AT": "reply:1"}  # each process is killed after its first new reply
    first = orchestrator(*launch_args(tmp_path, server.url, "--no-plots", "--python", "python3"), env=crash,
                         timeout=CLI_TIMEOUT_S)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    session = session_from(first)
    assert settings_json(session)["python"] == "python3"

    fixed = orchestrator("resume", str(session), "--timeout", "77", "--env", "FOO=bar", "--python", sys.executable,
                         env=crash, timeout=CLI_TIMEOUT_S)
    assert fixed.returncode == -signal.SIGKILL, fixed.stdout + fixed.stderr
    saved = settings_json(session)
    assert saved["timeout_s"] == 77 and saved["env"].get("FOO") == "bar" and saved["python"] == sys.executable
    assert events(session, "run_started")[-1]["data"]["timeout_s"] == 77  # run 1 ran under it

    overridden = orchestrator("resume", str(session), env={**crash, "ORCH_TIMEOUT_S": "55"}, timeout=CLI_TIMEOUT_S)
    assert overridden.returncode == -signal.SIGKILL, overridden.stdout + overridden.stderr
    saved = settings_json(session)
    assert saved["timeout_s"] == 55 and saved["env"].get("FOO") == "bar"
    assert events(session, "run_started")[-1]["data"]["timeout_s"] == 55

    saved["api_base"] = server.url.replace("http://", "http://user:***@")
    (session / ".orchestrator" / "settings.json").write_text(json.dumps(saved, indent=2))
    refused = orchestrator("resume", str(session), env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--api-base" in one_line(refused.stderr)
    assert status_json(session)["session"]["status"] == "interrupted"  # refused before driving: still not driven

    done = orchestrator("resume", str(session), "--api-base", server.url, env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert status_json(session)["session"]["status"] == "completed"
    assert settings_json(session)["api_base"] == server.url
    assert_each_reply_requested_once(server, 3)


def test_a_reply_cut_at_the_output_limit_is_journaled_and_the_model_is_told(tmp_path, fake_provider):
    cut = {"content": "Run 1: LR 0.2.\n\nexperiment.py\n```python\n<<<<<<< SEARCH\nLR = 0.1\n=", "finish_reason": "length"}
    replies = [cut, {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")}, {"content": "ALL_COMPLETED"}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"), env=MODEL_ENV, timeout=CLI_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    session = session_from(res)
    first = events(session, "reply")[0]
    assert first["data"]["finish_reason"] == "length"
    told = server.requests()[1]["messages"][-1]["content"]
    assert "cut off at the output token limit" in told
    assert status_json(session)["session"]["status"] == "completed"


def test_another_thread_cannot_take_a_session_lock_this_thread_holds(tmp_path):
    from orchestrator.loop import SessionBusy, session_lock

    (tmp_path / ".orchestrator").mkdir()
    refused: list[BaseException] = []

    def other() -> None:
        try:
            with session_lock(tmp_path):
                pass
        except SessionBusy as exc:
            refused.append(exc)

    with session_lock(tmp_path), session_lock(tmp_path):  # re-entrant in the holding thread
        worker = threading.Thread(target=other)
        worker.start()
        worker.join(timeout=DEADLINE_S)
    assert len(refused) == 1 and str(os.getpid()) in str(refused[0])
    with session_lock(tmp_path):  # free again once released
        pass


def test_a_dollar_budget_for_a_model_of_unknown_price_needs_a_token_budget(tmp_path, fake_provider):
    server = fake_provider.start({"replies": [{"content": "ALL_COMPLETED"}]})
    args = launch_args(tmp_path, server.url, "--no-plots", "--budget-usd", "0.01", model="openai/my-local-model")
    refused = orchestrator(*args, env={"OPENAI_API_KEY": ""}, timeout=CLI_TIMEOUT_S)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--max-tokens-total" in one_line(refused.stderr)
    assert not (tmp_path / "sessions").exists() and server.requests() == []
    bounded = orchestrator(*args, "--max-tokens-total", "100000", env={"OPENAI_API_KEY": ""}, timeout=CLI_TIMEOUT_S)
    assert bounded.returncode == 0, bounded.stdout + bounded.stderr
    assert status_json(session_from(bounded))["session"]["status"] == "completed"


def test_the_transcript_never_holds_a_reply_the_journal_lacks(tmp_path, fake_provider):
    server = fake_provider.start({"replies": waiting_replies()}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"),
                       env={**MODEL_ENV, "ORCH_TEST_CRASH_AT": "reply:1"}, timeout=CLI_TIMEOUT_S)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    session = session_from(res)
    assert len(events(session, "reply")) == 1  # journaled, then killed before the transcript was written
    transcript = session / ".orchestrator" / "transcript.jsonl"
    assert not transcript.exists() or transcript.read_text() == ""


def test_a_second_ctrl_c_during_the_clean_up_still_ends_the_session_recorded(tmp_path, fake_provider, reaper):
    go = tmp_path / "go"
    reaper.watch_run(go)
    stubborn = (WAITING_EXPERIMENT_PATCH[0],  # ignores SIGTERM: stopping it takes the whole grace period
                "    import signal\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + WAITING_EXPERIMENT_PATCH[1])
    replies = [{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1.") + edit(*stubborn, plan="")},
               {"content": "ALL_COMPLETED"}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    # the run talks to the test through files in tmp and its pid
    env = {**MODEL_ENV, **UNSANDBOXED, "TOY_GO_FILE": str(go)}
    proc = reaper.spawn(launch_args(tmp_path, server.url, "--no-plots", "--env", f"TOY_GO_FILE={go}"), env,
                        tmp_path / "launch")
    run_pid = read_pid(Path(str(go) + ".pid"), proc)
    for _ in range(3):  # an impatient user
        os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=DEADLINE_S) == 130, (tmp_path / "launch" / "stderr").read_text()
    wait_for(lambda: not pid_alive(run_pid), "the run's process to be stopped")
    session = Path((tmp_path / "launch" / "stdout").read_text().splitlines()[0])
    state = status_json(session)["session"]
    assert state["status"] == "interrupted" and state["reason"] == "interrupted by the user", state
