"""Whole sessions, end to end: the CLI in a subprocess, over real HTTP (the direct route, and litellm where a test
says so) to the fake DeepSeek-rules server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.session_helpers import (
    REPO,
    TEST_KEY,
    UNSANDBOXED,
    WAITING_EXPERIMENT_PATCH,
    edit,
    git,
    hanging_code,
    make_idea,
    make_template,
    orchestrator,
    pid_alive,
    session_from,
    status_json,
    stop_waiting_run,
    stopped_after_first_reply,
)

pytestmark = pytest.mark.slow

MODEL_ENV = {"DEEPSEEK_API_KEY": TEST_KEY, "MY_SERVICE_TOKEN": "tok-abcdef123456"}


def launch_args(tmp: Path, url: str, *extra: str) -> list[str]:
    template = make_template(tmp)
    idea = make_idea(tmp)
    return [
        "launch",
        str(idea),
        "--template",
        str(template),
        "--model",
        "deepseek/deepseek-reasoner",
        "--api-base",
        url,
        "--root",
        str(tmp / "sessions"),
        *extra,
    ]


def test_a_whole_session_survives_failed_edits_crashes_timeouts_and_429s(tmp_path, fake_provider):
    pid_file = tmp_path / "hang.pids"
    hang = textwrap.indent(hanging_code(pid_file), "    ")
    replies = [
        {
            "content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: raise LR to 0.2."),
            "reasoning": "think",
            "prompt_tokens": 900,
            "completion_tokens": 100,
            "cached_tokens": 300,
        },
        {"content": edit("LR = 0.25\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")},  # SEARCH matches nothing
        {
            "content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")
            + edit(
                "    score = 1.0 - abs(LR - 0.3)\n",
                "    raise RuntimeError('exploded on purpose')\n",
                plan="",
            )
        },
        {
            "content": edit(
                "    raise RuntimeError('exploded on purpose')\n",
                "    score = 1.0 - abs(LR - 0.3)\n",
                plan="Fix the crash.",
            )
        },
        {
            "content": edit(
                "    os.makedirs(args.out_dir, exist_ok=True)\n",
                "    os.makedirs(args.out_dir, exist_ok=True)\n" + hang,
                plan="Run 3: a slow variant.",
            )
        },
        {
            "content": edit(hang, "", plan="Run 3: drop the slow part.")
            + edit("LR = 0.3\n", "LR = 0.35\n", plan="")
        },
        {"content": "Everything planned is done.\n\nALL_COMPLETED"},
        {"content": edit("# Notes\n", "# Notes\nLR = 0.3 scored best.\n", path="notes.txt", plan="Notes.")},
    ]
    server = fake_provider.start(
        {"replies": replies, "faults": {"2": {"status": 429, "retry_after": 1}}}, api_key=TEST_KEY
    )
    # the hanging run writes its and its grandchild's pids into the test's tmp folder
    res = orchestrator(*launch_args(tmp_path, server.url, "--timeout", "4"), env={**MODEL_ENV, **UNSANDBOXED})
    assert res.returncode == 0, res.stdout + res.stderr
    session = session_from(res)

    # The provider never answered 400: every history sent obeyed DeepSeek's rules.
    statuses = [r["status"] for r in server.requests()]
    assert 400 not in statuses and statuses.count(429) == 1 and statuses.count(200) == len(replies)

    state = status_json(session)
    assert state["session"]["status"] == "completed"
    runs = {r["run"]: r for r in state["runs"]}
    assert [runs[i]["status"] for i in range(4)] == ["ok", "ok", "ok", "ok"]
    assert runs[2]["attempts"] == 2 and runs[2]["history"][0]["outcome"] == "error"
    assert "exploded on purpose" in runs[2]["history"][0]["stderr_tail"]
    assert runs[3]["history"][0]["outcome"] == "timeout"
    assert runs[2]["metrics"]["toy.score"]["value"] == pytest.approx(1.0)
    assert runs[2]["metrics"]["toy.score"]["vs_baseline"] == pytest.approx(0.2)
    assert runs[2]["metrics"]["toy.score"]["better"] is True
    assert runs[1]["cached_tokens"] == 300 and runs[1]["prompt_tokens"] == 900

    tags = set(git(session, "tag").split())
    assert {"run_0", "run_1", "run_2", "run_3"} <= tags
    # The hanging run and the grandchild it forked were both stopped.
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2 and not any(pid_alive(p) for p in pids)

    piped = orchestrator("diff", str(session), "2")
    assert piped.returncode == 0
    assert "-LR = 0.2" in piped.stdout and "+LR = 0.3" in piped.stdout and "\x1b[" not in piped.stdout
    assert "LR = 0.3 scored best." in (session / "notes.txt").read_text()

    # The experiment never saw a key; the key appears nowhere in the session folder.
    assert "seen: []" in (session / "run_1" / "stdout.log").read_text()
    for path in session.rglob("*"):
        if path.is_file() and ".git/" not in path.as_posix():
            assert TEST_KEY not in path.read_text(errors="ignore"), path
    assert TEST_KEY not in git(session, "log", "-p", "--all")


def test_the_first_prompt_carries_idea_baseline_command_and_files(tmp_path, fake_provider):
    server = fake_provider.start(
        {"replies": [{"content": "Nothing to try.\nALL_COMPLETED"}]}, api_key=TEST_KEY
    )
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"), env=MODEL_ENV)
    assert res.returncode == 0, res.stderr
    first = server.requests()[0]["messages"]
    assert first[0]["role"] == "system" and "You study learning rates." in first[0]["content"]
    prompt = first[1]["content"]
    for expected in (
        "Tune the toy LR",
        "Sweep LR upwards.",
        "toy.score: 0.8",
        "python experiment.py --out_dir=run_i",
        "ALL_COMPLETED",
        "LR = 0.1",
        "<<<<<<< SEARCH",
    ):
        assert expected in prompt, expected


def test_runs_given_up_after_four_attempts_restore_the_last_good_code(tmp_path, fake_provider):
    crash = edit(
        "    score = 1.0 - abs(LR - 0.3)\n", "    score = 1.0 - abs(LR - 0.3)\n    1 / 0\n", plan="Try."
    )
    again = edit("    1 / 0\n", "    [][1]\n", plan="Try again.")
    back = edit("    [][1]\n", "    1 / 0\n", plan="And again.")
    replies = [crash, again, back, again, {"content": "ALL_COMPLETED"}]
    server = fake_provider.start(
        {"replies": [{"content": r} if isinstance(r, str) else r for r in replies]}, api_key=TEST_KEY
    )
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"), env=MODEL_ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    session = session_from(res)
    state = status_json(session)
    run1 = next(r for r in state["runs"] if r["run"] == 1)
    assert run1["status"] == "failed" and run1["attempts"] == 4
    assert "run_1" not in git(session, "tag").split()
    # The code is back to the baseline's, and the model was told so with the files.
    assert (session / "experiment.py").read_text() == git(session, "show", "run_0:experiment.py")
    last_prompt = server.requests()[-1]["messages"][-1]["content"]
    assert "restored to run_0" in last_prompt and "LR = 0.1" in last_prompt


# --------------------------------------------------------------------------------------------------- crash tests

def crash_replies() -> list[dict]:
    return [
        {
            "content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")
            + edit(*WAITING_EXPERIMENT_PATCH, plan="")
        },
        {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")},
        {"content": "ALL_COMPLETED"},
    ]


def outcome(session: Path) -> tuple[dict[str, str], dict[int, dict]]:
    state = status_json(session)
    metrics = {r["run"]: {k: v["value"] for k, v in r["metrics"].items()} for r in state["runs"]}
    tags = {t: git(session, "show", f"{t}:experiment.py") for t in git(session, "tag").split()}
    return tags, metrics


def run_session(tmp: Path, fake_provider, crash_at: str | None) -> tuple[Path, object]:
    go = tmp / "go"
    server = fake_provider.start({"replies": crash_replies()}, api_key=TEST_KEY)
    # the run waits for a file in the test's tmp folder; one must outlive its SIGKILLed orchestrator
    env = {**MODEL_ENV, **UNSANDBOXED, "TOY_GO_FILE": str(go)}
    args = [*launch_args(tmp, server.url, "--no-plots", "--env", f"TOY_GO_FILE={go}")]
    if crash_at == "during_run":
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **env},
        )
        pid_file = Path(str(go) + ".pid")
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the run never started"
            time.sleep(0.05)
        orphan = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=30)
        session = Path(stdout.splitlines()[0])
        assert pid_alive(orphan)  # the run outlived the orchestrator...
        go.touch()
        resumed = orchestrator("resume", str(session), env=env)
        assert not pid_alive(orphan)  # ...until resume stopped it
    else:
        go.touch()
        first = orchestrator(*args, env={**env, **({"ORCH_TEST_CRASH_AT": crash_at} if crash_at else {})})
        session = session_from(first)
        if crash_at is None:
            assert first.returncode == 0, first.stderr
            return session, server
        assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
        resumed = orchestrator("resume", str(session), env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return session, server


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fake_provider_module):
    session, _ = run_session(tmp_path_factory.mktemp("plain"), fake_provider_module, None)
    return outcome(session)


@pytest.mark.parametrize("crash_at", ["reply:1", "edits_written:1", "during_run", "run_finished:2"])
def test_resume_after_sigkill_finishes_like_an_uninterrupted_session(
    crash_at, tmp_path, fake_provider, uninterrupted
):
    session, server = run_session(tmp_path, fake_provider, crash_at)
    assert outcome(session) == uninterrupted
    answered = [json.dumps(r["messages"], sort_keys=True) for r in server.requests() if r["status"] == 200]
    assert len(answered) == len(set(answered)) == 3, "a journaled reply was requested again"
    assert status_json(session)["session"]["status"] == "completed"


# --------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_get_one_line_and_exit_2(tmp_path):
    template = make_template(tmp_path)
    idea = make_idea(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x", ')
    no_exp = tmp_path / "no_experiment"
    no_exp.mkdir()
    cases = {
        "missing idea": ["launch", str(tmp_path / "nope.json"), "--template", str(template)],
        "invalid idea": ["launch", str(broken), "--template", str(template)],
        "unknown template": ["launch", str(idea), "--template", "no_such_template"],
        "no experiment.py": ["launch", str(idea), "--template", str(no_exp)],
        "max runs over 10": ["launch", str(idea), "--template", str(template), "--max-runs", "11"],
        "secret --env": ["launch", str(idea), "--template", str(template), "--env", "OPENAI_API_KEY=sk-x"],
        "not a session": ["resume", str(tmp_path)],
        "status of a non-session": ["status", str(tmp_path)],
        "missing key": [
            "launch",
            str(idea),
            "--template",
            str(template),
            "--model",
            "deepseek/deepseek-chat",
        ],
    }
    env = {k: "" for k in os.environ if k.endswith("_API_KEY")}
    for name, args in cases.items():
        res = orchestrator(*args, env={**env, "DEEPSEEK_API_KEY": ""}, cwd=tmp_path)
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, (name, res.stderr)
    assert "DEEPSEEK_API_KEY" in orchestrator(*cases["missing key"], env={"DEEPSEEK_API_KEY": ""}, cwd=tmp_path).stderr
    assert not (tmp_path / "experiments").exists()


def test_resuming_a_finished_session_changes_nothing(tmp_path, fake_provider):
    server = fake_provider.start({"replies": [{"content": "ALL_COMPLETED"}]}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"), env=MODEL_ENV)
    session = session_from(res)
    journal = (session / ".orchestrator" / "journal.jsonl").read_text()
    again = orchestrator("resume", str(session), env=MODEL_ENV)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert (session / ".orchestrator" / "journal.jsonl").read_text() == journal
    assert len(server.requests()) == 1


def baseline_needs_toy_data(template: Path) -> None:
    """The template's experiment fails until its runs get TOY_DATA (as a missing dataset would)."""
    experiment = template / "experiment.py"
    experiment.write_text(experiment.read_text().replace(
        "    os.makedirs(args.out_dir, exist_ok=True)\n",
        "    os.makedirs(args.out_dir, exist_ok=True)\n"
        "    if not os.environ.get('TOY_DATA'):\n"
        "        raise SystemExit('dataset not found: set TOY_DATA')\n"))


