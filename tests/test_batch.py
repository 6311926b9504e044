"""`orchestrator batch`: many sessions over a shared pool of slots, leased per run (issue 12).

Every assertion reads what the runs and sessions wrote themselves: each run's run_i/slot.json (the toy template
tests/data/sleep_template records the CUDA_VISIBLE_DEVICES it saw, its start and end, its pid), the sessions'
journals, git tags, the fake provider's request log, and /proc/locks (through leases.busy_slots) or a fresh
flock for the slot leases. Nothing is mocked: every batch is the real command, its session processes and runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from session_helpers import (
    REPO,
    default_stop_signals,
    git,
    orchestrator,
    pid_alive,
    run_in_a_terminal,
    status_json,
)

from orchestrator.leases import SlotPool, busy_slots, waiting

SLEEP_TEMPLATE = REPO / "tests" / "data" / "sleep_template"
IDEAS = SLEEP_TEMPLATE / "seed_ideas.json"
DEADLINE_S = 120.0  # generous: the machine is small and busy

# One more run: the marker line stays and a new line is added under it, so it applies at any point of a session.
NUMBER = "@N@"


def reply_text(tag: str) -> str:
    return ("One more run.\n\nexperiment.py\n```python\n<<<<<<< SEARCH\n# runs so far\n=======\n"
            f"# runs so far\n# edit {tag}\n>>>>>>> REPLACE\n```\n")


# --------------------------------------------------------------------------------------------------- helpers


def make_template(where: Path, durations: dict[str, list[Any]]) -> Path:
    """A copy of the sleep template whose durations.json is `durations` (a "default" plan is added)."""
    tpl = where / "sleep_template"
    shutil.copytree(SLEEP_TEMPLATE, tpl)
    (tpl / "durations.json").write_text(json.dumps({"default": [1, 1, 1, 1], **durations}))
    return tpl


def make_script(where: Path, n: int = 30, cost_usd: float | None = None) -> Path:
    """A scripted model's file: n replies, reply i adds the line `# edit i` (each session reads from its own
    start, so every reply of a session adds a line its file does not have yet)."""
    items = []
    for i in range(1, n + 1):
        item: dict[str, Any] = {"content": reply_text(str(i))}
        if cost_usd is not None:
            item["cost_usd"] = cost_usd
        items.append(item)
    path = where / "replies.yaml"
    path.write_text(yaml.safe_dump(items))
    return path


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": pythonpath, **(extra or {})}


def batch_cmd(tpl: Path, root: Path, ideas: str, *more: str, model: str | None = None,
              scale: float = 0.2, max_runs: int = 1) -> list[str]:
    args = ["batch", str(IDEAS), "--ideas", ideas, "--template", str(tpl), "--root", str(root),
            "--max-runs", str(max_runs), "--no-plots", "--env", f"SLEEP_SCALE={scale:g}", *more]
    if model is not None:
        args += ["--model", model]
    return args


def batch_from(result: subprocess.CompletedProcess[str]) -> Path:
    first = result.stdout.splitlines()[0] if result.stdout else ""
    folder = Path(first.strip())
    assert folder.is_dir() and (folder / "batch.json").is_file(), (
        f"first line is not the batch folder: {first!r}\nstdout:\n{result.stdout[-3000:]}\n"
        f"stderr:\n{result.stderr[-3000:]}")
    return folder


def batch_spec(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "batch.json").read_text())


def sessions_of(folder: Path) -> dict[str, Path]:
    """idea -> session folder, as batch.json lists them."""
    return {s["idea"]: Path(s["path"]) for s in batch_spec(folder)["sessions"]}


def journal(session: Path) -> list[dict[str, Any]]:
    """The session's events (a line still being written is skipped)."""
    path = session / ".orchestrator" / "journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def kinds(session: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in journal(session) if e["kind"] == kind]


def final_status(session: Path) -> str:
    """The status the journal ends on: the last `finished` event's status, `interrupted`, or `running`."""
    status = "running"
    for e in journal(session):
        if e["kind"] == "finished":
            status = e["data"]["status"]
        elif e["kind"] == "interrupted":
            status = "interrupted"
        elif e["kind"] == "drive_started":
            status = "running"
    return status


def executing_runs(session: Path) -> list[dict[str, Any]]:
    """Runs executing now: journaled as started (a run may be started, gated, before it gets its slot), not
    finished, and begun by their own record (run_i/slot.json, the toy's first act)."""
    return [e for e in open_runs(session) if (session / f"run_{e['data']['run']}" / "slot.json").exists()]


def open_runs(session: Path) -> list[dict[str, Any]]:
    """run_started events with no run_finished (or run_stopped) yet."""
    events = journal(session)

    def key(e: dict[str, Any]) -> tuple[Any, ...]:
        d = e["data"]
        return d.get("stage"), d.get("run"), d.get("attempt")

    ended = {key(e) for e in events if e["kind"] in ("run_finished", "run_stopped")}
    return [e for e in events if e["kind"] == "run_started" and key(e) not in ended]


@dataclass
class Seen:
    """One run as it recorded itself in run_i/slot.json."""

    idea: str
    session: Path
    run: int
    device: str | None
    start: float
    end: float | None
    pid: int


def runs_seen(folder: Path) -> list[Seen]:
    out = []
    for idea, session in sessions_of(folder).items():
        for slot_file in sorted(session.glob("run_*/slot.json")):
            data = json.loads(slot_file.read_text())
            out.append(Seen(idea, session, int(slot_file.parent.name.split("_")[1]), data["cuda_visible_devices"],
                            data["start"], data.get("end"), data["pid"]))
    return out


def overlap(a: Seen, b: Seen) -> bool:
    assert a.end is not None and b.end is not None
    return a.start < b.end and b.start < a.end


