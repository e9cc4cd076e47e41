"""MLflow tracking: URI precedence, redaction, the embedded server, parent/child runs, async metrics, outages.

The `mlflow` tests start one real `mlflow server` on 127.0.0.1 (SQLite backend under pytest's tmp folder)
for the module and stop it by its recorded process group; the outage test kills it mid-logging and
starts it again on the same port and database. Everything is read back with MlflowClient.
Run: `python -m pytest tests/test_tracking.py -q --durations=5` (about 40 s on 2 CPU cores);
only the server-free checks: `python -m pytest tests/test_tracking.py -m "not mlflow" -q`.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from orchestrator.errors import TrackingConfigError, TrackingUnavailableError
from orchestrator.tracking import records as tracking
from orchestrator.tracking.schema import DROPPED_METRIC
from orchestrator.tracking.server import EmbeddedServer, ensure_reachable, prepare_tracking_uri, resolve_tracking_uri
from orchestrator.tracking.trial_tracker import TrialTracker

SECRET_PASSWORD = "s3cr3t-pa55"
SECRET_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123"
CONFIG = {
    "name": "tracking-test",
    "model": {"path": "/models/tiny", "tokenizer_path": "/models/tiny-tok", "hf_token": SECRET_TOKEN},
    "dpo": {"beta": 0.1, "kl_weight": 0.0, "loss": "sigmoid"},
    "train": {"learning_rate": 1e-4, "max_steps": 20},
    "data": {"train": f"postgresql://trainer:{SECRET_PASSWORD}@db.internal:5432/pairs", "columns": {}},
    "sweep": {"kl_weight": [0.0, 0.05]},
    "notes": "x" * 7000,  # longer than MLflow's 6000-character param limit
    "many": {f"key_{index:03d}": index for index in range(150)},  # > 100 params: several log_batch calls
}


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {point.step: point.value for point in client.get_metric_history(run_id, key)}


def embedded_log(server) -> str:
    return (server["server"].root / "server.log").read_text(errors="replace")


def everything_logged(client, run_id: str) -> str:
    run = client.get_run(run_id)
    return repr(run.data.params) + repr(run.data.tags)


# ---- without a server ---------------------------------------------------------------------------

def test_tracking_uri_precedence_config_then_environment_then_embedded(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri("http://from-config:5000", str(tmp_path)) == ("http://from-config:5000", False)
    assert resolve_tracking_uri(None, str(tmp_path)) == ("http://from-env:5000", False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, str(tmp_path)) == (str(tmp_path.resolve() / "mlflow"), True)
    with pytest.raises(TrackingConfigError, match="tracking.uri"):
        resolve_tracking_uri(None, "s3://bucket/runs")


def test_params_are_flat_redacted_and_within_mlflow_limits():
    params = tracking.flatten_params(CONFIG)
    assert params["dpo.beta"] == "0.1" and params["sweep.kl_weight"] == "[0.0, 0.05]"
    assert params["model.tokenizer_path"] == "/models/tiny-tok"  # 'token' inside a longer word is not a secret
    assert params["model.hf_token"] == "***"
    assert params["data.train"] == "postgresql://trainer:***@db.internal:5432/pairs"
    assert len(params["notes"]) <= tracking.MAX_PARAM_VALUE_LENGTH
    assert SECRET_PASSWORD not in repr(params) and SECRET_TOKEN not in repr(params)
    assert SECRET_PASSWORD not in tracking.config_yaml(CONFIG) and SECRET_TOKEN not in tracking.config_yaml(CONFIG)
    assert tracking.redact(f"push with {SECRET_TOKEN}") == "push with ***"
    assert tracking.redact_params({"api_key": "abc", "train.tokens_per_second": 5.0}) == {"api_key": "***", "train.tokens_per_second": 5.0}


def test_data_fingerprint_changes_with_the_file_content(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    first = tracking.data_fingerprints({"train": str(pairs), "eval": None, "hub": "org/pairs"})
    pairs.write_text('{"prompt": "a", "chosen": "c", "rejected": "b"}\n')
    second = tracking.data_fingerprints({"train": str(pairs)})
    assert len(first["data.train.sha256"]) == 64 and first["data.train.sha256"] != second["data.train.sha256"]
    assert first["data.hub.source"] == "org/pairs" and not any(key.startswith("data.eval") for key in first)


def test_unreachable_server_is_a_clear_error_within_the_timeout():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port}.*unreachable") as error:
        ensure_reachable(f"http://admin:{SECRET_PASSWORD}@127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - started < 5
    assert SECRET_PASSWORD not in str(error.value)


@pytest.fixture
def password_protected_health():
    """An HTTP server on 127.0.0.1 whose /health wants Basic admin:SECRET_PASSWORD (like a proxy in front
    of MLflow); yields its port and stops after the test."""
    import base64
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    expected = "Basic " + base64.b64encode(f"admin:{SECRET_PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" and self.headers.get("Authorization") == expected else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_inside_the_uri_or_in_mlflow_variables_reach_the_health_check(password_protected_health, monkeypatch):
    port = password_protected_health
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    ensure_reachable(f"http://admin:{SECRET_PASSWORD}@127.0.0.1:{port}", timeout_s=2.0)
    with pytest.raises(TrackingUnavailableError, match="refused the credentials") as error:
        ensure_reachable(f"http://admin:wrong-{SECRET_PASSWORD}@127.0.0.1:{port}", timeout_s=2.0)
    assert SECRET_PASSWORD not in str(error.value)
    with pytest.raises(TrackingUnavailableError, match="refused the credentials"):
        ensure_reachable(f"http://127.0.0.1:{port}", timeout_s=2.0)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET_PASSWORD)
    ensure_reachable(f"http://127.0.0.1:{port}/", timeout_s=2.0)


# ---- with a real server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    storage = tmp_path_factory.mktemp("tracking-storage")
    embedded = EmbeddedServer(storage / "mlflow")
    started = time.monotonic()
    url = embedded.start_or_reuse()
    print(f"mlflow server start: {time.monotonic() - started:.1f} s")
    try:
        yield {"url": url, "server": embedded, "storage": storage, "client": tracking.client_for(url)}
    finally:
        embedded.stop()


@pytest.mark.mlflow
def test_second_call_reuses_the_embedded_server_and_prints_its_url(server, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pid = server["server"].state()["pid"]
    started = time.monotonic()
    assert prepare_tracking_uri(None, str(server["storage"])) == server["url"]
    assert time.monotonic() - started < 3 and server["server"].state()["pid"] == pid
    assert server["url"] in capsys.readouterr().out
    assert (server["storage"] / "mlflow" / "mlflow.db").is_file()


@pytest.mark.mlflow
def test_a_server_that_takes_the_port_first_is_never_used_as_ours(server, tmp_path, monkeypatch):
    """Two sweeps starting their embedded servers at once may both find port 5000 free; the one whose server
    loses the bind must not take the other's healthy answer for its own (it would log its runs into the other
    sweep's store): it moves to another port, and its runs land in its own store."""
    from orchestrator.tracking import server as server_module

    taken = int(server["url"].rsplit(":", 1)[1])  # the module's server listens there
    real_free_port, calls = server_module._free_port, []

    def probe_saw_it_free(host: str, preferred: int, **kwargs) -> int:
        calls.append(preferred)
        return taken if len(calls) == 1 else real_free_port(host, preferred, **kwargs)

    monkeypatch.setattr(server_module, "_free_port", probe_saw_it_free)
    mine = EmbeddedServer(tmp_path / "mlflow")
    try:
        url = mine.start_or_reuse()
        assert url != server["url"] and len(calls) == 2, (url, calls)
        assert server_module._port_owned_by_group(int(url.rsplit(":", 1)[1]), mine.state()["pgid"]) is True
        experiment = tracking.client_for(url).create_experiment("only-in-mine")
        assert tracking.client_for(url).get_experiment(experiment).name == "only-in-mine"
        assert server["client"].get_experiment_by_name("only-in-mine") is None
    finally:
        mine.stop()


