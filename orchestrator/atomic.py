"""Writing a file so that a crash leaves either the old or the new content, never half of it.

Temp files are written beside their target with the suffix `TEMP_SUFFIX`; a crash between writing one and renaming
it can leave one behind, so the session's git rules never commit that suffix (see `workspace.IGNORED`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".orch-tmp"

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_temp_beside(path: Path, data: bytes, durable: bool = True) -> Path:
    """Write `data` to a new temp file in `path`'s folder (fsynced when `durable`), with the mode `path` has, or
    the usual mode for a new file; return the temp file's path. The caller renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_UMASK  # mkstemp makes 0600 files; give new ones the usual permissions
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_bytes_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to a temp file beside `path`, then rename it into place."""
    tmp = write_temp_beside(path, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to a temp file beside `path`, fsync it, then rename it into place."""
    write_bytes_atomic(path, text.encode("utf-8"))