def most_at_once(runs: list[Seen]) -> int:
    points = sorted([(r.start, 1) for r in runs] + [(r.end, -1) for r in runs])  # an end sorts before a start
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most


def lock_free(path: Path) -> bool:
    """True when nobody holds the flock on `path` (taken and let go at once)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def assert_no_slot_held(folder: Path) -> None:
    pool = SlotPool.model_validate(batch_spec(folder)["pool"])
    assert busy_slots(pool, folder) == 0, "a slot is still leased after the batch ended"
    locks = sorted((folder / ".slots").glob("*.lock"))
    assert locks, "the batch made no slot lock files"
    held = [p.name for p in locks if not lock_free(p)]
    assert not held, f"slot locks still held: {held}"


def tags(session: Path) -> list[str]:
    return sorted(git(session, "tag", "-l").split())


def wait_for(what: str, check: Any, deadline_s: float = DEADLINE_S, proc: subprocess.Popen[bytes] | None = None,
             every: float = 0.05) -> Any:
    end = time.monotonic() + deadline_s
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the batch exited ({proc.returncode}) before: {what}")
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline_s:.0f} s: {what}")
        time.sleep(every)


def session_pids(folder: Path) -> set[int]:
    """Every process the batch's sessions journaled: their drivers and their runs."""
    pids = set()
    for session in sessions_of(folder).values():
        for e in journal(session):
            if e["kind"] in ("drive_started", "run_started") and e["data"].get("pid"):
                pids.add(int(e["data"]["pid"]))
    return pids


class Batch:
    """A `batch` command started in the background (its own session, so a signal reaches it alone)."""

    def __init__(self, args: list[str], work: Path, env: dict[str, str] | None = None, tag: str = "batch") -> None:
        self.out = work / f"{tag}.stdout"
        self.err = work / f"{tag}.stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=child_env(env), cwd=REPO,
                                         start_new_session=True, preexec_fn=default_stop_signals)
        self.folder: Path | None = None

    def text(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-3000:]}"

    def wait_folder(self) -> Path:
        def first() -> Path | None:
            lines = self.out.read_text().splitlines()
            return Path(lines[0].strip()) if lines and (Path(lines[0].strip()) / "batch.json").is_file() else None

        self.folder = wait_for("the batch printed its folder", first, proc=self.proc)
        return self.folder

    def wait_sessions(self, n: int) -> dict[str, Path]:
        """The batch folder is announced once batch.json exists; its sessions are created after that."""
        folder = self.folder or self.wait_folder()
        return wait_for(f"batch.json lists {n} sessions", lambda: len(sessions_of(folder)) == n and sessions_of(folder),
                        proc=self.proc, every=0.005)

    def wait(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Clean-up, pass or fail: SIGKILL the batch by pid, then whatever of its sessions' processes outlives it
        (they get SIGTERM from the kernel; SIGKILL by pid after a grace)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.folder is None or not (self.folder / "batch.json").exists():
            return
        pids = session_pids(self.folder)
        end = time.monotonic() + 30
        while any(pid_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        for p in pids:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.fixture
def batches() -> Iterator[list[Batch]]:
    started: list[Batch] = []
    yield started
    for b in started:
        b.stop()


def run_batch(args: list[str], env: dict[str, str] | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return orchestrator(*args, env=env, timeout=timeout)


# --------------------------------------------------------------------------------------------------- a shared batch


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Three ideas over two GPUs, two runs each after the baseline, every run 0.6 s: the runs queue for slots.
    The batch's environment and --env both name other devices: the lease must win over both."""
    work = tmp_path_factory.mktemp("shared")
    tpl = make_template(work, {})
    script = make_script(work)
    res = run_batch(batch_cmd(tpl, work / "root", "idea_a,idea_b,idea_c", "--gpus", "0,1",
                              "--env", "CUDA_VISIBLE_DEVICES=7", model=f"scripted:{script}", scale=0.6,
                              max_runs=2), env={"CUDA_VISIBLE_DEVICES": "5,6"})
    return batch_from(res), res


@pytest.mark.slow
def test_overlapping_runs_never_share_a_gpu_and_each_sees_exactly_its_leased_one(shared) -> None:
    folder, res = shared
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sessions = sessions_of(folder)
    assert set(sessions) == {"idea_a", "idea_b", "idea_c"}
    for idea, session in sessions.items():
        assert final_status(session) == "max_runs", (idea, journal(session)[-1])
    runs = runs_seen(folder)
    assert len(runs) == 9, [(r.idea, r.run) for r in runs]  # 3 ideas x (baseline + 2 runs), each recorded
    for r in runs:
        assert r.device in ("0", "1"), f"{r.idea} run_{r.run} saw CUDA_VISIBLE_DEVICES={r.device!r}"
        assert r.end is not None and r.end > r.start
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if overlap(a, b):
                assert a.device != b.device, (f"{a.idea} run_{a.run} and {b.idea} run_{b.run} ran at the same time "
                                              f"on device {a.device}")
    # the runs did share: more than one ran at a time (two GPUs, three sessions)
    assert most_at_once(runs) == 2
    # each run's journal record names the slot and device it had
    for r in runs:
        started = [e["data"] for e in kinds(r.session, "run_finished")
                   if e["data"].get("stage") == "experiment" and e["data"].get("run") == r.run]
        assert started, f"{r.idea} run_{r.run}: no run_finished"
        last = started[-1]
        assert last["executor"] == "local"
        assert last["gpus"] == r.device, (last, r)
        assert last["slot"] == f"gpu{r.device}", (last, r)
    assert_no_slot_held(folder)


@pytest.mark.slow
def test_per_gpu_two_lets_at_most_two_runs_share_a_device(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, {"idea_a": [5, 5], "idea_b": [5, 5], "idea_c": [5, 5]})
    res = run_batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b,idea_c", "--gpus", "0", "--per-gpu", "2",
                              model=f"scripted:{make_script(tmp_path)}", scale=0.2))
    folder = batch_from(res)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = runs_seen(folder)
    assert len(runs) == 6
    assert all(r.device == "0" for r in runs), [r.device for r in runs]
    assert most_at_once(runs) <= 2
    # two overlapping runs hold two different leases of the device
    slot_of = {}
    for r in runs:
        started = [e["data"] for e in kinds(r.session, "run_finished") if e["data"].get("run") == r.run]
        slot_of[(r.idea, r.run)] = started[-1]["slot"]
        assert started[-1]["gpus"] == "0"
    assert set(slot_of.values()) <= {"gpu0.1", "gpu0.2"}, slot_of
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if overlap(a, b):
                assert slot_of[(a.idea, a.run)] != slot_of[(b.idea, b.run)], (a, b)
    assert_no_slot_held(folder)


@pytest.mark.slow
def test_one_cpu_slot_runs_one_run_at_a_time_and_shows_no_gpu(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, {"idea_a": [3, 3], "idea_b": [3, 3]})
    res = run_batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b", "--slots", "1",
                              model=f"scripted:{make_script(tmp_path)}", scale=0.2),
                    env={"CUDA_VISIBLE_DEVICES": ""})
    folder = batch_from(res)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert batch_spec(folder)["pool"]["kind"] == "cpu"
    runs = runs_seen(folder)
    assert len(runs) == 4
    assert most_at_once(runs) == 1, [(r.idea, r.run, r.start, r.end) for r in runs]
    assert all(r.device in (None, "", "-1") for r in runs), [r.device for r in runs]
    for r in runs:
        started = [e["data"] for e in kinds(r.session, "run_finished") if e["data"].get("run") == r.run]
        assert started[-1]["slot"] == "cpu0"
    assert_no_slot_held(folder)


