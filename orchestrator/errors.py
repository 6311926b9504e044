"""The one family of errors a user can cause or must act on.

Every such error derives from `OrchestratorError`; the command line catches that class in one place, prints the
message's first line (redacted) and exits with `exit_code` (2: bad input, the default). Errors inside a running
session never reach the user this way: the driver records them and ends the session `interrupted` (resumable).
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every user-facing error: one line of message, a non-zero exit code."""

    exit_code = 2


class ModelError(OrchestratorError, Exception):
    """Base of every model-layer failure (models.py, credentials.py); str(e) is one clear line."""
