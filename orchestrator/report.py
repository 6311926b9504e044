"""Reading a session for people: the results table, run diffs, and listings. Reads session folders only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from rich.console import RenderableType
from rich.markdown import Markdown
from rich.markup import escape
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from orchestrator.errors import OrchestratorError
from orchestrator.journal import META_DIR, AttemptRecord, JournalError, RunRecord, SessionState, load_state
from orchestrator.secrets import redact
from orchestrator.terminal import safe
from orchestrator.workspace import GitError, Workspace

# Paths that are results or logs, not code: left out of code diffs.
NON_CODE = (":(exclude)run_*", ":(exclude)plot_logs", ":(exclude)*.png", ":(exclude)*.pdf", ":(exclude)*.svg")


class ReportError(OrchestratorError, ValueError):
    """A run or session asked for does not exist."""


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


def shown_metrics(state: SessionState, limit: int = 5) -> list[str]:
    """The template's key metrics, else the first metrics of the baseline."""
    names = list(state.session.key_metrics)
    if not names:
        for rec in state.runs:
            names = list(rec.metrics)[:limit]
            if names:
                break
    return names[:limit]


def metric_cell(rec: RunRecord, name: str) -> Text:
    m = rec.metrics.get(name)
    if m is None:
        return Text("-", style="dim")
    text = Text(_fmt(m.value))
    if rec.run != 0 and m.vs_baseline is not None:
        style = "green" if m.better else "red" if m.better is False else "dim"
        text.append(f" ({m.vs_baseline:+.3g})", style=style)
    return text


# Outcomes a reviewer must not miss in the results table: the run changed guarded files, or filled its disk quota.
ALARMING_OUTCOMES = ("tampered", "quota")
SANDBOX_WORDS = {"bwrap": "bwrap", "none": "none (not contained)"}


