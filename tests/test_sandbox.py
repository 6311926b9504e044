"""The sandbox's parts, each on its own: the guard's snapshot and repair, the checked .git/config, the runner's
limits and network rule, redaction of run folders, terminal-safe text, and a benign run giving the same results
with and without bubblewrap. The hostile end-to-end sessions are in test_sandbox_hostile.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from orchestrator import guard
from orchestrator.runner import RunLimits, RunRequest, start
from orchestrator.sandbox import SandboxSpec, bwrap_command, bwrap_problem, choose, gpu_binds
from orchestrator.secrets import REDACTED, redact_folder
from orchestrator.terminal import safe
from orchestrator.workspace import RepositoryTampered, Workspace, _git_env
from tests.session_helpers import edit, git, make_idea, make_template, orchestrator, session_from, status_json

NO_BWRAP = bwrap_problem()
# CI installs bubblewrap (.ci/run sets ORCH_REQUIRE_BWRAP=1): there a missing bwrap fails instead of skipping.
needs_bwrap = pytest.mark.skipif(NO_BWRAP is not None and os.environ.get("ORCH_REQUIRE_BWRAP") != "1",
                                 reason=f"bubblewrap cannot run here: {NO_BWRAP}")
KEY = "sk-sandbox-test-7d1e0b9c4a2f6e8d0c3b"


def run_once(session: Path, code: str, name: str = "run_1", spec: SandboxSpec | None = None,
             limits: RunLimits | None = None, timeout: float = 60):
    (session / "experiment.py").write_text(code)
    req = RunRequest(cwd=session, run_name=name, results_file=None, sandbox=spec, timeout_s=timeout,
                     limits=limits or RunLimits())
    with start(req, gate=True) as handle:
        handle.release()
        return handle.wait()


@pytest.fixture
def session(tmp_path):
    folder = tmp_path / "session"
    folder.mkdir()
    (folder / "experiment.py").write_text("pass\n")
    (folder / "evaluate.py").write_text("SCALE = 1\n")
    Workspace.init(folder)
    return folder


MODES = [pytest.param(None, id="none"), pytest.param(SandboxSpec(), id="bwrap", marks=needs_bwrap)]


# --------------------------------------------------------------------------------------------------- guard


def test_a_rewritten_file_is_caught_even_with_its_mtime_and_size_put_back(session):
    target = session / "evaluate.py"
    before = guard.take(session, ["evaluate.py"], [], keep=[])
    st = target.stat()
    target.write_text("SCALE = 9\n")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert guard.changes(before) == ["evaluate.py"]


def test_repair_puts_kept_files_back_removes_new_ones_and_never_writes_through_a_planted_link(session, tmp_path):
    meta = session / ".orchestrator"
    meta.mkdir()
    (meta / "journal.jsonl").write_text('{"seq": 1}\n')
    before = guard.take(session, [], [".orchestrator"], keep=[".orchestrator"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.rename(meta, session / "moved")
    os.symlink(outside, meta)  # the folder is now a link to a place outside the session
    (outside / "planted.txt").write_text("x")
    changed = guard.changes(before)
    assert ".orchestrator" in changed
    repaired, left = guard.repair(before, changed)
    assert not left
    assert meta.is_dir() and not meta.is_symlink()
    assert (meta / "journal.jsonl").read_text() == '{"seq": 1}\n'
    assert not (outside / "journal.jsonl").exists(), "the repair wrote through the planted link"
    assert sorted(p.name for p in meta.iterdir()) == ["journal.jsonl"]


def test_settle_restores_tracked_files_from_the_last_checkpoint_and_names_them(session):
    ws = Workspace.open(session)
    before = guard.watch(session, "run_1", ["evaluate.py"], ["experiment.py"])
    (session / "evaluate.py").write_text("SCALE = 1000\n")
    (session / "experiment.py").write_text("print('changed while running')\n")
    verdict = guard.settle(before, ws, ["experiment.py"])
    assert verdict.tampered == ["evaluate.py"]
    assert verdict.discarded == ["experiment.py"]
    assert (session / "evaluate.py").read_text() == "SCALE = 1\n"
    assert (session / "experiment.py").read_text() == "pass\n"
    assert "evaluate.py" in verdict.message() and "do not count" in verdict.message()


# --------------------------------------------------------------------------------------------------- git


def test_a_planted_filter_makes_git_refuse_until_the_config_is_repaired(session, tmp_path):
    marker = tmp_path / "filter-ran"
    with open(session / ".git" / "config", "a") as fh:
        fh.write(f'[filter "evil"]\n\tclean = touch {marker}; cat\n')
    (session / ".gitattributes").write_text("* filter=evil\n")
    ws = Workspace.open(session)
    with pytest.raises(RepositoryTampered, match="filter.evil.clean"):
        ws.commit("after the run")
    assert not marker.exists()
    assert ws.repair_config() == ["filter.evil.clean"]
    ws.commit("after the repair", paths=[".gitattributes"])
    assert not marker.exists(), "the planted filter ran"
    assert ws.config_problems() == []


def test_git_never_sees_a_secret_variable(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("MY_SERVICE_TOKEN", KEY)
    env = _git_env()
    assert KEY not in env.values()
    assert env["GIT_CONFIG_GLOBAL"] == os.devnull and env["GIT_CONFIG_NOSYSTEM"] == "1"


# --------------------------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("spec", MODES)
def test_a_run_folder_past_its_quota_is_stopped_with_outcome_quota(session, spec):
    code = ("import os, sys, time\nos.makedirs(sys.argv[1].split('=')[1], exist_ok=True)\n"
            "with open(os.path.join(sys.argv[1].split('=')[1], 'big.bin'), 'wb') as fh:\n"
            "    for _ in range(400):\n        fh.write(os.urandom(1 << 16)); fh.flush(); time.sleep(0.01)\n"
            "time.sleep(60)\n")
    result = run_once(session, code, spec=spec, limits=RunLimits(run_dir_bytes=2 * 2**20))
    assert result.outcome == "quota", result.message
    assert "quota" in result.message and result.duration_s < 30


@pytest.mark.parametrize("spec", MODES)
def test_a_file_larger_than_the_limit_cannot_be_written(session, spec):
    code = ("import sys\nopen('run_1/f.bin', 'wb').write(b'x' * (3 << 20))\n")
    result = run_once(session, code, spec=spec, limits=RunLimits(file_bytes=1 << 20))
    assert result.outcome == "error", result.message
    assert (session / "run_1" / "f.bin").stat().st_size <= 1 << 20


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server():
    server = HTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@needs_bwrap
@pytest.mark.parametrize("network", [False, True])
def test_sandboxed_runs_reach_the_network_only_when_declared(session, loopback_server, network):
    code = ("import urllib.request\n"
            f"print(urllib.request.urlopen('http://127.0.0.1:{loopback_server}/', timeout=5).read().decode())\n")
    result = run_once(session, code, spec=SandboxSpec(network=network))
    log = (session / "run_1" / "stdout.log").read_text()
    if network:
        assert result.outcome == "ok" and "hello" in log, result.message
    else:
        assert result.outcome == "error" and "hello" not in log


@needs_bwrap
def test_a_machine_without_gpu_devices_binds_none_and_runs(session):
    if any(Path("/dev").glob("nvidia*")):
        pytest.skip("this machine has GPU device nodes")
    assert gpu_binds() == []
    args = bwrap_command(SandboxSpec(), session, session / "run_1", session / "scratch", sys.executable)
    assert not any("nvidia" in a or "/dev/dri" in a for a in args)
    assert run_once(session, "print('ok')\n", spec=SandboxSpec()).outcome == "ok"


def test_choose_bwrap_without_bubblewrap_is_one_clear_error(monkeypatch, tmp_path):
    from orchestrator import sandbox

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    sandbox.bwrap_problem.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
            choose("bwrap")
        fallback = choose("auto")
        assert fallback.used == "none" and "not sandboxed" in fallback.warning and "\n" not in fallback.warning
        assert choose("none").warning == ""
    finally:
        sandbox.bwrap_problem.cache_clear()


@pytest.mark.parametrize("bwrap_on_path", [True, False])
def test_the_probe_started_in_the_background_gives_the_answer_a_probe_gives(monkeypatch, tmp_path, bwrap_on_path):
    from orchestrator import sandbox

    if not bwrap_on_path:
        monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    sandbox.bwrap_problem.cache_clear()
    try:
        fresh = sandbox.bwrap_problem()
        sandbox.bwrap_problem.cache_clear()
        before = set(threading.enumerate())
        sandbox.probe_in_background()
        for thread in set(threading.enumerate()) - before:  # the probe's thread, unless it is done already
            assert thread.daemon  # a probe that hangs never holds the process's exit
            thread.join(timeout=60)
        assert sandbox.bwrap_problem.cache_info().currsize == 1  # the background probe's answer is in
        assert sandbox.bwrap_problem() == fresh
        assert (fresh is None) == (bwrap_on_path and NO_BWRAP is None)
    finally:
        sandbox.bwrap_problem.cache_clear()


def test_a_launch_probes_bubblewrap_once_even_while_its_background_probe_is_slow(monkeypatch, tmp_path):
    """`choose` waits for the probe started in the background rather than running a second one, which could answer
    otherwise (the warning shown and the mode recorded must agree)."""
    from orchestrator import sandbox

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho probe >> {calls}\nsleep 0.5\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    sandbox.bwrap_problem.cache_clear()
    try:
        sandbox.probe_in_background()
        choice = sandbox.choose("auto")  # at once: the probe is still sleeping
        assert choice.used == "none" and "bubblewrap cannot run here" in choice.warning
        assert calls.read_text().splitlines() == ["probe"]
    finally:
        sandbox.bwrap_problem.cache_clear()
        sandbox._BACKGROUND_PROBE = None


@pytest.mark.parametrize("spec", MODES)
def test_a_secret_a_run_prints_or_writes_never_stays_in_its_folder(session, spec, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    code = (f"import os\nprint('key:', {KEY!r})\nos.makedirs('run_1/sub', exist_ok=True)\n"
            f"open('run_1/sub/notes.bin', 'wb').write(b'\\x00\\x01' + {KEY!r}.encode() + b'\\xff')\n")
    result = run_once(session, code, spec=spec)
    assert result.outcome == "ok", result.message
    assert KEY not in (session / "run_1" / "stdout.log").read_text()
    assert REDACTED in (session / "run_1" / "stdout.log").read_text()
    assert redact_folder(session / "run_1") == ["sub/notes.bin"]
    assert (session / "run_1" / "sub" / "notes.bin").read_bytes() == b"\x00\x01" + REDACTED.encode() + b"\xff"


# --------------------------------------------------------------------------------------------------- terminal


def test_terminal_text_loses_escape_sequences_but_keeps_its_words():
    hostile = "a\x1b]0;pwned\x07b \x1b[2J\x1b[31mred\x1b[0m \x9b1;1H\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ tab\tend\r\n"
    assert safe(hostile) == "ab red link tab\tend\n"
    assert safe("10%\r20%") == "10%\n20%"


# --------------------------------------------------------------------------------------------------- benign results


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


@needs_bwrap
def test_the_sae_fast_preset_gives_the_same_results_with_and_without_the_sandbox(tmp_path):
    from orchestrator.template import copy_template, find_template

    sae = find_template("sae")
    session = tmp_path / "sae"
    copy_template(sae, session)
    env = {"SAE_FAST": "1", "SAE_PRESET": "cpu", "SAE_DEVICE": "cpu", "SAE_SEEDS": "1"}
    results = {}
    for name, spec in (("run_1", None), ("run_2", SandboxSpec(readonly=sae.protected, caches=[]))):
        req = RunRequest(cwd=session, run_name=name, sandbox=spec, env_allow=list(sae.env), env_set=env,
                         timeout_s=600)
        with start(req, gate=True) as handle:
            handle.release()
            result = handle.wait()
        assert result.outcome == "ok", result.message + result.stderr_tail
        results[name] = json.loads((session / name / "final_info.json").read_text())
    # wall-clock timings differ between any two runs; everything else must be identical
    direct, boxed = (json.dumps(_without_timings(results[n]), sort_keys=True) for n in ("run_1", "run_2"))
    assert direct == boxed


@needs_bwrap
def test_a_sandboxed_run_cannot_remount_its_read_only_view(session):
    code = ("import subprocess\n"
            "r = subprocess.run(['mount', '-o', 'remount,bind,rw', '.git'], capture_output=True, text=True)\n"
            "print('mount exit', r.returncode)\n"
            "open('.git/description', 'a').write('pwned')\n")
    result = run_once(session, code, spec=SandboxSpec(readonly=[".git"]))
    assert result.outcome == "error" and "Read-only file system" in result.stderr_tail, result.message
    assert "pwned" not in (session / ".git" / "description").read_text()
    assert "mount exit 0" not in (session / "run_1" / "stdout.log").read_text()


def test_a_package_or_byte_code_shadowing_a_protected_module_is_tampering(session):
    ws = Workspace.open(session)
    before = guard.watch(session, "run_1", ["evaluate.py"], ["experiment.py"])
    (session / "evaluate").mkdir()
    (session / "evaluate" / "__init__.py").write_text("SCALE = 1000\n")
    (session / "__pycache__").mkdir()
    (session / "__pycache__" / "evaluate.cpython-311.pyc").write_bytes(b"\x00" * 16)
    verdict = guard.settle(before, ws, ["experiment.py"])
    assert {"evaluate", "evaluate/__init__.py", "__pycache__"} <= set(verdict.tampered)
    assert not (session / "evaluate").exists() and not (session / "__pycache__").exists()


def test_a_change_to_git_objects_cannot_be_undone_and_is_reported_unrestored(session):
    ws = Workspace.open(session)
    before = guard.watch(session, "run_1", ["evaluate.py"], ["experiment.py"])
    obj = next(p for p in (session / ".git" / "objects").rglob("*") if p.is_file())
    obj.chmod(0o644)
    obj.write_bytes(b"forged")
    verdict = guard.settle(before, ws, ["experiment.py"])
    rel = obj.relative_to(session).as_posix()
    assert rel in verdict.tampered and rel in verdict.unrestored


@pytest.mark.parametrize(("unrestored", "says"), [
    ([], "tampered: the run changed a.py, .git/HEAD; restored, and its results do not count"),
    ([".git/HEAD"], "tampered: the run changed a.py, .git/HEAD; .git/HEAD could not be restored, the rest was; its "
                    "results do not count"),
    (["a.py", ".git/HEAD"], "tampered: the run changed a.py, .git/HEAD, which could not be restored; its results do "
                            "not count"),
], ids=["all-restored", "some", "none-restored"])
def test_the_tampering_message_never_calls_restored_what_was_not(unrestored, says):
    assert guard.Verdict(tampered=["a.py", ".git/HEAD"], unrestored=unrestored).message() == says


# --------------------------------------------------------------------------------------------------- bwrap set-up


def failing_bwrap(folder: Path, fail_file: Path, when: str) -> Path:
    """A `bwrap` for PATH: bubblewrap itself, except that while `fail_file` exists a command naming `when` fails in
    set-up the way bwrap does where mounting /proc is refused (seen in unprivileged containers)."""
    real = shutil.which("bwrap")
    assert real is not None
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "bwrap"
    fake.write_text(f"""#!/bin/sh
