"""The CLI's rich console, wide enough for the candidate table when output goes to a file.

Rich falls back to 80 columns when stdout is not a terminal, which squeezes the candidate
table of a logged run (``domainflow run ... > run.log``) into truncated cells. A terminal keeps
its own width; ``COLUMNS`` still wins when set.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 160


def make_console() -> Console:
    """A console that is the terminal's width, or ``LOG_WIDTH`` columns when writing to a file or pipe."""
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return Console()
    return Console(width=LOG_WIDTH)
