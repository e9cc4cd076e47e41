"""Single-process runs (`dpo train`, `dpo sft`): config -> plain arguments -> engine, metrics to JSONL.

No Ray here: the engine runs in this process, and every report is appended as one JSON object to
`<output_dir>/metrics.jsonl` (with `step` and the metric keys) while a progress bar shows the steps.
The resolved config is written beside it as `config.yaml`. Nothing is written before the data has been
validated: the first file appears with the first report.
Run: `dpo train configs/quickstart.yaml` or `dpo sft CONFIG` (with data.sft_train).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import ExperimentConfig
from orchestrator.config.layout import OutputLayout
from orchestrator.config.spec import resolve_run
from trainables.entrypoints import run_dpo, run_sft

logger = logging.getLogger(__name__)


class MetricsFile:
    """The `report` callable of single-process runs: appends metrics to output_dir/metrics.jsonl."""

    def __init__(self, output: OutputLayout, config: ExperimentConfig, *, append: bool):
        self.output = output
        self.config = config
        self.append = append
        self.opened = False
        self.first: dict[str, Any] | None = None
        self.last: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.output.metrics_file

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if not self.opened:
            Path(self.output.output_dir).mkdir(parents=True, exist_ok=True)
            self.output.config_file.write_text(yaml.safe_dump(self.config.model_dump(), sort_keys=False))
            if not self.append:
                self.path.write_text("")
            self.opened = True
        record = dict(metrics)
        if checkpoint_dir:
            record["checkpoint"] = checkpoint_dir
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.first is None:
            self.first = record
        self.last.update(record)


def _summary(metrics: dict[str, Any]) -> str:
    keys = [k for k in sorted(metrics) if k.startswith(("eval/", "train/loss"))]
    return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics[k], float) and math.isfinite(metrics[k]))


def _run_in_process(config: ExperimentConfig, run) -> MetricsFile:
    """Run `run(sink)` with a metrics.jsonl sink under output_dir (appending when resuming) and print the end."""
    sink = MetricsFile(OutputLayout(str(config.output_dir)), config, append=config.train.resume_from is not None)
    run(sink)
    print(f"done: {sink.path}  {_summary(sink.last)}")
    return sink


def train(config: ExperimentConfig) -> MetricsFile:
    """DPO in this process; returns the metrics sink (first and last records)."""
    spec = resolve_run(config)
    return _run_in_process(config, lambda sink: run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime, sink))


def sft(config: ExperimentConfig) -> MetricsFile:
    """SFT in this process on data.sft_train; output under output_dir."""
    spec = resolve_run(config, stage="sft")
    return _run_in_process(config, lambda sink: run_sft(spec.model, spec.data, spec.loop, spec.runtime, sink))
