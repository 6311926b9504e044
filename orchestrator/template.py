"""Experiment templates: find one by name or path, validate it, copy it into a session folder.

A template is a folder with `experiment.py` (taking `--out_dir`). AI-Scientist templates work unchanged
(`plot.py`, `prompt.json`, `run_0/final_info.json`, `seed_ideas.json` or `ideas/*.json`); ours may add a
`template.toml` with the keys of `TemplateToml` below.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.atomic import write_text_atomic
from orchestrator.errors import OrchestratorError

EXPERIMENT_FILE = "experiment.py"
PLOT_FILE = "plot.py"
TOML_FILE = "template.toml"
PROMPT_FILE = "prompt.json"
BASELINE_DIR = "run_0"
RESULTS_FILE = "final_info.json"
BASELINE_HASH_FILE = "experiment.sha256"
IDEA_SUFFIXES = (".json", ".toml", ".yaml", ".yml")
# Never copied into a session folder, whatever the template says; .env files hold keys that must not reach a
# session, its git history or a run.
ALWAYS_SKIPPED = (".git", "__pycache__", "*.pyc", ".act_cache", ".orchestrator", ".env", ".env.*")

Direction = Literal["higher", "lower"]


class TemplateError(OrchestratorError, ValueError):
    """A template that cannot be used; the message is one line naming the template and the problem."""


class TemplateLimits(BaseModel):
    """`[limits]` of template.toml: resource limits of every run (absent: no limit)."""

    model_config = ConfigDict(extra="forbid")

    processes: int | None = Field(None, ge=1)  # tasks (processes and threads) a run may add (RLIMIT_NPROC)
    file_mb: float | None = Field(None, gt=0)  # the largest file a run may write
    run_dir_mb: float | None = Field(None, gt=0)  # disk quota of the run folder, checked while it runs


class TemplateToml(BaseModel):
    """The keys `template.toml` may hold; any other key is an error naming it."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    editable: list[str] = Field(default_factory=lambda: [EXPERIMENT_FILE, PLOT_FILE, "notes.txt"])
    protected: list[str] = Field(default_factory=list)
    timeout_s: float | None = Field(default=None, gt=0)
    env: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    key_metrics: list[str] = Field(default_factory=list)
    metrics: dict[str, Direction] = Field(default_factory=dict)
    network: bool = False  # runs may use the network (sandboxed runs have none otherwise)
    writable: bool = False  # sandboxed runs may write anywhere in the session folder except guarded paths
    caches: list[str] = Field(default_factory=list)  # folders bound writable into the sandbox (~ and $VARS)
    limits: TemplateLimits = Field(default_factory=TemplateLimits)

    @field_validator("editable", "protected", "exclude")
    @classmethod
    def _relative_patterns(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            if not p.strip():
                raise ValueError("empty pattern")
            if p.startswith("/") or ".." in Path(p).parts:
                raise ValueError(f"pattern {p!r} must be relative to the template folder")
        return patterns

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not n or "=" in n or not (n.replace("_", "a").isalnum() and not n[0].isdigit()):
                raise ValueError(f"{n!r} is not an environment variable name")
        return names


class Template(BaseModel):
    """A validated template folder."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    description: str = ""
    editable: list[str] = Field(default_factory=lambda: [EXPERIMENT_FILE, PLOT_FILE, "notes.txt"])
    protected: list[str] = Field(default_factory=list)
    timeout_s: float | None = None
    env: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    key_metrics: list[str] = Field(default_factory=list)
    metrics: dict[str, Direction] = Field(default_factory=dict)
    system_prompt: str = ""
    task_description: str = ""
    has_plot: bool
    network: bool = False
    writable: bool = False
    caches: list[str] = Field(default_factory=list)
    limits: TemplateLimits = Field(default_factory=TemplateLimits)

    def cache_dirs(self, session: Path) -> list[Path]:
        """The declared caches as absolute folders: ~ and $VARS expanded (entries still holding a $ are dropped),
        relative ones inside the session folder."""
        out = []
        for entry in self.caches:
            path = os.path.expandvars(os.path.expanduser(entry))
            if "$" not in path:
                out.append(Path(session) / path if not os.path.isabs(path) else Path(path))
        return out

    def direction(self, metric: str) -> Direction | None:
        """Whether higher or lower is better for `metric`: its exact name first, then glob patterns in order."""
        if metric in self.metrics:
            return self.metrics[metric]
        for pattern, direction in self.metrics.items():
            if fnmatch.fnmatchcase(metric, pattern):
                return direction
        return None

    def is_editable(self, rel_path: str) -> bool:
        """Whether the model may edit the file at `rel_path` (relative, '/'-separated); protected wins."""
        rel = Path(rel_path).as_posix()
        if rel.startswith("/") or ".." in Path(rel).parts:
            return False
        if any(fnmatch.fnmatchcase(rel, p) for p in self.protected):
            return False
        return any(fnmatch.fnmatchcase(rel, p) for p in self.editable)

    def editable_files(self, folder: Path | None = None) -> list[str]:
        """The existing files in `folder` (default: the template) that the model may edit, sorted."""
        root = Path(folder) if folder is not None else self.path
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not _skipped(d, d, ALWAYS_SKIPPED)]
            for f in filenames:
                rel = (Path(dirpath) / f).relative_to(root).as_posix()
                if self.is_editable(rel):
                    found.append(rel)
        return sorted(found)

    def ideas(self) -> list[Path]:
        """The template's idea files: `seed_ideas.json`, then `ideas/*.{json,toml,yaml,yml}` sorted."""
        found = []
        seed = self.path / "seed_ideas.json"
        if seed.is_file():
            found.append(seed)
        ideas_dir = self.path / "ideas"
        if ideas_dir.is_dir():
            found += sorted(
                p for p in ideas_dir.iterdir() if p.is_file() and p.suffix.lower() in IDEA_SUFFIXES
            )
        return found


# ------------------------------------------------------------------------------------------------------ finding


def builtin_templates_dir() -> Path:
    """Where the built-in templates are: inside the installed wheel, else the repository checkout."""
    import orchestrator

    shipped = Path(orchestrator.__file__).parent / "_shipped" / "templates"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parents[1] / "templates"


def _search_dirs(search: Sequence[Path]) -> list[Path]:
    dirs = [Path(d).expanduser() for d in search]
    dirs.append(builtin_templates_dir())
    return dirs


def _candidate_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(
        d.name
        for d in folder.iterdir()
        if d.is_dir() and not d.name.startswith((".", "_")) and (d / EXPERIMENT_FILE).is_file()
    )


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~")) or Path(text).is_absolute()


def find_template(name_or_path: str, search: Sequence[Path] = ()) -> Template:
    """A template by folder path (absolute, relative, or anything with '/') or by name: the `search` folders
    first, then the built-ins, then a folder of that name in the current directory."""
    text = str(name_or_path).strip()
    if not text:
        raise TemplateError("template name is empty")
    if _looks_like_path(text):
        return load_template(Path(text).expanduser())
    dirs = _search_dirs(search)
    for d in dirs:
        candidate = d / text
        if candidate.is_dir():
            return load_template(candidate)
    local = Path(text)
    if local.is_dir():
        return load_template(local)
    available: list[str] = []
    for d in dirs:
        available += [n for n in _candidate_names(d) if n not in available]
    if available:
        raise TemplateError(f"unknown template {text!r}; available: {', '.join(available)}")
    where = ", ".join(str(d) for d in dirs)
    raise TemplateError(f"unknown template {text!r}; no templates found in {where}")


def list_templates(search: Sequence[Path] = ()) -> list[Template]:
    """Every template in the `search` folders and the built-ins, by name; an earlier folder shadows a later one."""
    seen: dict[str, Template] = {}
    for d in _search_dirs(search):
        for name in _candidate_names(d):
            if name not in seen:
                seen[name] = load_template(d / name)
    return sorted(seen.values(), key=lambda t: t.name)


# ------------------------------------------------------------------------------------------------------ loading


def _toml_error(where: Path, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    kind = e["type"]
    if kind == "extra_forbidden":
        known = ", ".join(TemplateToml.model_fields)
        return f"{where}: unknown key {loc!r} (known keys: {known})"
    if kind == "literal_error":
        return f"{where}: {loc} must be 'higher' or 'lower', got {e['input']!r}"
    if kind == "value_error":
        return f"{where}: {loc}: {(e.get('ctx') or {}).get('error') or e['msg']}"
    return f"{where}: {loc}: {e['msg'].lower()}, got {e['input']!r}"


def _read_toml(folder: Path) -> TemplateToml:
    path = folder / TOML_FILE
    if not path.exists():
        return TemplateToml()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise TemplateError(f"{path}: invalid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TemplateError(f"{path}: cannot read: {err}") from None
    try:
        return TemplateToml.model_validate(data)
    except ValidationError as err:
        raise TemplateError(_toml_error(path, err)) from None


def _read_prompt(folder: Path) -> tuple[str, str]:
    path = folder / PROMPT_FILE
    if not path.exists():
        return "", ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TemplateError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise TemplateError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: must be a JSON object with 'system' and 'task_description'")
    out = []
    for key in ("system", "task_description"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise TemplateError(f"{path}: {key!r} must be text")
        out.append(value)
    return out[0], out[1]


def load_template(folder: Path) -> Template:
    """Validate a template folder and read its template.toml and prompt.json (both optional)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise TemplateError(f"template folder {folder} does not exist")
    if not folder.is_dir():
        raise TemplateError(f"template {folder} is not a folder")
    if not (folder / EXPERIMENT_FILE).is_file():
        raise TemplateError(f"template folder {folder} has no {EXPERIMENT_FILE}")
    folder = folder.resolve()
    cfg = _read_toml(folder)
    system, task = _read_prompt(folder)
    description = cfg.description.strip() or (task.strip().splitlines()[0][:200] if task.strip() else "")
    return Template(
        name=folder.name,
        path=folder,
        description=description,
        editable=cfg.editable,
        protected=cfg.protected,
        timeout_s=cfg.timeout_s,
        env=cfg.env,
        exclude=cfg.exclude,
        key_metrics=cfg.key_metrics,
        metrics=cfg.metrics,
        system_prompt=system,
        task_description=task,
        has_plot=(folder / PLOT_FILE).is_file(),
        network=cfg.network,
        writable=cfg.writable,
        caches=cfg.caches,
        limits=cfg.limits,
    )


# ------------------------------------------------------------------------------------------------------ copying


def _skipped(name: str, rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(rel, p) for p in patterns)


def copy_template(t: Template, dest: Path) -> None:
    """Copy the template's files into `dest`, which must not exist or be empty.

    Skips .git, __pycache__, *.pyc, .act_cache, .orchestrator, `.env` and `.env.*` files anywhere (API keys
    never enter a session folder or its history), the template's `exclude` entries (names or relative globs)
    and top-level run_* folders except run_0 (the baseline candidate). Symbolic links stay
    links; a relative link that points outside the template is made absolute so it still resolves. The copy is
    made beside `dest` and moved into place, so a failure leaves no half-copied session folder.
    """
    src = t.path
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TemplateError(f"cannot copy template {t.name!r}: {dest} exists and is not an empty folder")
    if not (src / EXPERIMENT_FILE).is_file():
        raise TemplateError(f"template folder {src} has no {EXPERIMENT_FILE}")
    skip = (*ALWAYS_SKIPPED, *t.exclude)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            rel_dir = here.relative_to(src)
            keep = []
            for d in sorted(dirnames):
                rel = (rel_dir / d).as_posix()
                if _skipped(d, rel, skip):
                    continue
                if rel_dir == Path(".") and d.startswith("run_") and d != BASELINE_DIR:
                    continue
                if (here / d).is_symlink():
                    _copy_link(here / d, tmp / rel, src)
                    continue
                (tmp / rel).mkdir()
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                rel = (rel_dir / f).as_posix()
                if _skipped(f, rel, skip):
                    continue
                if (here / f).is_symlink():
                    _copy_link(here / f, tmp / rel, src)
                else:
                    shutil.copy2(here / f, tmp / rel)
        os.chmod(tmp, stat.S_IMODE(src.stat().st_mode))
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_link(link: Path, target_path: Path, src_root: Path) -> None:
    target = os.readlink(link)
    if not os.path.isabs(target):
        resolved = (link.parent / target).resolve()
        if not resolved.is_relative_to(src_root.resolve()):
            target = str(resolved)
    os.symlink(target, target_path)


# ------------------------------------------------------------------------------------------------------ baseline


def file_hash(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recorded_hash(run_dir: Path) -> str | None:
    try:
        text = (run_dir / BASELINE_HASH_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text.split()[0].lower() if text else None


def baseline_reusable(t: Template) -> bool:
    """True only when run_0/final_info.json holds a JSON object and run_0/experiment.sha256 records the hash of
    the template's current experiment.py (the code that made it). AI-Scientist templates lack the hash file, so
    their baseline is run first."""
    run0 = t.path / BASELINE_DIR
    try:
        info = json.loads((run0 / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(info, dict):
        return False
    recorded = _recorded_hash(run0)
    return recorded is not None and recorded == file_hash(t.path / EXPERIMENT_FILE)


def record_baseline_hash(folder: Path) -> str:
    """Write `folder/run_0/experiment.sha256` with the hash of `folder/experiment.py`, atomically; returns it.
    Call after a baseline run so the folder (a session or a template) can offer its run_0 for reuse."""
    folder = Path(folder)
    digest = file_hash(folder / EXPERIMENT_FILE)
    run0 = folder / BASELINE_DIR
    run0.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run0 / BASELINE_HASH_FILE, digest + "\n")
    return digest