if [ -e {shlex.quote(str(fail_file))} ]; then
  for arg in "$@"; do
    case "$arg" in *{when}) echo "bwrap: Can't mount proc on /newroot/proc: Operation not permitted" >&2; exit 1;; esac
  done
fi
exec {shlex.quote(real)} "$@"
""")
    fake.chmod(0o755)
    return folder


@needs_bwrap
def test_a_sandbox_that_cannot_be_set_up_is_told_apart_from_a_run_that_fails(session, tmp_path, monkeypatch):
    fail = tmp_path / "fail"
    fail.touch()
    bin_dir = failing_bwrap(tmp_path / "bin", fail, "/run_1")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    broken = run_once(session, "print('never here')\n", spec=SandboxSpec())
    assert broken.outcome == "sandbox_failed", broken.message
    assert "Can't mount proc" in broken.message
    # A run cannot pass its own failure off as the sandbox's: it began, so it is an error like any other.
    fail.unlink()
    faked = run_once(session, "import sys\nsys.stderr.write(\"bwrap: Can't mount proc\\n\")\nsys.exit(1)\n",
                     spec=SandboxSpec())
    assert faked.outcome == "error" and "Can't mount proc" in faked.message
    assert run_once(session, "print('fine')\n", spec=SandboxSpec()).outcome == "ok"


@needs_bwrap
def test_a_run_whose_sandbox_fails_costs_no_attempt_and_resume_runs_it(tmp_path):
    fail = tmp_path / "fail"
    fail.touch()
    bin_dir = failing_bwrap(tmp_path / "bin", fail, "/run_1")
    replies = tmp_path / "replies.yaml"
    replies.write_text(json.dumps([{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")},
                                   {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")}]))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ORCH_SANDBOX": "bwrap"}
    first = orchestrator("launch", str(make_idea(tmp_path)), "--template", str(make_template(tmp_path)),
                         "--model", f"scripted:{replies}", "--root", str(tmp_path / "sessions"), "--max-runs", "2",
                         "--no-plots", env=env)
    session = session_from(first)
    assert first.returncode == 1, first.stdout + first.stderr
    state = status_json(session)
    assert state["session"]["status"] == "interrupted"
    assert "run_1 could not start" in state["session"]["reason"]
    assert "Can't mount proc" in state["session"]["reason"] and "--sandbox none" in state["session"]["reason"]
    run1 = next(r for r in state["runs"] if r["run"] == 1)
    assert [a["outcome"] for a in run1["history"]] == ["stopped"]  # not an error the model must fix
    assert state["session"]["totals"]["calls"] == 1
    events = [json.loads(line) for line in (session / ".orchestrator" / "journal.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["kind"] in ("run_finished", "attempt_failed") and e["data"].get("run") == 1]

    fail.unlink()  # bubblewrap works again
    again = orchestrator("resume", str(session), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    state = status_json(session)
    assert state["session"]["status"] == "max_runs"
    run1 = next(r for r in state["runs"] if r["run"] == 1)
    assert run1["status"] == "ok" and [a["outcome"] for a in run1["history"]] == ["ok"]
    assert state["session"]["totals"]["calls"] == 2  # the model was not asked again for run 1
    assert sorted(git(session, "tag", "--list").split()) == ["run_0", "run_1", "run_2"]


@needs_bwrap
def test_a_session_under_a_relative_root_runs_sandboxed(tmp_path):
    """`--root` as most users give it (and its default, experiments/): relative to where they stand."""
    replies = tmp_path / "replies.yaml"
    replies.write_text(json.dumps([{"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: LR 0.2.")}]))
    template = make_template(tmp_path)
    toml = template / "template.toml"  # a cache inside the session folder, as the SAE template declares one
    toml.write_text(toml.read_text().replace("[metrics]", 'caches = [".act_cache"]\n\n[metrics]', 1))
    result = orchestrator("launch", str(make_idea(tmp_path)), "--template", str(template),
                          "--model", f"scripted:{replies}", "--root", "sessions", "--max-runs", "1", "--no-plots",
                          env={"ORCH_SANDBOX": "bwrap"}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    session = tmp_path / result.stdout.splitlines()[0].strip()
    assert session.parent == tmp_path / "sessions"
    state = status_json(session)
    assert state["session"]["status"] == "max_runs"
    assert [r["status"] for r in state["runs"]] == ["ok", "ok"]
    assert state["session"]["sandbox"] == "bwrap"
