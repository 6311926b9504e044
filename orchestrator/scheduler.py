"""Many sessions at once: create a batch folder with one session per idea, then drive the sessions concurrently.

Each session is driven by its own `orchestrator resume SESSION` process: the same Driver, lock, journal and signal
handling as a single session, so a batch adds nothing a session does not already survive. What the batch adds is
the sharing: every run leases a slot of the batch's pool (leases.py) only while it executes, so while one session
waits for its model, another's run uses the GPU. `--parallel` caps how many sessions are driven at a time.

The batch process owns no state of its own beyond batch.json: if it is killed, its session processes are told
(SIGTERM through PR_SET_PDEATHSIG), record `interrupted` and stop their runs; `resume BATCH` goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Protocol

from orchestrator.batch import (
    LOGS_DIR,
    BatchSession,
    BatchSpec,
    LeaderRow,
    batch_dir_name,
    leader_row,
    load_batch,
    save_batch,
    snapshot,
    spent_usd,
)
from orchestrator.config import Settings, public_dump
from orchestrator.errors import OrchestratorError
from orchestrator.journal import FINAL_STATUSES, JournalError, load_state
from orchestrator.leases import SlotPool, busy_slots, waiting
from orchestrator.new_session import claim_session_dir, create_session
from orchestrator.spec import IdeaSpec
from orchestrator.template import Template

POLL_S = 0.1  # how often the batch looks at its session processes
SHOW_S = 0.5  # how often it reads the sessions' snapshots for the live view
STOP_PATIENCE_S = 120.0  # after Ctrl-C, how long sessions get to record `interrupted` before they are killed
BATCH_PID_VAR = "ORCHESTRATOR_BATCH_PID"  # a session process started by a batch: the batch process's pid


class BatchStopped(OrchestratorError):
    """The batch was stopped by a signal; its sessions recorded `interrupted`."""

    exit_code = 130


def create_batch(name: str, ideas_file: Path, ideas: list[IdeaSpec], template: Template, settings: Settings,
                 max_runs: Callable[[IdeaSpec], int], pool: SlotPool, parallel: int, backend: str,
                 ray_address: str | None, ray_resources: dict[str, float], budget_usd: float | None,
                 session_budget_usd: float | None, on_claimed: Callable[[Path], None] | None = None) -> Path:
    """Claim `ROOT/<time>_batch_<name>/` and create one session folder per idea inside it, exactly as `launch`
    makes them. batch.json is written first (with every idea) and again after each session, so it always lists
    what exists; `resume BATCH` creates the sessions a stopped batch had not made yet."""
    folder = claim_session_dir(Path(settings.root), batch_dir_name(name)).resolve()
    session_settings = settings.model_copy(update={"root": folder, "batch": folder, "budget_usd": session_budget_usd})
    spec = BatchSpec(name=name, created_at=time.time(), ideas_file=str(Path(ideas_file).resolve()),
                     template=str(template.path), ideas=[i.name for i in ideas], backend=backend,
                     ray_address=ray_address, ray_resources=ray_resources, pool=pool, parallel=parallel,
                     budget_usd=budget_usd, session_budget_usd=session_budget_usd,
                     settings=public_dump(session_settings),
                     idea_specs=[{"idea": i.model_dump(mode="json"), "max_runs": max_runs(i)} for i in ideas])
    save_batch(folder, spec)
    (folder / LOGS_DIR).mkdir(exist_ok=True)
    if on_claimed is not None:  # batch.json exists: status and resume can read the folder from now on
        on_claimed(folder)
    create_missing(folder, spec, template, session_settings)
    return folder


def create_missing(folder: Path, spec: BatchSpec, template: Template, session_settings: Settings) -> None:
    """Create the session folder of every idea of the batch that has none yet. Ctrl-C or SIGTERM meanwhile is
    held until the session being made is complete, then stops the batch (every session listed is resumable)."""
    with _stop_signals() as signals:
        for entry in spec.missing():
            if signals:
                break
            idea = IdeaSpec.model_validate(entry["idea"])
            session = create_session(idea, template, session_settings, int(entry["max_runs"]))
            spec.sessions.append(BatchSession(idea=idea.name, path=str(session)))
            save_batch(folder, spec)
    if signals:
        raise BatchStopped(f"stopped by {signal.Signals(signals[0]).name} while creating the sessions; resume "
                           f"with:\n  orchestrator resume {folder}")


def unfinished(spec: BatchSpec, reopen: set[str] | frozenset[str] = frozenset()) -> list[BatchSession]:
    """The sessions `resume BATCH` drives: every one not in a final status, and those whose status is in
    `reopen` (a limit that was raised, or `baseline_failed`). A session that cannot be read is driven too, so its own process says
    what is wrong with it, in its log."""
    todo = []
    for entry in spec.sessions:
        status: str
        try:
            status = load_state(Path(entry.path)).session.status
        except (JournalError, OSError):
            status = "unreadable"
        if status not in FINAL_STATUSES or status in reopen:
            todo.append(entry)
    return todo


class View(Protocol):
    def update(self, rows: list[LeaderRow], busy: int, total: int, queued: int, spent: float) -> None: ...


def follow_batch() -> bool:
    """In a session process started by a batch (BATCH_PID_VAR set): end with the batch process. The kernel sends
    SIGTERM when it dies (the session records `interrupted`); if it died already, exit before driving anything.
    Returns whether this process drives a batch's session."""
    from orchestrator.sandbox import die_with_parent

    parent = os.environ.pop(BATCH_PID_VAR, "")
    if not parent.isdigit():
        return False
    if not die_with_parent(int(parent)):
        raise BatchStopped("the batch process that started this session has ended; resume the batch")
    return True


