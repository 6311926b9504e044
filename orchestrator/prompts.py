"""Renders the prompt texts in `prompts/` (one file per situation) with a session's context."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from string import Template

import orchestrator
from orchestrator.errors import OrchestratorError


class PromptError(OrchestratorError, LookupError):
    """A prompt file is missing or refers to a value the caller did not give."""


def prompts_dir() -> Path:
    """Prompts ship inside the wheel; in a source checkout they sit at the repository's top level."""
    package = Path(orchestrator.__file__).parent
    shipped = package / "_shipped" / "prompts"
    return shipped if shipped.is_dir() else package.parent / "prompts"


def render(situation: str, context: Mapping[str, object]) -> str:
    """Fill `prompts/<situation>.md` with `context` ($name placeholders). Every placeholder must be given."""
    path = prompts_dir() / f"{situation}.md"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"no prompt file for situation {situation!r} ({path})") from None
    try:
        rendered = Template(text).substitute({k: str(v) for k, v in context.items()})
    except KeyError as exc:
        raise PromptError(f"prompt {situation!r} needs a value for ${exc.args[0]}") from None
    return _tidy(rendered)


def files_block(files: Mapping[str, str]) -> str:
    """The current text of the editable files, each under its path, fenced so that the model sees exact lines."""
    parts = []
    for path, text in files.items():
        fence = "````" if "```" in text else "```"
        lang = "python" if path.endswith(".py") else ""
        body = text if text.endswith("\n") or not text else text + "\n"
        parts.append(f"{path}\n{fence}{lang}\n{body}{fence}")
    return "\n\n".join(parts) if parts else "(no editable files)"


def _tidy(text: str) -> str:
    """Trim the ends only: substituted values (file texts above all) must reach the model byte for byte."""
    return text.strip("\n")
