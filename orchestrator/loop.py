"""The driver: the only room that sequences the others.

The driver is deterministic given its journal: every step first looks for its own recorded outcome (keyed by stage,
run, attempt and edit retry) and only performs the side effect when none is recorded. So `resume` is simply driving
the session again from the top: journaled replies are never requested twice, finished runs are not run again, and
the conversation is rebuilt from the prompts and replies on record.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from orchestrator import conversation, guard, prompts
from orchestrator.atomic import write_text_atomic
from orchestrator.batch import batch_budget, spent_usd
from orchestrator.config import ConfigError, Settings
from orchestrator.edits import PLAN_CHARS, SUBJECT_CHARS, apply_edits, plan_line, shorten
from orchestrator.errors import OrchestratorError
from orchestrator.executors import Executor, LocalExecutor
from orchestrator.journal import (
    FINAL_STATUSES,
    META_DIR,
    REOPENABLE_STATUSES,
    SETTINGS_FILE,
    Journal,
    JournalError,
    SessionState,
    StateFold,
    write_snapshot,
)
from orchestrator.leases import LeaseTimeout
from orchestrator.models import ContextWindowError, Model, ModelError, Reply
from orchestrator.new_session import settings_file_text
from orchestrator.runner import RunLimits, RunRequest, RunResult, stop_orphan
from orchestrator.sandbox import SandboxSpec, choose, protect_process, stop_strays
from orchestrator.secrets import redact_folder, redact_obj
from orchestrator.spec import IdeaSpec
from orchestrator.template import Template, record_baseline_hash
from orchestrator.workspace import Workspace

ALL_COMPLETED = "ALL_COMPLETED"
DEFAULT_RUN_TIMEOUT_S = 7200.0


class SessionBusy(OrchestratorError, RuntimeError):
    """Another orchestrator process is driving this session."""


class _LimitReached(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _RunCouldNotStart(Exception):
    """The machine, not the experiment, kept a run from beginning (its sandbox could not be set up)."""


class _SessionFailed(Exception):
    def __init__(self, reason: str, status: str = "failed") -> None:
        super().__init__(reason)
        self.status = status


class Progress(BaseModel):
    """What the command line shows while a session runs."""

    phase: str
    stage: str = "experiment"
    run: int | None = None
    max_runs: int = 10
    attempt: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    message: str = ""
    outcome: str | None = None  # run_finished: ok, error, timeout ...


class Hooks(Protocol):
    def progress(self, p: Progress) -> None: ...


class _Situation(BaseModel):
    """What the next prompt is about: a prompt file and the values it needs."""

    name: str
    context: dict[str, Any] = {}
    show_files: bool = False


class _Applied(BaseModel):
    kind: str  # applied | no_edits | completed | failed | no_change
    feedback: str = ""
    commit: str | None = None


def resume_settings(session: Path, overrides: dict[str, Any],
                    check: Callable[[Settings], None] | None = None) -> Settings:
    """The settings a session was launched with, under ORCH_* variables and the flags given to `resume` (the
    result is saved again). A saved `api_base` whose credentials were masked is never used as a URL. `check` is
    called with the result before it is saved: whatever it raises leaves the session's settings as they were."""
    from orchestrator.config import env_overrides, load_settings

    path = Path(session) / META_DIR / SETTINGS_FILE
    if not path.exists():
        raise JournalError(f"{session} is not a session folder (no {META_DIR}/{SETTINGS_FILE})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JournalError(f"{path} cannot be read: {exc}") from None
    max_runs = saved.pop("max_runs", None)
    changed = {k: v for k, v in overrides.items() if v is not None}
    if "env" in changed:  # --env adds to the saved variables (masked, secret-looking ones are not kept)
        kept_env = {k: v for k, v in (saved.get("env") or {}).items() if v != "***"}
        changed["env"] = {**kept_env, **changed["env"]}
    masked = "***" in str(saved.get("api_base") or "")
    if masked:
        saved.pop("api_base")
    kept = {k: v for k, v in saved.items() if k not in env_overrides()}
    settings = load_settings(kept | changed, None)
    if masked and settings.api_base is None:
        raise ConfigError("the session's api_base held credentials, which are never saved: give it again with "
                          "resume --api-base URL (or ORCH_API_BASE)")
    if check is not None:
        check(settings)
    write_text_atomic(path, settings_file_text(settings, max_runs))
    return settings


_HELD_LOCKS: set[tuple[Path, int]] = set()  # (session, thread): re-entrant for the thread that holds it


LOCK_PATIENCE_S = 1.0  # `status` probes the lock with a shared lock for a moment (journal._driven): wait that out


def _flock_within(fd: int, patience_s: float) -> bool:
    """Take an exclusive flock on `fd`, retrying for `patience_s` seconds; False if still held by someone else."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@contextmanager
def session_lock(session: Path) -> Iterator[None]:
    """Hold the session's lock (`.orchestrator/lock`, flock) for the block; re-entrant within one thread (another
    thread of the same process is refused like another process: flock locks belong to the open file).

    Take it before reading the journal: a driver that read the journal first could replay stale events. Opening
    the file never truncates it, so a second process that fails to get the lock leaves the holder's pid there
    and can name it."""
    key = (Path(session).resolve(), threading.get_ident())
    if key in _HELD_LOCKS:
        yield
        return
    path = Path(session) / META_DIR / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise JournalError(f"{session} is not a session folder (no {META_DIR}/)") from None
    try:
        if not _flock_within(fd, LOCK_PATIENCE_S):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise SessionBusy(f"{session} is being driven by another orchestrator process{who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(key)
    finally:
        os.close(fd)


class Stopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP reached the orchestrator while it drove a session."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals_stop_the_session() -> Iterator[None]:
    """While a session is driven, SIGINT, SIGTERM and SIGHUP raise `Stopped` (a KeyboardInterrupt): the run's
    process group is stopped and the session is recorded `interrupted`. Only the first signal raises; later ones
    (an impatient second Ctrl-C) are ignored, so the clean-up and its journal record are never cut short. A
    signal the process was started ignoring (SIGINT in a background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise Stopped(signum)

    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------- the driver


class Driver:
    """Drives one session folder from wherever its journal says it stands to a final status."""

    def __init__(self, session: Path, model: Model, settings: Settings, hooks: Hooks | None = None,
                 executor: Executor | None = None) -> None:
        self.dir = Path(session)
        self.model = model
        self.settings = settings
        self.hooks = hooks
        self.executor: Executor = executor or LocalExecutor()
        self.last_good_run = 0

    def _load(self) -> None:
        """Read the journal (under the session lock) and what the session was launched with."""
        self.journal = Journal(self.dir, redact=redact_obj)
        if not self.journal.exists():
            raise JournalError(f"{self.dir} is not a session folder (no {META_DIR}/journal.jsonl)")
        started = self.journal.find("session_started")
        if started is None:
            raise JournalError(f"{self.dir}: the journal has no session_started event")
        self.fold = StateFold(self.dir)
        for event in self.journal.events():
            self.fold.add(event)
        self.idea = IdeaSpec.model_validate(started.data["idea"])
        self.template = Template.model_validate(started.data["template"])
        self.max_runs = int(started.data["max_runs"])
        self.baseline_reusable = bool(started.data.get("baseline_reusable"))
        self.ws = Workspace.open(self.dir)
        self.history: list[conversation.Message] = [
            conversation.Message(role="system", content=started.data["system_prompt"])
        ]
        room = self.journal.find("context_room")  # learned for one model: another may have a larger window
        self.context_room: int | None = None
        if room is not None and room.data.get("model") == self.model.name:
            self.context_room = int(room.data["tokens"])
        trimmed = self.journal.find("context_trimmed")
        self.trim = conversation.Trim() if trimmed is None else conversation.Trim(
            elided=tuple(trimmed.data["elided"]), dropped=tuple(trimmed.data["dropped"]))

    # ---------------------------------------------------------------------------------------------- entry point

    def state(self) -> SessionState:
        return self.fold.state()

    def drive(self, reopen: bool = False) -> SessionState:
        """Drive to a final status. `reopen` continues a session that one of its limits ended.

        Whatever goes wrong inside a step ends recorded: a limit as its status, a model error or any unexpected
        exception as `interrupted` (resumable; the traceback is journaled), Ctrl-C, SIGTERM and SIGHUP as
        `interrupted` after the run's process group is stopped (then KeyboardInterrupt is raised again)."""
        with session_lock(self.dir), _signals_stop_the_session():
            self._drive_t0 = time.time()
            protect_process()  # non-dumpable (runs cannot read our environment) and a subreaper (see stop_strays)
            self.sandbox = choose(self.settings.sandbox)
            self._load()
            before = self.state().session.status
            if before in FINAL_STATUSES and not (reopen and before in REOPENABLE_STATUSES):
                return self.state()
            try:
                self._record("drive_started", pid=os.getpid(),
                             reopened=before if before in FINAL_STATUSES else None,
                             sandbox=self.sandbox.used, sandbox_requested=self.sandbox.requested,
                             sandbox_warning=self.sandbox.warning or None)
                self._recover()
                status, reason = self._experiments()
                if status in ("completed", "max_runs") and self.settings.plots:
                    self._plots()
                    self._notes()
                self._record("finished", status=status, reason=reason)
            except _LimitReached as limit:
                self._record("finished", status=limit.status, reason=limit.reason)
            except _SessionFailed as failure:
                self._record("finished", status=failure.status, reason=str(failure))
            except ModelError as exc:
                self._record("interrupted", reason=f"model error: {exc}")
            except _RunCouldNotStart as exc:
                self._record("interrupted", reason=str(exc))
            except KeyboardInterrupt as exc:
                signalled = isinstance(exc, Stopped) and exc.signum != signal.SIGINT
                why = f"stopped by {exc.args[0]}" if signalled else "interrupted by the user"
                self._record("interrupted", reason=why)
                raise
            except Exception as exc:  # the catch-all: never leave a session `running` with a traceback
                self._record("interrupted", reason=_one_line(f"{type(exc).__name__}: {exc}"),
                             error_type=type(exc).__name__, traceback=traceback.format_exc(limit=30))
        return self.state()

    # ---------------------------------------------------------------------------------------------- bookkeeping

    def _record(self, kind: str, **data: Any) -> None:
        event = self.journal.append(kind, **data)
        self.fold.add(event)
        _crash_point(kind)
        state = self.state()
        write_snapshot(self.dir, state)
        if self.hooks is not None and kind in ("phase", "reply", "run_finished", "finished", "interrupted"):
            info = state.session
            self._show(Progress(
                phase=info.phase if kind == "phase" else kind,
                stage=data.get("stage", "experiment"),
                run=info.current_run,
                max_runs=self.max_runs,
                attempt=info.current_attempt,
                prompt_tokens=info.totals.prompt_tokens,
                completion_tokens=info.totals.completion_tokens,
                cost_usd=info.totals.cost_usd,
                message=str(data.get("message") or data.get("reason") or ""),
                outcome=data.get("outcome") if kind == "run_finished" else None,
            ))

    def _show(self, progress: Progress) -> None:
        """Progress for the terminal; a closed terminal or pipe never stops the session."""
        try:
            assert self.hooks is not None
            self.hooks.progress(progress)
        except OSError:
            self.hooks = None

    def _phase(self, phase: str, stage: str = "experiment", run: int | None = None,
               attempt: int | None = None) -> None:
        self._record("phase", phase=phase, stage=stage, run=run, attempt=attempt)

    def _recover(self) -> None:
        """Undo what a crash left half done: orphaned experiment processes and uncommitted edits."""
        events = self.journal.events()
        finished = {e.key() for e in events if e.kind in ("run_finished", "run_stopped")}
        orphans = [e for e in events if e.kind == "run_started" and e.key() not in finished]
        for e in orphans:
            if e.data.get("pid") is not None:  # a Ray task has none here: Ray ended it with its owner
                stop_orphan(int(e.data["pid"]), e.data.get("proc_start_ticks"))
        planted = self.ws.repair_config()  # a run of the crashed process may have planted a filter
        if planted:
            self._record("repository_repaired", keys=planted)
        if orphans:  # its snapshot died with that process: what git knows of the guarded paths is checked instead
            guarded = [p for p in (*guard.TREE_FILES, *self._protected_files(), *guard.earlier_runs(self.dir, ""))
                       if (self.dir / p).exists()]
            changed = self.ws.changed(guarded)
            if changed:
                self.ws.restore("HEAD", changed, remove_absent=True)
                self._record("guarded_restored", files=changed,
                             message="changed while the orchestrator was not running; restored from the checkpoint")
        stale = self.ws.clear_stale_locks(older_than=self._drive_t0)  # left by a git command killed with us
        if stale:
            self._record("git_locks_removed", files=stale)
        editable = self._editable_files(tuple(self.template.editable))
        if editable and self.ws.is_dirty(editable):
            # Edits written but not committed: back to the last checkpoint (the journaled reply is applied again).
            # Results, figures and other outputs are left alone.
            self._reset_editable("HEAD")

    def _reset_editable(self, ref: str) -> list[str]:
        """Make the editable files what they are at `ref` and return their paths. Tracked files absent at `ref`
        are removed; untracked files absent there, files over the size limit and everything else stay."""
        paths = self._editable_files(tuple(self.template.editable))
        tracked = set(self.ws.tracked(paths))
        # an untracked file absent at `ref` is not ours to remove (a generated config, a user's file)
        self.ws.restore(ref, [p for p in paths if p in tracked or self.ws.show(ref, p) is not None],
                        remove_absent=True)
        return paths

    def _check_limits(self, spending: bool = True) -> None:
        """Stop cleanly when a budget is used up: the wall clock before each model call and each run, the dollar
        and token budgets before each model call only (a reply already paid for still gets its run)."""
        left = self._wall_left()
        if left is not None and left <= 0:
            wall = self.settings.wall_clock_s
            raise _LimitReached("wall_clock", f"the session ran its {wall:.0f} s wall-clock budget")
        if not spending:
            return
        totals = self.state().session.totals
        budget = self.settings.budget_usd
        if budget is not None and totals.cost_usd >= budget:
            raise _LimitReached("budget_usd", f"model spending reached ${totals.cost_usd:.4f} of the ${budget:.2f} budget")
        if self.settings.batch is not None:  # the batch's budget, shared by all its sessions
            shared = batch_budget(self.settings.batch)
            spent = spent_usd(self.settings.batch) if shared is not None else 0.0
            if shared is not None and spent >= shared:
                raise _LimitReached("budget_usd", f"the batch's model spending reached ${spent:.4f} of its "
                                                  f"${shared:.2f} budget")
        cap = self.settings.max_tokens_total
        used = totals.prompt_tokens + totals.completion_tokens
        if cap is not None and used >= cap:
            raise _LimitReached("max_tokens", f"the session used {used:,} tokens of its {cap:,} token budget")

    def _wall_left(self) -> float | None:
        """Seconds left of the wall-clock budget (None without one)."""
        wall = self.settings.wall_clock_s
        if wall is None:
            return None
        last = self.journal.last()
        active = self.state().session.totals.active_seconds
        elapsed = active + (max(0.0, time.time() - last.ts) if last is not None else 0.0)
        return wall - elapsed

    def _check_stall(self) -> None:
        """End the session (status `stalled`) after `stall_replies` replies in a row with nothing to apply."""
        limit = self.settings.stall_replies
        streak = 0
        for event in reversed(self.journal.events()):
            if event.kind in ("edits_applied", "completed_reply") or (event.kind == "drive_started"
                                                                      and event.data.get("reopened")):
                break
            if event.kind in ("edits_failed", "no_edits", "no_change") and event.data.get("stage") == "experiment":
                streak += 1
        if streak >= limit:
            raise _LimitReached("stalled", f"{streak} replies in a row had no edits that could be applied")

    # ---------------------------------------------------------------------------------------------- asking

    def _ask(self, stage: str, run: int | None, attempt: int, retry: int, make_prompt: Callable[[], str]) -> str:
        """Append one user message, and get the model's reply: from the journal when on record, else by a call."""
        key = dict(stage=stage, run=run, attempt=attempt, retry=retry)
        k = (stage, run, attempt, retry)
        prompt = self.journal.find("prompt", k)
        text = prompt.data["content"] if prompt is not None else None
        if text is None:
            text = make_prompt()
            self._record("prompt", **key, content=text)
        self.history = conversation.append(self.history, "user", text)
        reply = self.journal.find("reply", k)
        if reply is None:
            self._phase("ask", stage, run, attempt)
            self._check_limits()
            got, wire, room = self._call_model()
            self._record("reply", **key, content=got.content, reasoning=got.reasoning,
                         prompt_tokens=got.prompt_tokens, completion_tokens=got.completion_tokens,
                         cached_tokens=got.cached_tokens, cost_usd=got.cost_usd, latency_s=got.latency_s,
                         model=got.model, call_attempts=got.attempts, finish_reason=got.finish_reason,
                         via=got.via)
            # the transcript follows the journal: a reply on record there is never missing from the journal
            self.journal.transcript_append({"request": wire, "reply": got.model_dump(mode="json")})
            if room is not None:  # the provider's window as we count it, recorded once the paid reply is safe
                self.context_room = room
                self._record("context_room", tokens=room, model=self.model.name)
            reply = self.journal.find("reply", k)
            assert reply is not None
        content = reply.data["content"]
        self.history = conversation.append(self.history, "assistant", content)
        return content

    def _call_model(self) -> tuple[Reply, list[dict[str, str]], int | None]:
        """One reply for the history as it stands, trimmed to fit the model's context window: ahead of time from
        the model's known limit or from what the provider accepted after refusing a longer history, and further
        each time the provider says the context is exceeded. Trims, and the size that fitted after a refusal
        (returned third, for the caller to journal after the reply), are journaled, so every later call (and a
        resumed session) starts from them instead of failing again."""
        trim = self.trim
        limit = self.model.context_limit()
        room = None if limit is None else limit - min(8192, limit // 4)  # leave room for the reply
        if self.context_room is not None:
            room = self.context_room if room is None else min(room, self.context_room)
        if room is not None:
            trim = conversation.fit(self.history, self.model.count_tokens, room, start=trim)
        refused = False
        for _ in range(8):
            self._use_trim(trim)
            messages = conversation.apply_trim(self.history, trim)
            try:
                reply = self.model.complete(messages)
            except ContextWindowError:
                refused = True
                tighter = conversation.tighten(self.history, trim)
                if tighter is None:
                    raise
                trim = tighter
                continue
            room = self.model.count_tokens(messages) if refused else None
            return reply, conversation.to_wire(messages, self.model.profile), room
        raise ContextWindowError("the conversation does not fit the model's context window even when shortened")

    def _use_trim(self, trim: conversation.Trim) -> None:
        if trim != self.trim:
            self._record("context_trimmed", elided=list(trim.elided), dropped=list(trim.dropped),
                         messages=len(self.history))
            self.trim = trim

    # ---------------------------------------------------------------------------------------------- editing

    def _apply(self, stage: str, run: int | None, attempt: int, retry: int, reply: str,
               editable: tuple[str, ...]) -> _Applied:
        key = dict(stage=stage, run=run, attempt=attempt, retry=retry)
        k = (stage, run, attempt, retry)
        for kind in ("edits_applied", "edits_failed", "no_edits", "no_change", "completed_reply"):
            done = self.journal.find(kind, k)
            if done is not None:
                mapping = {"edits_applied": "applied", "edits_failed": "failed", "completed_reply": "completed"}
                return _Applied(kind=mapping.get(kind, kind), feedback=done.data.get("feedback", ""),
                                commit=done.data.get("commit"))
        started = self.journal.find("apply_started", k)
        if started is not None:  # a crash between writing the edits and committing them
            self._reset_editable(started.data["base"])
        else:
            self._record("apply_started", **key, base=self.ws.head())
        self._phase("apply", stage, run, attempt)
        result = apply_edits(self.dir, reply, editable=editable, protected=tuple(self.template.protected))
        if result.blocks == 0 and not result.parse_error:
            if is_completed(reply):
                self._record("completed_reply", **key)
                return _Applied(kind="completed")
            self._record("no_edits", **key, message="the reply had no SEARCH/REPLACE blocks")
            return _Applied(kind="no_edits")
        if not result.ok:
            self._record("edits_failed", **key, feedback=result.feedback, message=_first_line(result.feedback))
            return _Applied(kind="failed", feedback=result.feedback)
        if not result.changed:
            self._record("no_change", **key, message="every block was already applied")
            return _Applied(kind="no_change")
        _crash_point("edits_written")
        label = f"run {run}" if stage == "experiment" else stage
        plan = plan_line(reply, PLAN_CHARS) or "edits"  # kept whole (up to PLAN_CHARS) for show and the report
        sha = self.ws.commit(f"{label} attempt {attempt}: {shorten(plan, SUBJECT_CHARS)}", paths=result.changed)
        # feedback on success is a note the model should read (e.g. a misnamed file applied where it matched)
        self._record("edits_applied", **key, commit=sha, changed=result.changed, plan=plan,
                     already_applied=result.already_applied, feedback=result.feedback)
        return _Applied(kind="applied", commit=sha, feedback=result.feedback)

    def _edit_step(self, stage: str, run: int | None, attempt: int, situation: _Situation,
                   editable: tuple[str, ...], no_edits_ends: bool = False) -> tuple[_Applied, _Situation]:
        """Ask for edits until they apply, the model is done, or the edit retries run out.

        With `no_edits_ends` (the plot and notes steps) a reply without edits ends the step at once.
        """
        retries = self.settings.edit_retries
        outcome = _Applied(kind="no_edits")
        for retry in range(retries + 1):
            reply = self._ask(stage, run, attempt, retry, partial(self._render, situation, editable))
            outcome = self._apply(stage, run, attempt, retry, reply, editable)
            if outcome.kind in ("applied", "completed"):
                return outcome, situation
            if no_edits_ends and outcome.kind in ("no_edits", "no_change"):
                return outcome, situation
            if stage == "experiment":
                self._check_stall()
            left = retries - retry
            cut = self._reply_cut(stage, run, attempt, retry)
            if outcome.kind == "failed":
                situation = _Situation(name="edits_failed", show_files=True,
                                       context={"run": run, "feedback": cut + outcome.feedback, "retries_left": left})
            elif cut:
                situation = _Situation(name="reply_cut", context={"run": run, "retries_left": left})
            else:
                situation = _Situation(name=outcome.kind, context={"run": run, "retries_left": left})
        return outcome, situation

    def _reply_cut(self, stage: str, run: int | None, attempt: int, retry: int) -> str:
        """A line for the model when its reply was cut at the output limit (finish_reason `length`), else ''."""
        reply = self.journal.find("reply", (stage, run, attempt, retry))
        if reply is None or reply.data.get("finish_reason") != "length":
            return ""
        return ("Your last reply was cut off at the output token limit before it ended, so its last block may be "
                "incomplete.\n\n")

    # ---------------------------------------------------------------------------------------------- running

    def _execute(self, stage: str, run: int | None, attempt: int, request: RunRequest) -> dict[str, Any]:
        """One attempt's run: started gated, journaled, the guard's snapshot taken, then (in a batch) a slot
        leased, and only then released with the leased GPU. So the slot is busy only while the run executes:
        everything the orchestrator does before and after it happens outside the lease."""
        key = dict(stage=stage, run=run, attempt=attempt, retry=None)
        k = (stage, run, attempt, None)
        done = self.journal.find("run_finished", k)
        if done is not None:
            return done.data
        self._check_limits(spending=False)
        self._phase("run", stage, run, attempt)
        wall = self._wall_left()
        deadline = None if wall is None else time.monotonic() + wall
        behind = run if stage == "experiment" and run is not None else self.max_runs + 1  # queue order
        editable = self._editable_files(tuple(self.template.editable))
        # leaving the block before wait() returns (a journal that cannot be written, a signal) stops the run
        # gated: the experiment begins only once its pid is journaled, so a crash in between leaves no run behind
        try:
            with self.executor.start(request) as handle:
                try:
                    _crash_point("run_spawned")
                    self._record("run_started", **key, pid=handle.pid, pgid=handle.pgid,
                                 proc_start_ticks=handle.proc_start_ticks, started_at=handle.started_at,
                                 command=request.command(), timeout_s=request.timeout_s, sandbox=handle.sandbox,
                                 executor=self.executor.name)
                    # nothing is written into the session from here until the guard has settled
                    before = guard.watch(self.dir, request.run_name, self._protected_files(), editable)
                    with ExitStack() as lease:  # a batch's slot for this run alone, given back whatever happens
                        held = lease.enter_context(self.executor.slot(
                            request, deadline=deadline, priority=behind, label=self.dir.name))
                        left = self._wall_left()  # after any wait for the slot
                        cut_by_wall = left is not None and left < request.timeout_s
                        held.started(handle.pid, handle.proc_start_ticks)
                        handle.release(env=held.env, timeout_s=max(left or 0.0, 0.001) if cut_by_wall else None)
                        result: RunResult = handle.wait()
                        strays = stop_strays(handle.proc_start_ticks) if handle.pid is not None else []
                        slot, gpus = held.slot, held.env.get("CUDA_VISIBLE_DEVICES", request.gpus)
                    # the slot is back: the run and what it left are gone
                except BaseException:  # Ctrl-C, a signal, a journal that cannot be written: nothing may outlive us
                    handle.kill()
                    if handle.pid is not None:  # the leader is reaped on exit
                        stop_strays(handle.proc_start_ticks, keep=frozenset({handle.pid}))
                    raise
        except LeaseTimeout:  # the run never began: recorded stopped, it runs again if the session is resumed
            self._record("run_stopped", **key, message="stopped before it began: the session's wall-clock budget "
                                                       "ran out while it waited for a free slot")
            raise _LimitReached("wall_clock", f"the session's {self.settings.wall_clock_s:.0f} s wall-clock budget "
                                              "ran out while its run waited for a free slot") from None
        verdict = guard.settle(before, self.ws, editable)
        notes = []
        discarded = sorted({*result.discarded, *verdict.discarded})
        if discarded:
            notes.append(f"the run's own changes to {', '.join(discarded)} were discarded")
        if strays:
            notes.append(f"{len(strays)} process(es) it left running outside its group were stopped")
        if verdict.tampered:
            result = result.model_copy(update={"outcome": "tampered", "metrics": {}, "message": verdict.message()})
        if notes:
            result = result.model_copy(update={"message": f"{result.message} ({'; '.join(notes)})"})
        if result.outcome == "sandbox_failed" and not verdict.tampered:
            # bwrap failed before the experiment began: not the model's doing, so not its attempt. Recorded stopped,
            # it runs again when the session is resumed (after bubblewrap is fixed, or with --sandbox none).
            self._record("run_stopped", **key, message=result.message, stderr_tail=result.stderr_tail)
            raise _RunCouldNotStart(f"{request.run_name} could not start: {result.message}. Nothing of it ran and "
                                    "the attempt is not counted; resume once bubblewrap works here, or with "
                                    "--sandbox none")
        if cut_by_wall and result.outcome == "timeout":
            # not the run's fault: it runs again from a clean folder if the session is resumed with more time
            self._record("run_stopped", **key, message="stopped: the session's wall-clock budget ran out")
            raise _LimitReached("wall_clock", f"the session's {self.settings.wall_clock_s:.0f} s wall-clock "
                                              f"budget ran out during run {run if run is not None else stage}")
        self._record("run_finished", **key, outcome=result.outcome, returncode=result.returncode,
                     duration_s=result.duration_s,
                     metrics={n: m.model_dump(mode="json") for n, m in result.metrics.items()},
                     message=result.message, stderr_head=result.stderr_head, stderr_tail=result.stderr_tail,
                     stdout_tail=result.stdout_tail, sandbox=result.sandbox, tampered=verdict.tampered,
                     unrestored=verdict.unrestored, discarded=discarded, strays=len(strays),
                     executor=self.executor.name, slot=slot, gpus=gpus)
        if verdict.unrestored:  # recorded above first, so status and the report name what happened
            raise _SessionFailed(f"{verdict.message()}; the session cannot be trusted past this run (its git "
                                 f"history or guarded files may hold what the run wrote)")
        done = self.journal.find("run_finished", k)
        assert done is not None
        return done.data

    def _run_request(self, run_name: str, script: str = "experiment.py", args: list[str] | None = None,
                     results_file: str | None = "final_info.json") -> RunRequest:
        timeout = self.settings.timeout_s or self.template.timeout_s or DEFAULT_RUN_TIMEOUT_S
        limits = self.template.limits
        mb = 2**20
        return RunRequest(cwd=self.dir, run_name=run_name, python=self.settings.python, script=script, args=args,
                          timeout_s=timeout, env_allow=list(self.template.env), env_set=dict(self.settings.env),
                          gpus=self.settings.gpus, results_file=results_file,
                          sandbox=self._sandbox_spec(run_name, writable=script == "plot.py"),
                          limits=RunLimits(
                              processes=limits.processes,
                              file_bytes=None if limits.file_mb is None else int(limits.file_mb * mb),
                              run_dir_bytes=None if limits.run_dir_mb is None else int(limits.run_dir_mb * mb)))

    def _sandbox_spec(self, run_name: str, writable: bool) -> SandboxSpec | None:
        """What a sandboxed run may touch; None when runs are not sandboxed. plot.py writes its figures into the
        session folder, so its tree is writable (guarded paths stay read-only)."""
        if self.sandbox.used != "bwrap":
            return None
        readonly = [".git", META_DIR, *guard.TREE_FILES, *self._protected_files(),
                    *guard.earlier_runs(self.dir, run_name)]
        return SandboxSpec(readonly=readonly, copy_on_write=self._editable_files(tuple(self.template.editable)),
                           writable_tree=self.template.writable or writable,
                           network=self.template.network or self.settings.allow_network,
                           caches=[str(p) for p in self.template.cache_dirs(self.dir)],
                           hidden=[] if self.settings.batch is None else [str(self.settings.batch)])

    def _protected_files(self) -> list[str]:
        """The session's files that match the template's protected patterns."""
        from fnmatch import fnmatchcase

        return [rel for rel in self._tree_files() if any(fnmatchcase(rel, p) for p in self.template.protected)]

    def _record_run(self, run: int, outcome: str) -> None:
        k = ("experiment", run, None, None)
        if self.journal.find("run_recorded", k) is not None:
            return
        redact_folder(self.dir / f"run_{run}")  # a key value never reaches a commit, whatever file holds it
        committed = self.ws.commit_run(f"run_{run}", f"run {run}: results ({outcome})")
        self.ws.tag(f"run_{run}", committed.sha, f"run {run}")
        self._record("run_recorded", stage="experiment", run=run, commit=committed.sha, tag=f"run_{run}",
                     untracked=committed.untracked, message=committed.problem)

    def _baseline(self) -> None:
        if self.journal.find("run_recorded", ("experiment", 0, None, None)) or self.journal.find("baseline_reused"):
            return
        if self.baseline_reusable:
            from orchestrator.runner import read_metrics

            metrics = read_metrics(self.dir / "run_0" / "final_info.json")
            head = self.ws.head()
            self.ws.tag("run_0", head, "run 0: baseline reused from the template")
            self._record("baseline_reused", stage="experiment", run=0, commit=head, tag="run_0",
                         metrics={n: m.model_dump(mode="json") for n, m in metrics.items()})
            return
        result = self._execute("experiment", 0, self._baseline_attempt(), self._run_request("run_0"))
        if result["outcome"] != "ok":
            raise _SessionFailed(f"the baseline run_0 failed ({result['outcome']}): {result.get('message', '')}; "
                                 "no model was called. Fix the cause, then resume the session to run it again",
                                 status="baseline_failed")
        record_baseline_hash(self.dir)  # so this folder can serve as a template whose baseline is reused
        self._record_run(0, "ok")

    def _baseline_attempt(self) -> int:
        """Each resume of a session whose baseline failed runs it once more, as its next attempt (a drive that only
        goes on after a crash replays the same attempt)."""
        return 1 + sum(1 for e in self.journal.events()
                       if e.kind == "drive_started" and e.data.get("reopened") == "baseline_failed")

    # ---------------------------------------------------------------------------------------------- stages

    def _experiments(self) -> tuple[str, str]:
        self._phase("baseline", "experiment", 0, self._baseline_attempt())
        self._baseline()
        situation = _Situation(name="first_turn", show_files=True)
        editable = tuple(self.template.editable)
        for run in range(1, self.max_runs + 1):
            done, situation = self._run_slot(run, situation, editable)
            if done:
                return "completed", f"the model replied {ALL_COMPLETED}"
        return "max_runs", f"all {self.max_runs} runs used"

    def _run_slot(self, run: int, situation: _Situation, editable: tuple[str, ...]) -> tuple[bool, _Situation]:
        attempts = self.settings.attempts_per_run
        last_message = ""
        for attempt in range(1, attempts + 1):
            outcome, situation = self._edit_step("experiment", run, attempt, situation, editable)
            if outcome.kind == "completed":
                return True, situation
            if outcome.kind != "applied":
                last_message = f"no edits could be applied ({outcome.kind.replace('_', ' ')})"
                if self.journal.find("attempt_failed", ("experiment", run, attempt, None)) is None:
                    self._record("attempt_failed", stage="experiment", run=run, attempt=attempt, retry=None,
                                 outcome="edits_failed" if outcome.kind == "failed" else outcome.kind,
                                 message=last_message)
                situation = situation.model_copy(
                    update={"context": {**situation.context, "retries_left": self.settings.edit_retries}})
                continue
            result = self._execute("experiment", run, attempt, self._run_request(f"run_{run}"))
            if result["outcome"] == "ok":
                self._record_run(run, "ok")
                self.last_good_run = run
                return False, _Situation(name="run_ok", context={"run": run, "note": outcome.feedback})
            last_message = result.get("message", "")
            situation = _Situation(name="run_failed", context={
                "note": outcome.feedback, "run": run, "attempt": attempt, "outcome": result["outcome"], "message": last_message,
                "stderr_head": result.get("stderr_head", ""), "stderr_tail": result.get("stderr_tail", ""),
                "stdout_tail": result.get("stdout_tail", ""), "attempts_left": attempts - attempt,
            })
        self._give_up(run, attempts, last_message)
        return False, _Situation(name="restored", show_files=True, context={
            "run": run, "attempts": attempts, "message": last_message,
            "restored_to": f"run_{self.last_good_run}",
        })

    def _give_up(self, run: int, attempts: int, message: str) -> None:
        """After the last failed attempt: put the editable files back as the last good run had them."""
        k = ("experiment", run, None, None)
        if self.journal.find("run_given_up", k) is not None:
            return
        good = f"run_{self.last_good_run}"
        paths = self._reset_editable(good)
        logs = [f"run_{run}"] if (self.dir / f"run_{run}").exists() else []
        if logs:
            redact_folder(self.dir / logs[0])
        sha = self.ws.commit(f"run {run}: restore code to {good} after {attempts} failed attempts",
                             paths=[*paths, *logs])
        self._record("run_given_up", stage="experiment", run=run, commit=sha, restored_to=good, message=message)

    def _plots(self) -> None:
        """The model adapts plot.py to compare the runs; it runs with the experiments' retry rules."""
        if not self.template.has_plot or not (self.dir / "plot.py").exists():
            return
        state = self.state()
        situation = _Situation(name="plot", show_files=True, context={
            "runs": ", ".join(f"run_{r.run}" for r in state.runs if r.status == "ok"),
            "key_metrics": ", ".join(state.session.key_metrics) or "the main metrics",
            "run_lines": self._run_lines(state),
        })
        attempts = self.settings.attempts_per_run
        for attempt in range(1, attempts + 1):
            outcome, situation = self._edit_step("plots", None, attempt, situation, ("plot.py",), no_edits_ends=True)
            if outcome.kind == "failed":
                continue
            if attempt > 1 and outcome.kind != "applied":
                return  # no fix offered for a failing plot.py: the step ends, the session does not fail
            before = _figure_stamps(self.dir)
            request = self._run_request("plot_logs", script="plot.py", args=[], results_file=None)
            result = self._execute("plots", None, attempt, request)
            if result["outcome"] == "ok":
                if self.journal.find("figures") is None:
                    after = _figure_stamps(self.dir)
                    figures = sorted(p for p, t in after.items() if before.get(p) != t) or sorted(after)
                    for path in [*figures, "plot_logs"]:
                        redact_folder(self.dir / path)
                    sha = self.ws.commit("plots: figures from plot.py", paths=[*figures, "plot_logs"])
                    self._record("figures", stage="plots", files=figures, commit=sha)
                return
            situation = _Situation(name="plot_failed", context={
                "attempt": attempt, "outcome": result["outcome"], "message": result.get("message", ""),
                "stderr_tail": result.get("stderr_tail", ""), "attempts_left": attempts - attempt,
            })

    def _notes(self) -> None:
        """The model writes notes.txt about each run and figure; a reply without edits ends the step."""
        from fnmatch import fnmatchcase

        if not any(fnmatchcase("notes.txt", p) for p in self.template.editable):
            return
        state = self.state()
        situation = _Situation(name="notes", show_files=True, context={
            "run_lines": self._run_lines(state),
            "figures": ", ".join(state.session.figures) or "no figures were made",
        })
        self._edit_step("notes", None, 1, situation, ("notes.txt",), no_edits_ends=True)

    # ---------------------------------------------------------------------------------------------- prompts

    def _editable_files(self, editable: tuple[str, ...]) -> list[str]:
        from fnmatch import fnmatchcase

        return [rel for rel in self._tree_files()
                if any(fnmatchcase(rel, p) for p in editable)
                and not any(fnmatchcase(rel, p) for p in self.template.protected)]

    def _tree_files(self) -> list[str]:
        """The session's own files (sorted, '/'-separated): not under .git/, .orchestrator/ or a run folder."""
        found = []
        for here, dirs, files in os.walk(self.dir):
            rel_here = Path(here).relative_to(self.dir).as_posix()
            if rel_here == ".":
                dirs[:] = [d for d in dirs if d not in (".git", META_DIR, "plot_logs") and not d.startswith("run_")]
                found += [f for f in files if not f.startswith("run_")]
            else:
                found += [f"{rel_here}/{f}" for f in files]
        return sorted(rel for rel in found if (self.dir / rel).is_file())

    def _files_text(self, editable: tuple[str, ...]) -> str:
        files = {p: (self.dir / p).read_text(encoding="utf-8", errors="replace") for p in self._editable_files(editable)}
        return prompts.files_block(files)

    def _render(self, situation: _Situation, editable: tuple[str, ...]) -> str:
        state = self.state()
        ctx: dict[str, Any] = dict(situation.context)
        note = str(ctx.pop("note", "") or "")
        runs_used = max((r.run for r in state.runs if r.status in ("ok", "failed")), default=0)
        ctx.setdefault("runs_left", max(0, self.max_runs - runs_used))
        files = self._files_text(editable) if situation.show_files else ""
        ctx["files"] = files
        ctx["files_part"] = f"\n## Current files\n{files}" if situation.show_files else ""
        if situation.name == "first_turn":
            ctx.update(
                title=self.idea.title, experiment=self.idea.experiment,
                plan=self.idea.plan or "(none given: plan the runs yourself)",
                task_description=self.template.task_description or "(see the code)",
                baseline=self._results_text(state, 0), max_runs=self.max_runs,
                edit_format=prompts.render("edit_format", {
                    "editable": ", ".join(self.template.editable),
                    "protected": ", ".join(self.template.protected) or "(none)",
                }),
            )
        elif situation.name == "run_ok":
            run = int(ctx["run"])
            rec = state.run(run)
            ctx.update(results=self._results_text(state, run), next_run=run + 1,
                       duration=f"{rec.duration_s:.1f} s" if rec and rec.duration_s else "",
                       best_line=self._best_line(state))
            if run >= self.max_runs:
                ctx["runs_left"] = 0
        elif situation.name in ("run_failed", "plot_failed"):
            ctx["stderr_part"] = _log_part("stderr", ctx.get("stderr_head", ""), ctx.get("stderr_tail", ""))
            ctx["stdout_part"] = _log_part("stdout", "", ctx.get("stdout_tail", ""))
        text = prompts.render(situation.name, ctx)
        return f"Note on your last edits: {note}\n\n{text}" if note else text

    def _results_text(self, state: SessionState, run: int) -> str:
        rec = state.run(run)
        if rec is None or not rec.metrics:
            return "(no results)"
        names = [m for m in state.session.key_metrics if m in rec.metrics]
        names += [m for m in rec.metrics if m not in names]
        lines = []
        for name in names[:40]:
            m = rec.metrics[name]
            text = f"- {name}: {_fmt(m.value)}"
            if m.stderr:
                text += f" ± {_fmt(m.stderr)}"
            if m.direction:
                text += f" ({m.direction} is better)"
            if run and m.baseline is not None and m.vs_baseline is not None:
                text += f"; baseline {_fmt(m.baseline)}, change {m.vs_baseline:+.4g}"
            lines.append(text)
        if len(names) > 40:
            lines.append(f"- ... and {len(names) - 40} more in run_{run}/final_info.json")
        return "\n".join(lines)

    def _best_line(self, state: SessionState) -> str:
        best = state.session.best_run
        if best is None or not state.session.key_metrics:
            return ""
        rec = state.run(best)
        name = next((m for m in state.session.key_metrics if rec and m in rec.metrics), None)
        if rec is None or name is None:
            return ""
        return f"Best run so far on {name}: run_{best} ({_fmt(rec.metrics[name].value)})."

    def _run_lines(self, state: SessionState) -> str:
        lines = []
        for rec in state.runs:
            head = f"- run_{rec.run} [{rec.status}]: {rec.plan or ('baseline' if rec.run == 0 else rec.message)}"
            key = [f"{m}={_fmt(rec.metrics[m].value)}" for m in state.session.key_metrics if m in rec.metrics]
            lines.append(head + (f" ({', '.join(key)})" if key else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- helpers


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests: ORCH_TEST_CRASH_AT=<point>[:<n>[:raise]] kills this process with SIGKILL
    the n-th time (default 1st) the driver passes that point, or with `raise` makes that step fail with an OSError
    (as a full disk would). Points are journal event kinds, "edits_written" and "run_spawned"."""
    spec = os.environ.get("ORCH_TEST_CRASH_AT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, mode = rest.partition(":")
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] == int(nth or 1):
        if mode == "raise":
            raise OSError(f"injected fault at {name}")
        os.kill(os.getpid(), signal.SIGKILL)


_CRASH_COUNTS: dict[str, int] = {}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _log_part(name: str, head: str, tail: str) -> str:
    """A log excerpt for the model: head and tail when both exist, else whichever does; nothing when empty."""
    parts = []
    if head.strip():
        parts.append(f"## {name} (head)\n```\n{head.rstrip()}\n```")
    if tail.strip():
        parts.append(f"## {name} ({'tail' if head.strip() else 'last lines'})\n```\n{tail.rstrip()}\n```")
    return "\n\n".join(parts)


def _one_line(text: str, limit: int = 500) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def is_completed(reply: str) -> bool:
    """The model says it is done: ALL_COMPLETED stands alone as the reply's last non-blank line (markdown
    emphasis or code ticks around it, a final period, and a code fence closing after it are allowed). Anywhere
    else it is prose."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    while lines and set(lines[-1]) <= {"`", "~"}:  # a closing code fence after it
        lines.pop()
    return bool(lines) and lines[-1].strip("*`_ ").rstrip(".") == ALL_COMPLETED


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


_FIGURE = re.compile(r"\.(png|jpg|jpeg|svg|pdf)$", re.IGNORECASE)


def _figure_stamps(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in folder.iterdir() if p.is_file() and _FIGURE.search(p.name)}
