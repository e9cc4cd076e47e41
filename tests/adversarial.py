"""The harness of the adversarial corpus (tests/test_adversarial_*.py): run `dpo` on one hostile input
and check the promises that hold for every case.

A case is a command line run in-process through `orchestrator.cli.main.main`. `refused(...)` checks:
- it ends with exit status 2, never a traceback (an exception escaping `main` is a failure);
- its message names what it must (a file, a row or line, a key or field) and stays short;
- no planted secret appears in stdout, stderr, the log records, or any file the run wrote;
- files it must not touch (inputs, another run's outputs, files outside the run's folder) are unchanged.
The corpus builds each input with the tiny world of tests/tiny_world.py (a small local model and pair
files), so nothing needs a hub.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

SECRET = "hunter2-Pl4nted-S3cret"  # planted in URIs, env vars and secret-named keys; must never come out
MAX_MESSAGE_CHARS = 4000  # one clear message, not a dump of the bad value


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    logs: str
    escaped: str | None = None  # the traceback of an exception that escaped main, if any
    written: dict[str, bytes] = field(default_factory=dict)

    @property
    def everything(self) -> str:
        return "\n".join([self.stdout, self.stderr, self.logs, self.escaped or ""])


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is itself worth seeing
            self.lines.append(f"<unformattable record {record.msg!r}>")


def run_cli(argv: list[str]) -> Outcome:
    """`dpo ARGV` in this process; an exception escaping main is recorded, not raised."""
    from orchestrator.cli.main import main

    out, err, handler = io.StringIO(), io.StringIO(), _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    escaped, code = None, None
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code if isinstance(exit_.code, int) else 2
            except BaseException:  # noqa: BLE001 - the case failed: recorded for the assertion
                escaped = traceback.format_exc()
    finally:
        root.removeHandler(handler)
    return Outcome(code, out.getvalue(), err.getvalue(), "\n".join(handler.lines), escaped)


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file below the roots (links recorded as their target)."""
    state: dict[str, tuple[str, int]] = {}
    for root in roots:
        paths = [root] if root.is_file() or root.is_symlink() else sorted(root.rglob("*")) if root.exists() else []
        for path in paths:
            if path.is_symlink():
                state[str(path)] = ("link:" + os.readlink(path), 0)
            elif path.is_file():
                state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return state


def files_text(*roots: Path) -> str:
    """The text of every file below the roots (to look for a leaked secret)."""
    chunks = []
    for root in roots:
        for path in ([root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []):
            if path.is_file() and not path.is_symlink():
                chunks.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(chunks)


def refused(argv: list[str], *, names: Iterable[str] = (), untouched: Iterable[Path] = (),
            written_roots: Iterable[Path] = (), must_not_exist: Iterable[Path] = ()) -> Outcome:
    """Run one case and assert it is a clean refusal (exit 2) that keeps every promise."""
    untouched, written_roots = list(untouched), list(written_roots)
    before = snapshot(*untouched)
    outcome = run_cli(argv)
    assert outcome.escaped is None, f"traceback instead of a clear error:\n{outcome.escaped}"
    assert outcome.code == 2, f"exit status {outcome.code}, expected 2\nstdout: {outcome.stdout}\nstderr: {outcome.stderr}"
    message = outcome.stderr.strip()
    assert message, "no message on stderr"
    assert "Traceback (most recent call last)" not in outcome.everything, outcome.everything
    assert len(message) <= MAX_MESSAGE_CHARS, f"message of {len(message)} characters:\n{message[:600]}..."
    for name in names:
        assert name in message, f"the message does not name {name!r}:\n{message}"
    assert_no_secret(outcome, *written_roots)
    assert snapshot(*untouched) == before, "a file that must not change was changed"
    for path in must_not_exist:
        assert not path.exists(), f"{path} was written by a refused run"
    return outcome


def assert_no_secret(outcome: Outcome, *written_roots: Path) -> None:
    assert SECRET not in outcome.everything, f"planted secret leaked:\n{outcome.everything}"
    assert SECRET not in files_text(*written_roots), "planted secret written to disk"
