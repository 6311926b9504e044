"""Builders of real review-test sessions (scripted replies, a toy template with a plot.py, git checkpoints) and the
headless-Chromium helpers that load a report and read its DOM, console and network log.

Used by tests/test_report.py, tests/test_review_cli.py and bench/report.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orchestrator.config import Settings
from orchestrator.journal import META_DIR
from orchestrator.loop import Driver
from orchestrator.models import make_model
from orchestrator.new_session import create_session
from orchestrator.spec import load_idea
from orchestrator.template import find_template
from tests.session_helpers import REPO, edit, make_idea, make_template

ARTIFACTS = REPO / "test-artifacts"

# plot.py for the report template: draws one bar per run from final_info.json as a PNG, standard library only.
PLOT_PY = '''\
import glob, json, os, struct, zlib


def png(path, width, height, pixel):
    rows = b"".join(b"\\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                 + chunk(b"IEND", b""))


scores = []
for folder in sorted(glob.glob("run_*"), key=lambda p: int(p.split("_")[1])):
    path = os.path.join(folder, "final_info.json")
    if os.path.exists(path):
        scores.append(json.load(open(path))["toy"]["means"]["score"])
width, height, bar = 40 * max(1, len(scores)), 120, 40


def pixel(x, y):
    i = x // bar
    top = height - int(height * scores[i]) if i < len(scores) else height
    return (40, 110, 200) if y >= top and x % bar < bar - 6 else (255, 255, 255)


png("scores.png", width, height, pixel)
print("wrote scores.png for", len(scores), "runs")
'''

TEMPLATE_TOML = '''\
description = "toy template for report tests"
editable = ["experiment.py", "plot.py", "notes.txt"]
timeout_s = 60
key_metrics = ["toy.score", "toy.gap"]

[metrics]
"toy.score" = "higher"
"toy.gap" = "lower"
'''

REASONING = "\n".join(f"reasoning line {i}: LR should go up." for i in range(1, 7))


def report_template(root: Path, baseline_fails: bool = False) -> Path:
    """The toy template of tests/session_helpers.py with a plot.py; optionally an experiment.py that fails."""
    template = make_template(root)
    (template / "template.toml").write_text(TEMPLATE_TOML)
    (template / "plot.py").write_text(PLOT_PY)
    if baseline_fails:
        code = (template / "experiment.py").read_text()
        code = code.replace("    os.makedirs(args.out_dir, exist_ok=True)\n",
                            "    os.makedirs(args.out_dir, exist_ok=True)\n"
                            "    raise SystemExit('dataset not found: /data/toy.csv')\n")
        (template / "experiment.py").write_text(code)
    return template


def drive_scripted(root: Path, replies: list[dict], max_runs: int = 5, plots: bool = True,
                   baseline_fails: bool = False, template: Path | None = None, sandbox: str = "auto") -> Path:
    """Launch the toy idea with scripted replies and drive it until it stops; returns the session folder.
    `template`: a template folder made by the caller (default: `report_template(root)`)."""
    root.mkdir(parents=True, exist_ok=True)
    template = template or report_template(root, baseline_fails)
    idea = make_idea(root)
    script = root / "replies.json"
    script.write_text(json.dumps(replies))
    settings = Settings(model=f"scripted:{script}", root=root / "sessions", plots=plots, sandbox=sandbox)
    session = create_session(load_idea(idea), find_template(str(template)), settings, max_runs)
    Driver(session, make_model(settings.model), settings).drive()
    return session


def completed_replies() -> list[dict]:
    return [
        {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: raise LR to 0.2."), "reasoning": REASONING,
         "prompt_tokens": 900, "completion_tokens": 100, "cached_tokens": 300, "cost_usd": 0.0012},
        {"content": edit("LR = 0.25\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")},  # SEARCH matches nothing
        {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")
         + edit("    score = 1.0 - abs(LR - 0.3)\n", "    raise RuntimeError('exploded on purpose')\n", plan="")},
        {"content": edit("    raise RuntimeError('exploded on purpose')\n", "    score = 1.0 - abs(LR - 0.3)\n",
                         plan="Fix the crash.")},
        {"content": edit("LR = 0.3\n", "LR = 0.6\n", plan="Run 3: overshoot to LR 0.6.")},
        {"content": "Everything planned is done.\n\nALL_COMPLETED"},
        {"content": "plot.py already compares every run."},
        {"content": edit("# Notes\n", "# Notes\nrun_2 (LR 0.3) scored best; scores.png shows every run.\n",
                         path="notes.txt", plan="Notes.")},
    ]


def completed_session(root: Path) -> Path:
    return drive_scripted(root, completed_replies())


def failed_session(root: Path) -> Path:
    """The baseline's experiment.py exits 1: the session fails before the model is asked anything."""
    return drive_scripted(root, [{"content": "ALL_COMPLETED"}], baseline_fails=True)


def interrupted_session(root: Path) -> Path:
    """Run 1 succeeds, run 2's first attempt crashes, then the scripted model has no reply left."""
    return drive_scripted(root, completed_replies()[:1] + completed_replies()[2:3])


def cut_journal_mid_run(session: Path, run: int) -> None:
    """Leave the journal as a crash during `run` would: everything after its last run_started is gone."""
    path = session / META_DIR / "journal.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines)
              if json.loads(line)["kind"] == "run_started" and json.loads(line)["data"].get("run") == run]
    path.write_text("".join(lines[: starts[-1] + 1]))


# --------------------------------------------------------------------------------------------------- Chromium


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


def need_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is required in CI (Debian package `chromium`)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


@dataclass
class PageLoad:
    dom: str
    console: list[str]  # every console message (the report has no script, so any message is a problem)
    requests: list[str]  # network requests the page made (Chromium's own background traffic left out)


