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

from pydantic import BaseModel, Field

from orchestrator.atomic import write_text_atomic
from orchestrator.errors import OrchestratorError

META_DIR = ".orchestrator"
JOURNAL_FILE = "journal.jsonl"
SNAPSHOT_FILE = "session.json"
TRANSCRIPT_FILE = "transcript.jsonl"
IDEA_FILE = "idea.json"
SETTINGS_FILE = "settings.json"

SessionStatus = Literal["running", "completed", "failed", "interrupted", "max_runs", "budget_usd", "wall_clock"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "max_runs", "budget_usd", "wall_clock"})


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


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and fsync it before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a torn last line (a crash mid-write) is ignored, a torn line elsewhere is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise JournalError(f"{path}: line {i + 1} is not valid JSON ({exc.msg})") from None
    return out


class Journal:
    """Append-only list of events in `<session>/.orchestrator/journal.jsonl`."""

    def __init__(self, session_dir: Path, redact: Any = None) -> None:
        self.session_dir = Path(session_dir)
        self.meta = self.session_dir / META_DIR
        self.path = self.meta / JOURNAL_FILE
        self._redact = redact
        self._events: list[Event] | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def events(self) -> list[Event]:
        if self._events is None:
            self._events = [Event.model_validate(obj) for obj in read_jsonl(self.path)]
        return list(self._events)

    def append(self, kind: str, **data: Any) -> Event:
        events = self.events()
        if self._redact is not None:
            data = self._redact(data)
        event = Event(seq=len(events) + 1, ts=time.time(), kind=kind, data=data)
        append_jsonl(self.path, event.model_dump(mode="json"))
        assert self._events is not None
        self._events.append(event)
        return event

    def find(self, kind: str, key: tuple[Any, ...] | None = None) -> Event | None:
        """The last event of this kind (and step key, when given)."""
        for event in reversed(self.events()):
            if event.kind == kind and (key is None or event.key() == key):
                return event
        return None

    def transcript_append(self, record: dict[str, Any]) -> None:
        if self._redact is not None:
            record = self._redact(record)
        append_jsonl(self.meta / TRANSCRIPT_FILE, record)


# --------------------------------------------------------------------------------------------------- the snapshot


class MetricValue(BaseModel):
    mean: float
    stderr: float | None = None


class MetricChange(BaseModel):
    """A metric of one run compared with the baseline and with the previous successful run."""

    value: float
    stderr: float | None = None
    baseline: float | None = None
    vs_baseline: float | None = None
    previous: float | None = None
    vs_previous: float | None = None
    direction: Literal["higher", "lower"] | None = None
    better: bool | None = None  # against the baseline, by the metric's direction


class AttemptRecord(BaseModel):
    attempt: int
    outcome: str  # ok | error | timeout | oom | no_results | edits_failed | no_edits | running
    message: str = ""
    commit: str | None = None
    plan: str = ""
    duration_s: float | None = None
    stderr_tail: str = ""


class RunRecord(BaseModel):
    run: int
    status: Literal["ok", "failed", "running", "pending"] = "pending"
    attempts: int = 0
    outcome: str | None = None
    message: str = ""
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
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    cost_unknown_calls: int = 0
    run_seconds: float = 0.0
    active_seconds: float = 0.0


class SessionInfo(BaseModel):
    schema_version: int = 1
    dir: str = ""
    name: str = ""
    title: str = ""
    experiment: str = ""
    plan: str | None = None
    template: str = ""
    model: str = ""
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
        change = MetricChange(value=mv.mean, stderr=mv.stderr, direction=_direction(name, directions))  # type: ignore[arg-type]
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