def test_a_failed_baseline_costs_no_call_and_resume_runs_it_again_once_fixed(tmp_path, fake_provider):
    server = fake_provider.start({"replies": [{"content": edit("LR = 0.1\n", "LR = 0.3\n", plan="LR 0.3.")}]},
                                 api_key=TEST_KEY)
    args = launch_args(tmp_path, server.url, "--no-plots", "--max-runs", "1")
    baseline_needs_toy_data(tmp_path / "toy_template")
    first = orchestrator(*args, env=MODEL_ENV)
    session = session_from(first)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "baseline_failed" in first.stdout and f"orchestrator resume {session}" in first.stdout
    state = status_json(session)
    assert state["session"]["status"] == "baseline_failed"
    assert "dataset not found" in state["session"]["reason"]
    assert [(r["run"], r["status"]) for r in state["runs"]] == [(0, "failed")]
    assert server.requests() == []  # nothing was paid for

    # Resumed as it is, the baseline runs again (its next attempt) and fails again.
    again = orchestrator("resume", str(session), env=MODEL_ENV)
    assert again.returncode == 1 and status_json(session)["session"]["status"] == "baseline_failed"
    # Resumed with the cause fixed, it runs once more, then the session goes on to the model.
    fixed = orchestrator("resume", str(session), "--env", "TOY_DATA=1", env=MODEL_ENV)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    state = status_json(session)
    assert state["session"]["status"] == "max_runs"
    run0 = next(r for r in state["runs"] if r["run"] == 0)
    assert run0["status"] == "ok" and [a["outcome"] for a in run0["history"]] == ["error", "error", "ok"]
    assert run0["metrics"]["toy.score"]["value"] == pytest.approx(0.8)
    assert next(r for r in state["runs"] if r["run"] == 1)["status"] == "ok"
    assert len(server.requests()) == 1
    assert git(session, "tag", "--list").split() == ["run_0", "run_1"]


