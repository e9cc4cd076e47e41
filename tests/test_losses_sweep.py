"""A sweep over dpo.loss on a real local Ray with MLflow, and `dpo analyze` ranking the losses with their betas.

`dpo sweep configs/quickstart.yaml` with `sweep.strategy: grid` and `sweep.loss: [sigmoid, ipo, sigmoid_norm]`
(no sweep.beta: each trial at its loss's prior beta, 0.1, 0.01 and 2), pointed at the tiny world and cut to
a few steps; then `dpo analyze` on the same config writes a report whose "Losses ranked" table has one row
per loss with that beta, and the MLflow runs carry dpo.loss and dpo.beta as params.
Run: `python -m pytest tests/test_losses_sweep.py -q` (a minute or two on 2 CPU cores, mostly Ray start-up).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
PRIORS = {"sigmoid": 0.1, "ipo": 0.01, "sigmoid_norm": 2.0}


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.integration
def test_a_sweep_over_losses_runs_and_analyze_ranks_them_with_their_betas(tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.cli.main import main
    from orchestrator.config import load_config
    from orchestrator.config.layout import mlflow_root
    from orchestrator.config.spec import resolve_experiment
    from orchestrator.tracking.server import EmbeddedServer
    from orchestrator.workflows.sweep import run_sweep

    monkeypatch.setenv("DPO_DEMO_CACHE", str(tmp_path / "demo-cache"))
    model = build_model_dir(tmp_path / "model", "llama")
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows("explicit", 16, seed=1))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", pair_rows("explicit", 8, seed=2))
    overrides = [
        f"model.path={model}", f"data.train={train}", f"data.eval={eval_}", "data.sft_train=null", "data.max_length=48",
        f"output_dir={tmp_path / 'outputs'}", f"storage_path={tmp_path / 'runs'}",
        f"reference.cache_dir={tmp_path / 'reference-cache'}", "train.device=cpu", "train.batch_size=8",
        "train.max_steps=4", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=2",
        "train.checkpoint_every=4", "train.eval_batch_size=8", "resources.cpus_per_worker=1",
        "sweep.strategy=grid", "sweep.loss=[sigmoid, ipo, sigmoid_norm]", "sweep.max_concurrent_trials=1",
    ]
    config = load_config(QUICKSTART, overrides)
    try:
        summary = run_sweep(resolve_experiment(config))
        ray.shutdown()
        client = MlflowClient(tracking_uri=summary["mlflow"]["uri"])
        parent = client.get_run(summary["mlflow"]["parent_run_id"])
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        report_dir = tmp_path / "report"
        code = main(["analyze", str(QUICKSTART), *[item for o in overrides for item in ("--set", o)],
                     "--report-dir", str(report_dir), "--no-log"])
    finally:
        ray.shutdown()
        EmbeddedServer(mlflow_root(config.storage_path)).stop()

    assert all(trial["error"] is None and trial["step"] == 4 for trial in summary["trials"]), summary["trials"]
    assert sorted(trial["config"]["loss"] for trial in summary["trials"]) == sorted(PRIORS)
    params = {run.data.params["dpo.loss"]: float(run.data.params["dpo.beta"]) for run in children}
    assert params == PRIORS  # each trial at its loss's prior beta, recorded as the trial's params
    assert code == 0
    report = (report_dir / "report.md").read_text()
    ranking = report.split("## Losses ranked")[1].split("## Diagnoses")[0]
    rows = [line for line in ranking.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 3, ranking
    ranked = {cells[1]: float(cells[2]) for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}
    assert ranked == PRIORS
    assert [int(row.strip("|").split("|")[0]) for row in rows] == [1, 2, 3]
    assert "## Diagnoses" in report and "reward_kl_frontier.png" in report
