"""How well `orchestrator batch` keeps GPU slots busy: leased per run against one idea pinned per GPU.

A simulated workload on the CPU: 8 ideas x 4 runs (the baseline run_0 and `--max-runs 3`) of the toy template
tests/data/sleep_template, whose runs only sleep for a planned time (1-6 s, fixed per idea and run in its
durations.json, drawn once from a fixed seed) and record the CUDA_VISIBLE_DEVICES they saw and their start and end
times in run_i/slot.json. Model replies come from tests/fake_provider.py on 127.0.0.1 with a fixed latency
(`--latency`), one SEARCH/REPLACE served again and again ("cycle") that adds a line numbered by the request
("number_token") under a marker line, so it applies at any point of any session.
The slots are fake GPU ids 0..N-1 (`--slots`): nothing uses them but CUDA_VISIBLE_DEVICES.

Two policies, the same batch command in two temporary roots, one after the other:

- leased: `orchestrator batch ... --gpus 0,1,2` with its default --parallel (or this bench's `--parallel K`): each
  run leases a slot only while it runs, sessions think (model calls, git) without holding one;
- pinned: the same with `--parallel N` (N = the slots): N sessions at a time, each in effect owning one GPU for its
  whole life, AI-Scientist's launcher policy.

Measured from the runs' own records (slot.json of every run_i of every session in batch.json): makespan (last end
- first start of the batch's runs), total run seconds, ideal makespan = max(total / slots, critical path) where the
critical path is the longest session's sum of run durations (a session's runs are sequential), makespan / ideal,
slot utilisation = total / (slots x makespan), and device violations: runs that saw anything but exactly one id of
the pool, and pairs of runs that overlapped in time on the same id (both must be 0). Also shown: the batch
command's wall time (process start to exit) and CPU time (it and every process under it; in brackets the batch
process alone, sampled once a second), the model calls answered, and the median first and later model call of a
session (journal: `ask` phase to `reply`; a session's process imports litellm during its first). Target for leased: utilisation >= 90 % and makespan <= 1.1 x ideal,
clearly better than pinned.

    PYTHONPATH=. .venv/bin/python bench/batch.py [--latency 0.5] [--slots 3] [--scale 1] [--sandbox auto|bwrap|none]
        [--policy both|leased|pinned] [--parallel K] [--batch-timeout 900] [--keep]

Exit status 0 when every batch finished with no violation, 1 on a violation or a missing run record, 2 when a
batch command failed (its exit status and the tail of its stderr are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import FakeProvider  # noqa: E402

TEMPLATE = REPO / "tests" / "data" / "sleep_template"
IDEAS = TEMPLATE / "seed_ideas.json"
MAX_RUNS = 3  # after the baseline: 4 runs per idea
STOP_GRACE_S = 30.0

# Applies in any session at any point: the marker line stays, one line is added after it. NUMBER becomes the
# request's number (the provider's "number_token"): the same REPLACE twice in one file would be recognised as
# already applied, and the session would get no run.
NUMBER = "@N@"
REPLY = f"""One more run.