def rebuild(events: Iterable[Event], session_dir: Path | None = None) -> SessionState:
    """Fold the journal into the session snapshot. Pure: the same events always give the same state."""
    info = SessionInfo(dir=str(session_dir) if session_dir else "")
    runs: dict[int, RunRecord] = {}
    raw_metrics: dict[int, dict[str, Any]] = {}
    directions: dict[str, str] = {}
    segment_start: float | None = None
    last_ts = 0.0

    def record(n: int) -> RunRecord:
        if n not in runs:
            runs[n] = RunRecord(run=n)
        return runs[n]

    def attempt_rec(rec: RunRecord, attempt: int) -> AttemptRecord:
        for a in rec.history:
            if a.attempt == attempt:
                return a
        a = AttemptRecord(attempt=attempt, outcome="running")
        rec.history.append(a)
        rec.attempts = max(rec.attempts, attempt)
        return a

    for ev in events:
        d = ev.data
        if ev.kind == "drive_started":
            if segment_start is not None:
                info.totals.active_seconds += max(0.0, last_ts - segment_start)
            segment_start = ev.ts
            info.status = "running"
            info.reason = ""
        last_ts = ev.ts
        info.updated_at = ev.ts
        stage = d.get("stage", "experiment")
        n = d.get("run")
        if ev.kind == "session_started":
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
            directions = dict(tmpl.get("metrics", {}))
            info.metric_directions = directions
            if segment_start is None:
                segment_start = ev.ts
        elif ev.kind == "phase":
            info.phase = d.get("phase", info.phase)
            if stage == "experiment":
                info.current_run = n
                info.current_attempt = d.get("attempt")
        elif ev.kind == "reply":
            info.totals.calls += 1
            info.totals.prompt_tokens += int(d.get("prompt_tokens", 0))
            info.totals.completion_tokens += int(d.get("completion_tokens", 0))
            info.totals.cached_tokens += int(d.get("cached_tokens", 0))
            cost = d.get("cost_usd")
            if cost is None:
                info.totals.cost_unknown_calls += 1
            else:
                info.totals.cost_usd += float(cost)
            if stage == "experiment" and n is not None:
                rec = record(n)
                rec.calls += 1
                rec.prompt_tokens += int(d.get("prompt_tokens", 0))
                rec.completion_tokens += int(d.get("completion_tokens", 0))
                rec.cached_tokens += int(d.get("cached_tokens", 0))
                rec.cost_usd += float(cost or 0.0)
        elif stage != "experiment" or n is None:
            pass
        elif ev.kind == "edits_applied":
            rec = record(n)
            a = attempt_rec(rec, d["attempt"])
            a.commit = d.get("commit")
            a.plan = d.get("plan", "")
        elif ev.kind == "attempt_failed":
            rec = record(n)
            a = attempt_rec(rec, d["attempt"])
            a.outcome = d.get("outcome", "edits_failed")
            a.message = d.get("message", "")
            if rec.status != "ok":
                rec.status = "running"
        elif ev.kind == "run_started":
            rec = record(n)
            attempt_rec(rec, d["attempt"]).outcome = "running"
            rec.status = "running"
        elif ev.kind == "run_finished":
            rec = record(n)
            a = attempt_rec(rec, d["attempt"])
            a.outcome = d["outcome"]
            a.message = d.get("message", "")
            a.duration_s = d.get("duration_s")
            a.stderr_tail = d.get("stderr_tail", "")
            info.totals.run_seconds += float(d.get("duration_s") or 0.0)
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
                raw_metrics[n] = d.get("metrics", {})
        elif ev.kind == "run_recorded":
            rec = record(n)
            rec.results_commit = d.get("commit")
            rec.tag = d.get("tag")
            rec.untracked = list(d.get("untracked", []))
        elif ev.kind == "baseline_reused":
            rec = record(0)
            rec.status = "ok"
            rec.outcome = "ok"
            rec.message = "reused from the template (same experiment.py)"
            rec.commit = d.get("commit")
            rec.tag = d.get("tag")
            raw_metrics[0] = d.get("metrics", {})
        elif ev.kind == "run_given_up":
            rec = record(n)
            rec.status = "failed"
        if ev.kind == "finished":
            info.status = d.get("status", "completed")
            info.reason = d.get("reason", "")
            info.phase = "finished"
        elif ev.kind == "interrupted":
            info.status = "interrupted"
            info.reason = d.get("reason", "interrupted")
        elif ev.kind == "figures":
            info.figures = list(d.get("files", []))

    if segment_start is not None:
        info.totals.active_seconds += max(0.0, last_ts - segment_start)

    baseline = raw_metrics.get(0)
    previous: dict[str, Any] | None = None
    for n in sorted(runs):
        rec = runs[n]
        if n in raw_metrics:
            rec.metrics = _compare(raw_metrics[n], baseline if n else None, previous if n else None, directions)
            previous = raw_metrics[n]
    info.best_run = _best_run(runs, info.key_metrics, directions)
    return SessionState(session=info, runs=[runs[n] for n in sorted(runs)])


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
    """Rebuild the snapshot of a session folder from its journal (raises JournalError when it is not one)."""
    journal = Journal(session_dir)
    if not journal.exists():
        raise JournalError(f"{session_dir} is not a session folder (no {META_DIR}/{JOURNAL_FILE})")
    return rebuild(journal.events(), session_dir)


def write_snapshot(session_dir: Path, state: SessionState) -> None:
    write_model_atomic(Path(session_dir) / META_DIR / SNAPSHOT_FILE, state)
