"""Secret redaction: the one function used by everything that writes to disk or the terminal.

Two kinds of secrets become "[REDACTED]":
- the values (8 characters or more) of environment variables whose names say they hold a secret
  (`*_API_KEY`, `*_TOKEN`, `*_SECRET`, `*_PASSWORD`, litellm's key variables ...);
- strings shaped like keys whatever their origin: `sk-...` (OpenAI, DeepSeek, Anthropic `sk-ant-...`), GitHub
  `ghp_...`/`github_pat_...`, Hugging Face `hf_...`, AWS `AKIA...`, Google `AIza...`, Slack `xox?-...`, and the
  credential after `Bearer `.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8

_SECRET_SUFFIXES = (
    "_API_KEY",
    "_APIKEY",
    "_KEY",
    "_TOKEN",
    "_SECRET",
    "_SECRET_KEY",
    "_ACCESS_KEY_ID",
    "_PASSWORD",
    "_PASSWD",
    "_CREDENTIALS",
)
# Names litellm (and the SDKs under it) read keys from that the suffixes above do not cover.
_SECRET_NAMES = frozenset(
    {
        "AZURE_AD_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_BEARER_TOKEN_BEDROCK",
        "LITELLM_MASTER_KEY",
        "LITELLM_SALT_KEY",
        "LITELLM_LICENSE",
        "VERTEXAI_CREDENTIALS",
        "WATSONX_APIKEY",
        "DATABRICKS_TOKEN",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "GITHUB_TOKEN",
        "GH_TOKEN",
    }
)

_KEY_SHAPES = re.compile(
    r"""
    (?<![A-Za-z0-9])(?:
        sk-[A-Za-z0-9_\-]{16,}                  # OpenAI, DeepSeek, Anthropic (sk-ant-...), OpenRouter (sk-or-...)
      | gh[pousr]_[A-Za-z0-9]{20,}              # GitHub tokens
      | github_pat_[A-Za-z0-9_]{20,}
      | hf_[A-Za-z0-9]{20,}                     # Hugging Face
      | (?:AKIA|ASIA)[0-9A-Z]{16}               # AWS access key ids
      | AIza[0-9A-Za-z_\-]{30,}                 # Google API keys
      | xox[abposr]-[A-Za-z0-9\-]{10,}          # Slack
      | gsk_[A-Za-z0-9]{20,}                    # Groq
    )
    """,
    re.VERBOSE,
)
_BEARER = re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=\-]{6,}", re.IGNORECASE)


# Names that never pass into a run's environment (parts of the name, prefixes of providers' variables).
_NEVER_PASS_PARTS = frozenset({
    "KEY", "APIKEY", "TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASS", "PASSPHRASE",
    "CREDENTIAL", "CREDENTIALS", "AUTH", "PAT", "COOKIE", "PRIVATE", "SESSIONID",
})
_NEVER_PASS_SUFFIXES = ("APIKEY", "API_KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS")
_NEVER_PASS_PREFIXES = ("AWS_", "LITELLM_", "AZURE_", "OPENAI_", "ANTHROPIC_", "DEEPSEEK_", "GOOGLE_APPLICATION_")


def looks_secret(name: str) -> bool:
    """Broader than is_secret_env_name: names that never reach an experiment run, nor settings.json.

    True for names such as OPENAI_API_KEY, MY_SERVICE_TOKEN, DB_PASSWORD, AWS_*, LITELLM_*."""
    upper = name.upper()
    if upper.startswith(_NEVER_PASS_PREFIXES) or upper.endswith(_NEVER_PASS_SUFFIXES):
        return True
    return any(part in _NEVER_PASS_PARTS for part in upper.split("_"))


def is_secret_env_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret."""
    upper = name.upper()
    return upper in _SECRET_NAMES or upper.endswith(_SECRET_SUFFIXES)


@lru_cache(maxsize=32)
def _values_pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    if not values:
        return None
    # Longest first, so a secret that contains another is replaced whole.
    return re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))


def _secret_values(env: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(
        sorted(
            {  # as set, and without the spaces around it (a client may send it stripped)
                form
                for k, v in env.items()
                if isinstance(v, str) and len(v.strip()) >= MIN_SECRET_LENGTH and is_secret_env_name(k)
                for form in (v, v.strip())
            }
        )
    )


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """The text with secret values from `env` (default: os.environ) and key-shaped strings replaced."""
    if not text:
        return text
    return _redact_with(_values_pattern(_secret_values(os.environ if env is None else env)), text)


def _redact_with(values: re.Pattern[str] | None, text: str) -> str:
    if not text:
        return text
    if values is not None:
        text = values.sub(REDACTED, text)
    text = _KEY_SHAPES.sub(REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def redact_obj(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """A deep copy of dicts/lists/tuples with every string (keys included) redacted; other leaves as they are.
    The environment is read once per call, not once per string."""
    return _redact_obj(_values_pattern(_secret_values(os.environ if env is None else env)), obj)


def _redact_obj(values: re.Pattern[str] | None, obj: Any) -> Any:
    if isinstance(obj, str):
        return _redact_with(values, obj)
    if isinstance(obj, Mapping):
        return {(_redact_with(values, k) if isinstance(k, str) else k): _redact_obj(values, v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [_redact_obj(values, v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def redact_bytes(data: bytes, env: Mapping[str, str] | None = None) -> bytes:
    """`redact` for bytes of any encoding (undecodable bytes pass through unchanged)."""
    if not data:
        return data
    return redact(data.decode("utf-8", "surrogateescape"), env).encode("utf-8", "surrogateescape")


def secret_values(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The values of the secret-named variables of `env` (default: os.environ) that `redact` replaces."""
    return _secret_values(os.environ if env is None else env)


def redact_folder(folder: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Replace every secret value (see `secret_values`) in the files under `folder` with [REDACTED], in place and
    atomically; returns the files changed (relative, sorted). Files are searched through a memory map, so a large
    file costs a scan, not a copy, unless it holds a secret."""
    import mmap

    from orchestrator.atomic import write_bytes_atomic

    needles = [v.encode("utf-8", "surrogateescape") for v in secret_values(env)]
    changed: list[str] = []
    if not needles:
        return changed
    folder = Path(folder)
    paths = [folder] if folder.is_file() or folder.is_symlink() else sorted(folder.rglob("*"))
    for path in paths:
        if path.is_symlink():  # a link's target is committed as its content
            target = os.readlink(path)
            if any(n.decode("utf-8", "surrogateescape") in target for n in needles):
                path.unlink()
                os.symlink(redact(target, env), path)
                changed.append(path.relative_to(folder).as_posix() if path != folder else path.name)
            continue
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    continue
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    if not any(view.find(n) >= 0 for n in needles):
                        continue
            data = path.read_bytes()
        except (OSError, ValueError):
            continue
        for n in sorted(needles, key=len, reverse=True):
            data = data.replace(n, REDACTED.encode())
        write_bytes_atomic(path, data)
        changed.append(path.relative_to(folder).as_posix() if path != folder else path.name)
    return changed