# --------------------------------------------------------------------------------------------------- faults


def run_finished(session: Path, run: int) -> list[dict[str, Any]]:
    return [e for e in kinds(session, "run_finished") if e["data"].get("run") == run]


@pytest.mark.slow
def test_a_hanging_run_is_killed_at_its_timeout_and_its_gpu_serves_the_other_session(tmp_path: Path) -> None:
    # one GPU: idea_a's baseline hangs; idea_b's baseline takes 2 s, so whichever leases first, idea_b still has
    # runs to do once idea_a's run has timed out, and they can only run if the slot came back.
    tpl = make_template(tmp_path, {"idea_a": ["hang"], "idea_b": [4, 1, 1]})
    res = run_batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b", "--gpus", "0", "--timeout", "3",
                              model=f"scripted:{make_script(tmp_path)}", scale=0.5, max_runs=2))
    folder = batch_from(res)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = sessions_of(folder)["idea_a"], sessions_of(folder)["idea_b"]
    hung = run_finished(a, 0)
    assert [e["data"]["outcome"] for e in hung] == ["timeout"], hung
    assert final_status(a) == "baseline_failed"
    assert final_status(b) == "max_runs"
    hung_pid = [e["data"]["pid"] for e in kinds(a, "run_started")][0]
    assert not pid_alive(hung_pid), "the hanging run is still alive"
    freed_at = hung[0]["ts"]
    later = [r for r in runs_seen(folder) if r.idea == "idea_b" and r.start > freed_at]
    assert later, "no run of idea_b started after idea_a's run timed out"
    assert all(r.device == "0" for r in later)
    assert_no_slot_held(folder)


@pytest.mark.slow
def test_a_session_whose_baseline_crashes_fails_alone_and_its_gpu_comes_back(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, {"idea_a": ["crash"], "idea_b": [4, 1, 1]})
    res = run_batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b", "--gpus", "0",
                              model=f"scripted:{make_script(tmp_path)}", scale=0.5, max_runs=2))
    folder = batch_from(res)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = sessions_of(folder)["idea_a"], sessions_of(folder)["idea_b"]
    crashed = run_finished(a, 0)
    assert len(crashed) == 1 and crashed[0]["data"]["outcome"] != "ok", crashed
    assert final_status(a) == "baseline_failed"
    assert final_status(b) == "max_runs"
    assert tags(b) == ["run_0", "run_1", "run_2"]
    assert tags(a) == []
    later = [r for r in runs_seen(folder) if r.idea == "idea_b" and r.start > crashed[0]["ts"]]
    assert later and all(r.device == "0" for r in later), "the crashed run's slot never served idea_b again"
    # the leaderboard says which failed
    text = orchestrator("status", str(folder)).stdout
    line_a = next(line for line in text.splitlines() if "idea_a" in line)
    assert "baseline_failed" in line_a
    assert f"orchestrator resume {folder}" in res.stdout  # which runs that baseline again
    assert_no_slot_held(folder)
    again = run_batch(["resume", str(folder)])
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    assert [e["data"]["attempt"] for e in run_finished(a, 0)] == [1, 2]  # run again, and it crashed again
    assert final_status(a) == "baseline_failed" and final_status(b) == "max_runs"
    assert len(run_finished(b, 0)) == 1  # the finished session was left alone
    assert_no_slot_held(folder)


