"""Reliability (issue 7) without Ray or a tracking server: each test injects its fault itself.

- Bad data (item 5) and bad config (item 6) stop `dpo sweep` with exit status 2 and a message naming the
  line or field, within seconds, before Ray or an MLflow server starts and before anything is written.
- A process SIGKILLed while it writes a checkpoint (item 4) leaves no checkpoint that resume would take:
  `train.resume_from: latest` continues from the last complete one and reproduces the uninterrupted run.
- Safe defaults (item 8): weights load from safetensors only, code shipped with a model never runs unless
  the config says so, a tampered training state is never fully unpickled, no password reaches a log line.
Ray faults: tests/test_reliability_ray.py; MLflow outages: tests/test_reliability_mlflow.py.
Run: `python -m pytest tests/test_reliability.py -q --durations=5` (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.cli.main import EXIT_BAD_INPUT, main
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.spec import RunSpec, resolve_run
from tests.test_data import BAD_LINES
from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.checkpointing import MANIFEST, STATE_FILE, CheckpointError, latest_checkpoint, load_training_state
from trainables.entrypoints import run_dpo
from trainables.modeling import load_causal_lm, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SECRET = "pa55-w0rd-never-logged"
FAST_ENOUGH_S = 20  # "within seconds": measured 1-3 s per case; generous for a shared 2-core machine


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reliability-world")
    model_dir = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 24, seed=1))
    eval_ = write_jsonl(root / "eval.jsonl", pair_rows("explicit", 8, seed=2))
    return {"root": str(root), "model": str(model_dir), "train": str(train), "eval": str(eval_)}


# ---- items 5 and 6: bad data and bad config stop `dpo sweep` before any work -----------------------

@pytest.fixture
def no_ray_and_no_server(monkeypatch):
    """Starting Ray or the embedded MLflow server fails the test at once (and starts nothing)."""
    import ray

    from orchestrator.tracking.server import EmbeddedServer

    def forbidden(what: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} started before the bad input was reported")
        return fail

    monkeypatch.setattr(ray, "init", forbidden("Ray"))
    monkeypatch.setattr(EmbeddedServer, "start_or_reuse", forbidden("the embedded MLflow server"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking on, embedded server: the default


def sweep_config(world: dict[str, str], directory: Path, **sections: dict[str, Any]) -> Path:
    """A sweep config on the tiny world whose every output would land inside `directory`."""
    raw: dict[str, Any] = {
        "name": "reliability", "output_dir": str(directory / "outputs"), "storage_path": str(directory / "runs"),
        "model": {"path": world["model"]}, "data": {"train": world["train"], "eval": world["eval"], "max_length": 48},
        "train": {"max_steps": 4, "batch_size": 8, "device": "cpu"},
        "reference": {"cache_dir": str(directory / "reference-cache")},
        "sweep": {"strategy": "grid", "beta": [0.1, 0.2]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = directory / "sweep.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*")}


def run_sweep_cli(arguments: list[str], capsys) -> tuple[int, str, float]:
    started = time.monotonic()
    code = main(["sweep", *arguments])
    return code, capsys.readouterr().err, time.monotonic() - started


GOOD_LINES = [json.dumps(row).encode() for row in pair_rows("explicit", 2, seed=3)]
TEN_MB = "word " * 2_000_000
BAD_DATA = {  # kind: (file bytes, what the error must say)
    **{kind: (b"\n".join([*GOOD_LINES, line]) + b"\n", f"row 2 (line 3){', ' if reason.startswith('field') else ': '}{reason}")
       for kind, (line, reason) in BAD_LINES.items()},  # every bad-row kind of the engine's data tests
    "10 MB row cut short": (b"\n".join([*GOOD_LINES, json.dumps({"prompt": "p", "chosen": TEN_MB, "rejected": "r"})[:-2].encode()]),
                            "row 2 (line 3): not valid JSON"),
    "10 MB row with chosen == rejected": (
        b"\n".join([*GOOD_LINES, json.dumps({"prompt": "p", "chosen": TEN_MB, "rejected": TEN_MB}).encode()]),
        "row 2 (line 3), field 'rejected': chosen == rejected"),
    "empty file": (b"", "the file is empty"),
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_stops_the_sweep_within_seconds_naming_the_line_before_ray_and_writing_nothing(
        world, tmp_path, capsys, no_ray_and_no_server, kind):
    content, expected = BAD_DATA[kind]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(content)
    config = sweep_config(world, tmp_path, data={"train": str(pairs)})
    before = files_under(tmp_path)

    code, error, seconds = run_sweep_cli([str(config)], capsys)

    assert code == EXIT_BAD_INPUT, error
    assert str(pairs) in error and expected in error, error[:2000]
    assert "Traceback" not in error
    assert seconds < FAST_ENOUGH_S, f"{kind}: the error took {seconds:.1f} s"
    assert files_under(tmp_path) == before


CPUS = os.cpu_count() or 1
GPUS = torch.cuda.device_count()
BAD_CONFIG = {  # case: (--set overrides, the field the error must name)
    "unknown key": (["dpo.betta=0.2"], "dpo.betta: unknown key"),
    "beta = 0": (["dpo.beta=0"], "dpo.beta: Input should be greater than 0"),
    "negative beta in the grid": (["sweep.beta=[0.1, -0.2]"], "sweep.beta"),
    "learning rate = 0": (["train.learning_rate=0"], "train.learning_rate: Input should be greater than 0"),
    "negative learning rate range": (["sweep.strategy=random", "sweep.learning_rate={min: -0.001, max: 0.01}"],
                                     "sweep.learning_rate"),
    "non-finite beta": (["dpo.beta=.inf"], "dpo.beta"),
    "more workers than CPUs": ([f"resources.num_workers={CPUS + 1}"], "resources.num_workers"),
    "more GPUs than the machine has": (["resources.use_gpu=true", f"resources.num_workers={GPUS + 1}"], "resources.use_gpu"),
    "missing model path": (["model.path=/no/such/model"], "model.path: '/no/such/model' does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_stops_the_sweep_naming_the_field_before_any_work(world, tmp_path, capsys, no_ray_and_no_server, case):
    overrides, named = BAD_CONFIG[case]
    config = sweep_config(world, tmp_path)
    before = files_under(tmp_path)

    code, error, seconds = run_sweep_cli([str(config), *[item for o in overrides for item in ("--set", o)]], capsys)

    assert code == EXIT_BAD_INPUT, error
    assert named in error, error
    assert "Traceback" not in error
    assert seconds < FAST_ENOUGH_S
    assert files_under(tmp_path) == before


# ---- item 4: a crash while a checkpoint is being written -----------------------------------------

# The config of these runs: 48 tokens, beta 0.1, on the CPU, 6 steps of 8 pairs, checkpoints every 3 steps.
RUN = dict(data__max_length=48, dpo__beta=0.1, train__device="cpu", train__learning_rate=5e-3, train__batch_size=8,
           train__micro_batch_size=8, train__max_steps=6, train__warmup_steps=0, train__schedule="cosine",
           train__weight_decay=0.0, train__max_grad_norm=1.0, train__eval_every=3, train__checkpoint_every=3,
           train__keep_checkpoints=None, train__log_every=1, train__seed=0)


def run_spec(world: dict[str, str], output_dir: Path, resume_from: str | None = None) -> RunSpec:
    return engine_args(world["model"], world["train"], world["eval"], output_dir=output_dir,
                       reference_cache=Path(world["root"]) / "reference-cache", train__resume_from=resume_from, **RUN)


def train(world: dict[str, str], output_dir: Path, resume_from: str | None = None) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []
    spec = run_spec(world, output_dir, resume_from)
    run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime,
            lambda metrics, checkpoint: reports.append(metrics))
    return reports


# Runs in a child process: the same training as `train` above, SIGKILLed inside save_checkpoint of step 6.
CRASH_DURING_SAVE = r"""
import io, json, os, signal, sys
import torch
import trainables.checkpointing as checkpointing
from tests.tiny_world import engine_args
from trainables.entrypoints import run_dpo

