"""A corrupted or failed MLflow artifact upload is retried (issue 23, promise 4), and never crashes a sweep.

The artifact store is real (MLflow's sqlite tracking store with a local artifact folder); the upload is
made to fail by wrapping MlflowClient.log_text: the first upload stores a cut-short copy (what a proxy
dropping the body's end leaves), or the store refuses it. Every upload is read back and compared.
Run: `python -m pytest tests/test_chaos_artifacts.py -q` (a few seconds).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from orchestrator.tracking import records

TEXT = json.dumps([{"round": r, "beta": 0.1 * r, "action": "climb"} for r in range(1, 40)], indent=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("artifact-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"  # created once: the schema migrations take seconds
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("artifacts", artifact_location=(root / "artifacts").as_uri())


@pytest.fixture
def run(store):
    uri, client, experiment = store
    return uri, client, client.create_run(experiment).info.run_id


def stored(client, run_id: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, "decision_log.json", str(tmp_path))).read_text()


@pytest.mark.mlflow
@pytest.mark.parametrize("fault", ["cut-short copy", "store refuses"])
def test_a_corrupted_or_failed_artifact_upload_is_retried_until_the_stored_copy_is_intact(run, tmp_path, monkeypatch, caplog, fault):
    from mlflow.tracking import MlflowClient

    uri, client, run_id = run
    real_log_text, uploads = MlflowClient.log_text, []

    def faulty(self, run_id, text, artifact_file):
        uploads.append(len(text))
        if len(uploads) == 1:
            if fault == "store refuses":
                raise ConnectionError("connection reset by peer")
            return real_log_text(self, run_id, text[: len(text) // 2], artifact_file)
        return real_log_text(self, run_id, text, artifact_file)

    monkeypatch.setattr(MlflowClient, "log_text", faulty)
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking.records"):
        assert records.log_text_artifact(uri, run_id, "decision_log.json", TEXT, retry_wait_s=0.01)
    assert len(uploads) == 2
    assert stored(client, run_id, tmp_path) == TEXT
    assert "artifact decision_log.json upload 1 of 3 failed" in caplog.text
    assert ("the stored copy differs" if fault == "cut-short copy" else "ConnectionError") in caplog.text


@pytest.mark.mlflow
def test_an_artifact_that_never_arrives_intact_is_logged_and_the_caller_goes_on(run, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    uri, _, run_id = run
    real_log_text = MlflowClient.log_text
    monkeypatch.setattr(MlflowClient, "log_text", lambda self, run_id, text, name: real_log_text(self, run_id, text[:10], name))
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking.records"):
        assert records.log_text_artifact(uri, run_id, "decision_log.json", TEXT, retry_wait_s=0.01) is False
    assert "not stored after 3 uploads" in caplog.text
