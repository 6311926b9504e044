"""What the orchestrator itself costs: a two-run toy session against a zero-latency loopback provider.

Starts tests/fake_provider.py on 127.0.0.1 (answers at once, DeepSeek's message rules), launches
`python -m orchestrator launch` on the toy template of tests/session_helpers.py with
`--model deepseek/deepseek-chat --api-base <loopback> --max-runs 2 --no-plots`, reads its output through pipes
and times, per session:

- first line: from the process start to the session folder line on stdout;
- loop: the driver's own time, from the journal's `drive_started` to its `finished` event (baseline and two runs
  of a script that does nearly nothing, two model calls, git checkpoints, journal);
- first call / later call: per model request, from the journal's `ask` phase to its `reply` event, less the time
  the provider took (nil here: the fake answers at once), so what the orchestrator and litellm add to a request;
- exit lag: from the last byte of output to the process's exit;
- wall: the whole session, from the process start to its exit.

Each is also shown as a ratio to `python -c pass` (the interpreter's start-up, timed in the same bench, median of
`--repeat`), so machines can be compared. Prints one table with the median over `--sessions` sessions, then the
import floor: what `python -c` takes to import typer and pydantic and make one pydantic model, the least any launch
that validates its input before making the session folder pays before its first line. The floor is also timed once
just before each session, and the first line less that floor (what the orchestrator adds) is printed per session and
as a median: this machine's speed drifts by half over minutes, and the difference drifts less than either.

    PYTHONPATH=. python bench/overhead.py [--sessions 3] [--repeat 5] [--keep DIR] [--baseline-s 10]

With `--baseline-s`, the baseline run sleeps that long first, as a real baseline outlasts litellm's import: the
first call then shows whether the warm-up thread left it costing what later calls do (loop and wall grow by it).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import FakeProvider  # noqa: E402
from tests.session_helpers import edit, make_idea, make_template  # noqa: E402

REPLIES = [
    {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: raise LR to 0.2."), "prompt_tokens": 900,
     "completion_tokens": 100},
    {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3."), "prompt_tokens": 1100,
     "completion_tokens": 100},
]
COLUMNS = ("first line", "loop", "first call", "later call", "exit lag", "wall")


# What any launch pays before its first line, whatever orchestrator does: the command-line library, pydantic, and
# pydantic's first model class (which loads the rest of pydantic). The input is validated with pydantic models
# before the session folder is made, so the first line cannot come sooner than this.
FLOOR_CODE = "import typer\nfrom pydantic import BaseModel\nclass M(BaseModel):\n    x: int = 0\nM(x=1)"


def python_s(repeat: int, code: str = "pass") -> float:
    """Median wall time of `python -c CODE`."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_session(work: Path, url: str, baseline_s: float = 0.0) -> dict[str, float]:
    """One launch; its timings in seconds (see the module's docstring). `baseline_s`: the baseline run sleeps
    that long first (the later runs do not)."""
    template, idea = make_template(work), make_idea(work)
    if baseline_s:
        code = (template / "experiment.py").read_text()
        (template / "experiment.py").write_text(code.replace(
            "    os.makedirs(args.out_dir, exist_ok=True)\n",
            f"    os.makedirs(args.out_dir, exist_ok=True)\n    if LR == 0.1:\n"
            f"        import time\n        time.sleep({baseline_s!r})\n"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DEEPSEEK_API_KEY": "sk-bench-0123456789abcdef",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "orchestrator", "launch", str(idea), "--template", str(template),
           "--model", "deepseek/deepseek-chat", "--api-base", url, "--root", str(work / "sessions"),
           "--max-runs", "2", "--no-plots"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=work)
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    out, err = b"", b""
    first_line = last_output = None
    open_pipes = 2
    while open_pipes:
        for key, _ in sel.select():
            chunk = os.read(key.fd, 65536)
            now = time.perf_counter()
            if not chunk:
                sel.unregister(key.fileobj)
                open_pipes -= 1
                continue
            last_output = now
            if key.data == "out":
                out += chunk
                if first_line is None and b"\n" in out:
                    first_line = now
            else:
                err += chunk
    proc.wait()
    exited = time.perf_counter()
    if proc.returncode != 0 or first_line is None or last_output is None:
        raise SystemExit(f"the session failed (exit {proc.returncode}):\n{out.decode()}\n{err.decode()}")
    session = Path(out.decode().splitlines()[0].strip())
    events = [json.loads(line) for line in (session / ".orchestrator" / "journal.jsonl").read_text().splitlines()]
    ts = {e["kind"]: e["ts"] for e in events}  # the last of each kind
    asks = [e["ts"] for e in events if e["kind"] == "phase" and e["data"].get("phase") == "ask"]
    replies = [e["ts"] for e in events if e["kind"] == "reply"]
    calls = [r - a for a, r in zip(asks, replies, strict=True)]
    if len(calls) != len(REPLIES):
        raise SystemExit(f"expected {len(REPLIES)} model calls, the journal has {len(calls)}")
    return {"first line": first_line - t0, "loop": ts["finished"] - ts["drive_started"], "first call": calls[0],
            "later call": statistics.mean(calls[1:]), "exit lag": exited - last_output, "wall": exited - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=3, help="sessions to time (the table shows medians)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of `python -c pass` to time")
    parser.add_argument("--keep", type=Path, help="keep the sessions and the provider's logs under this folder")
    parser.add_argument("--baseline-s", type=float, default=0.0,
                        help="make the baseline run sleep this long (e.g. 10: longer than litellm's import, as any "
                             "real baseline is, so the first call shows what a warmed-up call costs)")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    base = python_s(args.repeat)
    floor = python_s(args.repeat, FLOOR_CODE)
    work_root = Path(tempfile.mkdtemp(prefix="orch-overhead-")) if args.keep is None else args.keep
    work_root.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, float]] = []
    try:
        for i in range(args.sessions):
            work = work_root / f"session_{i}"
            work.mkdir()
            provider = FakeProvider(work / "provider").start({"replies": REPLIES})
            try:
                floor_now = python_s(1, FLOOR_CODE)  # just before: this machine's speed drifts over minutes
                sample = timed_session(work, provider.url, args.baseline_s)
                samples.append(sample | {"floor": floor_now, "over floor": sample["first line"] - floor_now})
            finally:
                provider.stop()
    finally:
        if args.keep is None:
            shutil.rmtree(work_root, ignore_errors=True)

    slow = f", baseline sleeps {args.baseline_s:g} s" if args.baseline_s else ""
    table = Table(title=f"orchestrator overhead: two-run toy session, loopback provider{slow}, median of "
                        f"{len(samples)}", title_justify="left")
    table.add_column("")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    medians = {c: statistics.median(s[c] for s in samples) for c in COLUMNS}
    table.add_row("seconds", *(f"{medians[c]:.3f}" for c in COLUMNS))
    table.add_row("x python -c pass", *(f"{medians[c] / base:.1f}" for c in COLUMNS))
    Console(width=140).print(table)
    print(f"python -c pass: {base:.3f} s (median of {args.repeat}); {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}")
    print(f"import floor before any first line (typer, pydantic, one model class): {floor:.3f} s "
          f"(median of {args.repeat}, {floor / base:.1f} x python -c pass)")
    over = statistics.median(s["over floor"] for s in samples)
    print(f"first line over the import floor timed just before each session: {over:.3f} s (median; what the "
          f"orchestrator adds to the libraries it starts with)")
    for c in (*COLUMNS, "floor", "over floor"):
        print(f"  {c:<11} " + " ".join(f"{s[c]:.3f}" for s in samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
