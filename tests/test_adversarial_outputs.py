"""Adversarial corpus, outputs: no user file is overwritten or deleted by a run that did not create it,
and a resumed checkpoint must belong to the run (issue 17, promises 3 and 4).

Each refusal case builds one hostile situation around `dpo train` / `dpo sft` (an output_dir holding
another run, a live lock, a file where a folder goes, an input where an output goes, a symbolic link out
of the run's folder, a checkpoint of another model or data) and checks with tests/adversarial.refused that
the run ends before any work with exit 2 and a message naming what it must, changes nothing it must not,
and leaks no planted secret (every case carries one in tracking.uri). The accepted cases check the ways
on: a dead owner's lock is taken over, train.overwrite_output_dir replaces the old run, resuming the
same run continues it, config.yaml is redacted and private, pruning deletes only the run's own folders.
Run: `python -m pytest tests/test_adversarial_outputs.py -q` (about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import pytest

from tests.adversarial import SECRET, assert_no_secret, refused, run_cli
from tests.tiny_world import build_model, build_model_dir, pair_rows, write_jsonl
from trainables.modeling import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"
SECRET_URI = f"http://alice:{SECRET}@127.0.0.1:5000"


@pytest.fixture(scope="module", autouse=True)
def _demo_cache_for_module(demo_cache) -> Path:
    return demo_cache


def dpo_args(world: dict, output_dir: Path, *extra: str, command: str = "train", model: str | None = None,
             train: str | None = None) -> list[str]:
    """`dpo <command> configs/quickstart.yaml --set ...` on the tiny world, a secret planted in tracking.uri."""
    settings = {
        "model.path": model or world["model"], "data.train": train or world["train"], "data.eval": world["eval"],
        "data.sft_train": world["sft"], "output_dir": str(output_dir), "reference.cache_dir": world["cache"],
        "train.max_steps": "3", "train.batch_size": "4", "train.eval_every": "3", "train.eval_batch_size": "8",
        "train.checkpoint_every": "3", "train.device": "cpu", "tracking.uri": SECRET_URI,
    }
    args = [command, str(QUICKSTART)]
    for key, value in [*settings.items(), *(item.split("=", 1) for item in extra)]:
        args += ["--set", f"{key}={value}"]
    return args


def trained(world: dict, output_dir: Path, *extra: str, **options) -> Path:
    outcome = run_cli(dpo_args(world, output_dir, *extra, **options))
    assert outcome.code == 0 and outcome.escaped is None, outcome.everything
    return output_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A model, a second model (other weights, same tokenizer), pair files, SFT rows, and finished runs to copy."""
    root = tmp_path_factory.mktemp("outputs-world")
    model = build_model_dir(root / "model")
    other_model = root / "other-model"
    shutil.copytree(model, other_model)
    build_model(other_model, "llama", vocab_size=len(load_tokenizer(str(model))), seed=7)  # other weights
    sft_rows = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in pair_rows("explicit", 12, seed=4)]
    world = {
        "root": root, "model": str(model), "other_model": str(other_model), "cache": str(root / "reference-cache"),
        "train": str(write_jsonl(root / "train.jsonl", pair_rows("explicit", 12, seed=1))),
        "other_train": str(write_jsonl(root / "other-train.jsonl", pair_rows("explicit", 12, seed=3))),
        "eval": str(write_jsonl(root / "eval.jsonl", pair_rows("explicit", 8, seed=2))),
        "sft": str(write_jsonl(root / "sft.jsonl", sft_rows)),
    }
    world["run"] = trained(world, root / "done-run")  # a finished `dpo train`: metrics, config, checkpoint step 3
    world["other_model_run"] = trained(world, root / "other-model-run", model=str(other_model))
    return world


def copy_of(run: Path, where: Path) -> Path:
    shutil.copytree(run, where, symlinks=True)
    return where


