"""Settings: defaults < orchestrator.toml (current directory) < ORCH_* environment < command-line flags.

API keys are never settings: they stay in the provider's own environment variables, so `public_dump` (written to
a session's settings.json) holds nothing secret; values of `--env` variables whose names look secret are masked.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tomllib
from datetime import date
from datetime import time as dt_time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.direct import ModelClient
from orchestrator.errors import OrchestratorError
from orchestrator.sandbox import SandboxMode
from orchestrator.secrets import looks_secret

CONFIG_FILE = "orchestrator.toml"
ENV_PREFIX = "ORCH_"
DEFAULT_RUN_TIMEOUT_S = 7200.0

class ConfigError(OrchestratorError, ValueError):
    """Settings that cannot be used; the message is one line naming the setting, the problem and its source."""


class Settings(BaseModel):
    """Every setting of a session; `load_settings` layers them from their sources."""

    # protected_namespaces: `model_client` and `model_max_attempts` are settings, not pydantic's (older pydantic
    # releases warn about the `model_` prefix otherwise)
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())

    model: str = "deepseek/deepseek-reasoner"
    api_base: str | None = None
    model_client: ModelClient = "auto"  # litellm: send every route through litellm, the direct ones too
    profile: str | None = None
    max_runs: int = Field(10, ge=1, le=10)
    attempts_per_run: int = Field(4, ge=1, le=10)
    edit_retries: int = Field(3, ge=0, le=10)
    timeout_s: float | None = Field(None, gt=0)
    request_timeout_s: float = Field(600, gt=0)
    model_max_attempts: int = Field(6, ge=1, le=50)
    budget_usd: float | None = Field(None, gt=0)
    max_tokens_total: int | None = Field(None, gt=0)
    wall_clock_s: float | None = Field(None, gt=0)
    stall_replies: int = Field(6, ge=1, le=100)
    python: str = sys.executable
    gpus: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    root: Path = Path("experiments")
    plots: bool = True
    sandbox: SandboxMode = "auto"
    allow_network: bool = False
    templates_dirs: list[Path] = Field(default_factory=list)
    batch: Path | None = None  # the batch folder a session belongs to: its runs lease that batch's slots

    @field_validator("model", "python")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @field_validator("api_base", "profile", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_text(cls, v: Any) -> Any:
        """GPU ids as CUDA_VISIBLE_DEVICES takes them: '0', '0,1'; a number or a list is accepted too."""
        if isinstance(v, bool):
            raise ValueError("must be GPU ids such as '0' or '0,1'")
        if isinstance(v, int):
            return str(v)
        if isinstance(v, list | tuple):
            v = ",".join(str(x) for x in v)
        if isinstance(v, str):
            ids = [p.strip() for p in v.split(",")]
            if not v.strip():
                return None
            if any(not p or " " in p for p in ids):
                raise ValueError(f"must be comma-separated GPU ids such as '0' or '0,1', got {v!r}")
            return ",".join(ids)
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_pairs(cls, v: Any) -> Any:
        return parse_env_pairs(v)

    @field_validator("templates_dirs", mode="before")
    @classmethod
    def _path_list(cls, v: Any) -> Any:
        """A list, a JSON list, or folders separated by the OS path separator (':' on Linux)."""
        if isinstance(v, str | Path):
            text = str(v).strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as err:
                    raise ValueError(f"invalid JSON list: {err.msg}") from None
            return [p for p in text.split(os.pathsep) if p.strip()]
        return v

    def run_timeout_s(self, template_timeout_s: float | None = None) -> float:
        """The run timeout in force: this setting, else the template's, else 7200 s."""
        return self.timeout_s or template_timeout_s or DEFAULT_RUN_TIMEOUT_S


def parse_env_pairs(v: Any) -> Any:
    """Variables for runs from a mapping, a JSON object, 'K=V,K2=V2' text, or a list of 'K=V' strings
    (repeated --env flags). Raises ValueError with a one-line message."""
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("{"):
            try:
                return parse_env_pairs(json.loads(text))
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON object: {err.msg}") from None
        v = [p for p in text.split(",") if p.strip()]
    if isinstance(v, list | tuple):
        out: dict[str, str] = {}
        for item in v:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"entries must be KEY=VALUE, got {item!r}")
            out[key.strip()] = value
        v = out
    if isinstance(v, dict):
        for key in v:
            if not _is_env_name(str(key)):
                raise ValueError(f"{key!r} is not an environment variable name")
        return {str(k): _env_text(val) for k, val in v.items()}
    return v


