"""Idea specs: what a session tries. Loaded from JSON, TOML or YAML files, one idea or a list of them.

AI-Scientist idea files (`seed_ideas.json`, `ideas/*.json`) load as they are: their keys (`Name`, `Title`,
`Experiment`, `Implementation_Plan`, `Interestingness`, ...) are matched without regard to case, the ones we know
become fields and the rest are kept in `extra`.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import OrchestratorError

NAME_MAX = 64
SUFFIXES = (".json", ".toml", ".yaml", ".yml")
_MAX_LISTED = 30

# Our field -> the normalised keys (lower case, '-' and ' ' as '_') that fill it, first found wins.
_ALIASES: dict[str, tuple[str, ...]] = {
    "name": ("name",),
    "title": ("title",),
    "experiment": ("experiment",),
    "plan": ("plan", "implementation_plan", "technical_details"),
    "template": ("template",),
    "max_runs": ("max_runs",),
}


class SpecError(OrchestratorError, ValueError):
    """An idea file that cannot be used; the message is one line naming the file and the problem."""


def slugify(text: str) -> str:
    """Lower case; every run of characters outside [a-z0-9_-] becomes one '_'; at most 64 characters."""
    slug = re.sub(r"[^a-z0-9_-]+", "_", text.strip().lower()).strip("_-")
    return slug[:NAME_MAX].rstrip("_-")


class IdeaSpec(BaseModel):
    """One idea: what `orchestrator launch IDEA` takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    title: str
    experiment: str
    plan: str | None = None
    template: str | None = None
    max_runs: int | None = Field(None, ge=1, le=10)
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name, title = data.get("name"), data.get("title")
        if isinstance(name, int | float) and not isinstance(name, bool):
            name = data["name"] = str(name)
        if title is None and isinstance(name, str) and name.strip():
            title = data["title"] = name.strip()
        source = name if name is not None and not (isinstance(name, str) and not name.strip()) else title
        if isinstance(source, str):
            slug = slugify(source)
            if not slug:
                raise ValueError(f"name {source!r} has no letters or digits to make a name from")
            data["name"] = slug
        for key in ("title", "experiment", "plan", "template"):
            if isinstance(data.get(key), str):
                data[key] = data[key].strip()
                if not data[key]:
                    if key in ("title", "experiment"):
                        raise ValueError(f"'{key}' is empty")
                    data[key] = None
        return data


# ------------------------------------------------------------------------------------------------------ loading


def _norm_key(key: str) -> str:
    return re.sub(r"[\s-]+", "_", key.strip().lower())


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _one_line_validation(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    kind = e["type"]
    ctx = e.get("ctx") or {}
    if kind == "missing":
        return f"missing field '{loc}'"
    if kind == "less_than_equal":
        return f"'{loc}' must be at most {ctx.get('le')}, got {e['input']!r}"
    if kind == "greater_than_equal":
        return f"'{loc}' must be at least {ctx.get('ge')}, got {e['input']!r}"
    if kind == "string_type":
        return f"'{loc}' must be text, got {_describe(e['input'])}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"'{loc}' must be a whole number, got {e['input']!r}"
    if kind == "value_error":
        return str(ctx.get("error") or e["msg"])
    msg = e["msg"]
    return f"'{loc}': {msg}" if loc else msg


def _to_spec(raw: Any, where: str) -> IdeaSpec:
    """One raw mapping (as read from a file) -> IdeaSpec; `where` prefixes errors ('f.json: idea 2')."""
    if not isinstance(raw, dict):
        raise SpecError(
            f"{where}: an idea must be an object with 'title' and 'experiment', got {_describe(raw)}"
        )
    by_norm: dict[str, str] = {}
    for key in raw:
        by_norm.setdefault(_norm_key(str(key)), key)
    fields: dict[str, Any] = {}
    used: set[str] = set()
    for field, aliases in _ALIASES.items():
        for alias in aliases:
            if alias in by_norm:
                fields[field] = raw[by_norm[alias]]
                used.add(by_norm[alias])
                break
    extra: dict[str, Any] = {}
    saved_extra = raw.get("extra")
    if isinstance(saved_extra, dict):  # an idea.json we wrote ourselves
        extra.update(saved_extra)
        used.add("extra")
    extra.update({str(k): v for k, v in raw.items() if k not in used})
    fields["extra"] = extra
    if "experiment" not in fields:
        label = fields.get("name") or fields.get("title")
        named = f" ({label!r})" if isinstance(label, str) else ""
        raise SpecError(f"{where}{named}: missing field 'experiment' (what to try)")
    if "name" not in fields and "title" not in fields:
        raise SpecError(f"{where}: an idea needs a 'name' or a 'title'")
    try:
        return IdeaSpec.model_validate(fields)
    except ValidationError as err:
        label = fields.get("name") or fields.get("title")
        named = f" ({label!r})" if isinstance(label, str) else ""
        raise SpecError(f"{where}{named}: {_one_line_validation(err)}") from None


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(
                f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"{path}: invalid TOML: {err}") from None
        norm = {_norm_key(k): k for k in data}
        if "ideas" in norm and "experiment" not in norm:
            return data[norm["ideas"]]
        return data
    import yaml  # only for YAML files: its import is a noticeable part of a launch's start

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or "cannot parse"
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SpecError(f"{path}: invalid YAML{at}: {problem}") from None


def _read(path: Path) -> Any:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise SpecError(
            f"{path}: unsupported idea file type {path.suffix or '(none)'!r}; use .json, .toml, .yaml or .yml"
        )
    if not path.exists():
        raise SpecError(f"{path}: idea file not found")
    if path.is_dir():
        raise SpecError(f"{path}: is a folder, not an idea file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read idea file: {err.strerror or err}") from None
    if not text.strip():
        raise SpecError(f"{path}: idea file is empty")
    return _parse(path, text)


def load_ideas(path: Path) -> list[IdeaSpec]:
    """All ideas in a file: one idea (an object), or a list of them (JSON/YAML list, TOML `[[ideas]]`)."""
    path = Path(path)
    data = _read(path)
    if isinstance(data, dict):
        norm = {_norm_key(str(k)): k for k in data}
        if "ideas" in norm and "experiment" not in norm and isinstance(data[norm["ideas"]], list):
            data = data[norm["ideas"]]
    if isinstance(data, dict):
        return [_to_spec(data, str(path))]
    if isinstance(data, list):
        if not data:
            raise SpecError(f"{path}: the list of ideas is empty")
        return [_to_spec(item, f"{path}: idea {i}") for i, item in enumerate(data, 1)]
    raise SpecError(f"{path}: expected an idea (an object) or a list of ideas, got {_describe(data)}")


def _names_line(ideas: list[IdeaSpec]) -> str:
    names = [i.name for i in ideas]
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return shown


def load_idea(path: Path, name: str | None = None) -> IdeaSpec:
    """Exactly one idea from a file; with `name`, the idea of that name (or slug) from a list."""
    path = Path(path)
    ideas = load_ideas(path)
    if name is None or not name.strip():
        if len(ideas) == 1:
            return ideas[0]
        raise SpecError(
            f"{path}: holds {len(ideas)} ideas; choose one with --idea NAME: {_names_line(ideas)}"
        )
    wanted = name.strip()
    matches = [i for i in ideas if i.name == wanted]
    if not matches:
        slug = slugify(wanted)
        matches = [i for i in ideas if i.name == slug or slugify(i.title) == slug]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SpecError(f"{path}: {len(matches)} ideas are named {wanted!r}; rename one so names are unique")
    raise SpecError(f"{path}: no idea named {wanted!r}; available: {_names_line(ideas)}")
