"""What the run sandbox costs at start-up: a trivial run (`python -c pass`) started directly and inside bubblewrap.

    python bench/sandbox.py [--repeats 30]

Both go through orchestrator.runner.start exactly as the loop starts a run (gated, pipes, logs, a session folder
with a git repository, copy-on-write editable files), so the difference is what the sandbox adds per run:
bwrap's namespaces and mounts, the copy-on-write scratch, and the PID namespace's teardown. Prints a table with the
median and 90th percentile of each, and the overhead per run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.runner import RunRequest, start
from orchestrator.sandbox import SandboxSpec, bwrap_problem


def one_run(session: Path, spec: SandboxSpec | None, n: int) -> float:
    req = RunRequest(cwd=session, run_name=f"run_{n}", script="experiment.py", results_file=None, sandbox=spec,
                     timeout_s=60)
    t0 = time.perf_counter()
    with start(req, gate=True) as handle:
        handle.release()
        result = handle.wait()
    elapsed = time.perf_counter() - t0
    if result.outcome != "ok":
        raise SystemExit(f"run failed: {result.message}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    problem = bwrap_problem()
    if problem:
        raise SystemExit(f"cannot measure: {problem}")
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        session = Path(tmp)
        (session / "experiment.py").write_text("pass\n")
        (session / "notes.txt").write_text("notes\n")
        subprocess.run(["git", "init", "-q", str(session)], check=True)
        spec = SandboxSpec(readonly=[".git", ".gitignore"], copy_on_write=["experiment.py", "notes.txt"])
        times: dict[str, list[float]] = {"direct": [], "bwrap": []}
        for i in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
            times["direct"].append(one_run(session, None, 2 * i))
            times["bwrap"].append(one_run(session, spec, 2 * i + 1))
    table = Table(title=f"Run start-up: an experiment.py that only says `pass`, {args.repeats} runs each through runner.start",
                  title_justify="left")
    for col in ("mode", "median ms", "p90 ms"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    med = {}
    for mode, values in times.items():
        values.sort()
        med[mode] = statistics.median(values) * 1000
        table.add_row(mode, f"{med[mode]:.1f}", f"{values[int(0.9 * (len(values) - 1))] * 1000:.1f}")
    table.caption = f"sandbox overhead per run (median): {med['bwrap'] - med['direct']:.1f} ms"
    table.caption_justify = "left"
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
