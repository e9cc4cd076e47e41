"""Process liveness, shared by checkpoint staging clean-up and the embedded MLflow server (no torch import).

Tested by `python -m pytest tests/test_reliability.py -q`.
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
