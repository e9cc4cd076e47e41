"""The one base class of every error caused by what the user gave us (a config, a data file, a path).

It lives in the engine's bottom layer so that the engine, the driver (orchestrator/) and the analysis
(analysis/) can all raise it without importing each other. `dpo`'s `main` catches it once, prints the
message (which names the file, row and field or key, and how to fix it) and exits with `exit_code`;
any other exception is a bug or an infrastructure failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a clean refusal with exit status 2, never a traceback."""

    exit_code = 2
