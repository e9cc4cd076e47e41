"""Resuming with a changed config: refused when a key that can change results differs, unless forced.

A run that is resumed (`dpo train` / `dpo sft` with train.resume_from, `dpo sweep --resume`) continues
checkpoints trained under the config it started with; a config edited between a crash and the resume
would silently mix two experiments in one curve. `check_resume_config` compares the config stored with
the run (`<output_dir>/config.yaml`, `<storage_path>/<name>/config.yaml` of a sweep, both written with
secrets redacted) with the one given now, key by key (dotted names), and raises ConfigChangedError listing
every changed key with both values, unless the command was given `--force-config-change` (then it warns).
Keys that cannot change results may differ: where the run is tracked (tracking.*), where it lives
(output_dir, storage_path, reference.cache_dir, whose content is checked by its key), how to go on
(train.resume_from, train.overwrite_output_dir), the preemption grace period, the number of restarts
and whether a failed trial stops the sweep (failure.max_failures, failure.fail_fast). A single run (`dpo train` / `dpo sft`) may also change train.max_steps, to train
longer (or stop sooner) than first planned: the steps after the checkpoint follow the new schedule, and a
warning says so. A sweep may not: its finished trials would not be comparable with the others. A key the
stored config does not hold (written by an older version) is not compared. Pure Python: no torch. Tested by `python -m pytest tests/test_chaos_config_change.py -q`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import ExperimentConfig
from orchestrator.config.spec import flatten
from orchestrator.errors import ConfigError
from orchestrator.redaction import redact

logger = logging.getLogger(__name__)

NON_RESULT_KEYS = frozenset({
    "tracking.enabled", "tracking.uri", "tracking.experiment", "output_dir", "storage_path", "reference.cache_dir",
    "train.resume_from", "train.overwrite_output_dir", "train.preemption_grace_s", "failure.max_failures",
    "failure.fail_fast",
    "data.num_proc",  # how many processes tokenise: the pairs are the same for any number
})
SHOWN_CHANGES = 20  # keys listed in the message; the rest counted
VALUE_CHARS = 80


class ConfigChangedError(ConfigError):
    """The config of a resumed run differs from the stored one in keys that can change its results."""


def comparable(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value, secrets redacted, values as JSON would hold them (tuples become lists)."""
    values = config.model_dump() if isinstance(config, ExperimentConfig) else config
    return flatten(json.loads(json.dumps(redact(values), default=str)))


SINGLE_RUN_MAY_CHANGE = frozenset({"train.max_steps"})  # train longer: a deliberate change, warned about


def changed_keys(stored: dict[str, Any], current: dict[str, Any], allowed: frozenset[str] = frozenset()) -> dict[str, tuple[Any, Any]]:
    """Keys held by both whose values differ, other than NON_RESULT_KEYS and `allowed`: key -> (stored, current)."""
    return {key: (stored[key], current[key]) for key in sorted(stored.keys() & current.keys())
            if key not in NON_RESULT_KEYS and key not in allowed and stored[key] != current[key]}


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."


def read_stored_config(path: Path) -> dict[str, Any] | None:
    """The stored config (None when there is none, e.g. a run of an older version); unreadable is an error."""
    if not path.is_file():
        return None
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigChangedError(f"{path}: the stored config of the run cannot be read ({type(error).__name__}); "
                                 "it is compared with this config before resuming. Restore it, or pass "
                                 "--force-config-change to resume without the comparison") from None
    return stored if isinstance(stored, dict) else None


def check_resume_config(stored_path: Path, config: ExperimentConfig | dict[str, Any], *, force: bool,
                        command: str, single_run: bool = False, resuming_from: str | None = None
                        ) -> dict[str, tuple[Any, Any]]:
    """Refuse (ConfigChangedError, exit 2) to resume under a config whose result keys differ from the stored one;
    with `force`, warn and go on. Returns the changed keys. single_run: `dpo train` / `dpo sft` (may change
    SINGLE_RUN_MAY_CHANGE); resuming_from: the checkpoint's name, for the message."""
    stored = read_stored_config(stored_path)
    if stored is None:
        if not force:
            logger.warning("%s: no stored config at %s to compare with (a run of an older version?); resuming "
                           "without the comparison", command, stored_path)
        return {}
    stored_values, current_values = comparable(stored), comparable(config)
    allowed = SINGLE_RUN_MAY_CHANGE if single_run else frozenset()
    for key in sorted(allowed & stored_values.keys() & current_values.keys()):
        if stored_values[key] != current_values[key]:
            logger.warning("%s: %s changes from %s to %s; the steps after the checkpoint follow the new schedule",
                           command, key, _shown(stored_values[key]), _shown(current_values[key]))
    changes = changed_keys(stored_values, current_values, allowed)
    if not changes:
        return {}
    listed = "; ".join(f"{key}: {_shown(old)} -> {_shown(new)}" for key, (old, new) in list(changes.items())[:SHOWN_CHANGES])
    more = f"; and {len(changes) - SHOWN_CHANGES} more" if len(changes) > SHOWN_CHANGES else ""
    if force:
        logger.warning("%s --force-config-change: resuming with %d changed key(s) that can change results: %s%s",
                       command, len(changes), listed, more)
        return changes
    raise ConfigChangedError(
        f"{command}: this config differs from the one the run started with ({stored_path}"
        f"{f', resuming from {resuming_from}' if resuming_from else ''}) in {len(changes)} key(s) "
        f"that can change its results: {listed}{more}. Put them back, start a new run (another name or "
        "output_dir), or pass --force-config-change to resume anyway")
