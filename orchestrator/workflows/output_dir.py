"""Whose output_dir it is: the checks and the claim a single-process run makes before any work.

`claim(config, stage)` runs before `dpo train` / `dpo sft` loads anything and refuses (OutputDirError or
RunLockedError, exit 2) when
- output_dir is a file, or a path through a file, or cannot be created;
- metrics.jsonl, config.yaml, run.json, run.lock or checkpoints/ in it is a symbolic link (a run never
  writes through a link) or not what the run would write (a folder where a file goes, or the reverse);
- an input (model.path, model.tokenizer_path, reference.path, data.*) is one of those outputs, or lies
  under checkpoints/ (which pruning deletes): the run would overwrite or delete it;
- another run's results (metrics.jsonl, config.yaml, checkpoints) are there, unless the command resumes
  that run (train.resume_from: latest, or one of its checkpoints) or train.overwrite_output_dir is true;
- another live run holds its lock (orchestrator/workflows/run_lock.py).
Then it takes the lock and writes run.json (the run's record: stage, name, config fingerprint, created,
host, pid). With train.overwrite_output_dir the previous run's results are set aside in a hidden folder and
deleted only at this run's first report; a run that fails before its first report restores them and
removes what it created, so a refused run leaves the folder as it was. Pure Python: no torch.
Tested by `python -m pytest tests/test_adversarial_outputs.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import ExperimentConfig
from orchestrator.config.layout import OutputLayout
from orchestrator.errors import ConfigError
from orchestrator.redaction import redact, write_private_text
from orchestrator.workflows.run_lock import RunLock

logger = logging.getLogger(__name__)

INPUT_KEYS = ("model.path", "model.tokenizer_path", "reference.path", "data.train", "data.eval",
              "data.sft_train", "data.sft_eval")
NOT_COMPARED = ("train.resume_from", "train.overwrite_output_dir")  # differ between a run and its resumption
SET_ASIDE_PREFIX = ".replaced-"
COMMANDS = {"dpo": "dpo train", "sft": "dpo sft"}
CHOICES = ("choose a new output_dir, resume that run with --set train.resume_from=latest, or replace it "
           "with --set train.overwrite_output_dir=true")


class OutputDirError(ConfigError):
    """An output_dir a run cannot write into without losing or following something."""


def config_fingerprint(config: ExperimentConfig) -> str:
    """sha256 (16 hex digits) of the redacted config without the keys that differ when a run is resumed."""
    values = redact(config.model_dump())
    for key in NOT_COMPARED:
        section, name = key.split(".")
        values.get(section, {}).pop(name, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _short(path: Path | str) -> str:
    text = str(path)
    return text if len(text) <= 120 else "..." + text[-117:]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# ---- checks that read only ----------------------------------------------------------------------

def check_path(layout: OutputLayout) -> None:
    """output_dir is a folder or can become one; none of the run's outputs is a link or of the wrong kind."""
    root = layout.root
    if root.is_symlink() and not root.exists():
        raise OutputDirError(f"output_dir {_short(root)} is a symbolic link to nothing; remove it or choose another output_dir")
    if root.exists() and not root.is_dir():
        raise OutputDirError(f"output_dir {_short(root)} is a file, not a folder; choose another output_dir")
    for ancestor in root.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputDirError(f"output_dir {_short(root)} goes through {_short(ancestor)}, which is a file, "
                                     "not a folder; choose another output_dir")
            break
    for path in (*layout.files, layout.checkpoints):
        if path.is_symlink():
            raise OutputDirError(f"output_dir {_short(root)}: {path.name} is a symbolic link; a run never writes "
                                 f"through a link. Remove the link or choose another output_dir")
        if path == layout.checkpoints:
            if path.exists() and not path.is_dir():
                raise OutputDirError(f"output_dir {_short(root)}: checkpoints is a file where the run keeps its "
                                     "checkpoint folders; move it or choose another output_dir")
        elif path.exists() and not path.is_file():
            raise OutputDirError(f"output_dir {_short(root)}: {path.name} is not a plain file; the run writes a file "
                                 "of that name there. Move it or choose another output_dir")