def _chromium_args(profile: Path) -> list[str]:
    return [need_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={profile}"]


def _page_requests(netlog: Path) -> list[str]:
    """URLs of requests whose top frame was the file: page loads are keyed by the page's file:// site."""
    text = netlog.read_text(encoding="utf-8", errors="replace")
    try:
        log = json.loads(text)
    except json.JSONDecodeError:
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    kinds = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls = []
    for ev in log.get("events", []):
        p = ev.get("params") or {}
        if kinds.get(ev["type"]) == "URL_REQUEST_START_JOB" and "url" in p:
            if "file://" in str(p.get("network_isolation_key", "")) or p.get("initiator") == "null":
                urls.append(p["url"])
    return urls


def load_page(page: Path, workdir: Path) -> PageLoad:
    workdir.mkdir(parents=True, exist_ok=True)
    netlog = workdir / "netlog.json"
    proc = subprocess.run(
        [*_chromium_args(workdir / "profile"), "--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return PageLoad(dom=proc.stdout, console=console, requests=_page_requests(netlog))


def screenshot(page: Path, out: Path, workdir: Path, size: tuple[int, int] = (1280, 2000),
               scrollbars: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*_chromium_args(workdir / "profile-shot"), f"--screenshot={out}",
                    f"--window-size={size[0]},{size[1]}", *([] if scrollbars else ["--hide-scrollbars"]),
                    page.resolve().as_uri()], capture_output=True, timeout=120, check=True)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "srcset", "data", "poster")]


def link_targets(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


def text_of(html: str, element_id: str) -> str:
    """The text inside the element with this id (tags stripped), from a serialized DOM."""
    start = html.index(f'id="{element_id}"')
    tag = html.rfind("<", 0, start)
    name = re.match(r"<(\w+)", html[tag:]).group(1)  # type: ignore[union-attr]
    end = html.index(f"</{name}>", start)
    return re.sub(r"<[^>]+>", " ", html[start:end])


# --------------------------------------------------------------------------------------------------- a wide table

WIDE_METRICS = ["summary.mcc_clean", "summary.mcc_contaminated", "summary.mcc_drop", "summary.ev_contaminated",
                "summary.explained_variance_clean"]


def wide_session(root: Path, runs: int = 10) -> Path:
    """A 10-run session whose results table is as wide as real ones get: five long key metric names (as the SAE
    template's), values with standard errors and changes against the baseline, large token counts and costs."""
    root.mkdir(parents=True, exist_ok=True)
    template = report_template(root)
    toml = (template / "template.toml").read_text()
    toml = re.sub(r"key_metrics = \[.*\]", "key_metrics = " + json.dumps(WIDE_METRICS), toml)
    toml = toml.split("[metrics]")[0] + "[metrics]\n" + "".join(
        f'"{m}" = "{"lower" if m.endswith("drop") else "higher"}"\n' for m in WIDE_METRICS)
    (template / "template.toml").write_text(toml)
    code = (template / "experiment.py").read_text()
    old = '    info = {"toy": {"means": {"score": score, "gap": abs(LR - 0.3)}, "stderrs": {"score": 0.01, "gap": 0.0}}}\n'
    assert old in code
    names = [m.split(".", 1)[1] for m in WIDE_METRICS]
    code = code.replace(old, old.rstrip("}\n") + "}},\n"
                        f'            "summary": {{"means": {{n: score * (k + 1.123456) / 7.654321 for k, n in '
                        f"enumerate({names!r})}},\n"
                        f'                        "stderrs": {{n: 0.00123456 * (k + 1) for k, n in '
                        f"enumerate({names!r})}}}}}}\n")
    (template / "experiment.py").write_text(code)
    replies = []
    lr = 0.1
    for i in range(runs):
        new = round(lr + 0.0123, 4)
        replies.append({"content": edit(f"LR = {lr}\n", f"LR = {new}\n", plan=f"Run {i + 1}: LR {new}."),
                        "prompt_tokens": 1_234_567, "completion_tokens": 98_765, "cost_usd": 12.345678})
        lr = new
    return drive_scripted(root, replies, max_runs=runs, plots=False, template=template)


def measure_results_table(page: Path, workdir: Path, width: int = 1400) -> dict:
    """Lay the report out in headless Chromium at `width` px and measure its results table: the page's and the
    table's scroll widths against their visible widths, and each header cell's right edge against the viewport.
    Works on a copy with one measuring script (the report itself runs none; its CSP is relaxed for that script)."""
    from orchestrator.report_html import CSP

    workdir.mkdir(parents=True, exist_ok=True)
    script = ("<script>addEventListener('load',()=>{const t=document.getElementById('results-table');"
              "let box=t.parentElement;const d=document.documentElement;"
              "const r={viewport:innerWidth,page_scroll:d.scrollWidth,page_client:d.clientWidth,"
              "table_right:t.getBoundingClientRect().right,"
              "box_scroll:box.scrollWidth,box_client:box.clientWidth,box_right:box.getBoundingClientRect().right,"
              "headers:[...t.querySelectorAll('thead th')].map(h=>[h.textContent,h.getBoundingClientRect().right])};"
              "document.body.setAttribute('data-layout',JSON.stringify(r));});</script>")
    text = page.read_text(encoding="utf-8").replace(CSP, CSP + "; script-src 'unsafe-inline'")
    copy = workdir / "measured.html"
    copy.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    proc = subprocess.run([*_chromium_args(workdir / "profile-measure"), f"--window-size={width},900", "--dump-dom",
                           copy.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'data-layout="([^"]*)"', proc.stdout)
    assert found, "the measuring script did not run"
    import html as html_mod

    return json.loads(html_mod.unescape(found.group(1)))
