"""The session's memory: an append-only, fsynced journal.jsonl and the session.json snapshot rebuilt from it.

Every side effect of a session (a model call, an edit, a commit, a run) is preceded or followed by an event here,
so `resume` can rebuild exactly where a crashed session stood. The snapshot (`SessionState`) is derived data: it is
rebuilt from the events whenever it is needed, and written beside them for readers such as `report`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.atomic import write_text_atomic
from orchestrator.errors import OrchestratorError

META_DIR = ".orchestrator"
JOURNAL_FILE = "journal.jsonl"
SNAPSHOT_FILE = "session.json"
TRANSCRIPT_FILE = "transcript.jsonl"
IDEA_FILE = "idea.json"
SETTINGS_FILE = "settings.json"

SessionStatus = Literal["running", "completed", "failed", "baseline_failed", "interrupted", "max_runs", "budget_usd",
                        "wall_clock", "max_tokens", "stalled"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "baseline_failed", "max_runs", "budget_usd",
                                            "wall_clock", "max_tokens", "stalled"})
# Ends that `resume` can go on from: limits it can lift (a larger budget, another model), and a baseline that failed
# before any model call (the cause is outside the session: a timeout, a busy GPU, a missing package), run again by a
# plain resume.
REOPENABLE_STATUSES: frozenset[str] = frozenset({"budget_usd", "wall_clock", "max_tokens", "stalled",
                                                 "baseline_failed"})


class JournalError(OrchestratorError, ValueError):
    """The journal cannot be read (not a session folder, or corrupted beyond its last line)."""


class Event(BaseModel):
    seq: int
    ts: float
    kind: str
    data: dict[str, Any] = Field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        """The step this event belongs to: (stage, run, attempt, retry), with None where it does not apply."""
        d = self.data
        return (d.get("stage", "experiment"), d.get("run"), d.get("attempt"), d.get("retry"))


# --------------------------------------------------------------------------------------------------- disk helpers


def write_model_atomic(path: Path, model: BaseModel) -> None:
    write_text_atomic(path, model.model_dump_json(indent=2) + "\n")


def _encode_line(obj: Any) -> bytes:
    """One JSON line as UTF-8. Text that cannot be encoded (a lone surrogate from a provider) is escaped, never
    allowed to fail the append."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(obj, ensure_ascii=True, default=str) + "\n").encode("ascii")


def repair_tail(path: Path) -> bool:
    """Make a JSONL file end on a complete line. A crash mid-append (power loss, SIGKILL) can leave a fragment
    after the last newline; the next append would glue its line onto it and make the file unreadable. A fragment
    that is a whole JSON value (only the newline was lost) gets its newline; anything else is cut off.
    Returns True if the file was changed. Costs one byte read when the file is whole."""
    try:
        fh = open(path, "r+b")
    except FileNotFoundError:
        return False
    with fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return False
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return False
        fh.seek(0)
        data = fh.read()
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:].decode("utf-8"))
            fh.write(b"\n")
        except (UnicodeDecodeError, json.JSONDecodeError):
            fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and fsync it before returning; a torn last line left by a crash is repaired first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = _encode_line(obj)
    repair_tail(path)
    with open(path, "ab") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a torn last line (a crash mid-write) is ignored, a bad line elsewhere is an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if torn_tail and i == len(lines) - 1:
                break
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise JournalError(f"{path}: line {i + 1} is not valid JSON ({why})") from None
        if not isinstance(obj, dict):
            raise JournalError(f"{path}: line {i + 1} is not a JSON object")
        out.append(obj)
    return out


