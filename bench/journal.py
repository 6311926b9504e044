"""The session journal: JSONL (what we ship) against SQLite in WAL mode, on a 3,000-event journal.

For each store: appending every event durably (fsync / synchronous=FULL), reading the whole journal back cold,
looking up 3,000 steps by key, and what a torn write leaves. Then the replay cost per event: folding one event
into the snapshot (StateFold.add + state) against rebuilding the whole state from all events before it (what
the driver did before), at 168 and 3,360 events.

    PYTHONPATH=. python bench/journal.py [--events 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.journal import Event, Journal, StateFold, read_jsonl, rebuild

KINDS = ("phase", "prompt", "reply", "apply_started", "edits_applied", "run_started", "run_finished",
         "run_recorded")


def make_events(n: int, seed: int = 0) -> list[dict]:
    """A journal shaped like a long session: prompts and replies carry kilobytes, phases a few fields."""
    rng = random.Random(seed)
    events = [{"kind": "session_started", "data": {"idea": {"name": "bench"}, "template": {"name": "t"},
                                                     "model": "m", "max_runs": 10, "system_prompt": "s" * 2000}}]
    for i in range(1, n):
        kind = KINDS[i % len(KINDS)]
        run, attempt, retry = (i // 40) % 11, 1 + (i // 8) % 4, (i // 2) % 4
        data: dict = {"stage": "experiment", "run": run, "attempt": attempt, "retry": retry}
        if kind == "prompt":
            data["content"] = "x" * rng.randint(1500, 8000)
        elif kind == "reply":
            data.update(content="y" * rng.randint(800, 4000), prompt_tokens=4000, completion_tokens=900,
                        cost_usd=0.004)
        elif kind == "run_finished":
            data.update(outcome="ok", duration_s=12.5, metrics={"m": {"mean": rng.random()}},
                        stderr_tail="z" * 2000)
        events.append({"kind": kind, "data": data})
    return events


def bench_jsonl(folder: Path, events: list[dict]) -> dict[str, float]:
    journal = Journal(folder)
    t0 = time.perf_counter()
    for e in events:
        journal.append(e["kind"], **e["data"])
    append_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold = Journal(folder)
    loaded = cold.events()
    read_s = time.perf_counter() - t0
    keys = [(ev.kind, ev.key()) for ev in loaded]
    t0 = time.perf_counter()
    for kind, key in keys:
        cold.find(kind, key)
    find_s = time.perf_counter() - t0
    # a torn write: half a line at the end, then one more append
    with open(journal.path, "ab") as fh:
        fh.write(b'{"seq": 99999, "kind": "ph')
    Journal(folder).append("phase", phase="after_tear")
    readable = len(read_jsonl(journal.path)) == len(events) + 1
    return {"append_ms": 1000 * append_s / len(events), "read_ms": 1000 * read_s,
            "find_us": 1e6 * find_s / len(keys), "size_kb": journal.path.stat().st_size / 1024,
            "readable_after_tear": float(readable)}


def bench_sqlite(folder: Path, events: list[dict]) -> dict[str, float]:
    path = folder / "journal.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts REAL, kind TEXT, stage TEXT, run INTEGER, "
                "attempt INTEGER, retry INTEGER, data TEXT)")
    con.execute("CREATE INDEX step ON events (kind, stage, run, attempt, retry)")
    t0 = time.perf_counter()
    for i, e in enumerate(events, 1):
        d = e["data"]
        con.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)",
                    (i, time.time(), e["kind"], d.get("stage"), d.get("run"), d.get("attempt"), d.get("retry"),
                     json.dumps(d)))
    append_s = time.perf_counter() - t0
    con.close()
    t0 = time.perf_counter()
    con = sqlite3.connect(path)
    rows = con.execute("SELECT seq, ts, kind, data FROM events ORDER BY seq").fetchall()
    loaded = [Event(seq=r[0], ts=r[1], kind=r[2], data=json.loads(r[3])) for r in rows]
    read_s = time.perf_counter() - t0
    keys = [(ev.kind, *ev.key()) for ev in loaded]
    t0 = time.perf_counter()
    for k in keys:
        con.execute("SELECT data FROM events WHERE kind=? AND stage IS ? AND run IS ? AND attempt IS ? "
                    "AND retry IS ? ORDER BY seq DESC LIMIT 1", k).fetchone()
    find_s = time.perf_counter() - t0
    con.close()
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("journal.sqlite"))
    return {"append_ms": 1000 * append_s / len(events), "read_ms": 1000 * read_s,
            "find_us": 1e6 * find_s / len(keys), "size_kb": size / 1024, "readable_after_tear": 1.0}


def bench_replay(events: list[dict], at: int) -> tuple[float, float]:
    """ms per event at journal length `at`: rebuilding everything (before) and folding one event (now)."""
    evs = [Event(seq=i + 1, ts=1000.0 + i, kind=e["kind"], data=e["data"]) for i, e in enumerate(events[:at])]
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        rebuild(evs)
    full_ms = 1000 * (time.perf_counter() - t0) / reps
    fold = StateFold()
    for ev in evs[:-1]:
        fold.add(ev)
    t0 = time.perf_counter()
    fold.add(evs[-1])
    fold.state()
    step_ms = 1000 * (time.perf_counter() - t0)
    return full_ms, step_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000)
    args = parser.parse_args()
    events = make_events(args.events)
    console = Console(width=130)
    stores = Table(title=f"Journal stores, {args.events} events (this machine: {os.cpu_count()} cores)")
    for col in ("store", "append (ms/event, durable)", "cold read (ms)", "find by key (µs)", "size (KiB)",
                "readable after a torn write"):
        stores.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        for name, fn, folder in (("JSONL + tail repair", bench_jsonl, Path(a)),
                                 ("SQLite WAL", bench_sqlite, Path(b))):
            r = fn(folder, events)
            stores.add_row(name, f"{r['append_ms']:.2f}", f"{r['read_ms']:.0f}", f"{r['find_us']:.1f}",
                           f"{r['size_kb']:.0f}", "yes" if r["readable_after_tear"] else "NO")
    console.print(stores)
    replay = Table(title="Snapshot after each event")
    for col in ("events", "rebuild all (ms, before)", "fold one (ms, now)"):
        replay.add_column(col, justify="right")
    for at in (168, 3360):
        full, step = bench_replay(make_events(max(at, args.events)), at)
        replay.add_row(str(at), f"{full:.2f}", f"{step:.3f}")
    console.print(replay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
