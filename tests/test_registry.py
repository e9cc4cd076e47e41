"""What the MLflow UI shows of a sweep (orchestrator/tracking/records.py, analysis/report.py): experiments
typed as model training (MLflow 3 opens them on the runs table, not the GenAI overview), data sets as
dataset inputs with their sha256 digests, the parent run's summary metrics (best score and beta, the chosen
beta after `dpo analyze`). The registered MLflow model of `dpo export --register` is tested in
tests/test_export.py. Run: `python -m pytest tests/test_registry.py -q` (a real MLflow server, ~20 s).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from orchestrator.tracking import records
from orchestrator.tracking.schema import (CHOSEN_BETA_METRIC, EXPERIMENT_KIND_TAG, SWEEP_BEST_BETA_METRIC,
                                          SWEEP_BEST_SCORE_METRIC, TRAINING_EXPERIMENT_KIND)
from tests.test_analysis import STEPS, log_sweep, mlflow_server, smooth_loss  # noqa: F401 - the shared server


def test_dataset_inputs_carry_the_files_sha256_and_their_role(tmp_path):
    train = tmp_path / "pairs.jsonl"
    train.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    inputs = records.dataset_inputs({"train": str(train), "eval": "org/heldout-pairs", "sft_train": None})
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("pairs", "train"), ("org/heldout-pairs", "eval")]
    from trainables.data_sources import dataset_fingerprint

    assert inputs[0].dataset.digest == dataset_fingerprint(str(train))[:36]
    assert json.loads(inputs[0].dataset.profile)["sha256"] == dataset_fingerprint(str(train))
    assert inputs[1].dataset.digest == hashlib.sha256(b"org/heldout-pairs").hexdigest()[:36]
    assert inputs[0].dataset.source_type == "local" and inputs[1].dataset.source_type == "hub"


@pytest.mark.mlflow
def test_a_sweeps_experiment_is_a_training_experiment_with_dataset_inputs_and_summary_metrics(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    url = mlflow_server["url"]
    client = MlflowClient(tracking_uri=url)
    kept = client.create_experiment("chosen-by-hand", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    experiment_id, parent = records.start_parent_run(url, "ui-sweep", "ui-sweep", {"name": "ui-sweep"})
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    records.get_or_create_experiment(url, "chosen-by-hand")
    assert client.get_experiment(kept).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # the user's choice kept

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    records.log_dataset_inputs(url, parent, {"train": str(train), "eval": None})
    records.log_summary_metrics(url, parent, {SWEEP_BEST_SCORE_METRIC: 0.75, SWEEP_BEST_BETA_METRIC: 0.2,
                                              "sweep/none": None, "sweep/nan": float("nan")})
    run = client.get_run(parent)
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "train" and len(dataset_input.dataset.digest) == 36
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "train"
    assert run.data.metrics == {SWEEP_BEST_SCORE_METRIC: 0.75, SWEEP_BEST_BETA_METRIC: 0.2}


@pytest.mark.mlflow
def test_analyze_logs_the_chosen_beta_as_a_metric_of_the_parent_run(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from analysis.report import analyze

    url = mlflow_server["url"]
    evals = STEPS[4::5]
    trials = [{"trial_id": f"t{index}", "beta": beta,
               "curves": {"train/loss": dict(zip(STEPS, smooth_loss())),
                          "eval/preference_accuracy": {step: accuracy for step in evals}}}
              for index, (beta, accuracy) in enumerate([(0.1, 0.7), (0.3, 0.9)])]
    parent = log_sweep(url, "ui-analyze", trials)
    analysis = analyze(url, "ui-analyze", report_dir=tmp_path / "report")
    assert analysis.selection.chosen["beta"] == 0.3
    assert MlflowClient(tracking_uri=url).get_run(parent).data.metrics[CHOSEN_BETA_METRIC] == 0.3