class Journal:
    """Append-only list of events in `<session>/.orchestrator/journal.jsonl`.

    Events are read once and then kept in memory with an index, so `find` costs the same at event 3,000 as at
    event 3. Only the process holding the session lock appends (see `loop.session_lock`); readers such as
    `status` never write and simply ignore a torn last line.
    """

    def __init__(self, session_dir: Path, redact: Any = None) -> None:
        self.session_dir = Path(session_dir)
        self.meta = self.session_dir / META_DIR
        self.path = self.meta / JOURNAL_FILE
        self._redact = redact
        self._events: list[Event] | None = None
        self._last: dict[tuple[str, tuple[Any, ...] | None], Event] = {}

    def exists(self) -> bool:
        return self.path.exists()

    def _loaded(self) -> list[Event]:
        if self._events is None:
            try:
                events = [Event.model_validate(obj) for obj in read_jsonl(self.path)]
            except ValueError as exc:
                raise JournalError(f"{self.path}: {str(exc).splitlines()[0]}") from None
            self._events = []
            self._last = {}
            for event in events:
                self._index(event)
        return self._events

    def _index(self, event: Event) -> None:
        assert self._events is not None
        self._events.append(event)
        self._last[(event.kind, None)] = event
        self._last[(event.kind, event.key())] = event

    def events(self) -> list[Event]:
        return list(self._loaded())

    def last(self) -> Event | None:
        events = self._loaded()
        return events[-1] if events else None

    def append(self, kind: str, **data: Any) -> Event:
        events = self._loaded()
        if self._redact is not None:
            data = self._redact(data)
        event = Event(seq=len(events) + 1, ts=time.time(), kind=kind, data=data)
        append_jsonl(self.path, event.model_dump(mode="json"))
        self._index(event)
        return event

    def find(self, kind: str, key: tuple[Any, ...] | None = None) -> Event | None:
        """The last event of this kind (and step key, when given)."""
        self._loaded()
        return self._last.get((kind, key))

    def transcript_append(self, record: dict[str, Any]) -> None:
        if self._redact is not None:
            record = self._redact(record)
        append_jsonl(self.meta / TRANSCRIPT_FILE, record)


# --------------------------------------------------------------------------------------------------- the snapshot


# Models marked defer_build are built on first use: this module is imported on the way to a launch's first line.
class MetricValue(BaseModel):
    model_config = ConfigDict(defer_build=True)
    mean: float
    stderr: float | None = None


class MetricChange(BaseModel):
    """A metric of one run compared with the baseline and with the previous successful run."""
    model_config = ConfigDict(defer_build=True)

    value: float
    stderr: float | None = None
    baseline: float | None = None
    vs_baseline: float | None = None
    previous: float | None = None
    vs_previous: float | None = None
    direction: Literal["higher", "lower"] | None = None
    better: bool | None = None  # against the baseline, by the metric's direction


class AttemptRecord(BaseModel):
    model_config = ConfigDict(defer_build=True)
    attempt: int
    # ok | error | timeout | oom | no_results | quota | tampered | edits_failed | no_edits | running | stopped
    outcome: str
    message: str = ""
    sandbox: str | None = None  # bwrap | none: how its run was contained (None: it never ran)
    tampered: list[str] = Field(default_factory=list)  # guarded paths its run changed
    unrestored: list[str] = Field(default_factory=list)  # those of them that could not be put back
    commit: str | None = None
    plan: str = ""
    duration_s: float | None = None
    stderr_tail: str = ""


class RunRecord(BaseModel):
    model_config = ConfigDict(defer_build=True)
    run: int
    # stopped: it was in progress when the session stopped (resume runs it again)
    status: Literal["ok", "failed", "running", "pending", "stopped"] = "pending"
    attempts: int = 0
    outcome: str | None = None
    message: str = ""
    sandbox: str | None = None  # bwrap | none, for its last attempt that ran
    plan: str = ""
    commit: str | None = None  # the checkpoint whose code produced the run
    results_commit: str | None = None  # the commit holding the run folder
    tag: str | None = None
    metrics: dict[str, MetricChange] = Field(default_factory=dict)
    duration_s: float | None = None
    stderr_tail: str = ""
    untracked: list[str] = Field(default_factory=list)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    history: list[AttemptRecord] = Field(default_factory=list)
    diff: str | None = None  # filled by `show`, empty in `status`


class Totals(BaseModel):
    model_config = ConfigDict(defer_build=True)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    cost_unknown_calls: int = 0
    run_seconds: float = 0.0
    active_seconds: float = 0.0