def config_value(config: ExperimentConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def check_inputs(layout: OutputLayout, config: ExperimentConfig) -> None:
    """No input is an output of the run (or under checkpoints/, which pruning deletes)."""
    root = layout.root.resolve()
    outputs = {path.name: root / path.name for path in layout.files}
    for key in INPUT_KEYS:
        value = config_value(config, key)
        if not isinstance(value, str) or not value:
            continue
        given = Path(value).expanduser()
        target = given.resolve()  # the outputs are no links (check_path): an input reaching one is the same file
        clash = next((name for name, output in outputs.items() if target == output), None)
        if clash is None and _inside(target, root / "checkpoints"):
            clash = "checkpoints/ (whose old checkpoints the run deletes)"
        if clash:
            raise OutputDirError(f"{key} {_short(value)} is inside output_dir {_short(layout.root)}, where the run "
                                 f"writes {clash}: the run would overwrite your input. Move the input elsewhere "
                                 "or choose another output_dir")
        linked = next((name for name, output in outputs.items() if _same_existing(given, output)), None)
        if linked:
            raise OutputDirError(f"{key} {_short(value)} is the same file as {linked} in output_dir "
                                 f"{_short(layout.root)} (a hard link): the run would overwrite your input. Remove "
                                 f"{linked} there or choose another output_dir")


def _same_existing(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def read_record(layout: OutputLayout) -> dict[str, Any] | None:
    try:
        record = json.loads(layout.run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def results_present(layout: OutputLayout) -> list[str]:
    """What of a run's results the folder holds, in words (empty: nothing a new run could lose)."""
    found = [path.name for path in (layout.metrics_file, layout.config_file) if path.is_file()]
    if layout.checkpoints.is_dir():
        steps = sorted(p.name for p in layout.checkpoints.iterdir() if not p.name.startswith("."))
        if steps:
            found.append(f"{len(steps)} checkpoint(s) up to {steps[-1]}" if len(steps) > 1 else f"checkpoint {steps[0]}")
    return found


def resumes_this_folder(layout: OutputLayout, resume_from: str | None) -> bool:
    if resume_from is None:
        return False
    if resume_from == "latest":
        return True
    return _inside(Path(resume_from).expanduser().resolve(), layout.checkpoints.resolve())


def _command(record: dict[str, Any]) -> str:
    return COMMANDS.get(record.get("stage"), f"dpo {str(record.get('stage', '?'))[:10]}")


def describe(layout: OutputLayout, found: list[str], record: dict[str, Any] | None) -> str:
    text = ", ".join(found)
    if record:
        created = str(record.get("created", "?"))[:32]
        text += (f"; run.json: `{_command(record)}` of {str(record.get('name', '?'))[:60]!r}, "
                 f"started {created} by process {record.get('pid')} on host {str(record.get('host'))[:60]}")
    else:
        text += " (no run.json: a run of an older version, or files of your own)"
    return text


# ---- the claim ------------------------------------------------------------------------------------

@dataclass
class Claim:
    """What a run holds on its output_dir, and how to undo it when the run fails before its first report."""

    layout: OutputLayout
    lock: RunLock
    created_dirs: list[Path] = field(default_factory=list)  # deepest last
    wrote_record: bool = False
    previous_record: tuple[bytes, int] | None = None  # run.json as it was (content, mode) before this run wrote it
    set_aside: Path | None = None
    started: bool = False

    def start(self) -> None:
        """The first report: the run now writes its results; a replaced run's are deleted."""
        self.started = True
        if self.set_aside is not None:
            shutil.rmtree(self.set_aside, ignore_errors=True)
            self.set_aside = None

    def abandon(self) -> None:
        """The run failed before its first report: put back what was set aside, remove what it created."""
        if self.wrote_record:
            self.layout.run_file.unlink(missing_ok=True)
            if self.previous_record is not None:
                self.layout.run_file.write_bytes(self.previous_record[0])
                os.chmod(self.layout.run_file, self.previous_record[1])
        if self.set_aside is not None:
            for entry in sorted(self.set_aside.iterdir()):
                destination = self.layout.root / entry.name
                if destination.exists() or destination.is_symlink():
                    logger.warning("left %s in %s: %s exists again", entry.name, self.set_aside, destination)
                    continue
                os.replace(entry, destination)
            _remove_empty(self.set_aside)
        self.lock.release()
        for folder in reversed(self.created_dirs):
            _remove_empty(folder)

    def release(self) -> None:
        self.lock.release()


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _make_dirs(root: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = [folder for folder in (root, *root.parents) if not folder.exists()][::-1]
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            for made in reversed(missing[: missing.index(folder)]):
                _remove_empty(made)
            raise OutputDirError(f"output_dir {_short(root)}: cannot create {_short(folder)} ({error.strerror}); "
                                 "choose a folder you can write to") from None
    return missing


def claim(config: ExperimentConfig, stage: str) -> Claim:
    """Check output_dir, take its lock and write run.json; raises OutputDirError / RunLockedError (exit 2)."""
    layout = OutputLayout(str(config.output_dir))
    check_path(layout)
    check_inputs(layout, config)
    created = _make_dirs(layout.root)
    try:
        lock = RunLock.acquire(layout.lock_file)
    except BaseException:
        for folder in reversed(created):
            _remove_empty(folder)
        raise
    result = Claim(layout, lock, created)
    try:
        _take_over_contents(result, config, stage)
    except BaseException:
        result.abandon()
        raise
    return result


def _take_over_contents(result: Claim, config: ExperimentConfig, stage: str) -> None:
    layout, train = result.layout, config.train
    found, record = results_present(layout), read_record(layout)
    fingerprint = config_fingerprint(config)
    resuming = resumes_this_folder(layout, train.resume_from)
    if found and not train.overwrite_output_dir:
        if not resuming:
            outside = " (train.resume_from names a checkpoint of another folder)" if train.resume_from else ""
            raise OutputDirError(f"output_dir {_short(layout.root)} holds another run{outside}: "
                                 f"{describe(layout, found, record)}. To keep it, {CHOICES}")
        if record and record.get("stage") not in (None, stage):
            raise OutputDirError(f"output_dir {_short(layout.root)} holds a `{_command(record)}` run; "
                                 f"`{COMMANDS[stage]}` with train.resume_from cannot continue it. Choose another output_dir")
        if record and record.get("config_fingerprint") != fingerprint:
            logger.info("output_dir %s: resuming with a config that differs from the run's first one (config.yaml "
                        "will hold this one)", layout.root)
    if found and train.overwrite_output_dir and resuming:
        raise OutputDirError(f"output_dir {_short(layout.root)}: train.overwrite_output_dir replaces the run there, "
                             f"train.resume_from={_short(train.resume_from)} continues it; set only one of them")
    if found and train.overwrite_output_dir:
        result.set_aside = _set_aside(layout)
        logger.warning("output_dir %s: train.overwrite_output_dir is true; the previous run (%s) is replaced once "
                       "this run reports its first step", layout.root, ", ".join(found))
    if record is None or not resuming or result.set_aside is not None:
        if layout.run_file.is_file():
            result.previous_record = (layout.run_file.read_bytes(), layout.run_file.stat().st_mode & 0o7777)
        write_private_text(layout.run_file, json.dumps({
            "stage": stage, "command": COMMANDS[stage], "name": config.name, "config_fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
        }, indent=1) + "\n")
        result.wrote_record = True


def _set_aside(layout: OutputLayout) -> Path:
    """Move the previous run's results (and record) into a hidden folder of output_dir."""
    folder = layout.root / f"{SET_ASIDE_PREFIX}{os.getpid()}-{int(time.time())}"
    folder.mkdir()
    for path in (*layout.results, layout.run_file):
        if path.exists() and not path.is_symlink():
            os.replace(path, folder / path.name)
    return folder