@pytest.mark.mlflow
def test_parent_and_child_runs_hold_config_tags_and_artifacts_and_are_reused(server):
    url, client = server["url"], server["client"]
    experiment_id, parent = tracking.start_parent_run(
        url, "tracking-test", "sweep-a", CONFIG, search_space={"beta": {"min": 0.1, "max": 0.5}},
        tags={"data.train_fingerprint": "abc123", "reference_cache_key": "key-9"},
        artifacts={"notes.txt": f"token={SECRET_TOKEN}"})
    run = client.get_run(parent)
    assert run.data.params["dpo.beta"] == "0.1" and run.data.params["many.key_149"] == "149"
    assert run.data.tags["reference_cache_key"] == "key-9" and run.data.tags["version.mlflow"]
    assert run.data.tags["sweep"] == "sweep-a" and run.info.status == "RUNNING"
    artifacts = {item.path for item in client.list_artifacts(parent)}
    assert {"config.yaml", "search_space.json", "notes.txt"} <= artifacts
    config_text = Path(client.download_artifacts(parent, "config.yaml")).read_text()
    assert "beta: 0.1" in config_text and SECRET_TOKEN not in config_text and SECRET_PASSWORD not in config_text
    assert SECRET_TOKEN not in Path(client.download_artifacts(parent, "notes.txt")).read_text()

    child = tracking.find_or_create_trial_run(url, experiment_id, parent, "trial_0001", "sweep-a",
                                              {"beta": 0.3, "kl_weight": 0.05, "learning_rate": 1e-4, **CONFIG},
                                              stage="dpo", arm="b", checkpoint_dir="/runs/sweep-a-trials/trial_0001")
    tags = client.get_run(child).data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["trial_id"] == "trial_0001" and tags["dpo.stage"] == "dpo"
    assert tags["dpo.arm"] == "b" and tags["checkpoint_dir"].endswith("trial_0001")
    assert client.get_run(child).data.params["beta"] == "0.3"
    for logged in (everything_logged(client, parent), everything_logged(client, child)):
        assert SECRET_TOKEN not in logged and SECRET_PASSWORD not in logged

    again = tracking.find_or_create_trial_run(url, experiment_id, parent, "trial_0001", "sweep-a", {"beta": 0.3})
    assert again == child
    assert len(tracking.find_runs(url, experiment_id, {"trial_id": "trial_0001", "sweep": "sweep-a"})) == 1
    assert tracking.start_parent_run(url, "tracking-test", "sweep-a", CONFIG)[1] == parent
    tracking.set_tags(url, parent, {"reference_cache_key": "key-10", "db_password": SECRET_PASSWORD})
    assert client.get_run(parent).data.tags["reference_cache_key"] == "key-10"
    assert SECRET_PASSWORD not in everything_logged(client, parent)