class SessionInfo(BaseModel):
    model_config = ConfigDict(defer_build=True)
    schema_version: int = 1
    dir: str = ""
    name: str = ""
    title: str = ""
    experiment: str = ""
    plan: str | None = None
    template: str = ""
    model: str = ""
    sandbox: str = ""  # bwrap | none: how the latest drive contained its runs ("" before the first)
    status: SessionStatus = "running"
    reason: str = ""
    phase: str = "starting"
    started_at: float = 0.0
    updated_at: float = 0.0
    max_runs: int = 10
    current_run: int | None = None
    current_attempt: int | None = None
    key_metrics: list[str] = Field(default_factory=list)
    metric_directions: dict[str, str] = Field(default_factory=dict)
    best_run: int | None = None
    figures: list[str] = Field(default_factory=list)
    totals: Totals = Field(default_factory=Totals)


class SessionState(BaseModel):
    """What `status --json` and `show --json` print: the session and a list of runs (one schema for both)."""
    model_config = ConfigDict(defer_build=True)

    session: SessionInfo
    runs: list[RunRecord] = Field(default_factory=list)

    def run(self, n: int) -> RunRecord | None:
        return next((r for r in self.runs if r.run == n), None)


def _direction(name: str, directions: dict[str, str]) -> str | None:
    from fnmatch import fnmatchcase

    if name in directions:
        return directions[name]
    for pattern, d in directions.items():
        if fnmatchcase(name, pattern):
            return d
    return None


def _compare(metrics: dict[str, Any], baseline: dict[str, Any] | None, previous: dict[str, Any] | None,
             directions: dict[str, str]) -> dict[str, MetricChange]:
    out: dict[str, MetricChange] = {}
    for name, m in metrics.items():
        mv = MetricValue.model_validate(m)
        change = MetricChange(value=mv.mean, stderr=mv.stderr, direction=_direction(name, directions))
        if baseline and name in baseline:
            change.baseline = float(baseline[name]["mean"])
            change.vs_baseline = mv.mean - change.baseline
            if change.direction is not None and abs(change.vs_baseline) > 1e-9 * max(1.0, abs(change.baseline)):
                change.better = (change.vs_baseline > 0) == (change.direction == "higher")
        if previous and name in previous:
            change.previous = float(previous[name]["mean"])
            change.vs_previous = mv.mean - change.previous
        out[name] = change
    return out


