"""Where the server's log goes: a rotating file under the home, and the terminal.

The file gets everything at the configured level, one line per request included (service
managers capture stdout and stderr without rotating them, so a service's terminal output is kept
to warnings). Other commands log warnings only; they print what matters themselves.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


def configure(level: str, log_file: Path | None) -> None:
    """`log_file` None: terminal only (commands other than serve)."""
    root = logging.getLogger()
    root.setLevel(level.upper() if log_file else "WARNING")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    console.setLevel(level.upper() if log_file and sys.stderr.isatty() else "WARNING")
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(log_file, maxBytes=MAX_BYTES, backupCount=BACKUPS)
        rotating.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(rotating)
