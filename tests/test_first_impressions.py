"""What a new user meets first: the session folder at once, mistakes (model name, key) refused before any work,
and a process that ends with its last line.

Start-up order is checked without timing: a `sitecustomize` gate holds `import litellm` (on any thread) until the
test opens it, so "the folder line comes before litellm is imported" and "the key check needs no litellm" are facts
a test can see on any machine, however busy. Speed itself is measured by bench/overhead.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.session_helpers import REPO, TEST_KEY, edit, make_idea, make_template, status_json

pytestmark = pytest.mark.slow

DEADLINE_S = 120.0  # generous: only a hang (a wait on the closed gate) reaches it

GATE = textwrap.dedent("""\
    # Holds `import litellm` until the file named by ORCH_TEST_LITELLM_GATE exists; marks the import's start.
    import atexit, importlib.abc, os, sys, time

    _gate = os.environ["ORCH_TEST_LITELLM_GATE"]

    class _Gate(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "litellm":
                open(_gate + ".asked", "w").close()
                while not os.path.exists(_gate):
                    time.sleep(0.01)
            return None

    sys.meta_path.insert(0, _Gate())
    # Interpreter teardown (what makes a process linger after its last line once litellm is loaded) runs atexit
    # hooks: this one shows whether it ran.
    atexit.register(lambda: sys.stderr.write("INTERPRETER-TEARDOWN\\n"))
    """)


def gated_env(tmp: Path, **extra: str) -> tuple[dict[str, str], Path]:
    site = tmp / "gate_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GATE)
    gate = tmp / "litellm.go"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("ORCH_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", ORCH_TEST_LITELLM_GATE=str(gate),
               PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), **extra)
    return env, gate


def first_line(proc: subprocess.Popen[str]) -> str:
    """The first line of stdout, or "" when none came before the deadline."""
    assert proc.stdout is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(DEADLINE_S)
    return got[0] if got else ""


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=DEADLINE_S)


def launch_args(tmp: Path, model: str, *extra: str) -> list[str]:
    return ["launch", str(make_idea(tmp)), "--template", str(make_template(tmp)), "--model", model,
            "--root", str(tmp / "sessions"), "--no-plots", *extra]


def sessions(tmp: Path) -> list[Path]:
    root = tmp / "sessions"
    return sorted(root.iterdir()) if root.exists() else []


def test_the_session_folder_comes_first_while_litellm_is_still_loading(tmp_path, fake_provider):
    server = fake_provider.start([edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2."),
                                  "Done.\n\nALL_COMPLETED"], api_key=TEST_KEY)
    env, gate = gated_env(tmp_path, DEEPSEEK_API_KEY=TEST_KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator",
         *launch_args(tmp_path, "deepseek/deepseek-chat", "--api-base", server.url)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        first = first_line(proc)  # litellm cannot have been imported yet: the gate is closed
        assert first, "no session folder line while litellm's import was held"
        assert Path(first.strip()).is_dir() and Path(first.strip()).parent == tmp_path / "sessions", first
        gate.touch()
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert (tmp_path / "litellm.go.asked").exists()  # litellm was used, after the gate opened
    assert status_json(Path(first.strip()))["session"]["status"] == "completed"
    assert [r["status"] for r in server.requests()] == [200, 200]  # the warm-up sent nothing
    assert "INTERPRETER-TEARDOWN" not in err  # the process ended with its output, without a slow teardown


def test_a_missing_key_of_a_known_provider_stops_at_once_without_litellm(tmp_path):
    env, gate = gated_env(tmp_path)  # the gate stays closed: importing litellm would hang until the deadline
    res = run_cli(launch_args(tmp_path, "deepseek/deepseek-reasoner"), env)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "DEEPSEEK_API_KEY" in lines[0] and "--api-key" not in lines[0], res.stderr
    assert res.stdout == "" and sessions(tmp_path) == []  # nothing made, nothing run
    assert not (tmp_path / "litellm.go.asked").exists()


@pytest.mark.parametrize("model", ["gpt4o", "claude-sonnet"])
def test_a_model_name_litellm_cannot_place_is_refused_before_any_work(tmp_path, model):
    env, gate = gated_env(tmp_path, OPENAI_API_KEY=TEST_KEY)
    gate.touch()
    res = run_cli(launch_args(tmp_path, model), env)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"unknown model {model!r}" in lines[0] and "provider/model" in lines[0], res.stderr
    assert res.stdout == "" and sessions(tmp_path) == []


def test_resume_with_another_model_and_no_key_stops_before_anything_changes(tmp_path):
    env, gate = gated_env(tmp_path)
    gate.touch()
    script = tmp_path / "replies.json"
    script.write_text(json.dumps([edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")]))  # then exhausted
    res = run_cli(launch_args(tmp_path, f"scripted:{script}"), env)
    assert res.returncode == 1, res.stdout + res.stderr  # interrupted: the script ran out
    (session,) = sessions(tmp_path)
    journal = (session / ".orchestrator" / "journal.jsonl").read_text()
    settings = (session / ".orchestrator" / "settings.json").read_text()

    for model, needle in [("deepseek/deepseek-chat", "DEEPSEEK_API_KEY"), ("gpt4o", "unknown model")]:
        res = run_cli(["resume", str(session), "--model", model], env)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], res.stderr
    assert (session / ".orchestrator" / "journal.jsonl").read_text() == journal
    assert (session / ".orchestrator" / "settings.json").read_text() == settings


def test_a_server_on_the_local_network_needs_no_key_and_a_named_host_is_told_what_to_set(tmp_path):
    env, gate = gated_env(tmp_path)
    res = run_cli(launch_args(tmp_path, "openai/qwen2.5-coder", "--api-base", "http://gpu-box.invalid:8000/v1"),
                  env)
    assert res.returncode == 2, res.stdout + res.stderr
    line = res.stderr.strip()
    assert "export OPENAI_API_KEY=" in line and "any value will do" in line and "\n" not in line
    assert "--api-key" not in line


def test_the_exit_does_not_wait_for_interpreter_teardown(tmp_path):
    env, gate = gated_env(tmp_path)
    gate.touch()
    res = run_cli(["list", str(tmp_path)], env)
    assert "INTERPRETER-TEARDOWN" not in res.stderr
    res = run_cli(["--help"], env)  # and a plain command still says all it has to say
    assert res.returncode == 0 and "launch" in res.stdout and "INTERPRETER-TEARDOWN" not in res.stderr


@pytest.mark.parametrize("key", [None, "   "], ids=["unset", "blank"])
def test_a_missing_or_blank_key_is_one_line_and_no_session(tmp_path, key):
    # A launch that got past the check is killed as its session starts (the gate is open: a wrong answer fails
    # fast; test_a_missing_key_of_a_known_provider_stops_at_once_without_litellm keeps it closed).
    env, gate = gated_env(tmp_path, ORCH_TEST_CRASH_AT="drive_started")
    gate.touch()
    if key is not None:
        env["DEEPSEEK_API_KEY"] = key
    res = run_cli(launch_args(tmp_path, "deepseek/deepseek-chat"), env)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "DEEPSEEK_API_KEY" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == "" and sessions(tmp_path) == [] and not (tmp_path / "sessions").exists()


def test_a_ca_bundle_setting_that_is_a_folder_stops_a_launch_before_any_work(tmp_path):
    bundle = tmp_path / "certs"
    bundle.mkdir()
    env, gate = gated_env(tmp_path, DEEPSEEK_API_KEY=TEST_KEY, SSL_CERT_FILE=str(bundle),
                          ORCH_TEST_CRASH_AT="drive_started")
    gate.touch()
    res = run_cli(launch_args(tmp_path, "deepseek/deepseek-chat"), env)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bundle) in lines[0] and "CA bundle" in lines[0], res.stderr
    assert res.stdout == "" and sessions(tmp_path) == []


def test_a_local_server_without_a_key_is_not_refused_at_launch(tmp_path):
    """openai/ on this machine needs no OPENAI_API_KEY: the launch gets past its checks (and is stopped by fault
    injection once the session starts, before anything would reach the port)."""
    env, gate = gated_env(tmp_path, ORCH_TEST_CRASH_AT="drive_started")
    gate.touch()
    res = run_cli(launch_args(tmp_path, "openai/gpt-4o", "--api-base", "http://127.0.0.1:9/v1"), env)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr  # killed where the session starts, not refused
    assert "OPENAI_API_KEY" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    (session,) = sessions(tmp_path)
    assert res.stdout.splitlines()[0] == str(session)
    assert status_json(session)["session"]["model"] == "openai/gpt-4o"
