"""Text from a model or a run, made safe to print on a terminal.

A reply or a run's stderr can hold escape sequences that retitle the terminal (OSC), move the cursor, clear the
screen or recolour what follows (CSI), or other control characters. `safe` removes them all, keeping newlines and
tabs (a carriage return becomes a newline, so progress bars stay readable instead of overwriting lines). The
journal and JSON output keep the text as it was; only what reaches a terminal is cleaned.
"""

from __future__ import annotations

import re

_SEQUENCES = re.compile(
    r"""
      \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?           # OSC: window title, hyperlinks, clipboard ... to BEL or ST
    | \x1b[PX^_][^\x1b]*(?:\x1b\\)?                # DCS, SOS, PM, APC strings
    | \x1b\[[0-?]*[ -/]*[@-~]                      # CSI: colours, cursor moves, erase
    | \x9b[0-?]*[ -/]*[@-~]                        # CSI as one C1 character
    | \x1b[ -/]*[0-~]?                             # any other escape
    """,
    re.VERBOSE,
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """`text` without escape sequences and control characters (newlines and tabs kept; CR becomes a newline)."""
    if not text:
        return text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROLS.sub("", _SEQUENCES.sub("", text))
