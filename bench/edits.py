"""Benchmark the SEARCH/REPLACE applier on the corpus of model replies in tests/edit_corpus/.

    PYTHONPATH=. .venv/bin/python bench/edits.py                      # ours only
    PYTHONPATH=. .venv/bin/python bench/edits.py --aider-python /tmp/aider-venv/bin/python   # side by side

Each case: before/ files, reply.md, case.json (expect: applied | already_applied | no_edits | rejected), after/.
Outcome per case and engine:
  applied correctly   the reply was accepted and every file reads as after/ (unchanged for already_applied/no_edits)
  rejected correctly  a reply expected to be rejected was refused and no file changed
  missed              a good reply was refused, files unchanged (safe: the model gets feedback and retries)
  accepted bad        a reply expected to be rejected was reported as fine, though no file changed
  wrong edit          the reply was reported fine, yet a file differs from after/ (or changed, for a reply expected
                      to be rejected)
  partial write       the reply was reported failed (some block did not apply), yet files changed
Exit status 1 when our engine makes any wrong edit or partial write.

aider (optional) runs in its own virtualenv, through a small adapter (ADAPTER below) that does what aider's
EditBlockCoder.apply_updates does: find_original_update_blocks, then do_replace per block, writing each file as
soon as its block applies (with aider's fallback to the other files in the chat), reading and writing through
aider's own InputOutput. Files a user would not let it touch (outside the editable globs, protected, absolute,
'..', .git/) are skipped, as a careful user answering aider's confirm prompts would; new editable files are created.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.edits import DEFAULT_EDITABLE, apply_edits, parse_edits

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "edit_corpus"
OUTCOMES = (
    "applied correctly",
    "rejected correctly",
    "missed",
    "accepted bad",
    "wrong edit",
    "partial write",
)
UNSAFE = ("wrong edit", "partial write")


@dataclass
class Case:
    name: str
    path: Path
    category: str
    expect: str
    editable: tuple[str, ...]
    protected: tuple[str, ...]
    reply: str
    before: dict[str, bytes]
    expected: dict[str, bytes]


@dataclass
class EngineRun:
    name: str
    outcomes: dict[str, str] = field(default_factory=dict)  # case name -> outcome
    seconds: float = 0.0  # parse + match + atomic writes (fsync)
    match_seconds: float | None = None  # parse + match only (dry run), where the engine can do that
    blocks: int = 0
    notes: dict[str, str] = field(default_factory=dict)


def tree(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_cases(corpus: Path = CORPUS) -> list[Case]:
    cases = []
    for d in sorted(p for p in corpus.iterdir() if (p / "case.json").is_file()):
        meta = json.loads((d / "case.json").read_text())
        before = tree(d / "before")
        cases.append(
            Case(
                name=d.name,
                path=d,
                category=meta["category"],
                expect=meta["expect"],
                editable=tuple(meta.get("editable", DEFAULT_EDITABLE)),
                protected=tuple(meta.get("protected", ())),
                reply=(d / "reply.md").read_bytes().decode("utf-8"),
                before=before,
                expected=tree(d / "after") if (d / "after").is_dir() else before,
            )
        )
    return cases


def classify(case: Case, ok: bool, after: dict[str, bytes]) -> str:
    if not ok and after != case.before:
        return "partial write"
    if case.expect == "rejected":
        if after != case.before:
            return "wrong edit"
        return "accepted bad" if ok else "rejected correctly"
    if after == case.expected and ok:
        return "applied correctly"
    if after == case.before:
        return "missed"
    return "wrong edit"


def run_ours(cases: list[Case], work: Path, repeat: int) -> EngineRun:
    run = EngineRun("orchestrator.edits", match_seconds=0.0)
    for case in cases:
        try:
            blocks = len(parse_edits(case.reply))
        except ValueError:
            blocks = 1
        for attempt in range(repeat):
            root = work / "ours" / case.name / str(attempt)
            shutil.copytree(case.path / "before", root)
            start = time.perf_counter()
            apply_edits(root, case.reply, editable=case.editable, protected=case.protected, dry_run=True)
            run.match_seconds += time.perf_counter() - start
            start = time.perf_counter()
            result = apply_edits(root, case.reply, editable=case.editable, protected=case.protected)
            run.seconds += time.perf_counter() - start
            run.blocks += blocks
            if attempt == 0:
                run.outcomes[case.name] = classify(case, result.ok, tree(root))
                if not result.ok:
                    run.notes[case.name] = result.feedback.splitlines()[0] if result.feedback else ""
    return run


ADAPTER = r"""
import fnmatch, json, sys, time
from pathlib import Path, PurePosixPath
from aider.coders.editblock_coder import DEFAULT_FENCE, do_replace, find_original_update_blocks
from aider.io import InputOutput

io = InputOutput(pretty=False, yes=True, fancy_input=False)
jobs = json.loads(Path(sys.argv[1]).read_text())
out = []

def permitted(rel, editable, protected):
    p = rel.strip().replace("\\", "/")
    if not p or p.startswith("/") or p.startswith("~"):
        return None
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if not parts or ".." in parts or ".git" in parts or ".orchestrator" in parts:
        return None
    rel = "/".join(parts)
    if not any(fnmatch.fnmatchcase(rel, g) for g in editable) or any(fnmatch.fnmatchcase(rel, g) for g in protected):
        return None
    return rel