def results_table(state: SessionState) -> Table:
    info = state.session
    title = f"{info.title or info.name} - {info.status}" + (f": {info.reason}" if info.reason else "")
    title = safe(title)
    table = Table(title=escape(title), title_justify="left")
    table.add_column("run", justify="right")
    table.add_column("status")
    table.add_column("attempts", justify="right")
    names = shown_metrics(state)
    groups = {n.rpartition(".")[0] for n in names}
    strip = len(groups) == 1 and "" not in groups  # one group for all: name it once, in the title
    if strip:
        table.title = f"{escape(title)}  [dim](metrics: {escape(safe(groups.pop()))}.*)[/dim]"
    for name in names:
        direction = next((r.metrics[name].direction for r in state.runs if name in r.metrics), None)
        arrow = {"higher": " ↑", "lower": " ↓"}.get(direction or "", "")
        table.add_column(Text(safe(name.rpartition(".")[2] if strip else name) + arrow), justify="right")
    modes = sorted({rec.sandbox for rec in state.runs if rec.sandbox})
    per_run_mode = len(modes) > 1
    if per_run_mode:
        table.add_column("sandbox")
    table.add_column("time", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("cost", justify="right")
    status_style = {"ok": "green", "failed": "red", "running": "yellow", "pending": "dim"}
    queued = info.status == "running" and info.phase == "queued"  # a batch's run waiting for its slot
    for rec in state.runs:
        if rec.status == "pending" and not rec.attempts:
            continue  # a run slot the model closed with ALL_COMPLETED: its call is in the totals below
        marker = " *" if rec.run == info.best_run and rec.run != 0 else ""
        status = Text(rec.status, style=status_style.get(rec.status, ""))
        if queued and rec.status == "running" and rec.run == info.current_run:
            status = Text("waiting for a slot", style="yellow")  # started, gated: it has not begun
        if rec.status != "ok" and any(a.outcome in ALARMING_OUTCOMES for a in rec.history):
            worst = next(a.outcome for a in rec.history if a.outcome in ALARMING_OUTCOMES)
            status.append(f" ({worst})", style="bold red")
        table.add_row(
            f"run_{rec.run}{marker}",
            status,
            str(rec.attempts or (1 if rec.run == 0 else 0)),
            *[metric_cell(rec, n) for n in names],
            *([rec.sandbox or "-"] if per_run_mode else []),
            _duration(rec.duration_s),
            f"{rec.prompt_tokens + rec.completion_tokens:,}",
            f"${rec.cost_usd:.4f}",
        )
    t = info.totals
    cost = f"${t.cost_usd:.4f}" + (f" (+{t.cost_unknown_calls} calls of unknown cost)" if t.cost_unknown_calls else "")
    table.caption = (f"{t.calls} model calls, {t.prompt_tokens:,} prompt + {t.completion_tokens:,} completion tokens "
                     f"({t.cached_tokens:,} cached), {cost}; runs {_duration(t.run_seconds)}"
                     + ("; * best run" if info.best_run else "")
                     + (f"; runs sandboxed: {SANDBOX_WORDS.get(modes[0], modes[0])}" if len(modes) == 1 else ""))
    table.caption_justify = "left"
    return table


def resolve_run(state: SessionState, run: str | int | None) -> RunRecord:
    """A run given as 3, "3" or "run_3"; None means the latest successful run."""
    if run is None:
        ok = [r for r in state.runs if r.status == "ok"]
        if not ok:
            raise ReportError("the session has no successful run yet")
        return ok[-1]
    text = str(run).removeprefix("run_")
    if not text.isdigit():
        raise ReportError(f"{run!r} is not a run (use a number such as 2, or run_2)")
    rec = state.run(int(text))
    if rec is None:
        have = ", ".join(f"run_{r.run}" for r in state.runs) or "none"
        raise ReportError(f"run_{text} does not exist in this session (runs: {have})")
    return rec


def run_diff(session: Path, state: SessionState, run: str | int | None = None,
             against: str | int | None = None) -> tuple[RunRecord, RunRecord | None, str]:
    """The code change that produced a run, against the previous successful run (or the one given)."""
    rec = resolve_run(state, run)
    ws = Workspace.open(session)
    base: RunRecord | None
    if against is not None:
        base = resolve_run(state, against)
    else:
        earlier = [r for r in state.runs if r.status == "ok" and r.run < rec.run]
        base = earlier[-1] if earlier else None
    target = rec.results_commit or rec.commit or _last_commit(rec)
    if target is None:
        raise ReportError(f"run_{rec.run} has no commit yet")
    if base is None:
        start = ws.resolve(f"{target}~1") if rec.run == 0 else None
        if start is None:
            return rec, None, ""
        return rec, None, ws.diff(start, target, paths=["."] + list(NON_CODE))
    base_ref = base.results_commit or base.commit
    if base_ref is None:
        raise ReportError(f"run_{base.run} has no commit")
    return rec, base, ws.diff(base_ref, target, paths=["."] + list(NON_CODE))


def _last_commit(rec: RunRecord) -> str | None:
    for a in reversed(rec.history):
        if a.commit:
            return a.commit
    return None


def list_sessions(root: Path) -> list[SessionState]:
    """Every session folder directly under root, and in the batch folders there, oldest first; folders that are not
    sessions are skipped."""
    out: list[SessionState] = []
    if not root.is_dir():
        return out
    children = []
    for child in sorted(root.iterdir()):
        children.append(child)
        if (child / "batch.json").is_file():  # a batch folder: its sessions are listed with the others
            children += sorted(c for c in child.iterdir() if c.is_dir())
    for child in children:
        if (child / META_DIR / "journal.jsonl").exists():
            try:
                out.append(load_state(child))
            except JournalError:
                continue
    return out


def sessions_table(states: list[SessionState]) -> Table:
    table = Table(title="Sessions", title_justify="left")
    for col in ("folder", "status", "runs ok", "best", "cost", "model"):
        table.add_column(col)
    for st in states:
        ok = sum(1 for r in st.runs if r.status == "ok" and r.run > 0)
        folder = Path(st.session.dir)
        name = folder.name if not (folder.parent / "batch.json").is_file() else f"{folder.parent.name}/{folder.name}"
        table.add_row(name, st.session.status, str(ok),
                      f"run_{st.session.best_run}" if st.session.best_run is not None else "-",
                      f"${st.session.totals.cost_usd:.4f}", st.session.model)
    return table


# --------------------------------------------------------------------------------------------------- show


def run_view(session: Path, run: str | int | None) -> SessionState:
    """What `show` prints: the session and one run, with its code diff filled in (same schema as `status`)."""
    state = load_state(session)
    rec = resolve_run(state, run)
    view = rec.model_copy(deep=True)
    view.diff = safe_run_diff(session, state, rec.run)
    return SessionState(session=state.session, runs=[view])


def safe_run_diff(session: Path, state: SessionState, run: int) -> str | None:
    """The run's diff against the previous successful run ("" when the code did not change); None when there is
    nothing to diff (the run has no commit yet) or the folder's git history cannot be read."""
    try:
        return redact(run_diff(session, state, run)[2])
    except (ReportError, GitError):
        return None


def error_summary(attempt: AttemptRecord) -> str:
    """One line about a failed attempt: the runner's message, else the last line of its stderr tail."""
    tail = [line.strip() for line in attempt.stderr_tail.splitlines() if line.strip()]
    text = attempt.message or (tail[-1] if tail else "")
    if attempt.message and tail and tail[-1] not in attempt.message:
        text += f" | {tail[-1]}"
    return safe(redact(text))


def _change(delta: float | None, better: bool | None) -> Text:
    if delta is None:
        return Text("-", style="dim")
    style = "green" if better else "red" if better is False else ""
    return Text(f"{delta:+.4g}", style=style)


def run_metrics_table(rec: RunRecord, key_metrics: list[str]) -> Table:
    table = Table(title="metrics", title_justify="left")
    for col in ("metric", "value", "baseline", "vs baseline", "previous", "vs previous"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    names = [m for m in key_metrics if m in rec.metrics] + [m for m in rec.metrics if m not in key_metrics]
    for name in names:
        m = rec.metrics[name]
        arrow = {"higher": " ↑", "lower": " ↓"}.get(m.direction or "", "")
        value = _fmt(m.value) + (f" ± {_fmt(m.stderr)}" if m.stderr else "")
        prev_better = None
        if m.vs_previous and m.direction:
            prev_better = (m.vs_previous > 0) == (m.direction == "higher")
        table.add_row(Text(safe(name) + arrow), value, _fmt(m.baseline), _change(m.vs_baseline, m.better), _fmt(m.previous),
                      _change(m.vs_previous, prev_better))
    return table


def show_renderables(view: SessionState) -> list[RenderableType]:
    """The terminal rendering of `run_view`: header, metrics, failed attempts, stderr tail and diff."""
    rec = view.runs[0]
    style = {"ok": "green", "failed": "red", "running": "yellow"}.get(rec.status, "dim")
    parts: list[RenderableType] = []
    head = Text(f"run_{rec.run} ", style="bold")
    head.append(rec.status, style=style)
    if rec.run == view.session.best_run and rec.run != 0:
        head.append("  (best run)", style="bold green")
    parts.append(head)
    commit = rec.commit or _last_commit(rec)
    facts = [
        ("plan", safe(rec.plan or (rec.history[-1].plan if rec.history else "")) or ("baseline" if rec.run == 0
                                                                                      else "-")),
        ("commit", (commit[:12] if commit else "-") + (f" (tag {rec.tag})" if rec.tag else "")),
        ("outcome", f"{rec.outcome or '-'}" + (f": {safe(redact(rec.message))}" if rec.message else "")),
        ("sandbox", rec.sandbox or "-"),
        ("attempts", str(rec.attempts or (1 if rec.run == 0 else 0))),
        ("duration", _duration(rec.duration_s)),
        ("tokens", f"{rec.prompt_tokens:,} prompt + {rec.completion_tokens:,} completion "
                   f"({rec.cached_tokens:,} cached) in {rec.calls} calls"),
        ("cost", f"${rec.cost_usd:.4f}"),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for k, v in facts:
        grid.add_row(k, Text(v))
    parts.append(grid)
    if rec.metrics:
        parts.append(run_metrics_table(rec, view.session.key_metrics))
    failed = [a for a in rec.history if a.outcome not in ("ok", "running")]
    if failed:
        table = Table(title="failed attempts", title_justify="left")
        for col in ("attempt", "outcome", "duration", "plan", "error"):
            table.add_column(col)
        for a in failed:
            table.add_row(str(a.attempt), Text(a.outcome, style="red"), _duration(a.duration_s),
                          Text(safe(a.plan) or "-"), Text(error_summary(a)))
        parts.append(table)
    if rec.stderr_tail.strip():
        parts.append(Text("stderr (tail)", style="bold"))
        parts.append(Text(safe(redact(rec.stderr_tail.rstrip())), style="dim"))
    parts.append(Text("diff" + (" (against the previous successful run)" if rec.run else ""), style="bold"))
    if rec.diff:
        parts.append(Syntax(safe(rec.diff), "diff", theme="ansi_dark", word_wrap=True))
    else:
        parts.append(Text("(no code change)" if rec.diff == "" else
                          "(no diff: the run has no commit, or the session's git history cannot be read)", style="dim"))
    return parts


# --------------------------------------------------------------------------------------------------- log


class LogEntry(BaseModel):
    """One step of the conversation as `log` shows it."""

    kind: Literal["system", "user", "assistant", "event"]
    stage: str = "experiment"
    run: int | None = None
    attempt: int | None = None
    retry: int | None = None
    text: str = ""
    reasoning: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None


def _where(stage: str, run: int | None, attempt: int | None, retry: int | None) -> str:
    place = f"run_{run}" if stage == "experiment" and run is not None else stage
    if attempt:
        place += f" attempt {attempt}"
    if retry:
        place += f" retry {retry}"
    return place


def _event_line(kind: str, d: dict[str, Any]) -> str | None:
    """A one-line note for the events between messages that a reader of the conversation wants to see."""
    where = _where(d.get("stage", "experiment"), d.get("run"), d.get("attempt"), None)
    if kind == "edits_applied":
        sha = str(d.get("commit") or "")[:12]
        return f"edits applied to {', '.join(d.get('changed', [])) or 'files'}: commit {sha} ({where})"
    if kind == "edits_failed":
        return f"edits failed ({where}): {d.get('message', '')}"
    if kind in ("no_edits", "no_change"):
        return f"{kind.replace('_', ' ')} ({where}): {d.get('message', '')}"
    if kind == "run_finished":
        dur = d.get("duration_s")
        return f"{where} finished: {d.get('outcome')}" + (f" in {_duration(dur)}" if dur is not None else "") + (
            f" - {d.get('message')}" if d.get("message") else "")
    if kind == "run_given_up":
        return f"{where} given up: code restored to {d.get('restored_to', 'the last good run')}"
    if kind == "figures":
        return f"figures: {', '.join(d.get('files', [])) or 'none'}"
    if kind == "finished":
        return f"session {d.get('status', 'finished')}" + (f": {d['reason']}" if d.get("reason") else "")
    if kind == "interrupted":
        return f"session interrupted: {d.get('reason', '')}"
    return None


def transcript(session: Path, run: str | int | None = None) -> list[LogEntry]:
    """The conversation from the journal (prompts, replies, and the steps between them), secrets redacted.
    With `run`, only that run's steps."""
    from orchestrator.journal import Journal

    journal = Journal(session)
    if not journal.exists():
        raise JournalError(f"{session} is not a session folder (no {META_DIR}/journal.jsonl)")
    events = journal.events()
    only: int | None = None
    if run is not None:
        only = resolve_run(load_state(session), run).run
    out: list[LogEntry] = []
    for ev in events:
        d = ev.data
        stage = d.get("stage", "experiment")
        n = d.get("run")
        if only is not None and (stage != "experiment" or n != only):
            continue
        common = dict(stage=stage, run=n, attempt=d.get("attempt"), retry=d.get("retry"))
        if ev.kind == "session_started" and only is None:
            out.append(LogEntry(kind="system", stage="start", text=redact(str(d.get("system_prompt", "")))))
        elif ev.kind == "prompt":
            out.append(LogEntry(kind="user", text=redact(str(d.get("content", ""))), **common))
        elif ev.kind == "reply":
            reasoning = d.get("reasoning")
            out.append(LogEntry(kind="assistant", text=redact(str(d.get("content", ""))),
                                reasoning=redact(str(reasoning)) if reasoning else None,
                                prompt_tokens=int(d.get("prompt_tokens") or 0),
                                completion_tokens=int(d.get("completion_tokens") or 0),
                                cost_usd=d.get("cost_usd"), **common))
        else:
            line = _event_line(ev.kind, d)
            if line is not None and (only is None or ev.kind not in ("finished", "interrupted")):
                out.append(LogEntry(kind="event", text=redact(line), **common))
    return out


def _folded(label: str, text: str, lines: int = 3) -> Text:
    """A dim, folded view of long text: its size and its first lines."""
    shown = [line for line in text.strip().splitlines() if line.strip()][:lines]
    out = Text(f"▸ {label} ({len(text):,} chars)", style="dim italic")
    for line in shown:
        out.append("\n  " + (line if len(line) <= 160 else line[:157] + "..."), style="dim")
    rest = len([line for line in text.strip().splitlines() if line.strip()]) - len(shown)
    if rest > 0:
        out.append(f"\n  ... {rest} more lines", style="dim")
    return out


def transcript_renderables(entries: list[LogEntry]) -> list[RenderableType]:
    """Rich renderables for `log`: a rule per message, markdown bodies, reasoning folded, steps as dim notes."""
    parts: list[RenderableType] = []
    for e in entries:
        where = _where(e.stage, e.run, e.attempt, e.retry)
        if e.kind == "system":
            parts.append(Rule("system", align="left", style="dim"))
            parts.append(_folded("system prompt", safe(e.text), lines=2))
        elif e.kind == "user":
            parts.append(Rule(f"user · {where}", align="left", style="cyan"))
            parts.append(Markdown(safe(e.text)))
        elif e.kind == "assistant":
            cost = "cost unknown" if e.cost_usd is None else f"${e.cost_usd:.4f}"
            parts.append(Rule(f"assistant · {where} · {e.prompt_tokens:,}+{e.completion_tokens:,} tokens · {cost}",
                              align="left", style="magenta"))
            if e.reasoning:
                parts.append(_folded("reasoning", safe(e.reasoning)))
            parts.append(Markdown(safe(e.text)))
        else:
            parts.append(Text(f"• {safe(e.text)}", style="yellow" if "fail" in e.text or "error" in e.text else "dim"))
    return parts


# --------------------------------------------------------------------------------------------------- batches


def _vs(row: Any) -> Text:
    if row.vs_baseline is None:
        return Text("-")
    style = {True: "green", False: "red"}.get(row.better, "")
    return Text(f"{row.vs_baseline * 100:+.1f}%", style=style)


def _batch_where(row: Any) -> str:
    """What a session is doing: `run 2/3 attempt 1 (queued)`, or its final status."""
    if row.status != "running":
        return row.status
    if row.run is None:
        return row.phase
    where = "baseline" if row.run == 0 else f"run {row.run}/{row.max_runs}"
    if row.attempt and row.attempt > 1:
        where += f" attempt {row.attempt}"
    phase = {"ask": "asking the model", "apply": "applying edits", "run": "running", "queued": "waiting for a slot",
             "baseline": "running"}.get(row.phase, row.phase)
    return f"{where}: {phase}"


def batch_row_line(row: Any) -> str:
    """One session of a batch as a plain line (piped output): where it is, best result, cost."""
    best = f"best run_{row.best_run} {row.metric} {_fmt(row.value)} ({_vs(row).plain})" if row.best_run is not None else "no run yet"
    return f"{_batch_where(row)} | {best} | ${row.cost_usd:.4f}"


def batch_live_table(rows: list[Any], slots: str, elapsed_s: float) -> Table:
    table = Table(title=f"Batch: {escape(slots)} | {_duration(elapsed_s)}", title_justify="left")
    for col, justify in (("idea", "left"), ("now", "left"), ("attempt", "right"), ("best", "right"),
                         ("vs baseline", "right"), ("cost", "right"), ("elapsed", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        best = f"run_{row.best_run} {_fmt(row.value)}" if row.best_run is not None else "-"
        table.add_row(Text(safe(row.idea)), Text(safe(_batch_where(row))), str(row.attempt or "-"), best, _vs(row),
                      f"${row.cost_usd:.4f}", _duration(row.elapsed_s))
    return table


def batch_table(rows: list[Any], spec: Any) -> Table:
    """The leaderboard of `status BATCH`: one row per idea, best first."""
    metric = next((r.metric for r in rows if r.metric), None)
    title = f"Batch {spec.name}: {len(rows)} ideas" + (f", ranked by {metric}" if metric else "")
    table = Table(title=escape(safe(title)), title_justify="left")
    for col, justify in (("#", "right"), ("idea", "left"), ("status", "left"), ("runs ok", "right"),
                         ("best", "right"), ("value", "right"), ("baseline", "right"), ("vs baseline", "right"),
                         ("cost", "right"), ("time", "right"), ("folder", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for n, row in enumerate(rows, 1):
        table.add_row(str(n), Text(safe(row.idea)), Text(safe(_batch_where(row))), str(row.runs_ok),
                      f"run_{row.best_run}" if row.best_run is not None else "-", _fmt(row.value), _fmt(row.baseline),
                      _vs(row), f"${row.cost_usd:.4f}", _duration(row.elapsed_s), Text(Path(row.path).name))
    total = sum(r.cost_usd for r in rows)
    budget = f" of ${spec.budget_usd:.2f}" if spec.budget_usd is not None else ""
    table.caption = f"total cost ${total:.4f}{budget}"
    return table