def test_a_baseline_retry_killed_midway_is_replayed_as_the_same_attempt(tmp_path, fake_provider):
    server = fake_provider.start({"replies": [{"content": edit("LR = 0.1\n", "LR = 0.3\n", plan="LR 0.3.")}]},
                                 api_key=TEST_KEY)
    args = launch_args(tmp_path, server.url, "--no-plots", "--max-runs", "1")
    baseline_needs_toy_data(tmp_path / "toy_template")
    session = session_from(orchestrator(*args, env=MODEL_ENV))
    assert status_json(session)["session"]["status"] == "baseline_failed"

    # The retry (attempt 2) is killed with its orchestrator as soon as its run has started.
    killed = orchestrator("resume", str(session), "--env", "TOY_DATA=1",
                          env={**MODEL_ENV, "ORCH_TEST_CRASH_AT": "run_spawned"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    fixed = orchestrator("resume", str(session), "--env", "TOY_DATA=1", env=MODEL_ENV)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    state = status_json(session)
    assert state["session"]["status"] == "max_runs"
    run0 = next(r for r in state["runs"] if r["run"] == 0)
    assert run0["status"] == "ok" and run0["history"][0]["outcome"] == "error"
    assert run0["history"][-1]["outcome"] == "ok"
    assert {a["attempt"] for a in run0["history"][1:]} == {2}  # the killed retry is replayed, not counted again
    assert len(server.requests()) == 1


# --------------------------------------------------------------------------------------------------- limits, Ctrl-C, baseline


# The child resets SIGINT to its default before it becomes the orchestrator: a pytest started from a background job
# (or under `nohup`) inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
_SIGINT_DEFAULT_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
EVENT_DEADLINE_S = 300.0  # generous: only a hang reaches it, however busy the machine


def test_ctrl_c_leaves_a_resumable_session_and_stops_the_run(tmp_path, fake_provider):
    go = tmp_path / "go"
    server = fake_provider.start({"replies": crash_replies()}, api_key=TEST_KEY)
    # unsandboxed: the run writes its pid file into this test's folder, and the test checks that pid
    env = {**MODEL_ENV, "TOY_GO_FILE": str(go), "ORCH_SANDBOX": "none"}
    args = launch_args(tmp_path, server.url, "--no-plots", "--env", f"TOY_GO_FILE={go}")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as out_fh, err.open("w") as err_fh:  # files, not pipes: nothing blocks on a full pipe
        proc = subprocess.Popen([sys.executable, "-c", _SIGINT_DEFAULT_EXEC, "-m", "orchestrator", *args], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=out_fh, stderr=err_fh,
                                env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": pythonpath,
                                     **env})
    pid_file = Path(str(go) + ".pid")
    run_pid: int | None = None
    try:
        deadline = time.monotonic() + EVENT_DEADLINE_S
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert proc.poll() is None, f"the orchestrator ended before run 1 started:\n{err.read_text()}"
            assert time.monotonic() < deadline, "run 1 never started"
            time.sleep(0.05)
        run_pid = int(pid_file.read_text())
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=EVENT_DEADLINE_S)
        stdout, stderr = out.read_text(), err.read_text()
        assert proc.returncode == 130, stdout + stderr
        assert "orchestrator resume" in stdout
        session = Path(stdout.splitlines()[0])
        assert not pid_alive(run_pid)
        assert status_json(session)["session"]["status"] == "interrupted"
        go.touch()
        resumed = orchestrator("resume", str(session), env=env, timeout=EVENT_DEADLINE_S)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert status_json(session)["session"]["status"] == "completed"
    finally:  # on failure, nothing is left running: the orchestrator and its run are stopped by pid
        stop_waiting_run(go, proc, run_pid)


