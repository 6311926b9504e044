"""A toy experiment for batch tests and bench/batch.py: it sleeps, and records which device it saw and when.

How long run_i sleeps comes from durations.json, keyed by the idea's name (the session folder's name after its
time stamp) and the run number, so a batch gives the same per-session results whichever session's run starts
first. A value of "crash" exits 1, "hang" sleeps until killed. SLEEP_SCALE (default 1) scales every duration.
"""

import argparse
import json
import os
import re
import time
from pathlib import Path

# edits from the model go below this line
# runs so far


def idea_name() -> str:
    folder = Path.cwd().name  # 2026-11-29T10-00-00_<idea>, or <...>-2 when two launched in the same second
    return re.sub(r"-\d+\Z", "", folder.split("_", 1)[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    out = Path(parser.parse_args().out_dir)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    run = int(out.name.rsplit("_", 1)[-1])
    table = json.loads(Path("durations.json").read_text())
    plan = table.get(idea_name(), table["default"])
    what = plan[run % len(plan)]
    seen = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "pid": os.getpid()}
    (out / "slot.json").write_text(json.dumps(seen))
    if what == "crash":
        raise SystemExit("crashed on purpose (durations.json says crash)")
    if what == "hang":
        while True:
            time.sleep(1)
    seconds = float(what) * float(os.environ.get("SLEEP_SCALE", "1"))
    time.sleep(seconds)
    seen["end"] = time.time()
    (out / "slot.json").write_text(json.dumps(seen))
    result = {"sleep": {"means": {"planned_s": float(what), "score": round(100 - float(what) * run, 3)}}}
    (out / "final_info.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