experiment.py
```python
<<<<<<< SEARCH
# runs so far
=======
# runs so far
# edit {NUMBER}
>>>>>>> REPLACE
```
"""


class BatchFailed(Exception):
    """The batch command did not finish every session (exit status, output tails)."""


@dataclass
class Run:
    idea: str
    name: str
    device: str | None
    start: float
    end: float | None


@dataclass
class Call:
    first: bool  # the session's first model call (its process imports litellm then)
    seconds: float  # from the journal's `ask` phase to its `reply` event


@dataclass
class Outcome:
    policy: str
    parallel: int | None
    wall_s: float
    cpu_s: float  # user + system seconds of the batch command and every process under it
    own_cpu_s: float  # the batch process alone (the scheduler), as last sampled before it exited
    batch_dir: Path
    runs: list[Run]
    model_calls: int
    requests: int
    problems: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)


def run_batch(work: Path, policy: str, args: argparse.Namespace, gpus: list[str]) -> Outcome:
    """Start a provider and one batch command under `work`; wait for both; read the runs' records."""
    provider = FakeProvider(work / "provider")
    proc: subprocess.Popen[bytes] | None = None
    try:
        provider.start({"replies": [REPLY], "cycle": True, "latency_s": args.latency, "number_token": NUMBER})
        parallel = len(gpus) if policy == "pinned" else args.parallel
        cmd = [sys.executable, "-m", "orchestrator", "batch", str(IDEAS), "--all", "--template", str(TEMPLATE),
               "--model", "openai/fake", "--api-base", provider.url, "--gpus", ",".join(gpus),
               "--root", str(work / "experiments"), "--name", policy, "--max-runs", str(MAX_RUNS), "--no-plots",
               "--env", f"SLEEP_SCALE={args.scale:g}"]
        if parallel is not None:
            cmd += ["--parallel", str(parallel)]
        if args.sandbox is not None:
            cmd += ["--sandbox", args.sandbox]
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "SLEEP_SCALE": f"{args.scale:g}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        out_path, err_path = work / "batch.stdout", work / "batch.stderr"
        print(f"{policy}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0, cpu0 = time.perf_counter(), children_cpu_s()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # its own session: a Ctrl-C here reaches only this script, which then stops the batch by its pid
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=work,
                                    start_new_session=True)
            deadline = time.monotonic() + args.batch_timeout
            own_cpu = 0.0
            while True:  # waits for the exit, sampling the batch process's own CPU time once a second
                own_cpu = process_cpu_s(proc.pid) or own_cpu
                try:
                    rc = proc.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        stop(proc)
                        raise BatchFailed(f"{policy}: the batch command ran past --batch-timeout "
                                          f"{args.batch_timeout:g} s" + tails(out_path, err_path)) from None
        wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0  # before the provider (a child) is stopped
        proc = None
        stdout = out_path.read_text(errors="replace")
        if rc != 0:
            raise BatchFailed(f"{policy}: the batch command exited {rc}" + tails(out_path, err_path))
        if not stdout.strip():
            raise BatchFailed(f"{policy}: the batch command printed nothing (the batch folder comes first)"
                              + tails(out_path, err_path))
        batch_dir = Path(stdout.splitlines()[0].strip())
        runs, problems, calls = read_runs(batch_dir)
        replies = [r for r in provider.requests() if r.get("status") == 200]
        return Outcome(policy, parallel, wall, cpu, own_cpu, batch_dir, runs, len(replies), len(provider.requests()), problems,
                       calls)
    finally:
        if proc is not None:  # interrupted (Ctrl-C) or failed while it ran
            stop(proc)
        provider.stop()


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for descendants (each level waits for its own children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one live process (Linux /proc), None when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the batch process (it stops its runs and leaves resumable sessions), SIGKILL after a grace."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def tails(out_path: Path, err_path: Path, lines: int = 25) -> str:
    text = ""
    for label, path in (("stdout", out_path), ("stderr", err_path)):
        body = path.read_text(errors="replace").splitlines() if path.exists() else []
        if body:
            text += f"\n--- last {min(lines, len(body))} lines of its {label}:\n" + "\n".join(body[-lines:])
    return text


def read_runs(batch_dir: Path) -> tuple[list[Run], list[str], list[Call]]:
    """Every run_i/slot.json of every session batch.json names; problems: what is missing or unfinished; the
    sessions' model calls as their journals timed them."""
    spec = json.loads((batch_dir / "batch.json").read_text(encoding="utf-8"))
    runs: list[Run] = []
    problems: list[str] = []
    calls: list[Call] = []
    sessions = spec.get("sessions", [])
    if len(sessions) != len(spec.get("ideas", sessions)):
        problems.append(f"batch.json lists {len(sessions)} sessions for {len(spec.get('ideas', []))} ideas")
    for s in sessions:
        folder = Path(s["path"])
        names = sorted((p.name for p in folder.glob("run_*") if re.fullmatch(r"run_\d+", p.name)),
                       key=lambda n: int(n.split("_")[1]))
        if len(names) != MAX_RUNS + 1:
            problems.append(f"{s['idea']}: {len(names)} run folders, expected {MAX_RUNS + 1}")
        for name in names:
            record = folder / name / "slot.json"
            if not record.is_file():
                problems.append(f"{s['idea']}/{name}: no slot.json")
                continue
            seen = json.loads(record.read_text())
            runs.append(Run(s["idea"], name, seen.get("cuda_visible_devices"), seen["start"], seen.get("end")))
            if seen.get("end") is None:
                problems.append(f"{s['idea']}/{name}: no end time (the run did not finish)")
        calls += journal_calls(folder / ".orchestrator" / "journal.jsonl")
    return runs, problems, calls


def journal_calls(journal: Path) -> list[Call]:
    """Each model call of a session: from the last `ask` phase before a `reply` event to that reply."""
    calls: list[Call] = []
    asked: float | None = None
    if not journal.is_file():
        return calls
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("kind") == "phase" and event.get("data", {}).get("phase") == "ask":
            asked = event["ts"]
        elif event.get("kind") == "reply" and asked is not None:
            calls.append(Call(first=not calls, seconds=event["ts"] - asked))
            asked = None
    return calls


def finished(runs: list[Run]) -> list[tuple[Run, float]]:
    """The runs that recorded an end time, with it, by start time."""
    return sorted(((r, r.end) for r in runs if r.end is not None), key=lambda pair: pair[0].start)


def device_violations(runs: list[Run], gpus: list[str]) -> tuple[int, int]:
    """(runs that did not see exactly one id of the pool, pairs of runs overlapping in time on the same id)."""
    bad = sum(1 for r in runs if r.device not in gpus)
    done = finished(runs)
    shared = 0
    for i, (a, a_end) in enumerate(done):
        for b, _ in done[i + 1:]:
            if b.start >= a_end:
                break
            if b.device == a.device and a.device in gpus:
                shared += 1
    return bad, shared


def figures(o: Outcome, slots: int) -> dict[str, Any]:
    done = finished(o.runs)
    if not done:
        return {"runs": 0}
    total = sum(end - r.start for r, end in done)
    per_session: dict[str, float] = {}
    for r, end in done:
        per_session[r.idea] = per_session.get(r.idea, 0.0) + end - r.start
    critical = max(per_session.values())
    makespan = max(end for _, end in done) - min(r.start for r, _ in done)
    ideal = max(total / slots, critical)
    return {"runs": len(done), "total": total, "critical": critical, "makespan": makespan, "ideal": ideal,
            "ratio": makespan / ideal, "util": total / (slots * makespan)}


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def planned_seconds(scale: float) -> float:
    table = json.loads((TEMPLATE / "durations.json").read_text())
    ideas = [i["name"] for i in json.loads(IDEAS.read_text())]
    plans = [table.get(i, table["default"]) for i in ideas]
    return sum(float(plan[k % len(plan)]) for plan in plans for k in range(MAX_RUNS + 1)) * scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the fake model takes per reply")
    parser.add_argument("--slots", type=int, default=3, help="fake GPU slots (ids 0..N-1)")
    parser.add_argument("--scale", type=float, default=1.0, help="SLEEP_SCALE: multiplies every run's duration")
    parser.add_argument("--sandbox", choices=("auto", "bwrap", "none"), default=None,
                        help="passed to the batch command (default: the orchestrator's default)")
    parser.add_argument("--policy", choices=("both", "leased", "pinned"), default="both")
    parser.add_argument("--parallel", type=int, default=None,
                        help="--parallel of the leased batch (default: the batch command's default)")
    parser.add_argument("--batch-timeout", type=float, default=900.0,
                        help="seconds one batch command may take before it is stopped")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (their path is printed)")
    args = parser.parse_args()
    if args.slots < 1:
        parser.error("--slots must be at least 1")

    from rich.console import Console
    from rich.table import Table

    gpus = [str(i) for i in range(args.slots)]
    policies = ["leased", "pinned"] if args.policy == "both" else [args.policy]
    work_root = Path(tempfile.mkdtemp(prefix="orch-batch-bench-"))
    load_before = os.getloadavg()
    outcomes: list[Outcome] = []
    try:
        for policy in policies:
            work = work_root / policy
            work.mkdir()
            outcomes.append(run_batch(work, policy, args, gpus))
    except BatchFailed as exc:
        print(f"bench/batch.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench/batch.py: interrupted; the batch command and the provider were stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept: {work_root}", file=sys.stderr)
        else:
            shutil.rmtree(work_root, ignore_errors=True)
    load_after = os.getloadavg()

    table = Table(title=f"orchestrator batch: 8 ideas x {MAX_RUNS + 1} runs of 1-6 s (x{args.scale:g}), "
                        f"{args.slots} fake GPU slots, model latency {args.latency:g} s", title_justify="left")
    for col in ("policy", "--parallel", "makespan s", "ideal s", "makespan/ideal", "utilisation", "wall s", "CPU s (batch)", "runs",
                "model calls", "1st / later call s", "device violations"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    status = 0
    rows: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        f = rows[o.policy] = figures(o, args.slots)
        bad, shared = device_violations(o.runs, gpus)
        if bad or shared or o.problems:
            status = 1
        label, par = o.policy, str(o.parallel) if o.parallel else "default"
        firsts, laters = ([c.seconds for c in o.calls if c.first is want] for want in (True, False))
        calls = f"{median(firsts)} / {median(laters)}"
        if not f["runs"]:
            table.add_row(label, par, "-", "-", "-", "-", f"{o.wall_s:.1f}", f"{o.cpu_s:.0f} ({o.own_cpu_s:.0f})", "0", str(o.model_calls), calls,
                          f"{bad} + {shared}")
            continue
        table.add_row(label, par, f"{f['makespan']:.1f}", f"{f['ideal']:.1f}", f"{f['ratio']:.3f}", f"{f['util']:.1%}",
                      f"{o.wall_s:.1f}", f"{o.cpu_s:.0f} ({o.own_cpu_s:.0f})", str(f["runs"]), str(o.model_calls), calls, f"{bad} + {shared}")
    Console(width=170).print(table)
    first = next((rows[o.policy] for o in outcomes if rows[o.policy]["runs"]), None)
    if first is not None:
        print(f"run seconds: {first['total']:.1f} measured, {planned_seconds(args.scale):.1f} planned "
              f"(durations.json); ideal = max({first['total']:.1f} / {args.slots} slots = "
              f"{first['total'] / args.slots:.1f}, critical path {first['critical']:.1f})")
    print("1st / later call: median seconds from a session's `ask` to its `reply` (journal), for its first model "
          "call (its process imports litellm then) and the later ones; the fake model takes --latency")
    print(f"CPU s: user + system seconds of the batch command and all under it (sessions, runs), on "
          f"{os.cpu_count()} CPUs; (batch): the batch process alone")
    print("device violations: runs without exactly one pool id + pairs of overlapping runs on the same id "
          "(both must be 0)")
    for o in outcomes:
        for p in o.problems:
            print(f"{o.policy}: {p}")
    leased, pinned = rows.get("leased"), rows.get("pinned")
    if leased and leased.get("runs"):
        met = leased["util"] >= 0.90 and leased["ratio"] <= 1.10
        line = (f"target (leased: utilisation >= 90 %, makespan <= 1.1 x ideal): {'met' if met else 'NOT met'}")
        if pinned and pinned.get("runs"):
            line += f"; pinned takes {pinned['makespan'] / leased['makespan']:.2f} x leased's makespan"
        print(line)
    print(f"{datetime.now().isoformat(timespec='minutes')}; {os.cpu_count()} CPUs; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min); python {sys.version.split()[0]}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