for job in jobs:
    root = Path(job["root"])
    in_chat = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                     and permitted(p.relative_to(root).as_posix(), job["editable"], job["protected"]))
    start = time.perf_counter()
    ok, note, blocks = True, "", 0
    try:
        edits = [e for e in find_original_update_blocks(job["reply"], DEFAULT_FENCE, in_chat) if e[0] is not None]
        blocks = len(edits)
        abs_fnames = [str(root / f) for f in in_chat]
        allowed = []
        for path, original, updated in edits:          # prepare_to_edit: confirm new / not-in-chat files
            rel = permitted(path, job["editable"], job["protected"])
            if rel is None:
                continue
            full = root / rel
            if not full.exists():
                full.parent.mkdir(parents=True, exist_ok=True)
                full.touch()
            if str(full) not in abs_fnames:
                abs_fnames.append(str(full))
            allowed.append((rel, original, updated))
        failed = 0
        for rel, original, updated in allowed:         # EditBlockCoder.apply_edits
            full = root / rel
            new = None
            if full.exists():
                new = do_replace(str(full), io.read_text(str(full)), original, updated, DEFAULT_FENCE)
            if not new and original.strip():
                for other in abs_fnames:
                    new = do_replace(other, io.read_text(other), original, updated, DEFAULT_FENCE)
                    if new:
                        full = Path(other)
                        break
            if new:
                io.write_text(str(full), new)
            else:
                failed += 1
        if failed:
            ok, note = False, f"{failed} block(s) failed to match"
    except ValueError as exc:
        ok, note = False, "parse error: " + str(exc).splitlines()[0]
    out.append({"name": job["name"], "ok": ok, "note": note, "seconds": time.perf_counter() - start,
                "blocks": blocks})
print(json.dumps(out))
"""


def run_aider(cases: list[Case], work: Path, python: str) -> EngineRun:
    run = EngineRun("aider (editblock_coder)")
    jobs = []
    for case in cases:
        root = work / "aider" / case.name
        shutil.copytree(case.path / "before", root)
        jobs.append(
            {
                "name": case.name,
                "root": str(root),
                "reply": case.reply,
                "editable": list(case.editable),
                "protected": list(case.protected),
            }
        )
    job_file = work / "aider_jobs.json"
    job_file.write_text(json.dumps(jobs))
    proc = subprocess.run(
        [python, "-c", ADAPTER, str(job_file)], capture_output=True, text=True, cwd=work, timeout=600
    )
    if proc.returncode != 0:
        raise SystemExit(f"the aider adapter failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    results = {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    for case in cases:
        r = results[case.name]
        run.outcomes[case.name] = classify(case, r["ok"], tree(work / "aider" / case.name))
        run.seconds += r["seconds"]
        run.blocks += r["blocks"]
        if r["note"]:
            run.notes[case.name] = r["note"]
    return run


def render(cases: list[Case], runs: list[EngineRun], console: Console) -> None:
    expect = Counter(c.expect for c in cases)
    good = sum(v for k, v in expect.items() if k != "rejected")
    table = Table(
        title=f"SEARCH/REPLACE appliers on {len(cases)} model replies ({good} to apply, "
        f"{expect['rejected']} to reject)"
    )
    table.add_column("engine")
    table.add_column("cases", justify="right")
    for outcome in OUTCOMES:
        table.add_column(outcome, justify="right")
    table.add_column("time / block\n(match)", justify="right")
    table.add_column("time / block\n(with writes)", justify="right")
    for run in runs:
        counts = Counter(run.outcomes.values())
        per_block = run.seconds / run.blocks * 1e6 if run.blocks else 0.0
        match = (
            "-"
            if run.match_seconds is None or not run.blocks
            else f"{run.match_seconds / run.blocks * 1e6:,.0f} µs"
        )
        cells = [
            (f"[bold red]{counts[o]}[/]" if counts[o] else f"[green]{counts[o]}[/]")
            if o in UNSAFE
            else str(counts[o])
            for o in OUTCOMES
        ]
        table.add_row(run.name, str(len(run.outcomes)), *cells, match, f"{per_block:,.0f} µs")
    console.print(table)

    by_cat = Table(title="correct outcomes per category (applied or rejected as expected)")
    by_cat.add_column("category")
    by_cat.add_column("cases", justify="right")
    for run in runs:
        by_cat.add_column(run.name, justify="right")
    cats: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        cats[case.category].append(case)
    for cat, members in cats.items():
        cells = []
        for run in runs:
            right = sum(run.outcomes[c.name] in ("applied correctly", "rejected correctly") for c in members)
            wrong = sum(run.outcomes[c.name] in UNSAFE for c in members)
            cells.append(f"{right}" + (f" [red]({wrong} wrong)[/]" if wrong else ""))
        by_cat.add_row(cat, str(len(members)), *cells)
    console.print(by_cat)

    for run in runs:
        bad = [
            name for name, o in run.outcomes.items() if o not in ("applied correctly", "rejected correctly")
        ]
        if bad:
            console.print(f"[bold]{run.name}[/]: " + ", ".join(f"{n} ({run.outcomes[n]})" for n in bad))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aider-python", help="python of a virtualenv with aider-chat installed")
    parser.add_argument("--repeat", type=int, default=5, help="applications per case, for timing (default 5)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args(argv)
    console = Console()
    cases = load_cases(args.corpus)
    with tempfile.TemporaryDirectory(prefix="bench-edits-") as tmp:
        work = Path(tmp)
        runs = [run_ours(cases, work, max(1, args.repeat))]
        if args.aider_python:
            runs.append(run_aider(cases, work, args.aider_python))
    render(cases, runs, console)
    counts = Counter(runs[0].outcomes.values())
    return 1 if any(counts[o] for o in UNSAFE) else 0


if __name__ == "__main__":
    sys.exit(main())