job = json.loads(sys.argv[1])
crash_step, crash_point = job["crash_step"], job["crash_point"]
real_save, real_replace = torch.save, os.replace

def torn_state_file(obj, path, *args, **kwargs):  # the process dies halfway through writing training_state.pt
    if isinstance(obj, dict) and obj.get("step") == crash_step:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

def die_before_rename(source, target):  # every file and the manifest written, the rename never happens
    if os.path.basename(str(target)) == f"step-{crash_step:06d}":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target)

if crash_point == "torn state file":
    checkpointing.torch.save = torn_state_file
else:
    checkpointing.os.replace = die_before_rename
spec = engine_args(job["model"], job["train"], job["eval"], reference_cache=job["cache"], output_dir=job["output_dir"],
                   **job["settings"])
run_dpo(spec.model, spec.data, spec.preference, spec.loop, spec.runtime, lambda metrics, checkpoint: None)
print("the crash was not injected", flush=True)
"""


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> dict[int, dict[str, Any]]:
    reports = train(world, tmp_path_factory.mktemp("uninterrupted"))
    return {report["step"]: report for report in reports}


@pytest.mark.integration
@pytest.mark.parametrize("crash_point", ["torn state file", "killed before the rename"])
def test_a_crash_while_a_checkpoint_is_written_leaves_it_ignored_and_resume_takes_the_last_complete_one(
        world, tmp_path, uninterrupted, crash_point):
    output_dir = tmp_path / "crashed"
    job = {"crash_step": 6, "crash_point": crash_point, "model": world["model"], "train": world["train"],
           "eval": world["eval"], "cache": str(Path(world["root"]) / "reference-cache"),
           "output_dir": str(output_dir), "settings": RUN}
    child = subprocess.run([sys.executable, "-c", CRASH_DURING_SAVE, json.dumps(job)], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr[-3000:]

    checkpoints = output_dir / "checkpoints"
    [staging] = [path for path in checkpoints.iterdir() if path.name.startswith(".staging-step-000006")]
    assert not (checkpoints / "step-000006").exists()  # the half-written checkpoint never took a real name
    assert latest_checkpoint(checkpoints) == checkpoints / "step-000003"

    resumed = train(world, output_dir, resume_from="latest")

    assert [report["step"] for report in resumed] == [4, 5, 6]
    differences = [abs(report[key] - uninterrupted[report["step"]][key])
                   for report in resumed for key in ("train/loss", "train/reward_margin", "train/grad_norm")]
    print(f"{crash_point}: resumed from step 3, largest difference to the uninterrupted run {max(differences):.1e}")
    assert max(differences) < 1e-5
    assert abs(resumed[-1]["eval/loss"] - uninterrupted[6]["eval/loss"]) < 1e-5
    assert latest_checkpoint(checkpoints) == checkpoints / "step-000006"
    assert not staging.exists(), "the crashed save's staging folder was left behind"


@pytest.mark.integration
def test_resuming_from_a_named_checkpoint_whose_files_changed_is_refused(world, tmp_path, uninterrupted):
    output_dir = tmp_path / "run"
    train(world, output_dir)
    step3 = output_dir / "checkpoints" / "step-000003"
    weights = step3 / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of one weight: still a loadable file, no longer the saved model
    weights.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"model/model.safetensors does not match its sha256"):
        train(world, tmp_path / "resumed", resume_from=str(step3))
    assert latest_checkpoint(output_dir / "checkpoints") == output_dir / "checkpoints" / "step-000006"


# ---- item 8: safe defaults ----------------------------------------------------------------------

class RunsCode:
    """Unpickling this object runs a shell command: what a malicious checkpoint file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_training_state_holding_code_is_refused_without_unpickling_it(world, tmp_path):
    output_dir = tmp_path / "run"
    train(world, output_dir)
    checkpoint = output_dir / "checkpoints" / "step-000006"
    marker = tmp_path / "code-ran"
    state = load_training_state(checkpoint)
    torch.save({**state, "extra": RunsCode(marker)}, checkpoint / STATE_FILE)
    manifest = json.loads((checkpoint / MANIFEST).read_text())  # a consistent manifest: only unpickling is left
    manifest["files"][STATE_FILE] = hashlib.sha256((checkpoint / STATE_FILE).read_bytes()).hexdigest()
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_training_state(checkpoint)
    assert not marker.exists()