def test_the_budget_is_checked_before_every_call(tmp_path, fake_provider):
    replies = [{"content": edit("LR = 0.1\n", "LR = 0.2\n"), "prompt_tokens": 200_000, "completion_tokens": 1000},
               {"content": "ALL_COMPLETED"}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots", "--budget-usd", "0.01"), env=MODEL_ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    state = status_json(session_from(res))
    assert state["session"]["status"] == "budget_usd" and "budget" in state["session"]["reason"]
    assert state["session"]["totals"]["cost_usd"] > 0.01
    assert len(server.requests()) == 1  # the second call was never made

    session = session_from(res)
    again = orchestrator("resume", str(session), env=MODEL_ENV)
    assert again.returncode == 0 and "--budget-usd" in again.stdout and len(server.requests()) == 1
    more = orchestrator("resume", str(session), "--budget-usd", "5", env=MODEL_ENV)
    assert more.returncode == 0, more.stdout + more.stderr
    assert status_json(session)["session"]["status"] == "completed" and len(server.requests()) == 2


def test_a_template_baseline_is_reused_only_when_made_by_the_same_code(tmp_path, fake_provider):
    from orchestrator.template import record_baseline_hash

    template = make_template(tmp_path)
    (template / "run_0").mkdir()
    (template / "run_0" / "final_info.json").write_text(json.dumps({"toy": {"means": {"score": 0.123}}}))
    record_baseline_hash(template)
    idea = make_idea(tmp_path)
    server = fake_provider.start({"replies": [{"content": "ALL_COMPLETED"}] * 2}, api_key=TEST_KEY)

    def launch() -> dict:
        res = orchestrator("launch", str(idea), "--template", str(template), "--model", "deepseek/deepseek-reasoner",
                           "--api-base", server.url, "--root", str(tmp_path / "sessions"), "--no-plots", env=MODEL_ENV)
        assert res.returncode == 0, res.stdout + res.stderr
        session = session_from(res)
        assert "run_0" in git(session, "tag").split()
        return next(r for r in status_json(session)["runs"] if r["run"] == 0)

    reused = launch()
    assert reused["metrics"]["toy.score"]["value"] == 0.123 and reused["duration_s"] is None
    (template / "experiment.py").write_text((template / "experiment.py").read_text() + "\n# changed\n")
    rerun = launch()
    assert rerun["metrics"]["toy.score"]["value"] == pytest.approx(0.8) and rerun["duration_s"] is not None


def test_the_wall_clock_budget_stops_a_run_that_would_outlast_it(tmp_path, fake_provider):
    slow = edit("    os.makedirs(args.out_dir, exist_ok=True)\n",
                "    os.makedirs(args.out_dir, exist_ok=True)\n    import time\n    time.sleep(600)\n", plan="A slow run.")
    server = fake_provider.start({"replies": [{"content": slow}, {"content": "ALL_COMPLETED"}]}, api_key=TEST_KEY)
    # no race between the budget and the run's start: the budget is set once run 1 is next (see the helper)
    session, used = stopped_after_first_reply(launch_args(tmp_path, server.url, "--no-plots"), MODEL_ENV)
    res = orchestrator("resume", str(session), "--wall-clock", f"{used + 45:.1f}", "--timeout", "500",
                       env=MODEL_ENV, timeout=EVENT_DEADLINE_S)
    assert res.returncode == 0, res.stdout + res.stderr
    state = status_json(session)
    assert state["session"]["status"] == "wall_clock" and "wall-clock" in state["session"]["reason"]
    # the run was cut at the budget (not after its 500 s timeout) and will run again on resume
    assert [r["status"] for r in state["runs"]] == ["ok", "stopped"]
    assert state["runs"][1]["history"][-1]["outcome"] == "stopped"
    assert len(server.requests()) == 1


def test_a_context_window_error_shortens_the_history_instead_of_failing(tmp_path, fake_provider):
    replies = [{"content": edit("LR = 0.1\n", "LR = 0.2\n")}, {"content": edit("LR = 0.2\n", "LR = 0.3\n")},
               {"content": "ALL_COMPLETED"}]
    too_long = {"status": 400, "message": "This model's maximum context length is 50 tokens. Please reduce the length."}
    server = fake_provider.start({"replies": replies, "faults": {"3": too_long}}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"), env=MODEL_ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert status_json(session_from(res))["session"]["status"] == "completed"
    sent = server.requests()
    assert sent[2]["status"] == 400 and sent[3]["status"] == 200
    assert len(sent[3]["messages"]) < len(sent[2]["messages"])
    assert sent[3]["messages"][-1] == sent[2]["messages"][-1]  # the pending prompt is still the last message


def test_two_orchestrators_never_drive_one_session(tmp_path, fake_provider):
    import fcntl

    server = fake_provider.start({"replies": [{"content": "ALL_COMPLETED"}]}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots"), env={**MODEL_ENV, "ORCH_TEST_CRASH_AT": "reply"})
    session = session_from(res)
    with open(session / ".orchestrator" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another driver holds the session
        busy = orchestrator("resume", str(session), env=MODEL_ENV)
    assert busy.returncode == 2 and "another orchestrator process" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    done = orchestrator("resume", str(session), env=MODEL_ENV)
    assert done.returncode == 0 and status_json(session)["session"]["status"] == "completed"


PLOT_PY = '''\
"""Writes scores.png: one byte per successful run's score (a stand-in for a real figure)."""
import glob
import json

scores = [json.load(open(p))["toy"]["means"]["score"] for p in sorted(glob.glob("run_*/final_info.json"))]
TITLE = "scores"
with open("scores.png", "wb") as fh:
    fh.write(bytes(int(s * 100) for s in scores))
'''


@pytest.mark.parametrize("crash_at", ["run_finished:3", "reply:4"])
def test_the_plot_and_notes_stage_resumes_after_sigkill(crash_at, tmp_path, fake_provider):
    make_template(tmp_path)
    (tmp_path / "toy_template" / "plot.py").write_text(PLOT_PY)
    (tmp_path / "toy_template" / "template.toml").write_text(
        (tmp_path / "toy_template" / "template.toml").read_text().replace('"notes.txt"]', '"notes.txt", "plot.py"]'))
    replies = [{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1.")}, {"content": "ALL_COMPLETED"},
               {"content": edit('TITLE = "scores"\n', 'TITLE = "toy score by run"\n', path="plot.py", plan="Title.")},
               {"content": edit("# Notes\n", "# Notes\nRun 1 raised the score.\n", path="notes.txt", plan="Notes.")}]
    server = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    idea = make_idea(tmp_path)
    args = ["launch", str(idea), "--template", str(tmp_path / "toy_template"), "--model", "deepseek/deepseek-reasoner",
            "--api-base", server.url, "--root", str(tmp_path / "sessions")]
    first = orchestrator(*args, env={**MODEL_ENV, "ORCH_TEST_CRASH_AT": crash_at})
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    session = session_from(first)
    resumed = orchestrator("resume", str(session), env=MODEL_ENV)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = status_json(session)
    assert state["session"]["status"] == "completed" and state["session"]["figures"] == ["scores.png"]
    assert (session / "scores.png").read_bytes() == bytes([80, 90])
    assert "Run 1 raised the score." in (session / "notes.txt").read_text()
    assert 'TITLE = "toy score by run"' in git(session, "show", "HEAD:plot.py")
    answered = [json.dumps(r["messages"], sort_keys=True) for r in server.requests() if r["status"] == 200]
    assert len(answered) == len(set(answered)) == 4


def test_an_edit_to_a_misnamed_file_is_applied_where_it_matches_and_the_model_is_told(tmp_path, fake_provider):
    misnamed = edit("LR = 0.1\n", "LR = 0.2\n", path="experiments.py", plan="Run 1: LR 0.2.")
    server = fake_provider.start({"replies": [{"content": misnamed}, {"content": "ALL_COMPLETED"}]}, api_key=TEST_KEY)
    args = launch_args(tmp_path, server.url, "--no-plots")
    toml = tmp_path / "toy_template" / "template.toml"  # any .py file is editable: experiments.py passes the rules
    toml.write_text(toml.read_text().replace('editable = ["experiment.py"', 'editable = ["*.py"'))
    res = orchestrator(*args, env=MODEL_ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    session = session_from(res)
    assert "LR = 0.2" in git(session, "show", "run_1:experiment.py")
    assert not (session / "experiments.py").exists()
    told = server.requests()[1]["messages"][-1]["content"]
    assert told.startswith("Note on your last edits:") and "experiment.py" in told


def test_a_trimmed_history_is_journaled_and_later_calls_start_from_it(tmp_path, fake_provider):
    """A provider with a small context window: once a call is refused for length, the trim is journaled and every
    later call (including after a resume) starts from it instead of re-sending the full history."""
    replies = [{"content": edit(f"LR = 0.{i}\n", f"LR = 0.{i + 1}\n", plan=f"Run {i}: LR 0.{i + 1}.")}
               for i in range(1, 6)] + [{"content": "ALL_COMPLETED"}]
    reference = fake_provider.start({"replies": replies}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path / "a", reference.url, "--no-plots"), env=MODEL_ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    sizes = [r["prompt_tokens"] for r in reference.requests()]
    limit = sizes[2] - 1  # the third call and every later one would be too long untrimmed
    server = fake_provider.start({"replies": replies, "context_limit": limit}, api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path / "b", server.url, "--no-plots"),
                       env={**MODEL_ENV, "ORCH_TEST_CRASH_AT": "reply:4"})
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    session = session_from(res)
    resumed = orchestrator("resume", str(session), env=MODEL_ENV)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert status_json(session)["session"]["status"] == "completed"
    journal = [json.loads(line) for line in (session / ".orchestrator" / "journal.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "context_trimmed" for e in journal)
    statuses = [r["status"] for r in server.requests()]
    assert statuses.count(200) == len(replies)
    # only the first too-long call is refused: every later one (also after the resume) is fitted ahead of time
    # to what the provider accepted; before, every call from the third on was refused first
    assert statuses.count(400) == 1, statuses


@pytest.mark.parametrize(("client", "via"), [("auto", "direct"), ("litellm", "litellm")])
def test_the_model_client_setting_chooses_what_carries_the_calls(tmp_path, fake_provider, client, via):
    server = fake_provider.start({"replies": [{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2."),
                                               "prompt_tokens": 900, "completion_tokens": 100}]},
                                 api_key=TEST_KEY)
    res = orchestrator(*launch_args(tmp_path, server.url, "--no-plots", "--max-runs", "1"),
                       env={**MODEL_ENV, "ORCH_MODEL_CLIENT": client})
    assert res.returncode == 0, res.stdout + res.stderr
    session = session_from(res)
    events = [json.loads(line) for line in (session / ".orchestrator" / "journal.jsonl").read_text().splitlines()]
    replies = [e["data"] for e in events if e["kind"] == "reply"]
    assert [(r["via"], r["prompt_tokens"], r["completion_tokens"]) for r in replies] == [(via, 900, 100)]
    assert replies[0]["cost_usd"] > 0  # priced from the same map either way
    assert status_json(session)["session"]["status"] == "max_runs"