class StateFold:
    """The session snapshot, folded from the journal one event at a time: `add` each event as it is appended and
    `state()` whenever a snapshot is needed. Replaying a whole session is linear in its events."""

    def __init__(self, session_dir: Path | None = None) -> None:
        self.info = SessionInfo(dir=str(session_dir) if session_dir else "")
        self.runs: dict[int, RunRecord] = {}
        self.raw_metrics: dict[int, dict[str, Any]] = {}
        self.directions: dict[str, str] = {}
        self.segment_start: float | None = None
        self.last_ts = 0.0
        self.active_before = 0.0  # active seconds of the drive segments before the current one

    def _record(self, n: int) -> RunRecord:
        if n not in self.runs:
            self.runs[n] = RunRecord(run=n)
        return self.runs[n]

    @staticmethod
    def _attempt(rec: RunRecord, attempt: int) -> AttemptRecord:
        for a in rec.history:
            if a.attempt == attempt:
                return a
        a = AttemptRecord(attempt=attempt, outcome="running")
        rec.history.append(a)
        rec.attempts = max(rec.attempts, attempt)
        return a

    def add(self, ev: Event) -> None:
        info, d = self.info, ev.data
        if ev.kind == "drive_started":
            if self.segment_start is not None:
                self.active_before += max(0.0, self.last_ts - self.segment_start)
            self.segment_start = ev.ts
            info.status = "running"
            info.reason = ""
            info.sandbox = d.get("sandbox", "none")
        self.last_ts = ev.ts
        info.updated_at = ev.ts
        stage = d.get("stage", "experiment")
        n = d.get("run")
        if ev.kind == "session_started":
            self._session_started(ev)
        elif ev.kind == "phase":
            info.phase = d.get("phase", info.phase)
            if stage == "experiment":
                info.current_run = n
                info.current_attempt = d.get("attempt")
        elif ev.kind == "reply":
            self._reply(d, stage, n)
        elif stage == "experiment" and n is not None:
            self._run_event(ev.kind, d, n)
        if ev.kind == "finished":
            info.status = d.get("status", "completed")
            info.reason = d.get("reason", "")
            info.phase = "finished"
            self._nothing_runs()
            if info.status == "baseline_failed" and 0 in self.runs:
                self.runs[0].status = "failed"
            # A run number that never got an attempt (the model closed the session with ALL_COMPLETED, or a limit
            # ended it at the ask) is no run: its calls stay in the session's totals.
            for n in [n for n, rec in self.runs.items() if n and rec.status == "pending" and not rec.attempts]:
                del self.runs[n]
        elif ev.kind == "interrupted":
            info.status = "interrupted"
            info.reason = d.get("reason", "interrupted")
            self._nothing_runs()
        elif ev.kind == "figures":
            info.figures = list(d.get("files", []))

    def _nothing_runs(self) -> None:
        """The session stopped: an attempt or run still marked running was stopped with it."""
        for rec in self.runs.values():
            for a in rec.history:
                if a.outcome == "running":
                    a.outcome = "stopped"
                    a.message = a.message or "stopped when the session stopped"
            if rec.status == "running":
                rec.status = "stopped"

    def _session_started(self, ev: Event) -> None:
        info, d = self.info, ev.data
        idea = d.get("idea", {})
        tmpl = d.get("template", {})
        info.name = idea.get("name", "")
        info.title = idea.get("title", "")
        info.experiment = idea.get("experiment", "")
        info.plan = idea.get("plan")
        info.template = tmpl.get("name", "")
        info.model = d.get("model", "")
        info.max_runs = int(d.get("max_runs", 10))
        info.started_at = ev.ts
        info.key_metrics = list(tmpl.get("key_metrics", []))
        self.directions = dict(tmpl.get("metrics", {}))
        info.metric_directions = self.directions
        if self.segment_start is None:
            self.segment_start = ev.ts

    def _reply(self, d: dict[str, Any], stage: str, n: int | None) -> None:
        totals = self.info.totals
        totals.calls += 1
        totals.prompt_tokens += int(d.get("prompt_tokens", 0))
        totals.completion_tokens += int(d.get("completion_tokens", 0))
        totals.cached_tokens += int(d.get("cached_tokens", 0))
        cost = d.get("cost_usd")
        if cost is None:
            totals.cost_unknown_calls += 1
        else:
            totals.cost_usd += float(cost)
        if stage == "experiment" and n is not None:
            rec = self._record(n)
            rec.calls += 1
            rec.prompt_tokens += int(d.get("prompt_tokens", 0))
            rec.completion_tokens += int(d.get("completion_tokens", 0))
            rec.cached_tokens += int(d.get("cached_tokens", 0))
            rec.cost_usd += float(cost or 0.0)

    def _run_event(self, kind: str, d: dict[str, Any], n: int) -> None:
        if kind == "edits_applied":
            rec = self._record(n)
            a = self._attempt(rec, d["attempt"])
            a.commit = d.get("commit")
            a.plan = d.get("plan", "")
        elif kind == "attempt_failed":
            rec = self._record(n)
            a = self._attempt(rec, d["attempt"])
            a.outcome = d.get("outcome", "edits_failed")
            a.message = d.get("message", "")
            if rec.status != "ok":
                rec.status = "running"
        elif kind == "run_started":
            rec = self._record(n)
            a = self._attempt(rec, d["attempt"])
            a.outcome = "running"
            a.sandbox = rec.sandbox = d.get("sandbox", "none")
            rec.status = "running"
        elif kind == "run_finished":
            self._run_finished(d, n)
        elif kind == "run_stopped":
            rec = self._record(n)
            a = self._attempt(rec, d["attempt"])
            a.outcome = "stopped"
            a.message = d.get("message", "")
        elif kind == "run_recorded":
            rec = self._record(n)
            rec.results_commit = d.get("commit")
            rec.tag = d.get("tag")
            rec.untracked = list(d.get("untracked", []))
            if d.get("message"):  # why part of the run folder could not be committed
                rec.message = f"{rec.message}; {d['message']}" if rec.message else d["message"]
        elif kind == "baseline_reused":
            rec = self._record(0)
            rec.status = "ok"
            rec.outcome = "ok"
            rec.message = "reused from the template (same experiment.py)"
            rec.commit = d.get("commit")
            rec.tag = d.get("tag")
            self.raw_metrics[0] = d.get("metrics", {})
        elif kind == "run_given_up":
            self._record(n).status = "failed"

    def _run_finished(self, d: dict[str, Any], n: int) -> None:
        rec = self._record(n)
        a = self._attempt(rec, d["attempt"])
        a.outcome = d["outcome"]
        a.message = d.get("message", "")
        a.tampered = list(d.get("tampered", []))
        a.unrestored = list(d.get("unrestored", []))
        a.duration_s = d.get("duration_s")
        a.stderr_tail = d.get("stderr_tail", "")
        self.info.totals.run_seconds += float(d.get("duration_s") or 0.0)
        rec.outcome = d["outcome"]
        rec.message = a.message
        rec.duration_s = a.duration_s
        rec.stderr_tail = a.stderr_tail
        if d["outcome"] == "ok":
            rec.status = "ok"
            rec.commit = a.commit or d.get("commit")
            # The run's intent is the plan of its first attempt; later attempts are usually fixes.
            plans = [x.plan for x in sorted(rec.history, key=lambda x: x.attempt) if x.plan]
            rec.plan = plans[0] if plans else a.plan
            self.raw_metrics[n] = d.get("metrics", {})

    def state(self) -> SessionState:
        """The snapshot as of the events added so far (a copy: later events do not change it)."""
        info = self.info.model_copy(deep=True)
        active = self.active_before
        if self.segment_start is not None:
            active += max(0.0, self.last_ts - self.segment_start)
        info.totals.active_seconds = active
        runs = {n: rec.model_copy(deep=True) for n, rec in self.runs.items()}
        baseline = self.raw_metrics.get(0)
        previous: dict[str, Any] | None = None
        for n in sorted(runs):
            if n in self.raw_metrics:
                runs[n].metrics = _compare(self.raw_metrics[n], baseline if n else None, previous if n else None,
                                           self.directions)
                previous = self.raw_metrics[n]
        info.best_run = _best_run(runs, info.key_metrics, self.directions)
        return SessionState(session=info, runs=[runs[n] for n in sorted(runs)])


