"""Bench: the HTML report of a 10-run session must stay under 5 MB and render in under 2 s in headless Chromium.

Builds a 10-run session with scripted replies on the toy template (each run adds ~60 lines of code, 40 metrics per
run, reasoning on every reply, matplotlib figures from plot.py when matplotlib is installed), writes its report,
and loads it in Chromium three times. Prints one table.

    PYTHONPATH=. .venv/bin/python bench/report.py [--keep DIR]

Render time is measured two ways: in the page (performance.now() at the load event, from a copy of the report
with one timing script added) and from outside (wall time of `chromium --dump-dom` on the report minus the same
on an empty page, i.e. the browser's own start-up left out).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.journal import load_state
from orchestrator.report_html import CSP, render_report, write_report
from tests.report_helpers import CHROMIUM, REASONING, drive_scripted, report_template
from tests.session_helpers import edit

MAX_BYTES = 5_000_000
MAX_RENDER_S = 2.0
RUNS = 10
REPEATS = 3

MATPLOTLIB_PLOT = '''\
import glob, json, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs = sorted((p for p in glob.glob("run_*") if os.path.exists(os.path.join(p, "final_info.json"))),
              key=lambda p: int(p.split("_")[1]))
infos = [json.load(open(os.path.join(p, "final_info.json"))) for p in runs]
names = list(infos[0]["eval"]["means"])[:12]
for fig_i, (title, key) in enumerate([("score", "toy"), ("eval metrics", "eval"), ("eval metrics (log)", "eval")]):
    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    for name in (["score", "gap"] if key == "toy" else names):
        ax.plot(range(len(infos)), [i[key]["means"][name] for i in infos], marker="o", label=name)
    if "log" in title:
        ax.set_yscale("log")
    ax.set_xlabel("run"); ax.set_title(title); ax.legend(ncol=3, fontsize=8); ax.grid(alpha=.3)
    fig.savefig(f"figure_{fig_i}.png"); plt.close(fig)
'''


def extra_code(i: int) -> str:
    body = "".join(f"    value_{k} = math.sin({i} * {k} + LR) * {k}  # run {i}: feature {k}\n" for k in range(55))
    return f"\n\ndef helper_{i}():\n    import math\n{body}    return value_0\n"


def bench_replies() -> list[dict]:
    replies = []
    lr = 0.1
    for i in range(RUNS):
        new = round(lr + 0.02, 2)
        replies.append({"content": edit(f"LR = {lr}\n", f"LR = {new}\n{extra_code(i + 1)}",
                                        plan=f"Run {i + 1}: LR {new} and helper_{i + 1}."),
                        "reasoning": REASONING * 30, "prompt_tokens": 12_000, "completion_tokens": 1_500,
                        "cost_usd": 0.004})
        lr = new
    replies.append({"content": "plot.py already compares every run."})
    replies.append({"content": edit("# Notes\n", "# Notes\n" + "Run notes line.\n" * 40, path="notes.txt",
                                    plan="Notes.")})
    return replies


def build_session(root: Path) -> Path:
    """A 10-run toy session: 40 extra metrics per run, and matplotlib figures when matplotlib is there."""
    root.mkdir(parents=True, exist_ok=True)
    template = report_template(root)
    code = (template / "experiment.py").read_text()
    old = '    info = {"toy": {"means": {"score": score, "gap": abs(LR - 0.3)}, "stderrs": {"score": 0.01, "gap": 0.0}}}\n'
    assert old in code
    code = code.replace(old, old.rstrip("}\n") + '}},\n'
                        '            "eval": {"means": {f"metric_{k}": (k + 1) * score for k in range(40)}}}\n')
    (template / "experiment.py").write_text(code)
    try:
        import matplotlib  # noqa: F401

        (template / "plot.py").write_text(MATPLOTLIB_PLOT)
    except ImportError:
        pass
    return drive_scripted(root, bench_replies(), max_runs=RUNS, template=template)


def chromium(page: Path, profile: Path) -> tuple[float, str]:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    return time.perf_counter() - start, proc.stdout


def timed_copy(report: Path, out: Path) -> Path:
    """The report with one script that writes the load time into the DOM (the CSP lets only that script run)."""
    script = ("<script>addEventListener('load',()=>{document.body.setAttribute('data-load-ms',"
              "String(performance.now()));});</script>")
    text = report.read_text(encoding="utf-8").replace(CSP, CSP + "; script-src 'unsafe-inline'")
    out.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the session here and keep it")
    args = parser.parse_args()
    if CHROMIUM is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.keep or tmp / "session"
        t0 = time.perf_counter()
        session = build_session(root)
        build_s = time.perf_counter() - t0
        state = load_state(session)
        ok_runs = sum(r.status == "ok" and r.run > 0 for r in state.runs)
        python_s = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            render_report(session)
            python_s.append(time.perf_counter() - t0)
        report = write_report(session)
        size = report.stat().st_size
        empty = tmp / "empty.html"
        empty.write_text("<!DOCTYPE html><html><body></body></html>")
        timed = timed_copy(report, tmp / "timed.html")
        chromium(empty, tmp / "profile")  # first start warms the profile and disk caches
        wall_empty, wall_report, in_page = [], [], []
        for _ in range(REPEATS):
            wall_empty.append(chromium(empty, tmp / "profile")[0])
            wall_report.append(chromium(report, tmp / "profile")[0])
            dom = chromium(timed, tmp / "profile")[1]
            found = re.search(r'data-load-ms="([\d.]+)"', dom)
            in_page.append(float(found.group(1)) / 1000 if found else float("nan"))
    load_s = statistics.median(in_page)
    outside_s = statistics.median(wall_report) - statistics.median(wall_empty)
    rows = [
        ("session", f"{ok_runs} runs + baseline, {len(state.session.figures)} figures, built in {build_s:.1f} s",
         "", ""),
        ("report size", f"{size:,} bytes", f"< {MAX_BYTES:,}", "ok" if size < MAX_BYTES else "OVER"),
        ("render in Python (median)", f"{statistics.median(python_s):.3f} s", "", ""),
        ("Chromium: load event (in page, median)", f"{load_s:.3f} s", f"< {MAX_RENDER_S} s",
         "ok" if load_s < MAX_RENDER_S else "OVER"),
        ("Chromium: --dump-dom wall, report - empty page", f"{outside_s:.3f} s", f"< {MAX_RENDER_S} s",
         "ok" if outside_s < MAX_RENDER_S else "OVER"),
        ("Chromium: --dump-dom wall, empty page (start-up)", f"{statistics.median(wall_empty):.3f} s", "", ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("measure", "value", "limit", "")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0 if size < MAX_BYTES and load_s < MAX_RENDER_S else 1


if __name__ == "__main__":
    sys.exit(main())