def parent_and_trial_run(url: str, sweep: str, trial_id: str) -> tuple[str, str, str]:
    """(experiment id, parent run id, trial run id) of a fresh sweep with one trial at beta 0.1."""
    experiment_id, parent = tracking.start_parent_run(url, "tracking-test", sweep, {"dpo": {"beta": 0.1}})
    return experiment_id, parent, tracking.find_or_create_trial_run(url, experiment_id, parent, trial_id, sweep, {"beta": 0.1})


@pytest.mark.mlflow
def test_tracker_returns_at_once_and_every_point_arrives_after_finish(server):
    url, client = server["url"], server["client"]
    experiment_id, parent, run_id = parent_and_trial_run(url, "sweep-b", "t1")
    tracker = TrialTracker(url, run_id, flush_every_s=0.2)
    started = time.monotonic()
    for step in range(1, 301):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/preference_accuracy": step / 300,
                             "eval/reward_margin": float(step), "trial_id": "t1"}, step=step)  # strings are skipped
    assert time.monotonic() - started < 0.5  # the loop never waits on the server
    tracking.set_tags(url, run_id, {"checkpoint_latest": "/runs/t1/checkpoint_000003"})
    assert tracker.close() is True
    tracking.end_run(url, run_id, "FINISHED")
    loss = history(client, run_id, "train/loss")
    assert len(loss) == 300 and loss[7] == pytest.approx(1 / 7)
    assert len(history(client, run_id, "eval/reward_margin")) == 300
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics[DROPPED_METRIC] == 0
    assert run.data.tags["checkpoint_latest"].endswith("checkpoint_000003")


