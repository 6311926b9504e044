"""Helpers for the end-to-end session tests: a small template made on the spot, and reply builders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_KEY = "sk-test-e2e-4f9a1c7d2b6e8f0a3c5d7e9b"

EXPERIMENT = '''\
"""A toy experiment: the score peaks at LR = 0.3."""
import argparse
import json
import os

LR = 0.1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    score = 1.0 - abs(LR - 0.3)
    secrets = sorted(k for k in os.environ if k.endswith(("_API_KEY", "_TOKEN", "_SECRET")))
    print("secret-looking variables seen:", secrets)
    info = {"toy": {"means": {"score": score, "gap": abs(LR - 0.3)}, "stderrs": {"score": 0.01, "gap": 0.0}}}
    with open(os.path.join(args.out_dir, "final_info.json"), "w") as fh:
        json.dump(info, fh)


if __name__ == "__main__":
    main()
'''

TEMPLATE_TOML = """\
description = "toy template for tests"
editable = ["experiment.py", "notes.txt"]
timeout_s = 60
key_metrics = ["toy.score", "toy.gap"]

[metrics]
"toy.score" = "higher"
"toy.gap" = "lower"
"""


# A patch for EXPERIMENT: the run writes its pid to $TOY_GO_FILE.pid, then waits until $TOY_GO_FILE exists.
WAITING_EXPERIMENT_PATCH = (
    "    os.makedirs(args.out_dir, exist_ok=True)\n",
    "    os.makedirs(args.out_dir, exist_ok=True)\n"
    "    import pathlib, time\n"
    "    go = pathlib.Path(os.environ['TOY_GO_FILE'])\n"
    "    with open(os.environ['TOY_GO_FILE'] + '.pid', 'w') as fh:\n"
    "        fh.write(str(os.getpid()))\n"
    "    while not go.exists():\n"
    "        time.sleep(0.05)\n",
)


# For sessions whose runs must reach the host: write files the test reads (TOY_GO_FILE, pid files in the test's
# tmp folder), or be seen, signalled and outlive the orchestrator by their pid. The default sandbox gives a run a
# private /tmp, a read-only tree and its own PID namespace, and kills it with its orchestrator.
UNSANDBOXED = {"ORCH_SANDBOX": "none"}


def default_stop_signals() -> None:
    """A `preexec_fn` for a child the test will stop by signal: a pytest started from a background job inherits
    SIGINT as ignored, under `nohup` SIGHUP too, and the orchestrator leaves ignored signals ignored (as a user who
    started it with `nohup` wants)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def make_template(root: Path) -> Path:
    t = root / "toy_template"
    t.mkdir(parents=True)
    (t / "experiment.py").write_text(EXPERIMENT)
    (t / "notes.txt").write_text("# Notes\n")
    (t / "template.toml").write_text(TEMPLATE_TOML)
    (t / "prompt.json").write_text(
        json.dumps(
            {"system": "You study learning rates.", "task_description": "A toy experiment with one knob, LR."}
        )
    )
    return t


def make_idea(root: Path) -> Path:
    path = root / "idea.json"
    path.write_text(
        json.dumps(
            {
                "name": "toy_lr",
                "title": "Tune the toy LR",
                "experiment": "Find the best LR.",
                "plan": "Sweep LR upwards.",
            }
        )
    )
    return path


def edit(search: str, replace: str, path: str = "experiment.py", plan: str = "Change the code.") -> str:
    return f"{plan}\n\n{path}\n```python\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n```\n"


def hanging_code(pid_file: Path) -> str:
    """Code for a run that ignores SIGTERM, forks a grandchild that does too, records both pids, then hangs."""
    return textwrap.dedent(f"""\
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        with open({str(pid_file)!r}, "w") as fh:
            fh.write(f"{{__import__('os').getpid()}} {{child.pid}}")
        time.sleep(600)
        """)


def orchestrator(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def session_from(result: subprocess.CompletedProcess[str]) -> Path:
    first = result.stdout.splitlines()[0] if result.stdout else ""
    path = Path(first.strip())
    assert path.is_dir(), f"first line of output is not the session folder: {first!r}\n{result.stderr}"
    return path


def status_json(session: Path) -> dict:
    res = orchestrator("status", str(session), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def git(session: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(session), *args], capture_output=True, text=True, check=True
    ).stdout


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def waiting_run_script(where: Path) -> tuple[Path, Path]:
    """(the go file, a scripted model's file) for a session whose run 1 waits for that go file (see
    WAITING_EXPERIMENT_PATCH): launch with `--env TOY_GO_FILE=<go file>`; the run's pid appears in `<go file>.pid`."""
    script = where / "replies.json"
    script.write_text(json.dumps([edit(*WAITING_EXPERIMENT_PATCH, plan="Run 1: wait for the go file.")]))
    return where / "go", script


def stop_waiting_run(go: Path, proc: subprocess.Popen, run_pid: int | None, grace_s: float = 30) -> None:
    """A test's clean-up, pass or fail: let a WAITING_EXPERIMENT_PATCH run end (touch its go file), kill the
    orchestrator if it still runs, and SIGKILL the run by pid if it has not ended within `grace_s`."""
    go.touch()
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if run_pid is not None:
        deadline = time.monotonic() + grace_s
        while pid_alive(run_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(run_pid):
            os.kill(run_pid, signal.SIGKILL)


def stopped_after_first_reply(args: list[str], env: dict[str, str]) -> tuple[Path, float]:
    """Launch a session and stop it (SIGKILL, by fault injection) as soon as the model's first reply is journaled:
    the baseline and that reply are done, run 1 is next. Returns the session and the active seconds it used.

    The wall-clock tests resume from here with a budget of these seconds plus a margin: what the margin must cover
    is then only the resume's own way to run 1 (no interpreter and litellm start-up, no baseline, no model call),
    so a busy machine cannot use the budget up before run 1 starts."""
    import signal

    first = orchestrator(*args, env={**env, "ORCH_TEST_CRASH_AT": "reply:1"}, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    session = session_from(first)
    return session, float(status_json(session)["session"]["totals"]["active_seconds"])


def run_in_a_terminal(args: list[str], env: dict[str, str], deadline_s: float = 180) -> tuple[int, str]:
    """Run the command line with a pseudo-terminal as stdout and stderr (as a user sees it); its exit status and
    everything it wrote. Reads until the process has ended and the terminal is drained, within a generous deadline."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=env, cwd=REPO, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None and not select.select([master], [], [], 0.5)[0]:
                break
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")
