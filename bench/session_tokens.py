"""How many prompt tokens a 10-run session sends.

Drives a real 10-run session on the SAE template (fast preset) with scripted replies that each change one
hyperparameter, then counts the tokens of every request exactly as it was sent (from transcript.jsonl) with
litellm's token counter for deepseek/deepseek-reasoner. Prints one row per model call and the totals.

    PYTHONPATH=. python bench/session_tokens.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.config import load_settings
from orchestrator.loop import Driver
from orchestrator.models import make_model
from orchestrator.new_session import create_session
from orchestrator.spec import load_idea
from orchestrator.template import find_template

PLAN = ("This run tests a sparser code: a larger L1 coefficient should cut L0 towards the true L0 and may help the "
        "contaminated condition, at some cost in explained variance. I change only the CPU preset.")


def scripted_replies(experiment: str) -> list[dict]:
    line = next(line for line in experiment.splitlines() if line.strip().startswith('"cpu": dict('))
    replies = []
    current = line
    for i in range(10):
        new = current.replace(current[current.index("l1_coeff="):].split(")")[0], f"l1_coeff={0.5 + 0.05 * (i + 1):.2f}")
        replies.append({
            "content": f"Run {i + 1}: l1_coeff {0.5 + 0.05 * (i + 1):.2f}.\n\n{PLAN}\n\nexperiment.py\n```python\n"
                       f"<<<<<<< SEARCH\n{current}\n=======\n{new}\n>>>>>>> REPLACE\n```\n",
            "reasoning": "Looking at the last results, the next step of the sweep is the natural one. " * 20,
            "completion_tokens": 350,
        })
        current = new
    # All ten runs are used, so the session goes straight on to the plot and notes steps.
    replies.append({"content": "plot.py already compares every run; no change needed."})
    replies.append({"content": "notes.txt\n```\n<<<<<<< SEARCH\n# Notes\n=======\n# Notes\nA sweep of l1_coeff.\n"
                               ">>>>>>> REPLACE\n```\n"})
    return replies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="keep the session under this folder")
    args = parser.parse_args()

    import litellm

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_tokens_"))
    sae = find_template("sae")
    replies_file = root / "replies.yaml"
    root.mkdir(parents=True, exist_ok=True)
    replies_file.write_text(yaml.safe_dump(scripted_replies((sae.path / "experiment.py").read_text())))
    settings = load_settings({"model": f"scripted:{replies_file}", "root": root / "sessions",
                              "env": {"SAE_FAST": "1"}})
    idea = load_idea(sae.path / "ideas" / "median_mad_sae.json")
    session = create_session(idea, sae, settings, max_runs=10)
    Console(stderr=True).print(f"session: {session} (11 runs of about 10 s each)")
    state = Driver(session, make_model(settings.model), settings).drive()

    table = Table(title="Prompt tokens per model call (deepseek/deepseek-reasoner tokenizer)", title_justify="left")
    for col in ("call", "stage", "run", "messages", "prompt tokens"):
        table.add_column(col, justify="right")
    total = 0
    records = [json.loads(line) for line in (session / ".orchestrator" / "transcript.jsonl").read_text().splitlines()]
    prompts = [e for e in (json.loads(x) for x in (session / ".orchestrator" / "journal.jsonl").read_text().splitlines())
               if e["kind"] == "reply"]
    for i, (rec, ev) in enumerate(zip(records, prompts, strict=True), 1):
        n = litellm.token_counter(model="deepseek/deepseek-reasoner", messages=rec["request"])
        total += n
        table.add_row(str(i), ev["data"]["stage"], str(ev["data"]["run"] or "-"), str(len(rec["request"])), f"{n:,}")
    table.caption = (f"{len(records)} calls, {total:,} prompt tokens in all; status {state.session.status}, "
                     f"{sum(1 for r in state.runs if r.status == 'ok') - 1} successful runs after the baseline")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
