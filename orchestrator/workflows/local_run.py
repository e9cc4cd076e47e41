"""Single-process runs (`dpo train`, `dpo sft`): config -> plain arguments -> engine, metrics to JSONL.

No Ray here: the engine runs in this process, and every report is appended as one JSON object to
`<output_dir>/metrics.jsonl` (with `step` and the metric keys) while a progress bar shows the steps.
The resolved config is written beside it as `config.yaml` (secrets redacted, mode 0600). Before any work
the run claims output_dir (orchestrator/workflows/output_dir.py): it is refused when the folder holds
another run it does not resume or replace (train.overwrite_output_dir), when another run holds its lock,
or when an output would overwrite an input or follow a link. metrics.jsonl and config.yaml appear with the
first report; a run that fails before it leaves the folder as it found it. SIGTERM or SIGINT stops the run
at the end of the step in progress with a checkpoint of it, within train.preemption_grace_s
(trainables/preemption.py); the exit status is then 75 and `--set train.resume_from=latest` goes on.
Run: `dpo train configs/quickstart.yaml` or `dpo sft CONFIG` (with data.sft_train).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from orchestrator.config import ExperimentConfig
from orchestrator.config.layout import OutputLayout
from orchestrator.config.spec import resolve_run
from orchestrator.tracking.records import write_config_yaml
from orchestrator.workflows.config_change import check_resume_config
from orchestrator.workflows.output_dir import COMMANDS, Claim, claim
from trainables.checkpointing import list_checkpoints
from trainables.entrypoints import run_dpo, run_sft
from trainables.preemption import stop_on_signals

logger = logging.getLogger(__name__)


class MetricsFile:
    """The `report` callable of single-process runs: appends metrics to output_dir/metrics.jsonl."""

    def __init__(self, output: OutputLayout, config: ExperimentConfig, *, append: bool, owner: Claim | None = None):
        self.output = output
        self.config = config
        self.append = append
        self.owner = owner  # the claim on output_dir, told when the run starts writing results
        self.opened = False
        self.first: dict[str, Any] | None = None
        self.last: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.output.metrics_file

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if not self.opened:
            if self.owner is not None:
                self.owner.start()
            self.output.root.mkdir(parents=True, exist_ok=True)
            write_config_yaml(self.output.config_file, self.config.model_dump())
            self._open(truncate=not self.append).close()
            self.opened = True
        record = dict(metrics)
        if checkpoint_dir:
            record["checkpoint"] = checkpoint_dir
        with self._open(truncate=False) as handle:
            handle.write(json.dumps(record) + "\n")
        if self.first is None:
            self.first = record
        self.last.update(record)

    def _open(self, *, truncate: bool):
        """metrics.jsonl for appending (emptied first when `truncate`), never through a symbolic link."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        return os.fdopen(os.open(self.path, flags, 0o644), "a", encoding="utf-8")


def _summary(metrics: dict[str, Any]) -> str:
    keys = [k for k in sorted(metrics) if k.startswith(("eval/", "train/loss"))]
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics[k], float) and math.isfinite(metrics[k]))


def _run_in_process(config: ExperimentConfig, stage: str, run, force_config_change: bool = False) -> MetricsFile:
    """Claim output_dir, run `run(sink)` with a metrics.jsonl sink there (appending when resuming), print the end.

    A run that fails before its first report gives the folder back as it was (Claim.abandon). Resuming the
    run in output_dir under a config whose result keys differ from its config.yaml is refused unless
    `force_config_change` (orchestrator/workflows/config_change.py).
    """
    owner = claim(config, stage)
    sink = MetricsFile(owner.layout, config, append=config.train.resume_from is not None, owner=owner)
    try:
        if config.train.resume_from is not None:
            resume_from = config.train.resume_from
            newest = ([c.name for c in list_checkpoints(owner.layout.checkpoints)] or [None])[-1]
            check_resume_config(owner.layout.config_file, config, force=force_config_change, single_run=True,
                                command=f"{COMMANDS[stage]} with train.resume_from",
                                resuming_from=newest if resume_from == "latest" else Path(resume_from).name)
        with stop_on_signals(config.train.preemption_grace_s):  # SIGTERM/SIGINT: checkpoint, then Preempted (exit 75)
            run(sink)
    except BaseException:
        if not owner.started:
            owner.abandon()
        raise
    finally:
        owner.release()
    print(f"done: {sink.path}  {_summary(sink.last)}")
    return sink


def train(config: ExperimentConfig, *, force_config_change: bool = False) -> MetricsFile:
    """DPO in this process; returns the metrics sink (first and last records)."""
    spec = resolve_run(config)
    return _run_in_process(config, "dpo", lambda sink: run_dpo(spec.model, spec.data, spec.preference, spec.loop,
                                                               spec.runtime, sink), force_config_change)


def sft(config: ExperimentConfig, *, force_config_change: bool = False) -> MetricsFile:
    """SFT in this process on data.sft_train; output under output_dir."""
    spec = resolve_run(config, stage="sft")
    return _run_in_process(config, "sft", lambda sink: run_sft(spec.model, spec.data, spec.loop, spec.runtime, sink),
                           force_config_change)