def _env_text(value: Any) -> str:
    """A run variable's value as text: strings as they are, TOML dates and times in ISO form, anything else
    (numbers, booleans, lists, tables) as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, date | dt_time):  # datetime is a date
        return value.isoformat()
    return json.dumps(value, default=str)


def _is_env_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and name.replace("_", "a").isalnum() and name.isascii()


def _source_of(field: str, cli: dict[str, Any], toml_file: Path) -> str:
    if field in cli:
        return "command line"
    env_name = (ENV_PREFIX + field).upper()
    if any(k.upper() == env_name for k in os.environ):
        return f"environment variable {env_name}"
    return str(toml_file)


def _one_line(err: ValidationError, cli: dict[str, Any], toml_file: Path) -> str:
    e = err.errors()[0]
    field = str(e["loc"][0]) if e["loc"] else ""
    kind = e["type"]
    ctx = e.get("ctx") or {}
    got = e.get("input")
    if kind == "extra_forbidden":  # no ORCH_* variable can bring an unknown setting: those are never read
        known = ", ".join(Settings.model_fields)
        where = "command line" if field in cli else str(toml_file)
        return f"unknown setting {field!r} in {where} (known settings: {known})"
    if kind == "less_than_equal":
        text = f"{field} must be at most {ctx['le']}"
    elif kind == "greater_than_equal":
        text = f"{field} must be at least {ctx['ge']}"
    elif kind == "greater_than":
        text = f"{field} must be greater than {ctx['gt']}"
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        text = f"{field} must be a whole number, got {got!r}"
    elif kind in ("float_parsing", "float_type"):
        text = f"{field} must be a number, got {got!r}"
    elif kind in ("bool_parsing", "bool_type"):
        text = f"{field} must be true or false, got {got!r}"
    elif kind == "value_error":
        text = f"{field}: {ctx.get('error') or e['msg']}"
    else:
        text = f"{field}: {e['msg'][:1].lower()}{e['msg'][1:]}"
    return f"{text} (from {_source_of(field, cli, toml_file)})"


def load_settings(cli: dict[str, Any], config_file: Path | None = None) -> Settings:
    """Resolve settings. `cli` holds command-line values by field name; None values are dropped so they do not
    override. `config_file` defaults to ./orchestrator.toml (used only if it exists); a named file must exist."""
    cli = {k: v for k, v in cli.items() if v is not None}
    if config_file is None:
        toml_file = Path(CONFIG_FILE)
    else:
        toml_file = Path(config_file)
        if not toml_file.is_file():
            raise ConfigError(f"config file {toml_file} not found")
    from_file: dict[str, Any] = {}
    if toml_file.exists():
        try:
            from_file = tomllib.loads(toml_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{toml_file}: invalid TOML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{toml_file}: cannot read: {err}") from None
    spelled: dict[str, str] = {}  # setting names may be in any case, but one setting is set once
    for name in from_file:
        if (first := spelled.setdefault(name.lower(), name)) != name:
            raise ConfigError(f"{toml_file} sets {name.lower()} twice ({first!r} and {name!r})")
    from_file = {name.lower(): value for name, value in from_file.items()}
    layers = ((from_file, str(toml_file)), (_from_environment(), f"environment variable {ENV_PREFIX}ENV"),
              (cli, "command line"))
    merged: dict[str, Any] = {}
    for values, origin in layers:  # lowest first
        for name, value in values.items():
            if name == "env":  # the `env` tables merge key by key: --env adds to the file's [env], not replaces it
                try:
                    value = parse_env_pairs(value)
                except ValueError as err:
                    raise ConfigError(f"env: {err} (from {origin})") from None
                if not isinstance(value, dict):
                    raise ConfigError(f"env: must be a table of KEY = VALUE variables, got {value!r} (from {origin})")
                value = merged.get("env", {}) | value
            merged[name] = value
    try:
        return Settings.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_one_line(err, cli, toml_file)) from None


def _from_environment() -> dict[str, str]:
    """The settings that ORCH_* variables set, by field name. Names match in any case (ORCH_MAX_RUNS,
    orch_max_runs); ORCH_* variables that name no setting are left alone (other tools may use the prefix)."""
    found: dict[str, str] = {}
    for field in Settings.model_fields:
        name = (ENV_PREFIX + field).upper()
        value = os.environ.get(name)  # the usual spelling first, then any other case
        if value is None:
            value = next((v for k, v in os.environ.items() if k.upper() == name), None)
        if value is not None:
            found[field] = value
    return found


def env_overrides() -> set[str]:
    """Names of the settings that an ORCH_* environment variable sets now."""
    names = {k.upper() for k in os.environ}
    return {field for field in Settings.model_fields if (ENV_PREFIX + field).upper() in names}


def check_python(python: str) -> str:
    """The interpreter runs will use, as a path; ConfigError when it cannot be found or run."""
    found = shutil.which(python)
    if found is None:
        where = "does not exist" if ("/" in python and not Path(python).exists()) else "is not an executable"
        if "/" not in python:
            where = "is not on PATH"
        raise ConfigError(f"python {python!r} {where}: give an interpreter for runs with --python")
    return found


def public_dump(s: Settings) -> dict[str, Any]:
    """Settings as JSON-ready data for settings.json: nothing secret (api_base credentials and values of
    secret-looking --env variables are masked)."""
    data = s.model_dump(mode="json")
    data["env"] = {k: ("***" if looks_secret(k) else v) for k, v in s.env.items()}
    if s.api_base:
        parts = urlsplit(s.api_base)
        if parts.username or parts.password:
            host = parts.hostname or ""
            netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
            data["api_base"] = urlunsplit(parts._replace(netloc=netloc))
    return data
