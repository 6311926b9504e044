"""The test suite with every core kept busy: do the tests depend on the machine's speed?

Starts `--burners` processes (default: one per core) that spin `while True: pass`, runs the test command in the
repository root, stops the burners by pid (always, also on Ctrl-C), and prints one table: the command's exit
status, its wall time, the load average it saw, and the ratio to an idle run's wall time (`--idle-s`, or measured
first with `--measure-idle`).

    PYTHONPATH=. python bench/suite_under_load.py [--burners 2] [--idle-s 1810] [--measure-idle] [-- pytest -q ...]

Issue 14's target: the suite passes with both cores busy and its wall time stays under 2.5x the idle run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMMAND = ["pytest", "-q"]


def start_burners(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(count)]


def stop_burners(burners: list[subprocess.Popen[bytes]]) -> None:
    for proc in burners:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


class LoadSampler:
    """Samples the 1-minute load average every few seconds while the suite runs."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else os.getloadavg()[0]


def timed(command: list[str]) -> tuple[int, float, float]:
    """(exit status, wall seconds, mean load average) of one run of the command."""
    with LoadSampler() as load:
        t0 = time.monotonic()
        rc = subprocess.run(command, cwd=REPO).returncode
        wall = time.monotonic() - t0
    return rc, wall, load.mean()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2, help="busy processes (default: cores)")
    parser.add_argument("--idle-s", type=float, help="wall seconds of an idle run, for the ratio")
    parser.add_argument("--measure-idle", action="store_true", help="run the command idle first, for the ratio")
    parser.add_argument("command", nargs="*", help="test command (default: pytest -q)")
    args = parser.parse_args()
    command = args.command or DEFAULT_COMMAND

    rows: list[tuple[str, int, float, float]] = []
    idle_s = args.idle_s
    if args.measure_idle:
        rc, wall, load = timed(command)
        rows.append(("idle", rc, wall, load))
        idle_s = wall
    burners = start_burners(args.burners)
    try:
        rc, wall, load = timed(command)
    finally:
        stop_burners(burners)
    rows.append((f"{args.burners} cores busy", rc, wall, load))

    print()
    print(f"command: {' '.join(command)}")
    print("| run | exit | wall | mean load | x idle |")
    print("|---|---|---|---|---|")
    for name, rc, wall, load in rows:
        ratio = f"{wall / idle_s:.2f}" if idle_s else "-"
        print(f"| {name} | {rc} | {wall / 60:.1f} min ({wall:.0f} s) | {load:.1f} | {ratio} |")
    return max(row[1] for row in rows)


if __name__ == "__main__":
    sys.exit(main())
