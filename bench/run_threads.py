"""Why runs get OMP_WAIT_POLICY=PASSIVE: a CPU-bound torch loop, alone and next to busy processes.

Times the same small training-like loop (two matmuls and a ReLU per step, torch's default thread count) with
OpenMP's default wait policy and with PASSIVE (threads sleep at a barrier instead of spinning), first on an idle
machine, then with `--burners` processes spinning `while True: pass` (default: one per core), as when other runs,
a batch's other sessions or other users share the cores. Prints one table; the policy changes no result.

    PYTHONPATH=. python bench/run_threads.py [--steps 400] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_under_load import start_burners, stop_burners

LOOP = """
import sys, time, torch
torch.manual_seed(0)
x, w = torch.randn(256, 512), torch.randn(512, 1024)
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    z = torch.relu(x @ w) @ w.T
print(time.perf_counter() - t, float(z.sum()))
"""


def timed(steps: int, policy: str | None) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", LOOP, str(steps)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    rows = []
    for load in ("idle", f"{args.burners} busy processes"):
        burners = start_burners(args.burners) if load != "idle" else []
        try:
            seconds: dict[str, list[float]] = {"default": [], "PASSIVE": []}
            sums = set()
            for _ in range(args.repeat):  # alternated, so drifting load hits both alike
                for name, policy in (("default", None), ("PASSIVE", "PASSIVE")):
                    s, total = timed(args.steps, policy)
                    seconds[name].append(s)
                    sums.add(round(total, 2))
        finally:
            stop_burners(burners)
        d, p = statistics.median(seconds["default"]), statistics.median(seconds["PASSIVE"])
        rows.append((load, d, p, len(sums) == 1))
    print(f"{args.steps} steps, median of {args.repeat}, {os.cpu_count()} CPUs")
    print("| machine | default wait policy | OMP_WAIT_POLICY=PASSIVE | default / PASSIVE | same result |")
    print("|---|---|---|---|---|")
    for load, d, p, same in rows:
        print(f"| {load} | {d:.2f} s | {p:.2f} s | {d / p:.2f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