@pytest.mark.mlflow
def test_many_trials_log_concurrently_without_losing_points(server):
    url, client = server["url"], server["client"]
    experiment_id, parent = tracking.start_parent_run(url, "tracking-test", "sweep-c", {"dpo": {"beta": 0.1}})
    run_ids = [tracking.find_or_create_trial_run(url, experiment_id, parent, f"t{i}", "sweep-c", {"beta": 0.1 * i}) for i in range(8)]
    errors: list[BaseException] = []

    def train(run_id: str) -> None:
        try:
            tracker = TrialTracker(url, run_id, flush_every_s=0.05)
            for step in range(200):
                tracker.log_metrics({"train/loss": step * 0.5, "train/kl": step * 0.01}, step)
                time.sleep(0.002)
            assert tracker.close() is True
            tracking.end_run(url, run_id, "FINISHED")
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=train, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert "database is locked" not in embedded_log(server)
    for run_id in run_ids:
        assert len(history(client, run_id, "train/loss")) == 200 and len(history(client, run_id, "train/kl")) == 200


@pytest.mark.mlflow
def test_server_outage_is_buffered_and_losses_are_counted(server):
    url, client, embedded = server["url"], server["client"], server["server"]
    experiment_id, parent, roomy_run = parent_and_trial_run(url, "sweep-d", "roomy")
    tight_run = tracking.find_or_create_trial_run(url, experiment_id, parent, "tight", "sweep-d", {"beta": 0.2})
    roomy = TrialTracker(url, roomy_run, flush_every_s=0.2, max_backoff_s=1.0)
    tight = TrialTracker(url, tight_run, flush_every_s=0.2, max_backoff_s=1.0, max_buffer=50)
    port = int(url.rsplit(":", 1)[1])
    try:
        for step in range(600):
            for tracker in (roomy, tight):
                tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
            if step == 100:
                assert embedded.stop()  # the server dies mid-training ...
            if step == 400:
                assert embedded.start_or_reuse(port=port) == url  # ... and comes back on the same port and database
            time.sleep(0.01)
    finally:
        embedded.start_or_reuse(port=port)  # the next tests need it
    assert roomy.close() is True and tight.close() is True  # no exception reached the training loop
    assert len(history(client, roomy_run, "train/loss")) >= 0.99 * 600
    assert client.get_run(roomy_run).data.metrics[DROPPED_METRIC] == 0
    delivered = len(history(client, tight_run, "train/loss"))
    dropped = client.get_run(tight_run).data.metrics[DROPPED_METRIC]
    assert dropped > 0 and delivered + dropped == 600


@pytest.mark.mlflow
def test_failed_trial_ends_failed_with_its_error_and_stale_runs_are_closed_then_resumed(server):
    url, client = server["url"], server["client"]
    experiment_id, parent, failed = parent_and_trial_run(url, "sweep-e", "bad")
    tracker = TrialTracker(url, failed, flush_every_s=0.2)
    tracker.log_metrics({"train/loss": 0.69}, step=1)
    tracker.close()
    tracking.end_run(url, failed, "FAILED", error="RuntimeError: loss is NaN at step 2")
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and "loss is NaN" in run.data.tags["error"]

    # End of a sweep: a trial Tune stopped early never ended its run; the parent is kept open.
    unfinished = tracking.find_or_create_trial_run(url, experiment_id, parent, "unfinished", "sweep-e", {"beta": 0.2})
    assert tracking.close_stale_runs(url, "tracking-test", "sweep-e", keep=[parent]) == 1
    assert client.get_run(parent).info.status == "RUNNING"
    # --resume after a killed driver: whatever it left RUNNING (here the parent) is ended first.
    assert tracking.close_stale_runs(url, "tracking-test", "sweep-e") == 1
    assert not tracking.find_runs(url, experiment_id, {"sweep": "sweep-e"}, status="RUNNING")
    assert client.get_run(unfinished).info.status == "KILLED"
    # On resume the trial continues its own run, reopened.
    assert tracking.find_or_create_trial_run(url, experiment_id, parent, "unfinished", "sweep-e", {"beta": 0.2}) == unfinished
    assert client.get_run(unfinished).info.status == "RUNNING"
    tracking.end_run(url, unfinished, "FINISHED")
    assert client.get_run(failed).info.status == "FAILED"  # closing stale runs leaves finished ones alone