@pytest.mark.slow
def test_ctrl_c_stops_every_session_leaves_no_run_and_no_lease_then_resume_finishes(tmp_path: Path,
                                                                                   batches: list[Batch]) -> None:
    """One GPU, two sessions: Ctrl-C comes while one session's run executes and the other waits for the slot."""
    tpl = make_template(tmp_path, {"idea_a": [10, 3], "idea_b": [10, 3]})
    env = {"ORCH_SANDBOX": "none"}  # slot.json's pids are then this machine's pids
    b = Batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b", "--gpus", "0",
                        model=f"scripted:{make_script(tmp_path)}", scale=0.2), tmp_path, env)
    batches.append(b)
    folder = b.wait_folder()
    sessions = b.wait_sessions(2)

    def queued(session: Path) -> bool:  # its run is started and waits in the batch's queue for the slot
        return session.name in waiting(folder)

    def one_running_one_queued() -> bool:
        return (any(executing_runs(s) for s in sessions.values()) and any(queued(s) for s in sessions.values()))

    wait_for("a run executing and the other session queued for the slot", one_running_one_queued, proc=b.proc)
    os.kill(b.proc.pid, signal.SIGINT)
    rc = b.wait(timeout=DEADLINE_S)
    assert rc == 130, b.text()
    for idea, session in sessions.items():
        assert final_status(session) == "interrupted", (idea, [e["kind"] for e in journal(session)][-5:])
        assert status_json(session)["session"]["status"] == "interrupted"
    for r in runs_seen(folder):
        assert not pid_alive(r.pid), f"{r.idea} run_{r.run} (pid {r.pid}) outlived the batch"
    for pid in session_pids(folder):
        assert not pid_alive(pid), f"pid {pid} (a session or run of the batch) outlived it"
    assert_no_slot_held(folder)
    assert "Traceback" not in b.text()

    res = orchestrator("resume", str(folder), env=env, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for idea, session in sessions.items():
        assert final_status(session) == "max_runs", idea
        assert tags(session) == ["run_0", "run_1"]
    runs = runs_seen(folder)
    assert len(runs) == 4 and most_at_once(runs) == 1
    assert_no_slot_held(folder)


@pytest.mark.slow
def test_a_run_waiting_for_its_slot_shows_as_waiting_in_status(tmp_path: Path, batches: list[Batch]) -> None:
    """One GPU, two baselines that hang: one holds the slot, the other is started (gated) and queued for it."""
    tpl = make_template(tmp_path, {"idea_a": ["hang"], "idea_b": ["hang"]})
    b = Batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b", "--gpus", "0",
                        model=f"scripted:{make_script(tmp_path)}"), tmp_path, {"ORCH_SANDBOX": "none"})
    batches.append(b)
    folder = b.wait_folder()
    sessions = b.wait_sessions(2)
    wait_for("one baseline executing and the other queued for the slot",
             lambda: len(waiting(folder)) == 1 and any(executing_runs(s) for s in sessions.values()), proc=b.proc)
    idea_of = {s.name: idea for idea, s in sessions.items()}
    queued_idea = idea_of[waiting(folder)[0]]
    executing_idea = next(i for i in sessions if i != queued_idea)

    queued = status_json(sessions[queued_idea])
    assert (queued["session"]["status"], queued["session"]["phase"]) == ("running", "queued")
    assert status_json(sessions[executing_idea])["session"]["phase"] != "queued"
    table = orchestrator("status", str(sessions[queued_idea])).stdout
    assert "waiting for a slot" in table
    board = orchestrator("status", str(folder)).stdout
    line = next(x for x in board.splitlines() if queued_idea in x)
    assert "waiting for a slot" in line, board
    line = next(x for x in board.splitlines() if executing_idea in x)
    assert "waiting" not in line, board
    as_json = json.loads(orchestrator("status", str(folder), "--json").stdout)
    phases = {item["idea"]: item["session"]["phase"] for item in as_json["sessions"]}
    assert phases[queued_idea] == "queued" and phases[executing_idea] != "queued"
    assert orchestrator("report", str(folder), "-o", str(tmp_path / "board.html")).returncode == 0
    page = (tmp_path / "board.html").read_text()
    assert page.count("waiting for a slot") == 1, page
    os.kill(b.proc.pid, signal.SIGINT)
    assert b.wait(timeout=DEADLINE_S) == 130, b.text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_session_processes_are_still_starting_loses_nothing(tmp_path: Path,
                                                                                batches: list[Batch],
                                                                                sig: signal.Signals) -> None:
    """The signal comes as soon as the batch has started its session processes (each log has its header): they
    are still starting (the interpreter, imports, the session lock) when the batch forwards it. Whatever state
    each was caught in, the batch exits 130, nothing keeps running, and resume finishes them all: `resume BATCH`,
    or (SIGTERM case) each session resumed on its own, both at once, still sharing the batch's one GPU."""
    tpl = make_template(tmp_path, {"idea_a": [3, 3], "idea_b": [3, 3]})
    env = {"ORCH_SANDBOX": "none"}
    # runs of 1.5 s: a session is nearly always still going when the signal comes (one that finished first is
    # accepted below, whole)
    b = Batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b", "--gpus", "0",
                        model=f"scripted:{make_script(tmp_path)}", scale=0.5), tmp_path, env)
    batches.append(b)
    folder = b.wait_folder()
    sessions = b.wait_sessions(2)
    wait_for("every session process started", lambda: len(list((folder / "logs").glob("*.log"))) == 2,
             proc=b.proc, every=0.005)
    os.kill(b.proc.pid, sig)
    rc = b.wait(timeout=DEADLINE_S)
    assert rc == 130, b.text()
    assert "Traceback" not in b.text()
    wait_for("no process of the batch left", lambda: not any(pid_alive(p) for p in session_pids(folder)),
             deadline_s=30)
    for idea, session in sessions.items():
        # a session caught before it drove has nothing to record; one that drove must not read `running`
        if not kinds(session, "drive_started"):
            continue
        state = status_json(session)
        if final_status(session) == "max_runs":  # it ended on its own before the signal reached it: whole
            assert state["session"]["status"] == "max_runs" and [r["status"] for r in state["runs"]] == ["ok", "ok"]
            continue
        assert final_status(session) == "interrupted", (idea, [e["kind"] for e in journal(session)][-5:])
        assert state["session"]["status"] == "interrupted"
    line_by_idea = {idea: next(line for line in orchestrator("status", str(folder)).stdout.splitlines()
                               if idea in line) for idea in sessions}
    assert not any(" running " in line for line in line_by_idea.values()), line_by_idea
    if (folder / ".slots").exists():
        held = [p.name for p in (folder / ".slots").glob("*.lock") if not lock_free(p)]
        assert not held
    if sig == signal.SIGINT:
        res = orchestrator("resume", str(folder), env=env, timeout=240)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    else:
        # each session resumed on its own, both at once: they still lease the batch's one GPU
        procs = [subprocess.Popen([sys.executable, "-m", "orchestrator", "resume", str(p)], env=child_env(env),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                 for p in sessions.values()]
        try:
            outs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
        runs = runs_seen(folder)
        assert len(runs) == 4 and all(r.device == "0" for r in runs)
        assert most_at_once(runs) == 1, [(r.idea, r.run, r.start, r.end) for r in runs]
    for idea, session in sessions.items():
        assert final_status(session) == "max_runs", idea
        assert tags(session) == ["run_0", "run_1"]


@pytest.mark.slow
def test_a_batch_stopped_while_it_creates_its_sessions_still_runs_every_idea_on_resume(
        tmp_path: Path, batches: list[Batch]) -> None:
    """The batch announces its folder (batch.json exists) before it has made the sessions' folders; Ctrl-C then
    stops it part way. `resume BATCH` must still give every idea of the batch its session, run to the end."""
    tpl = make_template(tmp_path, {})
    ideas = ["idea_a", "idea_b", "idea_c", "idea_d"]
    b = Batch(batch_cmd(tpl, tmp_path / "root", ",".join(ideas), "--gpus", "0",
                        model=f"scripted:{make_script(tmp_path)}", scale=0.1), tmp_path)
    batches.append(b)
    folder = b.wait_folder()
    os.kill(b.proc.pid, signal.SIGINT)
    assert b.wait(timeout=DEADLINE_S) == 130, b.text()
    assert batch_spec(folder)["ideas"] == ideas
    res = orchestrator("resume", str(folder), timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sessions = sessions_of(folder)
    assert sorted(sessions) == ideas, (f"after resume, batch.json has sessions for {sorted(sessions)} of the "
                                      f"batch's ideas {ideas}; resume said: {res.stdout.strip()[-300:]}")
    for idea, session in sessions.items():
        assert final_status(session) == "max_runs", idea
    strays = [p.name for p in folder.iterdir() if p.is_dir() and p.name not in ("logs", ".slots")
              and p not in set(sessions.values())]
    assert not strays, f"session folders the batch does not list: {strays}"


@pytest.mark.slow
def test_a_run_that_outlives_its_killed_session_keeps_its_gpu_until_it_ends(tmp_path: Path,
                                                                           batches: list[Batch]) -> None:
    """One GPU. One session's process is SIGKILLed while its (unsandboxed) run executes: the run goes on, so the
    GPU is still in use; the other session's runs must not get it until that run has ended. The rest of the
    batch goes on; resume finishes the killed session."""
    tpl = make_template(tmp_path, {"idea_a": [10, 1], "idea_b": [10, 1]})
    env = {"ORCH_SANDBOX": "none"}
    b = Batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b", "--gpus", "0",
                        model=f"scripted:{make_script(tmp_path)}", scale=0.2), tmp_path, env)
    batches.append(b)
    folder = b.wait_folder()
    sessions = b.wait_sessions(2)
    busy = wait_for("a run executing", lambda: [(idea, r) for idea, s in sessions.items() for r in executing_runs(s)],
                    proc=b.proc)
    idea, started = busy[0]
    driver = [e["data"]["pid"] for e in kinds(sessions[idea], "drive_started")][-1]
    os.kill(driver, signal.SIGKILL)
    assert b.wait(timeout=DEADLINE_S) == 1, b.text()
    run_pid = started["data"]["pid"]
    wait_for("the orphaned run ended", lambda: not pid_alive(run_pid), deadline_s=60)
    orphan = next(r for r in runs_seen(folder) if r.idea == idea and r.run == started["data"]["run"])
    assert orphan.end is not None, "the orphaned run did not run to its end"
    others = [r for r in runs_seen(folder) if r.idea != idea]
    assert others, "the other session made no run"
    for r in others:
        assert r.end is None or not overlap(orphan, r), (
            f"{r.idea} run_{r.run} ({r.start:.2f}-{r.end:.2f}) ran on GPU 0 while {idea}'s orphaned run_"
            f"{orphan.run} ({orphan.start:.2f}-{orphan.end:.2f}) still used it")
    other = next(i for i in sessions if i != idea)
    assert final_status(sessions[other]) == "max_runs"
    res = orchestrator("resume", str(folder), env=env, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert final_status(sessions[idea]) == "max_runs"
    assert tags(sessions[idea]) == ["run_0", "run_1"]


# --------------------------------------------------------------------------------------------------- SIGKILL


def provider_plan() -> dict[str, Any]:
    return {"replies": [reply_text(NUMBER)], "cycle": True, "number_token": NUMBER, "rules": "none"}


def edit_lines_at_tags(session: Path) -> dict[str, int]:
    """For each tag: how many `# edit` lines experiment.py has at that commit."""
    out = {}
    for tag in tags(session):
        text = git(session, "show", f"{tag}:experiment.py")
        out[tag] = len(re.findall(r"^# edit \d+$", text, flags=re.M))
    return out


@pytest.mark.slow
def test_a_sigkilled_batch_resumes_to_the_same_tags_and_pays_no_reply_twice(tmp_path: Path, fake_provider,
                                                                           batches: list[Batch]) -> None:
    # run_1 takes 5 s in both sessions: the kill comes while both execute it, when no model call is in flight
    tpl = make_template(tmp_path, {"idea_a": [1, 25, 1], "idea_b": [1, 25, 1]})

    def cmd(root: Path, url: str) -> list[str]:
        return batch_cmd(tpl, root, "idea_a,idea_b", "--gpus", "0,1", "--api-base", url, model="openai/fake",
                         scale=0.2, max_runs=2)

    # the uninterrupted reference and the batch to be killed run side by side (each with its own provider)
    reference = fake_provider.start(provider_plan())
    server = fake_provider.start(provider_plan())
    ref_batch = Batch(cmd(tmp_path / "ref", reference.url), tmp_path, tag="reference")
    b = Batch(cmd(tmp_path / "killed", server.url), tmp_path)
    batches.extend([ref_batch, b])
    folder = b.wait_folder()
    sessions = b.wait_sessions(2)
    wait_for("both sessions executing a run", lambda: all(executing_runs(s) for s in sessions.values()), proc=b.proc)
    os.kill(b.proc.pid, signal.SIGKILL)
    b.proc.wait()
    pids = session_pids(folder)
    wait_for("every session process and run gone after the batch's SIGKILL",
             lambda: not any(pid_alive(p) for p in pids), deadline_s=60)
    for idea, session in sessions.items():
        assert final_status(session) == "interrupted", (idea, [e["kind"] for e in journal(session)][-5:])
    assert_no_slot_held(folder)

    assert ref_batch.wait(timeout=240) == 0, ref_batch.text()
    ref_sessions = sessions_of(ref_batch.wait_folder())
    ref_replies = {idea: len(kinds(s, "reply")) for idea, s in ref_sessions.items()}
    assert ref_replies == {"idea_a": 2, "idea_b": 2}
    assert len(reference.requests()) == 4

    res = orchestrator("resume", str(folder), timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for idea, session in sessions.items():
        assert final_status(session) == "max_runs", idea
        assert tags(session) == tags(ref_sessions[idea]) == ["run_0", "run_1", "run_2"]
        assert edit_lines_at_tags(session) == edit_lines_at_tags(ref_sessions[idea])
        assert len(kinds(session, "reply")) == ref_replies[idea], idea
    replies = sum(len(kinds(s, "reply")) for s in sessions.values())
    answered = [r for r in server.requests() if r["status"] == 200]
    assert len(server.requests()) == len(answered) == replies == 4, [(r["index"], r["status"])
                                                                      for r in server.requests()]


# --------------------------------------------------------------------------------------------------- scheduling


@pytest.mark.slow
def test_parallel_one_drives_one_session_at_a_time(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, {})
    res = run_batch(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b,idea_c", "--gpus", "0,1", "--parallel", "1",
                              model=f"scripted:{make_script(tmp_path)}", scale=0.1))
    folder = batch_from(res)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    spans = []
    for idea, session in sessions_of(folder).items():
        events = journal(session)
        start = next(e["ts"] for e in events if e["kind"] == "drive_started")
        end = [e["ts"] for e in events if e["kind"] == "finished"][-1]
        spans.append((start, end, idea))
    spans.sort()
    for (s1, e1, i1), (s2, e2, i2) in zip(spans, spans[1:], strict=False):
        assert e1 <= s2, f"{i1} ({s1:.2f}-{e1:.2f}) and {i2} ({s2:.2f}-{e2:.2f}) were driven at the same time"
    assert most_at_once(runs_seen(folder)) == 1


@pytest.mark.slow
def test_concurrent_batches_into_one_root_never_share_a_folder(tmp_path: Path, batches: list[Batch]) -> None:
    """Two batch commands at once, same root, same name; the name each would take for the next two minutes is
    already taken (as by an earlier batch in that second), so both must claim a suffixed one at the same time."""
    tpl = make_template(tmp_path, {})
    root = tmp_path / "root"
    root.mkdir()
    now = datetime.now()
    for s in range(-2, 120):
        (root / f"{(now + timedelta(seconds=s)).strftime('%Y-%m-%dT%H-%M-%S')}_batch_same").mkdir(exist_ok=True)
    before = set(root.iterdir())
    script = make_script(tmp_path)
    started = [Batch(batch_cmd(tpl, root, "idea_a,idea_b", "--gpus", "0", "--name", "same",
                               model=f"scripted:{script}", scale=0.1), tmp_path, tag=f"b{i}") for i in range(2)]
    batches.extend(started)
    for b in started:
        assert b.wait(timeout=240) == 0, b.text()
        b.wait_folder()
    folders = [b.folder for b in started]
    assert folders[0] != folders[1]
    assert all(f not in before for f in folders)
    assert set(root.iterdir()) - before == set(folders)
    paths = [p for f in folders for p in sessions_of(f).values()]
    assert len(paths) == 4 and len(set(paths)) == 4, paths
    for f in folders:
        for session in sessions_of(f).values():
            assert session.parent == f
            assert final_status(session) == "max_runs"
            assert (session / "run_0" / "slot.json").is_file() and (session / "run_1" / "slot.json").is_file()
            assert len(kinds(session, "session_started")) == 1


# --------------------------------------------------------------------------------------------------- bad input


def assert_refused(res: subprocess.CompletedProcess[str], root: Path | None = None) -> None:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stdout.strip() == "", res.stdout
    if root is not None:
        assert not root.exists() or not any(root.iterdir()), list(root.iterdir())


@pytest.mark.parametrize("extra, env", [
    (["--ideas", "idea_a,nope", "--gpus", "0"], {}),
    ([], {}),  # a file of eight ideas and neither --ideas nor --all
    (["--all", "--ideas", "idea_a"], {}),
    (["--ideas", "idea_a", "--per-gpu", "2"], {"CUDA_VISIBLE_DEVICES": ""}),
    (["--ideas", "idea_a", "--slots", "2", "--gpus", "0"], {}),
    (["--ideas", "idea_a", "--gpus", "0", "--backend", "nope"], {}),
    (["--ideas", "idea_a", "--gpus", "0", "--ray-address", "x"], {}),
    (["--ideas", "idea_a", "--gpus", "0,0"], {}),
    (["--ideas", "idea_a", "--gpus", "0", "--per-gpu", "0"], {}),
    (["--ideas", "idea_a", "--gpus", "0", "--parallel", "0"], {}),
    (["--ideas", "idea_a", "--gpus", "0", "--parallel", "-1"], {}),
    (["--ideas", "idea_a", "--gpus", "0", "--budget-usd", "0"], {}),
    (["--ideas", "idea_a", "--gpus", "0", "--session-budget-usd", "-1"], {}),
], ids=["unknown-idea", "several-ideas-no-choice", "ideas-and-all", "per-gpu-without-gpus", "slots-with-gpus",
        "unknown-backend", "ray-address-without-ray", "gpu-twice", "per-gpu-zero", "parallel-zero",
        "parallel-negative", "budget-zero", "session-budget-negative"])
def test_bad_batch_input_is_one_line_exit_2_and_creates_nothing(tmp_path: Path, extra: list[str],
                                                                env: dict[str, str]) -> None:
    tpl = make_template(tmp_path, {})
    root = tmp_path / "root"
    args = ["batch", str(IDEAS), "--template", str(tpl), "--root", str(root), "--no-plots", "--max-runs", "1",
            "--model", f"scripted:{make_script(tmp_path)}", *extra]
    assert_refused(orchestrator(*args, env=env, timeout=60), root)


def test_a_dollar_budget_for_an_unpriced_model_without_a_token_budget_is_refused(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, {})
    root = tmp_path / "root"
    # (the batch budget test below prices its replies with the scripted model's cost_usd instead)
    res = orchestrator("batch", str(IDEAS), "--ideas", "idea_a", "--template", str(tpl), "--root", str(root),
                       "--gpus", "0", "--model", "openai/fake", "--api-base", "http://127.0.0.1:9/v1",
                       "--session-budget-usd", "1", timeout=60)
    assert_refused(res, root)
    assert "max-tokens-total" in res.stderr


@pytest.mark.slow
def test_resume_of_a_batch_refuses_gpus_and_changes_nothing(shared) -> None:
    folder, _ = shared
    before = (folder / "batch.json").read_bytes()
    logs = {p: p.read_bytes() for p in (folder / "logs").iterdir()}
    for args in (["--gpus", "1"], ["--budget-usd", "0"]):
        assert_refused(orchestrator("resume", str(folder), *args, timeout=60))
    assert (folder / "batch.json").read_bytes() == before
    assert {p: p.read_bytes() for p in (folder / "logs").iterdir()} == logs
    done = orchestrator("resume", str(folder), timeout=60)
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stdout + done.stderr


def test_batch_help_explains_slots_and_leases() -> None:
    res = orchestrator("batch", "--help", timeout=60)
    assert res.returncode == 0
    text = " ".join(res.stdout.split()).lower()
    assert "lease" in text and "slot" in text and "--per-gpu" in text and "--parallel" in text


# --------------------------------------------------------------------------------------------------- review


@pytest.mark.slow
def test_status_json_of_a_batch_is_each_sessions_own_status(shared) -> None:
    folder, _ = shared
    res = orchestrator("status", str(folder), "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data) == {"batch", "sessions"}
    spec = batch_spec(folder)
    assert data["batch"]["ideas"] == ["idea_a", "idea_b", "idea_c"]
    assert data["batch"]["pool"] == spec["pool"]
    assert [s["idea"] for s in data["sessions"]] == ["idea_a", "idea_b", "idea_c"]
    for item in data["sessions"]:
        own = status_json(Path(item["path"]))
        assert item["session"] == own["session"], item["idea"]
        assert item["runs"] == own["runs"], item["idea"]
        assert Path(item["path"]).parent == folder


@pytest.mark.slow
def test_status_of_a_batch_lists_every_idea(shared) -> None:
    folder, _ = shared
    res = orchestrator("status", str(folder), timeout=60)
    assert res.returncode == 0, res.stderr
    for idea in ("idea_a", "idea_b", "idea_c"):
        line = next((line for line in res.stdout.splitlines() if idea in line), None)
        assert line is not None, f"{idea} missing:\n{res.stdout}"
        assert "max_runs" in line


@pytest.mark.slow
def test_report_of_a_batch_links_each_sessions_report(shared) -> None:
    folder, _ = shared
    res = orchestrator("report", str(folder), timeout=120)
    assert res.returncode == 0, res.stderr
    page = folder / "report.html"
    assert Path(res.stdout.strip().splitlines()[-1]).resolve() == page.resolve()
    html = page.read_text()
    links = re.findall(r'href="([^"#]+)"', html)
    targets = set()
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue
        assert not link.startswith("/"), f"absolute link {link}"
        targets.add((folder / link).resolve())
    for idea, session in sessions_of(folder).items():
        want = (session / "report.html").resolve()
        assert want in targets, f"{idea}: no link to {want} in {sorted(targets)}"
        assert want.is_file()


# --------------------------------------------------------------------------------------------------- budgets


@pytest.fixture(scope="module")
def budget_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Each reply costs $0.10; sessions one at a time; $0.15 per session, $0.25 for the batch. idea_a spends
    $0.20 (its own budget stops it), idea_b one reply ($0.30 in all: the batch's budget stops it), idea_c none."""
    work = tmp_path_factory.mktemp("budget")
    tpl = make_template(work, {})
    script = make_script(work, cost_usd=0.10)
    res = run_batch(batch_cmd(tpl, work / "root", "idea_a,idea_b,idea_c", "--gpus", "0", "--parallel", "1",
                              "--budget-usd", "0.25", "--session-budget-usd", "0.15", model=f"scripted:{script}",
                              scale=0.1, max_runs=5))
    return batch_from(res), res


@pytest.mark.slow
def test_the_batch_and_session_budgets_stop_model_calls(budget_batch) -> None:
    folder, res = budget_batch
    s = sessions_of(folder)
    replies = {idea: len(kinds(p, "reply")) for idea, p in s.items()}
    assert replies == {"idea_a": 2, "idea_b": 1, "idea_c": 0}, f"{replies}\n{res.stdout[-2000:]}"
    assert final_status(s["idea_a"]) == "budget_usd"
    assert final_status(s["idea_b"]) == "budget_usd"
    assert "batch" in kinds(s["idea_b"], "finished")[-1]["data"]["reason"]
    assert not kinds(s["idea_c"], "drive_started")
    data = json.loads(orchestrator("status", str(folder), "--json").stdout)
    assert data["batch"]["spent_usd"] == pytest.approx(0.30)
    line_c = next(line for line in orchestrator("status", str(folder)).stdout.splitlines() if "idea_c" in line)
    assert "not started" in line_c


@pytest.mark.slow
def test_resuming_a_batch_whose_budget_is_spent_says_how_to_go_on(budget_batch) -> None:
    """idea_c never started: the batch's budget was spent. The batch ends with the hint `orchestrator resume
    BATCH`; followed as printed, it must not silently do nothing and print the same hint again."""
    folder, first = budget_batch
    res = orchestrator("resume", str(folder), timeout=120)
    said = " ".join((res.stdout + res.stderr).split())
    assert "--budget-usd" in said, ("resume of a batch whose budget is spent neither starts idea_c nor says "
                                    f"that the budget must be raised (exit {res.returncode}):\n{said[-1500:]}")
    assert not kinds(sessions_of(folder)["idea_c"], "drive_started")


@pytest.mark.slow
def test_raising_the_batch_budget_on_resume_lets_the_sessions_it_stopped_go_on(budget_batch) -> None:
    folder, _ = budget_batch
    s = sessions_of(folder)
    assert len(kinds(s["idea_b"], "reply")) == 1  # stopped by the batch's budget, not its own
    res = orchestrator("resume", str(folder), "--budget-usd", "10", timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert batch_spec(folder)["budget_usd"] == 10
    replies = {idea: len(kinds(p, "reply")) for idea, p in s.items()}
    assert replies["idea_a"] == 2  # its own $0.15 still stops it
    assert replies["idea_c"] == 2  # started now, stopped by its own budget
    assert replies["idea_b"] == 2, ("idea_b was stopped only by the batch's budget; with the batch's budget "
                                    f"raised, resume should let it spend up to its own: {replies}")


@pytest.mark.slow
def test_a_run_whose_wall_clock_ends_while_it_waits_for_a_slot_is_recorded_stopped_and_runs_on_resume(
        tmp_path: Path) -> None:
    """The batch's only GPU stays taken (this test holds its lease); a session of that batch whose wall clock ends
    while its baseline waits ends `wall_clock` with that run recorded stopped, never begun; resumed with more
    time once the GPU is free, the run begins on that GPU."""
    from orchestrator.batch import BatchSpec, save_batch

    tpl = make_template(tmp_path, {"idea_a": [1, 1]})
    folder = tmp_path / "batch"
    folder.mkdir()
    save_batch(folder, BatchSpec(name="held", created_at=time.time(), ideas_file=str(tpl / "seed_ideas.json"),
                                 template=str(tpl), ideas=["idea_a"], pool=SlotPool(kind="gpu", devices=["0"]),
                                 parallel=1))
    (folder / ".slots").mkdir()
    holder = os.open(folder / ".slots" / "gpu0.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)
    env = {"ORCH_BATCH": str(folder)}
    try:
        res = orchestrator("launch", str(tpl / "seed_ideas.json"), "--idea", "idea_a", "--template", str(tpl),
                           "--model", f"scripted:{make_script(tmp_path)}", "--root", str(folder), "--max-runs", "1",
                           "--no-plots", "--wall-clock", "3", env=env, timeout=DEADLINE_S)
    finally:
        os.close(holder)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    session = Path(res.stdout.splitlines()[0])
    assert final_status(session) == "wall_clock"
    stopped = [e["data"] for e in kinds(session, "run_stopped") if e["data"].get("run") == 0]
    assert stopped and "waited for a free slot" in stopped[-1]["message"], stopped
    assert not kinds(session, "run_finished")
    assert not (session / "run_0" / "slot.json").exists()  # the experiment never began
    again = orchestrator("resume", str(session), "--wall-clock", "300", env=env, timeout=DEADLINE_S)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert final_status(session) == "max_runs"
    assert json.loads((session / "run_0" / "slot.json").read_text())["cuda_visible_devices"] == "0"


def test_a_batch_in_a_terminal_shows_its_live_table_then_the_leaderboard(tmp_path):
    """As a user sees it: stdout and stderr a terminal, so the live table (rich Live) is drawn and redrawn."""
    tpl = make_template(tmp_path, {})
    env = child_env({"TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"})
    env.pop("NO_COLOR", None)
    code, text = run_in_a_terminal(batch_cmd(tpl, tmp_path / "root", "idea_a,idea_b",
                                             model=f"scripted:{make_script(tmp_path)}"), env)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text).replace("\r", "\n")
    assert code == 0 and "Traceback" not in plain, plain
    assert "Batch: slots" in plain  # the live view's caption
    assert re.search(r"Batch seed_ideas: 2 ideas, ranked by sleep\.score", plain), plain
    assert re.search(r"│ 1 │ idea_\w .*│ max_runs │", plain) and re.search(r"│ 2 │ idea_\w .*│ max_runs │", plain), plain
