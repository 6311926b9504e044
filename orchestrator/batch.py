"""A batch folder: many sessions of one launch, their shared slot pool, and what they spent together.

```
experiments/2026-11-29T10-00-00_batch_ideas/
  batch.json                     BatchSpec: ideas, settings, slot pool, backend, the sessions' folders
  2026-11-29T10-00-01_idea_a/    one ordinary session folder per idea (status, resume, report work on each)
  logs/idea_a.log                the output of the process that drove it
  .slots/gpu0.lock ...           the slot leases (see leases.py)
```
This room only reads and writes that folder; `scheduler.py` drives the sessions.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from orchestrator.atomic import write_text_atomic
from orchestrator.config import ConfigError
from orchestrator.errors import OrchestratorError
from orchestrator.journal import (
    META_DIR,
    SETTINGS_FILE,
    SNAPSHOT_FILE,
    JournalError,
    SessionState,
    load_state,
)
from orchestrator.leases import SlotPool, waiting
from orchestrator.spec import IdeaSpec, load_ideas

BATCH_FILE = "batch.json"
LOGS_DIR = "logs"


class BatchError(OrchestratorError, ValueError):
    """A folder that is not a readable batch folder."""


class BatchSession(BaseModel):
    idea: str
    path: str  # absolute path of the session folder


class BatchSpec(BaseModel):
    """batch.json: what the batch was launched with. Written once at launch; `resume BATCH` updates settings."""

    schema_version: int = 1
    name: str
    created_at: float
    ideas_file: str
    template: str
    ideas: list[str]
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # None: a local Ray is started for the batch
    ray_resources: dict[str, float] = Field(default_factory=dict)  # what each run asks of Ray
    pool: SlotPool
    parallel: int = Field(ge=1)
    budget_usd: float | None = None  # for the whole batch
    session_budget_usd: float | None = None
    settings: dict[str, Any] = Field(default_factory=dict)  # the sessions' settings as launched (no secrets)
    idea_specs: list[dict[str, Any]] = Field(default_factory=list)  # each idea as launched, with its max_runs
    sessions: list[BatchSession] = Field(default_factory=list)

    def missing(self) -> list[dict[str, Any]]:
        """Ideas with no session yet (the batch was stopped while it created them)."""
        have = {s.idea for s in self.sessions}
        return [i for i in self.idea_specs if i["idea"]["name"] not in have]


def batch_dir_name(name: str, now: datetime | None = None) -> str:
    return f"{(now or datetime.now()).strftime('%Y-%m-%dT%H-%M-%S')}_batch_{name}"


def is_batch(folder: Path) -> bool:
    return (Path(folder) / BATCH_FILE).is_file()


def load_batch(folder: Path) -> BatchSpec:
    path = Path(folder) / BATCH_FILE
    if not path.is_file():
        raise BatchError(f"{folder} is not a batch folder (no {BATCH_FILE})")
    try:
        return BatchSpec.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise BatchError(f"{path} cannot be read: {first}") from None


def save_batch(folder: Path, spec: BatchSpec) -> None:
    write_text_atomic(Path(folder) / BATCH_FILE, spec.model_dump_json(indent=2) + "\n")


def snapshot(session: Path) -> SessionState | None:
    """The session's last written snapshot (cheap: no journal replay, no lock probe); None before it exists."""
    try:
        return SessionState.model_validate_json((Path(session) / META_DIR / SNAPSHOT_FILE).read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def spent_usd(folder: Path) -> float:
    """What the batch's sessions have spent on model calls together, from their snapshots (each is written right
    after every journaled reply)."""
    try:
        spec = load_batch(folder)
    except BatchError:
        return 0.0
    total = 0.0
    for entry in spec.sessions:
        state = snapshot(Path(entry.path))
        if state is not None:
            total += state.session.totals.cost_usd
    return total


def batch_budget(folder: Path) -> float | None:
    try:
        return load_batch(folder).budget_usd
    except BatchError:
        return None


def session_states(spec: BatchSpec, folder: Path | None = None) -> list[tuple[BatchSession, SessionState | None]]:
    """Each session of the batch with its state rebuilt from its journal (None when it cannot be read). With the
    batch's `folder`, a session whose run waits for a slot shows phase `queued` (see `with_queue`)."""
    queue = set(waiting(folder)) if folder is not None and spec.backend == "local" else set()
    out: list[tuple[BatchSession, SessionState | None]] = []
    for entry in spec.sessions:
        try:
            out.append((entry, _queued(load_state(Path(entry.path)), Path(entry.path), queue)))
        except (JournalError, OSError):
            out.append((entry, None))
    return out


def with_queue(session: Path, state: SessionState) -> SessionState:
    """A running session of a batch whose run is started (gated) but waits for a free slot shows phase `queued`:
    its journal says `run`, the batch's queue (`.slots/queue`, see leases.py) says it has not begun."""
    if state.session.status != "running":
        return state
    try:
        batch = json.loads((Path(session) / META_DIR / SETTINGS_FILE).read_text()).get("batch")
    except (OSError, ValueError):
        return state
    return _queued(state, Path(session), set(waiting(Path(batch)))) if batch else state


def _queued(state: SessionState, session: Path, queue: set[str]) -> SessionState:
    if state.session.status == "running" and session.name in queue:
        state.session.phase = "queued"
    return state


def status_json(folder: Path) -> str:
    """`status BATCH --json`: {"batch": batch.json's content, "sessions": [{"idea", "path", "session", "runs"}]};
    each `session`/`runs` pair is what `status SESSION --json` prints for that folder."""
    spec = load_batch(folder)
    sessions = []
    for entry, state in session_states(spec, folder):
        item: dict[str, Any] = {"idea": entry.idea, "path": entry.path}
        if state is None:
            item["session"] = None
            item["runs"] = []
            item["error"] = f"{entry.path} cannot be read"
        else:
            item.update(json.loads(state.model_dump_json()))
        sessions.append(item)
    return json.dumps({"batch": json.loads(spec.model_dump_json()) | {"dir": str(Path(folder).resolve()),
                                                                    "spent_usd": spent_usd(folder)},
                       "sessions": sessions}, indent=2)


class LeaderRow(BaseModel):
    """One idea of a batch, as the leaderboard, the live view and the batch report show it."""

    idea: str
    path: str
    status: str  # the session's status, or "not started" / "unreadable"
    phase: str = ""
    run: int | None = None  # the run being worked on
    max_runs: int = 0
    attempt: int | None = None
    runs_ok: int = 0
    best_run: int | None = None
    metric: str | None = None  # the first key metric
    value: float | None = None  # of the best run
    baseline: float | None = None
    vs_baseline: float | None = None  # relative change, e.g. 0.12 for +12 %
    better: bool | None = None
    cost_usd: float = 0.0
    elapsed_s: float = 0.0


def leader_row(entry: BatchSession, state: SessionState | None, now: float | None = None) -> LeaderRow:
    import time

    if state is None:
        return LeaderRow(idea=entry.idea, path=entry.path, status="unreadable")
    info = state.session
    drove = info.phase != "starting" or info.totals.calls > 0
    row = LeaderRow(idea=entry.idea, path=entry.path,
                    status=info.status if drove or info.status != "running" else "not started",
                    phase=info.phase, run=info.current_run, max_runs=info.max_runs, attempt=info.current_attempt,
                    runs_ok=sum(1 for r in state.runs if r.status == "ok" and r.run > 0), best_run=info.best_run,
                    cost_usd=info.totals.cost_usd)
    end = info.updated_at if info.status != "running" else (now or time.time())
    row.elapsed_s = max(0.0, end - info.started_at) if info.started_at and drove else 0.0
    names = info.key_metrics or sorted({n for r in state.runs for n in r.metrics})
    if names:
        row.metric = names[0]
        best = next((r for r in state.runs if r.run == info.best_run), None)
        change = best.metrics.get(names[0]) if best is not None else None
        if change is not None:
            row.value, row.baseline, row.better = change.value, change.baseline, change.better
            if info.best_run == 0:  # no run beat the baseline
                row.baseline, row.vs_baseline = change.value, 0.0
            elif change.baseline:
                row.vs_baseline = (change.value - change.baseline) / abs(change.baseline)
    return row


def leaderboard(spec: BatchSpec, states: list[tuple[BatchSession, SessionState | None]]) -> list[LeaderRow]:
    """Best first: ideas whose best run beats the baseline most (by the metric's direction), then the rest."""
    rows = [leader_row(entry, state) for entry, state in states]

    def rank(row: LeaderRow) -> tuple[int, float]:
        if row.vs_baseline is None or row.better is None:
            return (1, 0.0)
        gain = abs(row.vs_baseline) if row.better else -abs(row.vs_baseline)
        return (0, -gain)

    return sorted(rows, key=rank)


def pick_ideas(path: Path, names: str | None, everything: bool) -> list[IdeaSpec]:
    """The ideas of a batch: --ideas a,b,c (in that order), --all, or the file's only idea."""
    found = load_ideas(path)
    if names and everything:
        raise ConfigError("give --ideas a,b,c or --all, not both")
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        by_name = {i.name: i for i in found}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ConfigError(f"{path} has no idea named {', '.join(unknown)} (it has: "
                              f"{', '.join(by_name)})")
        return [by_name[n] for n in dict.fromkeys(wanted)]
    if not everything and len(found) > 1:
        raise ConfigError(f"{path} holds {len(found)} ideas: choose with --ideas a,b,c or take them all with --all")
    names_seen = [i.name for i in found]
    twice = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: more than one idea is named {', '.join(twice)}; names must be unique")
    return found


def parse_ray_resources(pairs: list[str] | None) -> dict[str, float]:
    """--ray-resource NAME=AMOUNT flags as a dict of positive amounts."""
    out: dict[str, float] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not key.strip() or amount <= 0:
            raise ConfigError(f"--ray-resource expects NAME=AMOUNT with a positive amount, got {pair!r}")
        out[key.strip()] = amount
    return out
