"""A new session folder: claim a fresh name, copy the template, make it a git repo and journal the launch.

Kept apart from the driver (loop.py) so that `launch` reaches its first line, the session folder, without loading
what only driving needs (edits, the conversation rules, leases, executors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import prompts
from orchestrator.atomic import write_text_atomic
from orchestrator.config import ConfigError, Settings, public_dump
from orchestrator.journal import (
    IDEA_FILE,
    META_DIR,
    SETTINGS_FILE,
    Journal,
    rebuild,
    write_model_atomic,
    write_snapshot,
)
from orchestrator.secrets import redact_obj
from orchestrator.spec import IdeaSpec
from orchestrator.template import Template, baseline_reusable, copy_template
from orchestrator.workspace import Workspace

if TYPE_CHECKING:
    from orchestrator.models import Model


def session_dir_name(idea: IdeaSpec, now: datetime | None = None) -> str:
    stamp = (now or datetime.now()).strftime("%Y-%m-%dT%H-%M-%S")
    return f"{stamp}_{idea.name}"


def claim_session_dir(root: Path, name: str) -> Path:
    """Create and return `root/name`, or `root/name-2`, `-3` ... when taken. `os.mkdir` either creates the folder
    or fails, so two launches in the same second (or two batch sessions) never share a folder."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"root {root} is a file, not a folder for session folders")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        session = root / (name if n == 1 else f"{name}-{n}")
        try:
            os.mkdir(session)
        except FileExistsError:
            continue
        return session
    raise ConfigError(f"no free session folder name for {name!r} under {root}")


def create_session(idea: IdeaSpec, template: Template, settings: Settings, max_runs: int,
                   now: datetime | None = None, on_claimed: Callable[[Path], None] | None = None,
                   on_journaled: Callable[[Path], None] | None = None) -> Path:
    """Copy the template into a fresh session folder, make it a git repo and journal the launch. `on_claimed` is
    called with the folder as soon as it exists; `on_journaled` once its journal holds the launch, so the folder is
    one that `status` and `resume` can read (before the snapshot, session.json, is written: readers rebuild it from
    the journal)."""
    session = claim_session_dir(Path(settings.root), session_dir_name(idea, now))
    if on_claimed is not None:
        on_claimed(session)
    try:
        copy_template(template, session)
    except BaseException:
        with suppress(OSError):
            session.rmdir()
        raise
    reuse = baseline_reusable(template)
    ws = Workspace.init(session)
    meta = session / META_DIR
    meta.mkdir(exist_ok=True)
    write_model_atomic(meta / IDEA_FILE, idea)
    write_text_atomic(meta / SETTINGS_FILE, settings_file_text(settings, max_runs))
    system = prompts.render("system", {"template_system": template.system_prompt})
    journal = Journal(session, redact=redact_obj)
    journal.append(
        "session_started",
        idea=idea.model_dump(mode="json"),
        template=template.model_dump(mode="json"),
        model=settings.model,
        max_runs=max_runs,
        baseline_reusable=reuse,
        commit=ws.head(),
        system_prompt=system,
    )
    if on_journaled is not None:
        on_journaled(session)
    write_snapshot(session, rebuild(journal.events(), session))
    return session


def settings_file_text(settings: Settings, max_runs: int | None) -> str:
    """A session's settings.json: the public settings (nothing secret) and its number of runs."""
    return json.dumps(public_dump(settings) | {"max_runs": max_runs}, indent=2, default=str) + "\n"


def check_budget_enforceable(settings: Settings, model: Model) -> None:
    """A dollar budget needs prices: refuse it for a model whose price litellm does not know, unless a token
    budget bounds the session too (its calls would count as $0 and the budget would never stop anything)."""
    if settings.budget_usd is not None and settings.max_tokens_total is None and not model.price_known():
        raise ConfigError(f"--budget-usd cannot be enforced: litellm does not know the price of {settings.model!r}; "
                          "add --max-tokens-total N to bound the session")