def lock_file(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.lock"
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": 1.7e9}))
    return path


def dead_pid() -> int:
    """The pid of a process that has ended (a child reaped at once)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# ---- the refusals: (argv, names, untouched, must_not_exist) built per case ---------------------------------

Case = Callable[[dict, Path], tuple[list[str], list[str], list[Path], list[Path]]]


def second_run_into_a_used_output_dir(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    return dpo_args(world, out), [str(out), "holds another run", "metrics.jsonl", "overwrite_output_dir"], [out], []


def second_sft_run_into_a_used_output_dir(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    return dpo_args(world, out, command="sft"), [str(out), "holds another run", "resume_from"], [out], []


def resume_of_another_folders_checkpoint_into_a_used_output_dir(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    checkpoint = world["other_model_run"] / "checkpoints" / "step-000003"
    return (dpo_args(world, out, f"train.resume_from={checkpoint}"), [str(out), "another folder"],
            [out, world["other_model_run"]], [])


def concurrent_run_holds_the_lock(world, tmp):
    out = tmp / "out"
    lock_file(out, os.getpid())  # a live process on this host: this test's own
    return dpo_args(world, out), [str(out), str(os.getpid()), socket.gethostname(), "in use"], [out], [out / "run.json"]


def live_lock_wins_over_overwrite(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    lock_file(out, os.getpid())
    return dpo_args(world, out, "train.overwrite_output_dir=true"), [str(out), str(os.getpid())], [out], []


def lock_of_another_host(world, tmp):
    out = tmp / "out"
    lock_file(out, 4242, host="gpu-node-17.example")
    return dpo_args(world, out), ["gpu-node-17.example", "run.lock"], [out], [out / "run.json"]


def output_dir_is_a_file(world, tmp):
    out = tmp / "out"
    out.write_text("my notes\n")
    return dpo_args(world, out), [str(out), "is a file"], [out], []


def output_dir_through_a_file(world, tmp):
    blocker = tmp / "notes.txt"
    blocker.write_text("my notes\n")
    out = blocker / "run"
    return dpo_args(world, out), [str(out), str(blocker), "is a file"], [blocker], []


def output_dir_is_a_dangling_link(world, tmp):
    out = tmp / "out"
    out.symlink_to(tmp / "nowhere")
    return dpo_args(world, out), [str(out), "symbolic link"], [out], [tmp / "nowhere"]


def training_file_named_metrics_jsonl_inside_output_dir(world, tmp):
    out = tmp / "out"
    out.mkdir()
    data = write_jsonl(out / "metrics.jsonl", pair_rows("explicit", 12, seed=1))
    return dpo_args(world, out, train=str(data)), ["data.train", "metrics.jsonl", str(out)], [out], [out / "config.yaml"]


def eval_file_named_config_yaml_inside_output_dir(world, tmp):
    out = tmp / "out"
    out.mkdir()
    data = write_jsonl(out / "config.yaml", pair_rows("explicit", 8, seed=2))
    return (dpo_args(world, out, f"data.eval={data}", "data.layout=explicit"), ["data.eval", "config.yaml"], [out],
            [out / "metrics.jsonl"])


def training_file_hard_linked_as_metrics_jsonl(world, tmp):
    data = write_jsonl(tmp / "pairs.jsonl", pair_rows("explicit", 12, seed=1))
    out = tmp / "out"
    out.mkdir()
    os.link(data, out / "metrics.jsonl")
    return dpo_args(world, out, train=str(data)), ["data.train", "metrics.jsonl"], [data, out], []


def model_inside_the_checkpoints_an_overwrite_would_delete(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    model = out / "checkpoints" / "step-000003" / "model"
    return (dpo_args(world, out, "train.overwrite_output_dir=true", model=str(model)), ["model.path", "checkpoints"],
            [out], [])


def symlinked_metrics_jsonl_pointing_outside(world, tmp):
    victim = tmp / "victim.jsonl"
    victim.write_text("precious\n")
    out = tmp / "out"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    return dpo_args(world, out), ["metrics.jsonl", "symbolic link", str(out)], [victim, out], []


def symlinked_config_yaml_pointing_outside(world, tmp):
    victim = tmp / "victim.yaml"
    victim.write_text("precious: true\n")
    out = tmp / "out"
    out.mkdir()
    (out / "config.yaml").symlink_to(victim)
    return dpo_args(world, out), ["config.yaml", "symbolic link"], [victim, out], []


def symlinked_checkpoints_folder_pointing_outside(world, tmp):
    elsewhere = copy_of(world["run"] / "checkpoints", tmp / "elsewhere")
    out = tmp / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    return (dpo_args(world, out, "train.overwrite_output_dir=true"), ["checkpoints", "symbolic link"], [elsewhere, out],
            [])


def symlinked_lock_file(world, tmp):
    victim = tmp / "victim.txt"
    victim.write_text("precious\n")
    out = tmp / "out"
    out.mkdir()
    (out / "run.lock").symlink_to(victim)
    return dpo_args(world, out), ["run.lock", "symbolic link"], [victim, out], []


def resume_of_another_models_checkpoint(world, tmp):
    out = tmp / "out"
    checkpoint = world["other_model_run"] / "checkpoints" / "step-000003"
    return (dpo_args(world, out, f"train.resume_from={checkpoint}"), ["train.resume_from", str(checkpoint), "model.path"],
            [world["other_model_run"]], [out])


def resume_with_other_training_data(world, tmp):
    out = tmp / "out"
    checkpoint = world["run"] / "checkpoints" / "step-000003"
    return (dpo_args(world, out, f"train.resume_from={checkpoint}", train=world["other_train"]),
            ["train.resume_from", "training data"], [world["run"]], [out])


def resume_latest_of_another_models_run(world, tmp):
    out = copy_of(world["other_model_run"], tmp / "out")
    return dpo_args(world, out, "train.resume_from=latest", "train.max_steps=6"), ["model.path", "step-000003"], [out], []


def sft_resuming_a_dpo_run(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    return (dpo_args(world, out, "train.resume_from=latest", "train.max_steps=6", command="sft"), [str(out), "`dpo train`"],
            [out], [])


def reference_model_inside_the_checkpoints_pruning_deletes(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    reference = out / "checkpoints" / "step-000003" / "model"
    return (dpo_args(world, out, "train.resume_from=latest", "train.max_steps=9", f"reference.path={reference}"),
            ["reference.path", "checkpoints"], [out], [])


def overwrite_and_resume_together(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    return (dpo_args(world, out, "train.overwrite_output_dir=true", "train.resume_from=latest"),
            ["overwrite_output_dir", "resume_from"], [out], [])


def run_record_is_a_folder(world, tmp):
    out = tmp / "out"
    (out / "run.json").mkdir(parents=True)
    return dpo_args(world, out), ["run.json", "not a plain file"], [out], [out / "metrics.jsonl"]


def checkpoints_is_a_file(world, tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "checkpoints").write_text("my list of checkpoints\n")
    return dpo_args(world, out), ["checkpoints", "is a file"], [out], [out / "run.json"]


def failed_run_into_an_empty_folder_leaves_it_empty(world, tmp):
    out = tmp / "out"
    out.mkdir()
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n{"prompt": "p"}\n')
    return (dpo_args(world, out, train=str(bad)), [str(bad)], [out],
            [out / "run.json", out / "run.lock", out / "metrics.jsonl"])


def failed_overwrite_gives_the_old_run_back(world, tmp):
    out = copy_of(world["run"], tmp / "out")
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    return dpo_args(world, out, "train.overwrite_output_dir=true", train=str(bad)), [str(bad)], [out], []


REFUSALS: list[Case] = [
    second_run_into_a_used_output_dir, second_sft_run_into_a_used_output_dir,
    resume_of_another_folders_checkpoint_into_a_used_output_dir, concurrent_run_holds_the_lock,
    live_lock_wins_over_overwrite, lock_of_another_host, output_dir_is_a_file, output_dir_through_a_file,
    output_dir_is_a_dangling_link, training_file_named_metrics_jsonl_inside_output_dir,
    eval_file_named_config_yaml_inside_output_dir, training_file_hard_linked_as_metrics_jsonl,
    model_inside_the_checkpoints_an_overwrite_would_delete, symlinked_metrics_jsonl_pointing_outside,
    symlinked_config_yaml_pointing_outside, symlinked_checkpoints_folder_pointing_outside, symlinked_lock_file,
    resume_of_another_models_checkpoint, resume_with_other_training_data, resume_latest_of_another_models_run,
    sft_resuming_a_dpo_run, reference_model_inside_the_checkpoints_pruning_deletes, overwrite_and_resume_together,
    run_record_is_a_folder, checkpoints_is_a_file, failed_run_into_an_empty_folder_leaves_it_empty,
    failed_overwrite_gives_the_old_run_back,
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.__name__) for case in REFUSALS])
def test_refused_before_any_work_and_nothing_changed(world, tmp_path, case):
    argv, names, untouched, must_not_exist = case(world, tmp_path)
    refused(argv, names=names, untouched=untouched, written_roots=[tmp_path], must_not_exist=must_not_exist)
    assert not list(tmp_path.rglob(".replaced-*")), "a set-aside run was left behind"


# ---- the ways on ------------------------------------------------------------------------------------

def metrics_steps(output_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_dead_owners_lock_is_taken_over(world, tmp_path):
    out = tmp_path / "out"
    lock_file(out, dead_pid())
    outcome = run_cli(dpo_args(world, out))
    assert outcome.code == 0, outcome.everything
    assert "taking over the lock" in outcome.logs
    assert metrics_steps(out) == [1, 3] and not (out / "run.lock").exists()
    assert json.loads((out / "run.json").read_text())["pid"] == os.getpid()


def test_overwrite_replaces_the_old_run_and_only_it(world, tmp_path):
    out = copy_of(world["other_model_run"], tmp_path / "out")
    notes = out / "notes.txt"
    notes.write_text("mine\n")
    outcome = run_cli(dpo_args(world, out, "train.overwrite_output_dir=true", "train.max_steps=2",
                               "train.checkpoint_every=1", "train.keep_checkpoints=1"))
    assert outcome.code == 0, outcome.everything
    assert metrics_steps(out) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert notes.read_text() == "mine\n" and not list(out.glob(".replaced-*"))


def test_config_yaml_is_redacted_and_private(world, tmp_path):
    out = tmp_path / "out"
    outcome = run_cli(dpo_args(world, out))
    assert outcome.code == 0, outcome.everything
    config = out / "config.yaml"
    assert SECRET not in config.read_text() and "alice:***@127.0.0.1" in config.read_text()
    assert config.stat().st_mode & 0o777 == 0o600
    assert_no_secret(outcome, out)


def test_resuming_the_same_run_continues_it(world, tmp_path):
    out = copy_of(world["run"], tmp_path / "out")
    outcome = run_cli(dpo_args(world, out, "train.resume_from=latest", "train.max_steps=6"))
    assert outcome.code == 0, outcome.everything
    assert metrics_steps(out) == [1, 3, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


def test_a_checkpoint_without_a_lineage_is_resumed_with_a_warning(world, tmp_path):
    out = copy_of(world["run"], tmp_path / "out")
    manifest = out / "checkpoints" / "step-000003" / "manifest.json"
    record = json.loads(manifest.read_text())
    record.pop("lineage")
    manifest.write_text(json.dumps(record))
    outcome = run_cli(dpo_args(world, out, "train.resume_from=latest", "train.max_steps=4"))
    assert outcome.code == 0, outcome.everything
    assert "records no model, tokenizer or data fingerprints" in outcome.logs
    assert metrics_steps(out)[-1] == 4


def test_pruning_deletes_only_this_runs_checkpoint_folders(world, tmp_path):
    """keep_checkpoints prunes this run's folders only: never another run's checkpoint, never through a link;
    a save never replaces another run's checkpoint or a link of the same step."""
    import torch

    from trainables.checkpointing import CheckpointError, save_checkpoint
    from trainables.modeling import load_causal_lm

    checkpoints = tmp_path / "out" / "checkpoints"
    foreign = copy_of(world["other_model_run"] / "checkpoints" / "step-000003", checkpoints / "step-000001")
    outside = copy_of(world["run"] / "checkpoints" / "step-000003", tmp_path / "outside")
    (checkpoints / "step-000002").symlink_to(outside, target_is_directory=True)
    before = {path: sorted(p.name for p in path.rglob("*")) for path in (foreign, outside)}
    model, tokenizer = load_causal_lm(world["model"]), load_tokenizer(world["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save = lambda step: save_checkpoint(checkpoints, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                        scheduler=scheduler, pairs_consumed=step, keep_last=1,
                                        extra={"lineage": {"run_id": "this-run"}})
    for step in (3, 4, 5):
        save(step)
    for step, what in ((1, "another run"), (2, "symbolic link")):
        with pytest.raises(CheckpointError, match=what):
            save(step)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002", "step-000005"]
    assert (checkpoints / "step-000002").is_symlink()
    assert before == {path: sorted(p.name for p in path.rglob("*")) for path in (foreign, outside)}


def test_two_runs_never_share_an_output_dir_even_in_one_process(world, tmp_path):
    """While a run holds output_dir, a second `dpo train` there (here: started from inside the first's report) is refused."""
    from orchestrator.workflows import local_run

    out = tmp_path / "out"
    seen: list = []
    original = local_run.MetricsFile.__call__

    def report_then_start_another(self, metrics, checkpoint_dir):
        original(self, metrics, checkpoint_dir)
        if not seen:
            seen.append(refused(dpo_args(world, out, "train.overwrite_output_dir=true"), names=["in use", str(out)]))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_run.MetricsFile, "__call__", report_then_start_another)
        outcome = run_cli(dpo_args(world, out))
    assert outcome.code == 0 and seen, outcome.everything
    assert metrics_steps(out) == [1, 3]


def test_redaction_reads_the_environment_while_another_thread_changes_it(monkeypatch):
    """MLflow's telemetry thread deletes a variable while the driver redacts a message: reading os.environ
    then raised KeyError and crashed a `dpo sweep --resume` (issue 23's driver-kill runs)."""
    import os
    import threading

    from orchestrator.redaction import redact_text

    monkeypatch.setenv("DPO_TEST_API_TOKEN", "s3cr3t-value-of-some-length")
    stop = threading.Event()

    def churn() -> None:
        index = 0
        while not stop.is_set():
            os.environ[f"DPO_CHURN_{index % 40}"] = "x"
            os.environ.pop(f"DPO_CHURN_{(index + 20) % 40}", None)
            index += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(3000):
            assert redact_text("token s3cr3t-value-of-some-length") == "token ***"
    finally:
        stop.set()
        thread.join()
        for index in range(40):
            os.environ.pop(f"DPO_CHURN_{index}", None)