class _Session:
    """A session's driving process: exec'd (`orchestrator resume SESSION`) or forked from the batch process."""

    def __init__(self, entry: BatchSession, log: IO[bytes], proc: subprocess.Popen[bytes] | None = None,
                 pid: int | None = None) -> None:
        self.entry = entry
        self.log = log
        self.proc = proc
        self.pid = proc.pid if proc is not None else pid
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        if self.code is None and self.pid is not None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, sig)


@contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP to the batch process are noted (not raised): the loop forwards them to the
    session processes and waits for them to record `interrupted`."""
    got: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, _frame: got.append(signum))
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def drive_batch(folder: Path, view: View, env: dict[str, Any], args: list[str] | None = None,
                per_session: dict[str, list[str]] | None = None, reopen: set[str] | frozenset[str] = frozenset(),
                python: str = sys.executable, fork_entry: Callable[[list[str]], int] | None = None) -> dict[str, int]:
    """Drive every unfinished session of the batch, at most `parallel` at a time, until all have ended. Returns
    each driven session's exit code by idea. Raises BatchStopped after a stop signal, once they have all ended."""
    spec = load_batch(folder)
    pool = spec.pool
    todo = unfinished(spec, reopen)
    running: list[_Session] = []
    codes: dict[str, int] = {}
    stopping: int | None = None
    stop_deadline = 0.0
    shown = 0.0
    ended: dict[str, LeaderRow] = {}  # sessions whose process has ended, as their journal says
    with _stop_signals() as signals:
        while todo or running:
            if signals and stopping is None:
                stopping = signals[0]
                stop_deadline = time.monotonic() + STOP_PATIENCE_S
                todo = []
                for s in running:  # a terminal's Ctrl-C reached them already; a `kill` of the batch did not
                    s.send_signal(stopping)
            if stopping is not None and time.monotonic() > stop_deadline:
                for s in running:
                    s.send_signal(signal.SIGKILL)
            while todo and len(running) < spec.parallel and not _budget_spent(folder, spec):
                entry = todo.pop(0)
                extra = [*(args or []), *(per_session or {}).get(entry.path, [])]
                running.append(_start(folder, entry, env, extra, python, fork_entry))
            if todo and not running and _budget_spent(folder, spec):
                todo = []  # the batch's budget is spent: the rest stay `not started` (resume with a new budget)
            for s in list(running):
                code = s.poll()
                if code is not None:
                    codes[s.entry.idea] = code
                    s.log.close()
                    running.remove(s)
                    ended[s.entry.path] = _final_row(s.entry)
            if time.monotonic() - shown >= SHOW_S:
                _show(view, spec, folder, pool, ended)
                shown = time.monotonic()
            if todo or running:
                time.sleep(POLL_S)
        _show(view, spec, folder, pool, ended)
    if stopping is not None:
        raise BatchStopped(f"stopped by {signal.Signals(stopping).name}; every session is saved. Resume with:\n"
                           f"  orchestrator resume {folder}")
    return codes


def _budget_spent(folder: Path, spec: BatchSpec) -> bool:
    return spec.budget_usd is not None and spent_usd(folder) >= spec.budget_usd


def _start(folder: Path, entry: BatchSession, env: dict[str, Any], args: list[str], python: str,
           fork_entry: Callable[[list[str]], int] | None) -> _Session:
    """Start the process that drives one session: `orchestrator resume SESSION ARGS`, as a fork of this process
    when `fork_entry` is given (it runs the command line in the child; the modules are loaded already, so the
    session starts in milliseconds instead of seconds of imports), else as a new interpreter."""
    log = open(folder / LOGS_DIR / f"{Path(entry.path).name}.log", "ab")  # closed when the session process ends
    log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} orchestrator resume {entry.path}\n".encode())
    log.flush()
    argv = ["resume", entry.path, *args]
    if fork_entry is None:
        proc = subprocess.Popen([python, "-m", "orchestrator", *argv], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**env, BATCH_PID_VAR: str(os.getpid())})
        return _Session(entry, log, proc=proc)
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the batch's loop
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update({**env, BATCH_PID_VAR: str(parent)})
            code = fork_entry(argv)
        finally:
            os._exit(code)
    return _Session(entry, log, pid=pid)


def _final_row(entry: BatchSession) -> LeaderRow:
    """A session whose process has ended, read from its journal (a process killed before it could record why
    shows as interrupted, not as still running)."""
    try:
        return leader_row(entry, load_state(Path(entry.path)))
    except (JournalError, OSError):
        return leader_row(entry, None)


def _show(view: View, spec: BatchSpec, folder: Path, pool: SlotPool, ended: dict[str, LeaderRow]) -> None:
    rows = []
    now = time.time()
    queue = set(waiting(folder)) if spec.backend == "local" else set()
    for entry in spec.sessions:
        row = ended.get(entry.path) or leader_row(entry, snapshot(Path(entry.path)), now)
        if row.status == "running" and Path(entry.path).name in queue:
            row.phase = "queued"  # its run is started (gated) and waits for a slot
        rows.append(row)
    queued = sum(1 for r in rows if r.phase == "queued")
    busy = busy_slots(pool, folder) if spec.backend == "local" else sum(1 for r in rows if r.phase == "run"
                                                                            and r.status == "running")
    view.update(rows, busy, len(pool.slots()), queued, sum(r.cost_usd for r in rows))


def child_env(extra: dict[str, str] | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env.update(extra or {})
    return env
