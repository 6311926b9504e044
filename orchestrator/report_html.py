"""The self-contained HTML report of a session: one file that opens offline, with nothing fetched.

Everything is inline: the CSS, the chart (SVG drawn here), the figures (data URIs) and the highlighted diffs
(pygments, with its CSS in the page). A Content-Security-Policy forbids every external load, so a mistake here
shows up as a blocked request rather than a silent fetch. Reads the session folder only, so it works for finished,
failed, interrupted and still-running sessions alike.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer

from orchestrator.errors import OrchestratorError
from orchestrator.journal import (
    FINAL_STATUSES,
    META_DIR,
    Event,
    Journal,
    JournalError,
    MetricChange,
    RunRecord,
    SessionState,
    rebuild,
    write_text_atomic,
)
from orchestrator.report import SANDBOX_WORDS, _duration, _fmt, error_summary, safe_run_diff, shown_metrics
from orchestrator.secrets import redact
from orchestrator.workspace import GitError, Workspace

REPORT_FILE = "report.html"
MAX_DIFF_CHARS = 200_000  # per diff; the rest is cut with a note (the full diff: `orchestrator diff`)
MAX_LOG_CHARS = 8_000  # per log tail
MAX_FIGURE_BYTES = 2_000_000  # per figure
MAX_FIGURES_BYTES = 3_500_000  # all figures together: keeps a report well under 5 MB
CHART_METRICS = 4
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}


class ReportRun(BaseModel):
    """A run with what the report adds to the snapshot: its diff, log tails and the edit feedback it got."""

    record: RunRecord
    diff: str | None = None  # None: no commit to diff, or no readable git history
    stdout_tail: str = ""
    edit_feedback: list[str] = Field(default_factory=list)
    attempt_diffs: dict[int, str] = Field(default_factory=dict)
    label: str = ""  # the status as shown: the record's, or "not run" for a slot a finished session left unused
    note: str = ""


def write_report(session: Path, output: Path | None = None) -> Path:
    """Render the report of a session folder and write it atomically (default: SESSION/report.html)."""
    session = Path(session)
    text = render_report(session)
    path = Path(output) if output is not None else session / REPORT_FILE
    if path.is_dir():
        path = path / REPORT_FILE
    if not path.parent.is_dir():  # a typo in -o should not silently make folders
        raise OrchestratorError(f"cannot write {path}: the folder {path.parent} does not exist")
    write_text_atomic(path, text)
    return path


def render_report(session: Path) -> str:
    """The report as one HTML string."""
    session = Path(session)
    journal = Journal(session)
    if not journal.exists():
        raise JournalError(f"{session} is not a session folder (no {META_DIR}/journal.jsonl)")
    events = journal.events()
    state = rebuild(events, session)
    runs = _collect_runs(session, state, events)
    return _page(session, state, runs)


# --------------------------------------------------------------------------------------------------- gathering


def _collect_runs(session: Path, state: SessionState, events: list[Event]) -> list[ReportRun]:
    try:
        ws: Workspace | None = Workspace.open(session)
    except GitError:
        ws = None
    out: list[ReportRun] = []
    for rec in state.runs:
        r = ReportRun(record=rec, label=rec.status)
        if rec.status in ("pending", "running") and state.session.status in FINAL_STATUSES | {"interrupted"}:
            r.label = "not run" if rec.status == "pending" else "stopped"
        if ws is not None:
            r.diff = safe_run_diff(session, state, rec.run)
            for a in rec.history:
                if a.outcome not in ("ok", "running") and a.commit:
                    r.attempt_diffs[a.attempt] = _attempt_diff(ws, a.commit)
        for ev in events:
            d = ev.data
            if d.get("stage", "experiment") != "experiment" or d.get("run") != rec.run:
                continue
            if ev.kind == "run_finished" and d.get("attempt") == (rec.history[-1].attempt if rec.history else 1):
                r.stdout_tail = redact(str(d.get("stdout_tail", "")))
            elif ev.kind == "edits_failed":
                r.edit_feedback.append(redact(str(d.get("feedback") or d.get("message") or "")))
            elif ev.kind == "completed_reply":
                r.note = "The model replied ALL_COMPLETED here: no further run."
            elif ev.kind == "run_given_up":
                r.note = (f"Given up after {rec.attempts} attempts; the code was restored to "
                          f"{d.get('restored_to', 'the last good run')}.")
        out.append(r)
    return out


def _attempt_diff(ws: Workspace, commit: str) -> str:
    """The edits one attempt applied: its checkpoint against the commit before it."""
    try:
        parent = ws.resolve(f"{commit}~1")
        return redact(ws.diff(parent, commit)) if parent else ""
    except GitError:
        return ""


# --------------------------------------------------------------------------------------------------- page


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_STATUS_CLASS = {"ok": "ok", "completed": "ok", "max_runs": "ok", "failed": "bad", "baseline_failed": "bad",
                 "interrupted": "warn", "running": "warn", "pending": "none", "budget_usd": "warn", "wall_clock": "warn"}

_CSS = """
:root { --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --dim: #6e7781; --line: #d0d7de; --bg2: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #fff; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 1.7em; margin: 0 0 4px; } h2 { border-bottom: 1px solid var(--line); padding-bottom: 4px;
margin-top: 2.2em; } h3 { margin: 0; font-size: 1.15em; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
pre { background: var(--bg2); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; white-space: pre; margin: 6px 0; }
pre.wrap { white-space: pre-wrap; word-break: break-word; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 12px; font-size: .85em; font-weight: 600;
         color: #fff; background: var(--dim); vertical-align: middle; }
.badge.ok { background: var(--ok); } .badge.bad { background: var(--bad); } .badge.warn { background: var(--warn); }
.banner { border-left: 4px solid var(--warn); background: #fff8c5; padding: 8px 12px; margin: 12px 0;
          border-radius: 4px; } .banner.bad { border-color: var(--bad); background: #ffebe9; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0; }
.facts dt { color: var(--dim); } .facts dd { margin: 0; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
.table-box { overflow-x: auto; } .se { white-space: nowrap; } /* a phone scrolls the table; a desktop window shows all of it */
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: right; vertical-align: top; }
th { background: var(--bg2); } td.l, th.l { text-align: left; }
td.better { background: #dafbe1; } td.worse { background: #ffebe9; }
.delta { font-size: .85em; color: var(--dim); } td.better .delta { color: var(--ok); }
td.worse .delta { color: var(--bad); }
tr.best td:first-child::after { content: " ★"; color: var(--ok); }
.charts { display: flex; flex-wrap: wrap; gap: 16px; } .charts svg { border: 1px solid var(--line);
border-radius: 6px; background: #fff; }
section.run { border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin: 18px 0; }
section.run > header { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; }
.plan { font-style: italic; } .dim { color: var(--dim); }
details { margin: 8px 0; } details > summary { cursor: pointer; color: #0969da; }
details.attempt { border-left: 3px solid var(--bad); padding-left: 10px; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--dim); font-size: .9em; }
footer { margin-top: 40px; color: var(--dim); font-size: .85em; }
.hl .gi { background: #e6ffec; } .hl .gd { background: #ffebe9; } .hl .gu { color: #8250df; }
"""


def _page(session: Path, state: SessionState, runs: list[ReportRun]) -> str:
    info = state.session
    formatter = HtmlFormatter(cssclass="hl", style="default")
    title = info.title or info.name or Path(info.dir).name
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} - orchestrator report</title>",
        f"<style>{_CSS}\n{formatter.get_style_defs('.hl')}</style>",
        "</head><body><main>",
        _header(session, state),
        _results(state, runs),
        _charts(state),
        _figures(session, state),
        _runs(state, runs, formatter),
        _notes(session),
        f'<footer>Written by orchestrator report on {_e(_when(time.time()))} from {_e(session.resolve())}.</footer>',
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _header(session: Path, state: SessionState) -> str:
    info = state.session
    t = info.totals
    cls = _STATUS_CLASS.get(info.status, "none")
    status = f'<span class="badge {cls}" id="status">{_e(info.status)}</span>'
    out = [f"<header><h1>{_e(info.title or info.name)}</h1>",
           f'<div class="dim mono">{_e(Path(info.dir or session).name)}</div></header>']
    if info.status == "interrupted":
        out.append(f'<div class="banner">Interrupted: {_e(redact(info.reason))}. Resume with '
                   f"<code>orchestrator resume {_e(session)}</code>.</div>")
    elif info.status == "running":
        out.append('<div class="banner">This session has not finished: it is still running, or its process was '
                   f"stopped without a record. Resume with <code>orchestrator resume {_e(session)}</code>.</div>")
    elif info.status == "failed":
        out.append(f'<div class="banner bad">Failed: {_e(redact(info.reason))}</div>')
    elif info.status == "baseline_failed":
        out.append(f'<div class="banner bad">The baseline failed: {_e(redact(info.reason))}: '
                   f"<code>orchestrator resume {_e(session)}</code>.</div>")
    cost = f"${t.cost_usd:.4f}" + (f" (+{t.cost_unknown_calls} calls of unknown cost)" if t.cost_unknown_calls else "")
    ok = sum(1 for r in state.runs if r.status == "ok" and r.run > 0)
    facts = [
        ("status", status + (f" {_e(redact(info.reason))}" if info.reason else "")),
        ("idea", f"<b>{_e(info.name)}</b>"),
        ("experiment", _e(redact(info.experiment)) or "-"),
        ("plan", _e(redact(info.plan)) if info.plan else "-"),
        ("model", f"<code>{_e(redact(info.model))}</code>"),
        ("template", _e(info.template) or "-"),
        ("sandbox", _e(SANDBOX_WORDS.get(info.sandbox, info.sandbox or "-"))),
        ("runs", f"{ok} successful of {info.max_runs} allowed"
                 + (f"; best: <a href=\"#run-{info.best_run}\">run_{info.best_run}</a>" if info.best_run else "")),
        ("model calls", f"{t.calls}: {t.prompt_tokens:,} prompt + {t.completion_tokens:,} completion tokens "
                        f"({t.cached_tokens:,} cached)"),
        ("cost", _e(cost)),
        ("time", f"runs {_duration(t.run_seconds)}, session {_duration(t.active_seconds)}; started "
                 f"{_e(_when(info.started_at))}, last event {_e(_when(info.updated_at))}"),
    ]
    out.append('<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>")
    return "\n".join(out)


def _metric_cell(rec: RunRecord, name: str) -> str:
    m = rec.metrics.get(name)
    if m is None:
        return '<td class="dim">-</td>'
    cls = "better" if m.better else "worse" if m.better is False else ""
    text = _e(_fmt(m.value))
    if m.stderr:
        text += f' <span class="dim se">± {_e(f"{m.stderr:.2g}")}</span>'
    if rec.run != 0 and m.vs_baseline is not None:
        text += f'<br><span class="delta">{m.vs_baseline:+.3g} vs run_0</span>'
    return f'<td class="{cls}">{text}</td>'


def _arrow(state: SessionState, name: str) -> str:
    d = next((r.metrics[name].direction for r in state.runs if name in r.metrics), None)
    return {"higher": " ↑", "lower": " ↓"}.get(d or "", "")


def _alarm_badge(rec: RunRecord) -> str:
    """A red badge when an attempt of this run changed guarded files (tampered) or filled its disk quota."""
    worst = next((a.outcome for a in rec.history if a.outcome in ("tampered", "quota")), None)
    return f' <span class="badge bad" title="{_e(worst)}">{_e(worst)}</span>' if worst else ""


def _results(state: SessionState, runs: list[ReportRun]) -> str:
    if not state.runs:
        return '<h2 id="results">Results</h2><p class="dim">No runs yet.</p>'
    names = shown_metrics(state)
    head = "".join(f"<th>{_breakable(n)}{_arrow(state, n)}</th>" for n in names)
    rows = []
    for r in runs:
        rec = r.record
        cls = _STATUS_CLASS.get(rec.status, "none")
        best = ' class="best"' if rec.run == state.session.best_run and rec.run != 0 else ""
        rows.append(
            f'<tr{best}><td class="l"><a href="#run-{rec.run}">run_{rec.run}</a></td>'
            f'<td class="l"><span class="badge {cls}">{_e(r.label)}</span>{_alarm_badge(rec)}</td>'
            f"<td>{rec.attempts or (1 if rec.run == 0 else 0)}</td>"
            + "".join(_metric_cell(rec, n) for n in names)
            + f"<td>{_duration(rec.duration_s)}</td><td>{rec.prompt_tokens + rec.completion_tokens:,}</td>"
            f"<td>${rec.cost_usd:.4f}</td></tr>")
    table = ('<div class="table-box"><table id="results-table"><thead><tr><th class="l">run</th><th class="l">status</th><th>attempts</th>'
             f"{head}<th>time</th><th>tokens</th><th>cost</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    legend = ('<p class="dim">Changes are against the baseline run_0; green is better and red worse by each '
              "metric's direction (↑ higher is better, ↓ lower is better); ★ marks the best run.</p>")
    every = sorted({n for r in state.runs for n in r.metrics} - set(names))
    more = ""
    if every:
        all_names = names + every
        head2 = "".join(f"<th>{_e(n)}{_arrow(state, n)}</th>" for n in all_names)
        body = "".join(f'<tr><td class="l">run_{r.run}</td>' + "".join(_metric_cell(r, n) for n in all_names)
                       + "</tr>" for r in state.runs if r.metrics)
        more = (f"<details><summary>All {len(all_names)} metrics</summary><div style=\"overflow-x:auto\">"
                f'<table><thead><tr><th class="l">run</th>{head2}</tr></thead><tbody>{body}</tbody></table>'
                "</div></details>")
    return f'<h2 id="results">Results</h2>{table}{legend}{more}'


def _breakable(name: str) -> str:
    """A metric name that may wrap after its dots and underscores (long names keep a table narrow)."""
    return re.sub(r"([._])", r"\1<wbr>", _e(name))


# --------------------------------------------------------------------------------------------------- chart


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def metric_chart(state: SessionState, name: str, width: int = 520, height: int = 260) -> str:
    """An inline SVG line chart of one metric across the successful runs, with the baseline dashed."""
    pts: list[tuple[int, MetricChange]] = [(r.run, r.metrics[name]) for r in state.runs
                                           if r.status == "ok" and name in r.metrics]
    if not pts:
        return ""
    ml, mr, mt, mb = 62, 16, 30, 36
    xs_max = max(max(n for n, _ in pts), 1)
    lows = [m.value - (m.stderr or 0) for _, m in pts]
    highs = [m.value + (m.stderr or 0) for _, m in pts]
    lo, hi = min(lows), max(highs)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    else:
        pad = (hi - lo) * 0.08
        lo, hi = lo - pad, hi + pad

    def x(n: float) -> float:
        return ml + (width - ml - mr) * (n / xs_max)

    def y(v: float) -> float:
        return mt + (height - mt - mb) * (1 - (v - lo) / (hi - lo))

    direction = pts[0][1].direction
    label = name + {"higher": " (higher is better)", "lower": " (lower is better)"}.get(direction or "", "")
    svg = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
           f' role="img" aria-label="{_e(label)}" class="chart" data-metric="{_e(name)}">',
           f'<text x="{ml}" y="18" font-size="13" font-weight="600" fill="#1f2328">{_e(label)}</text>']
    for t in _ticks(lo, hi):
        ty = y(t)
        svg.append(f'<line x1="{ml}" x2="{width - mr}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#eaeef2"/>'
                   f'<text x="{ml - 6}" y="{ty + 4:.1f}" font-size="11" text-anchor="end" fill="#6e7781">'
                   f"{_e(f'{t:.4g}')}</text>")
    for n in range(0, xs_max + 1):
        svg.append(f'<text x="{x(n):.1f}" y="{height - mb + 16}" font-size="11" text-anchor="middle" '
                   f'fill="#6e7781">{n}</text>')
    svg.append(f'<text x="{(ml + width - mr) / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle" '
               'fill="#6e7781">run</text>')
    base = next((m.value for n, m in pts if n == 0), None)
    if base is not None:
        svg.append(f'<line x1="{ml}" x2="{width - mr}" y1="{y(base):.1f}" y2="{y(base):.1f}" stroke="#6e7781" '
                   'stroke-dasharray="5,4"><title>baseline run_0</title></line>')
    svg.append('<polyline fill="none" stroke="#0969da" stroke-width="2" points="'
               + " ".join(f"{x(n):.1f},{y(m.value):.1f}" for n, m in pts) + '"/>')
    for n, m in pts:
        if m.stderr:
            svg.append(f'<line x1="{x(n):.1f}" x2="{x(n):.1f}" y1="{y(m.value - m.stderr):.1f}" '
                       f'y2="{y(m.value + m.stderr):.1f}" stroke="#0969da" stroke-width="1"/>')
        colour = "#1a7f37" if m.better else "#cf222e" if m.better is False else "#0969da"
        r = 6 if n == state.session.best_run and n != 0 else 4
        tip = f"run_{n}: {m.value:.6g}" + (f" ± {m.stderr:.3g}" if m.stderr else "")
        svg.append(f'<circle cx="{x(n):.1f}" cy="{y(m.value):.1f}" r="{r}" fill="{colour}"><title>{_e(tip)}'
                   "</title></circle>")
    svg.append("</svg>")
    return "".join(svg)


def _charts(state: SessionState) -> str:
    names = shown_metrics(state, limit=CHART_METRICS)
    charts = [c for c in (metric_chart(state, n) for n in names) if c]
    if not charts:
        return ""
    return '<h2 id="chart">Key metrics across runs</h2><div class="charts">' + "".join(charts) + "</div>"


# --------------------------------------------------------------------------------------------------- figures


def _figures(session: Path, state: SessionState) -> str:
    names = state.session.figures
    if not names:
        return ""
    root = session.resolve()
    out = ['<h2 id="figures">Figures</h2>']
    budget = MAX_FIGURES_BYTES
    for name in names:
        path = (session / name).resolve()
        mime = _MIME.get(path.suffix.lower())
        if not path.is_relative_to(root) or not path.is_file():
            out.append(f'<p class="dim">{_e(name)}: not found in the session folder.</p>')
            continue
        size = path.stat().st_size
        if mime is None or size > MAX_FIGURE_BYTES or size > budget:
            why = "not an image a browser shows" if mime is None else f"{size:,} bytes, too large to embed"
            out.append(f'<p class="dim">{_e(name)}: {why}; open it from the session folder.</p>')
            continue
        budget -= size
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        out.append(f'<figure><img alt="{_e(name)}" src="data:{mime};base64,{data}">'
                   f"<figcaption>{_e(name)}</figcaption></figure>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- runs


def _cut(text: str, limit: int, tail: bool = True) -> str:
    if len(text) <= limit:
        return text
    return ("[... cut ...]\n" + text[-limit:]) if tail else (text[:limit] + "\n[... cut ...]")


def _diff_html(diff: str | None, formatter: HtmlFormatter) -> str:
    if diff is None:
        return '<p class="dim">(no diff: the session\'s git history cannot be read)</p>'
    if not diff.strip():
        return '<p class="dim">(no code change)</p>'
    note = ""
    if len(diff) > MAX_DIFF_CHARS:
        diff = diff[:MAX_DIFF_CHARS]
        note = '<p class="dim">Diff cut here; the whole diff: <code>orchestrator diff</code>.</p>'
    return f'<div class="diff">{highlight(diff, DiffLexer(), formatter)}</div>{note}'


def _run_metrics(rec: RunRecord, key: list[str]) -> str:
    if not rec.metrics:
        return ""
    names = [m for m in key if m in rec.metrics] + [m for m in rec.metrics if m not in key]
    rows = []
    for n in names:
        m = rec.metrics[n]
        cls = "better" if m.better else "worse" if m.better is False else ""
        arrow = {"higher": " ↑", "lower": " ↓"}.get(m.direction or "", "")
        value = _fmt(m.value) + (f" ± {_fmt(m.stderr)}" if m.stderr else "")
        vs_b = f"{m.vs_baseline:+.4g}" if m.vs_baseline is not None else "-"
        vs_p = f"{m.vs_previous:+.4g}" if m.vs_previous is not None else "-"
        rows.append(f'<tr><td class="l">{_e(n)}{arrow}</td><td>{_e(value)}</td><td>{_e(_fmt(m.baseline))}</td>'
                    f'<td class="{cls}">{vs_b}</td><td>{_e(_fmt(m.previous))}</td><td>{vs_p}</td></tr>')
    body = "".join(rows[:60])
    more = f'<p class="dim">... and {len(rows) - 60} more metrics.</p>' if len(rows) > 60 else ""
    return ('<details open><summary>Metrics</summary><table><thead><tr><th class="l">metric</th><th>value</th>'
            "<th>baseline</th><th>vs baseline</th><th>previous</th><th>vs previous</th></tr></thead>"
            f"<tbody>{body}</tbody></table>{more}</details>")


def _log_tail(label: str, text: str, open_: bool) -> str:
    if not text.strip():
        return ""
    return (f"<details{' open' if open_ else ''}><summary>{_e(label)}</summary>"
            f'<pre class="wrap">{_e(_cut(text, MAX_LOG_CHARS))}</pre></details>')


def _run_section(state: SessionState, r: ReportRun, formatter: HtmlFormatter) -> str:
    rec = r.record
    cls = _STATUS_CLASS.get(rec.status, "none")
    plan = rec.plan or (rec.history[-1].plan if rec.history else "") or ("baseline" if rec.run == 0 else "")
    commit = rec.commit or next((a.commit for a in reversed(rec.history) if a.commit), None) or rec.results_commit
    best = ' <span class="badge ok">best</span>' if rec.run == state.session.best_run and rec.run else ""
    facts = [
        ("commit", f"<code>{_e(commit[:12])}</code>" if commit else "-"),
        ("tag", f"<code>{_e(rec.tag)}</code>" if rec.tag else "-"),
        ("outcome", _e(rec.outcome or "-") + (f": {_e(redact(rec.message))}" if rec.message else "")),
        ("attempts", str(rec.attempts or (1 if rec.run == 0 else 0))),
        ("sandbox", _e(SANDBOX_WORDS.get(rec.sandbox or "", rec.sandbox or "-"))),
        ("duration", _duration(rec.duration_s)),
        ("tokens", f"{rec.prompt_tokens:,} prompt + {rec.completion_tokens:,} completion "
                   f"({rec.cached_tokens:,} cached), {rec.calls} calls"),
        ("cost", f"${rec.cost_usd:.4f}"),
    ]
    out = [f'<section class="run" id="run-{rec.run}"><header><h3>run_{rec.run}</h3>'
           f'<span class="badge {cls}">{_e(r.label)}</span>{best}'
           f'<span class="plan">{_e(redact(plan))}</span></header>',
           '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>",
           f'<p class="banner">{_e(r.note)}</p>' if r.note else "",
           _run_metrics(rec, state.session.key_metrics)]
    against = "the template" if rec.run == 0 else "the previous successful run"
    if commit:
        out.append(f'<details open class="diff-block"><summary>Code diff against {against}</summary>'
                   f"{_diff_html(r.diff, formatter)}</details>")
    failed = rec.status != "ok"
    out.append(_log_tail("stderr (tail)", redact(rec.stderr_tail), failed))
    out.append(_log_tail("stdout (tail)", r.stdout_tail, False))
    for a in rec.history:
        if a.outcome in ("ok", "running"):
            continue
        body = [f"<p>{_e(error_summary(a))}</p>" if error_summary(a) else ""]
        if a.plan:
            body.append(f'<p class="plan">{_e(redact(a.plan))}</p>')
        if a.stderr_tail.strip():
            body.append(f'<pre class="wrap">{_e(_cut(redact(a.stderr_tail), MAX_LOG_CHARS))}</pre>')
        if r.attempt_diffs.get(a.attempt):
            body.append(f"<p class=\"dim\">Edits of this attempt:</p>{_diff_html(r.attempt_diffs[a.attempt], formatter)}")
        summary = f"attempt {a.attempt} failed: {a.outcome}" + (f" ({_duration(a.duration_s)})" if a.duration_s else "")
        if a.tampered:
            restored = [t for t in a.tampered if t not in a.unrestored]
            parts = ([f"could not be restored: {', '.join(a.unrestored)}"] if a.unrestored else []) + (
                [f"restored: {', '.join(restored)}"] if restored else [])
            body.insert(0, f'<p class="banner">The run changed guarded files (results not counted); '
                           f'{_e("; ".join(parts))}</p>')
        out.append(f'<details class="attempt"><summary>{_e(summary)}</summary>{"".join(body)}</details>')
    if r.edit_feedback:
        items = "".join(f'<pre class="wrap">{_e(_cut(f, MAX_LOG_CHARS, tail=False))}</pre>' for f in r.edit_feedback)
        out.append(f"<details><summary>{len(r.edit_feedback)} edit(s) that did not apply</summary>{items}</details>")
    out.append("</section>")
    return "\n".join(p for p in out if p)


def _runs(state: SessionState, runs: list[ReportRun], formatter: HtmlFormatter) -> str:
    if not runs:
        return ""
    return '<h2 id="runs">Runs</h2>' + "\n".join(_run_section(state, r, formatter) for r in runs)


def _notes(session: Path) -> str:
    path = session / "notes.txt"
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return ""
    return f'<h2 id="notes">Notes</h2><pre class="wrap">{_e(_cut(redact(text), 100_000, tail=False))}</pre>'


# --------------------------------------------------------------------------------------------------- batches


def write_batch_report(folder: Path, output: Path | None = None) -> Path:
    """One page comparing a batch's ideas (default: BATCH/report.html), each linking its session's own report,
    which is written (or rewritten) too."""
    from orchestrator.batch import leaderboard, load_batch, session_states

    folder = Path(folder)
    spec = load_batch(folder)
    path = Path(output) if output is not None else folder / REPORT_FILE
    if path.is_dir():
        path = path / REPORT_FILE
    if not path.parent.is_dir():
        raise OrchestratorError(f"cannot write {path}: the folder {path.parent} does not exist")
    states = session_states(spec, folder)
    links: dict[str, str] = {}
    for entry, state in states:
        if state is None:
            continue
        session_report = write_report(Path(entry.path))
        try:
            links[entry.path] = os.path.relpath(session_report, path.parent.resolve())
        except ValueError:  # another drive (Windows): an absolute link still works offline
            links[entry.path] = session_report.resolve().as_uri()
    rows = leaderboard(spec, states)
    metric = next((r.metric for r in rows if r.metric), None)
    head = ["#", "idea", "status", "runs ok", "best run", metric or "best", "baseline", "vs baseline", "cost",
            "time", "report"]
    body = []
    for n, row in enumerate(rows, 1):
        vs = "-" if row.vs_baseline is None else f"{row.vs_baseline * 100:+.1f}%"
        cls = "" if row.vs_baseline is None or row.better is None else ("better" if row.better else "worse")
        link = links.get(row.path)
        shown = "waiting for a slot" if row.status == "running" and row.phase == "queued" else row.status
        cells = [str(n), f'<td class="l">{_e(row.idea)}</td>',
                 f'<td class="l"><span class="badge {_STATUS_CLASS.get(row.status, "")}">{_e(shown)}</span></td>',
                 str(row.runs_ok), f"run_{row.best_run}" if row.best_run is not None else "-", _fmt(row.value),
                 _fmt(row.baseline), f'<td class="{cls}">{_e(vs)}</td>', f"${row.cost_usd:.4f}",
                 _duration(row.elapsed_s),
                 f'<td class="l"><a href="{_e(link)}">{_e(Path(row.path).name)}</a></td>' if link
                 else f'<td class="l">{_e(Path(row.path).name)}</td>']
        body.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    total = sum(r.cost_usd for r in rows)
    facts = {"ideas": str(len(rows)), "template": spec.template, "slots": spec.pool.describe(),
             "backend": spec.backend, "sessions at a time": str(spec.parallel),
             "cost": f"${total:.4f}" + (f" of a ${spec.budget_usd:.2f} budget" if spec.budget_usd else ""),
             "model": str(spec.settings.get("model", "")), "launched": _when(spec.created_at)}
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Batch {_e(spec.name)} - orchestrator report</title>",
        f"<style>{_CSS}</style>",
        "</head><body><main>",
        f"<h1>Batch {_e(spec.name)}</h1>",
        '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items()) + "</dl>",
        "<h2>Ideas, best first</h2>",
        '<div class="table-box"><table><thead><tr>'
        + "".join(f'<th class="{"l" if h in ("idea", "status", "report") else ""}">{_e(h)}</th>' for h in head)
        + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>",
        f'<footer>Written by orchestrator report on {_e(_when(time.time()))} from {_e(folder.resolve())}.</footer>',
        "</main></body></html>",
    ]
    write_text_atomic(path, "\n".join(page) + "\n")
    return path