def rebuild(events: Iterable[Event], session_dir: Path | None = None) -> SessionState:
    """Fold the journal into the session snapshot. Pure: the same events always give the same state."""
    fold = StateFold(session_dir)
    for ev in events:
        fold.add(ev)
    return fold.state()


def _best_run(runs: dict[int, RunRecord], key_metrics: list[str], directions: dict[str, str]) -> int | None:
    """The successful run best on the first key metric that has a direction."""
    for name in key_metrics:
        d = _direction(name, directions)
        scored = [(r.metrics[name].value, r.run) for r in runs.values() if r.status == "ok" and name in r.metrics]
        if d and scored:
            pick = max if d == "higher" else min
            return pick(scored)[1]
    return None


def load_state(session_dir: Path) -> SessionState:
    """Rebuild the snapshot of a session folder from its journal (raises JournalError when it is not one).

    A session recorded `running` that no process drives (its driver was killed, or the machine went down, before
    it could record why) is shown as what it is: `interrupted`, its running run `stopped`; `resume` goes on."""
    journal = Journal(session_dir)
    if not journal.exists():
        raise JournalError(f"{session_dir} is not a session folder (no {META_DIR}/{JOURNAL_FILE})")
    events = journal.events()
    fold = StateFold(session_dir)
    for event in events:
        fold.add(event)
    if fold.info.status == "running" and any(e.kind == "drive_started" for e in events) \
            and not _driven(Path(session_dir)):
        fold.info.status = "interrupted"
        fold.info.reason = "the orchestrator process ended without recording why (killed?); resume goes on"
        fold._nothing_runs()
    return fold.state()


def _driven(session_dir: Path) -> bool:
    """Whether a process holds the session's lock (`.orchestrator/lock`, taken by whoever drives it)."""
    import fcntl

    try:
        fd = os.open(session_dir / META_DIR / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held (exclusively) by a driver
        return True
    finally:
        os.close(fd)  # closing releases a lock this probe took
    return False


def write_snapshot(session_dir: Path, state: SessionState) -> None:
    write_model_atomic(Path(session_dir) / META_DIR / SNAPSHOT_FILE, state)