def test_weights_load_from_safetensors_only_never_from_a_pickled_file(world, tmp_path):
    model_dir = tmp_path / "pickled-model"
    load_causal_lm(world["model"]).config.save_pretrained(model_dir)  # config.json, and weights only as ...
    marker = tmp_path / "code-ran"
    torch.save({"weights": RunsCode(marker)}, model_dir / "pytorch_model.bin")  # ... a pickle, as older models ship

    with pytest.raises(OSError, match="safetensors"):
        load_causal_lm(str(model_dir))
    assert not marker.exists()


def test_code_shipped_with_a_model_never_runs_unless_the_config_allows_it(world, tmp_path):
    """A model folder whose config.json and tokenizer_config.json point at its own Python files (auto_map)."""
    model_dir = build_model_dir(tmp_path / "model-with-code", "llama")
    marker = tmp_path / "code-ran"
    code = (f"open({str(marker)!r}, 'w').write('ran')\n"
            "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
            "class Custom(PretrainedConfig):\n    model_type = 'custom'\n"
            "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    for module in ("configuration_custom", "modeling_custom", "tokenization_custom"):
        (model_dir / f"{module}.py").write_text(code)
    tokenizer_map = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    for name, update in (("config.json", {"model_type": "custom", "auto_map": {
            "AutoConfig": "configuration_custom.Custom", "AutoModelForCausalLM": "modeling_custom.Custom", **tokenizer_map}}),
            ("tokenizer_config.json", {"tokenizer_class": "CustomTokenizer", "auto_map": tokenizer_map})):
        settings = json.loads((model_dir / name).read_text())
        (model_dir / name).write_text(json.dumps({**settings, **update}))

    experiment = ExperimentConfig.model_validate({"name": "safe", "model": {"path": str(model_dir)},
                                                  "data": {"train": world["train"]}})
    trust_remote_code = resolve_run(experiment).model.trust_remote_code  # what the engine receives by default
    assert trust_remote_code is False
    with pytest.raises(OSError, match="custom code"):
        load_causal_lm(str(model_dir), trust_remote_code=trust_remote_code)
    with pytest.raises(OSError, match="custom code"):
        load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    assert not marker.exists()


def test_tracker_log_lines_never_show_the_tracking_password(caplog):
    import socket

    from orchestrator.tracking.trial_tracker import TrialTracker

    with socket.socket() as probe:  # a port nobody listens on: every request fails
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.INFO)
    tracker = TrialTracker(f"http://trainer:{SECRET}@127.0.0.1:{port}", "0" * 32, flush_every_s=0.05,
                           max_backoff_s=0.2, client=object())
    tracker.log_metrics({"train/loss": 0.69}, step=1)
    deadline = time.monotonic() + 30
    while "unreachable" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tracker.close(timeout_s=0.5) is False  # nothing could be delivered
    assert "unreachable" in caplog.text and "http://trainer:***@127.0.0.1" in caplog.text
    assert SECRET not in caplog.text


def test_the_sweep_summary_never_prints_the_tracking_password(capsys):
    from orchestrator.console import print_sweep_summary as print_summary

    print_summary({"name": "s", "trials": [], "reference_cache_key": "k", "decision_log": [], "metric": "m",
                   "best": {"trial_id": "t1", "metric": 0.9, "config": {"beta": 0.1}}, "storage": "/runs/s",
                   "mlflow": {"uri": f"https://trainer:{SECRET}@mlflow.internal", "parent_run_id": "abc"}})
    printed = capsys.readouterr().out
    assert "https://trainer:***@mlflow.internal" in printed and SECRET not in printed
