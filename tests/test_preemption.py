"""Preemption of `dpo train` (issue 23, promise 3): SIGTERM / SIGINT save a checkpoint at the next step boundary.

Each test runs `dpo train` in a child process whose steps are slowed down (a sleep per step, so that a
signal lands mid-run), signals it the way a cluster scheduler or Ctrl-C would, and checks what was left on
disk and what a resumed run reports. The uninterrupted run is trained once in this process.
Run: `python -m pytest tests/test_preemption.py -q`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.cli.main import main
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl
from trainables.checkpointing import checkpoint_problem, latest_checkpoint, load_training_state
from trainables.preemption import EXIT_PREEMPTED, Preempted, PreemptionTimeout, stop_on_signals, stop_requested

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 10
SLOW_SAVE_S = 120.0  # a checkpoint made that slow is cut short by a second signal
STOPPED_WITHIN_S = 60  # the process ends well before the slow save would; 3-12 s measured, most of it exit under load

# `dpo train` in a child process, every step slowed by `step_sleep` s, the checkpoint saved after a stop signal by
# `save_sleep` s (a slow disk).
SLOWED_TRAIN = r"""
import json, sys, time
import trainables.checkpointing as checkpointing
import trainables.loop as loop
from orchestrator.cli.main import main
from trainables.preemption import stop_requested

job = json.loads(sys.argv[1])
real_indices, real_save_model = loop.global_batch_indices, checkpointing.save_model_and_tokenizer

def slow_indices(*args, **kwargs):
    time.sleep(job["step_sleep"])
    return real_indices(*args, **kwargs)

def slow_save_model(*args, **kwargs):
    result = real_save_model(*args, **kwargs)
    if stop_requested():
        time.sleep(job["save_sleep"])
    return result

loop.global_batch_indices = slow_indices
checkpointing.save_model_and_tokenizer = slow_save_model
print("started", flush=True)
sys.exit(main(job["argv"]))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("preemption-world")
    model = build_model_dir(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", pair_rows("explicit", 24, seed=1))
    eval_ = write_jsonl(root / "eval.jsonl", pair_rows("explicit", 8, seed=2))
    config = {
        "name": "preemption", "model": {"path": str(model)}, "data": {"train": str(train), "eval": str(eval_), "max_length": 48},
        "train": {"max_steps": MAX_STEPS, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 2, "device": "cpu",
                  "log_every": 2, "eval_every": 5, "checkpoint_every": 4, "keep_checkpoints": None, "seed": 0},
        "reference": {"cache_dir": str(root / "reference-cache")},
    }
    path = root / "train.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    uninterrupted = root / "uninterrupted"
    assert main(["train", str(path), "--set", f"output_dir={uninterrupted}"]) == 0
    return {"config": str(path), "root": root, "uninterrupted": read_metrics(uninterrupted)}


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def start_child(world, output_dir: Path, *, step_sleep: float, save_sleep: float = 0.0, grace_s: float = 60.0):
    job = {"step_sleep": step_sleep, "save_sleep": save_sleep,
           "argv": ["train", world["config"], "--set", f"output_dir={output_dir}",
                    "--set", f"train.preemption_grace_s={grace_s}"]}
    return subprocess.Popen([sys.executable, "-c", SLOWED_TRAIN, json.dumps(job)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_step(child, output_dir: Path, step: int, timeout_s: float = 240) -> None:
    """Until metrics.jsonl holds a report of `step` (or later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()[1][-3000:]
        metrics = output_dir / "metrics.jsonl"
        if metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.05)
    child.kill()
    raise AssertionError(f"step {step} was not reported within {timeout_s} s")


def assert_same_losses(reports: list[dict[str, Any]], uninterrupted: list[dict[str, Any]]) -> float:
    """Every train/ and eval/ value of `reports` equals the uninterrupted run's at the same step within 1e-6."""
    expected = {report["step"]: report for report in uninterrupted}
    largest = 0.0
    for report in reports:
        for key, value in report.items():
            if key.startswith(("train/loss", "train/reward", "train/grad_norm", "eval/")):
                assert key in expected[report["step"]], (report["step"], key)
                largest = max(largest, abs(value - expected[report["step"]][key]))
    assert largest < 1e-6, largest
    return largest


@pytest.mark.integration
def test_a_stop_signal_saves_the_step_in_progress_and_resuming_gives_the_uninterrupted_losses(world, tmp_path):
    signal_number = signal.SIGTERM  # SIGINT takes the same handler (test_the_handlers_come_back...)
    output_dir = tmp_path / "preempted"
    child = start_child(world, output_dir, step_sleep=0.4)
    wait_for_step(child, output_dir, 2)  # step 3 is not a log step (log_every 2): its metric window will be in flight
    sent = time.monotonic()
    child.send_signal(signal_number)
    _, stderr = child.communicate(timeout=120)
    exited_after = time.monotonic() - sent

    name = signal.Signals(signal_number).name
    assert child.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert f"training stopped by {name} after step" in stderr and "train.resume_from=latest" in stderr
    reports = read_metrics(output_dir)
    stopped_at = reports[-1]["step"]
    assert 3 <= stopped_at < MAX_STEPS and reports[-1]["checkpoint"].endswith(f"step-{stopped_at:06d}")
    checkpoints = output_dir / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / f"step-{stopped_at:06d}"
    assert load_training_state(checkpoints / f"step-{stopped_at:06d}")["step"] == stopped_at
    print(f"{name}: stopped after step {stopped_at}, {exited_after:.2f} s after the signal (steps take 0.4 s + training)")

    assert main(["train", world["config"], "--set", f"output_dir={output_dir}", "--set", "train.resume_from=latest"]) == 0
    resumed = read_metrics(output_dir)[len(reports):]
    assert [report["step"] for report in reports + resumed if "train/loss" in report] == \
        [report["step"] for report in world["uninterrupted"] if "train/loss" in report]
    largest = assert_same_losses(reports + resumed, world["uninterrupted"])
    print(f"{name}: resumed run equals the uninterrupted one, largest difference {largest:.1e}")


@pytest.mark.integration
def test_a_second_sigint_stops_at_once_and_the_last_good_checkpoint_stays_usable(world, tmp_path):
    output_dir = tmp_path / "interrupted-twice"
    child = start_child(world, output_dir, step_sleep=0.2, save_sleep=SLOW_SAVE_S)
    staging = output_dir / "checkpoints"
    while not (staging / "step-000004").is_dir():  # the regular checkpoint of step 4, written in full
        assert child.poll() is None, child.communicate()[1][-3000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)  # first: a checkpoint at the next step boundary...
    while not any(path.name.startswith(".staging-") for path in staging.iterdir()):
        assert child.poll() is None, child.communicate()[1][-3000:]
        time.sleep(0.05)
    [cut_short] = [path for path in staging.iterdir() if path.name.startswith(".staging-")]
    time.sleep(0.5)  # ...which is now being written (its model files are there; 120 s of sleep inside the save)
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)  # second: stop at once
    _, stderr = child.communicate(timeout=60)
    stopped_within = time.monotonic() - sent

    assert child.returncode != 0 and child.returncode != EXIT_PREEMPTED, stderr[-3000:]
    assert stopped_within < STOPPED_WITHIN_S, stopped_within  # not the 120 s the save would still take
    stop_step = cut_short.name.split("-")[2]
    assert not (staging / f"step-{stop_step}").exists()  # the cut-short save never took a real name
    assert latest_checkpoint(staging) == staging / "step-000004"
    assert checkpoint_problem(staging / "step-000004") is None
    print(f"second SIGINT: stopped {stopped_within:.2f} s after it; step-000004 intact")
    assert load_training_state(staging / "step-000004")["step"] == 4  # what train.resume_from=latest reads


def test_the_grace_period_bounds_the_wait_for_the_step_boundary():
    """A step (and its checkpoint) longer than the grace period is cut short by PreemptionTimeout; what it was
    writing stays a staging folder, as the second-signal case shows on disk."""
    started = time.monotonic()
    with pytest.raises(PreemptionTimeout, match="grace period after SIGTERM"):
        with stop_on_signals(0.3):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # a step that does not end in time
    assert 0.25 < time.monotonic() - started < 4
    assert stop_requested() is None and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_sigint_then_sigterm_request_a_stop_then_stop_at_once_and_the_handlers_come_back():
    import threading

    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals(5.0) as installed:
        assert installed and signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, only a request
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop_requested() == "SIGINT"
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 5.0  # the grace period runs
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # any second stop signal: at once
            time.sleep(0.1)
    assert {number: signal.getsignal(number) for number in before} == before and stop_requested() is None
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)

    seen = []
    thread = threading.Thread(target=lambda: seen.append(stop_on_signals(5.0).__enter__()))
    thread.start()
    thread.join()
    assert seen == [False]


def test_the_stop_message_says_how_to_go_on():
    error = Preempted("SIGTERM", 7, 10, "/runs/x/checkpoints/step-000007")
    assert error.exit_code == EXIT_PREEMPTED == 75
    assert str(error) == ("training stopped by SIGTERM after step 7 of 10: checkpoint /runs/x/checkpoints/step-000007 "
                          "saved; continue with --set train.resume_from=latest")
    # in a sweep's trial, Ray retries the trial from that checkpoint: no command to run; the driver gets the same text
    import pickle

    from trainables.preemption import trial_scope

    with trial_scope(30):
        in_trial = Preempted("SIGTERM", 7, 10, None)
    assert str(in_trial).endswith("the checkpoint of that step was saved with rank 0, which reports it; the trial is "
                                  "retried from it (failure.max_failures)"), str(in_trial)
    assert str(pickle.loads(pickle.dumps(in_trial))) == str(in_trial)


# A Ray trial worker in miniature: the process's own SIGTERM handler (Ray's exits the worker), the trial's loop in a
# thread of its own; prints what happened, one JSON line per event.
WORKER = r"""
import json, os, signal, sys, threading, time
from trainables.preemption import install_in_worker, stop_requested, trial_scope

def previous(signum, frame):  # stands for Ray's handler
    print(json.dumps({"previous_handler": signal.Signals(signum).name}), flush=True)

signal.signal(signal.SIGTERM, previous)
assert install_in_worker() and install_in_worker()  # idempotent
os.kill(os.getpid(), signal.SIGTERM)  # no trial running: the previous handler
time.sleep(0.2)

def trial():
    with trial_scope(float(sys.argv[1])) as active:
        print(json.dumps({"active": active}), flush=True)
        for step in range(1, 200):
            time.sleep(0.02)
            if stop_requested():
                print(json.dumps({"stopped_at_step": step, "signal": stop_requested()}), flush=True)
                return
    print(json.dumps({"ran_to_the_end": True}), flush=True)

thread = threading.Thread(target=trial)
thread.start()
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGTERM)
thread.join()
os.kill(os.getpid(), signal.SIGTERM)  # after the trial stopped: at once (the previous handler)
time.sleep(0.2)
print(json.dumps({"alarm_left": signal.getitimer(signal.ITIMER_REAL)[0]}), flush=True)
"""


def test_a_trial_worker_turns_sigterm_into_a_stop_of_its_trial_thread_and_otherwise_keeps_its_own_handler():
    child = subprocess.run([sys.executable, "-c", WORKER, "30"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == 0, child.stderr
    events = [json.loads(line) for line in child.stdout.splitlines()]
    assert events[0] == {"previous_handler": "SIGTERM"}  # no trial: the worker's own handler, as without us
    assert events[1] == {"active": True}
    assert events[2]["signal"] == "SIGTERM" and 10 <= events[2]["stopped_at_step"] < 199  # the loop saw it mid-way
    assert events[3] == {"previous_handler": "SIGTERM"}  # a signal once the trial stopped: at once
    assert events[4] == {"alarm_left": 0.0}  # the grace period's alarm ended with the trial


def test_a_trial_thread_whose_step_outlasts_the_grace_period_hands_the_signal_to_the_workers_own_handler():
    slow = WORKER.replace("time.sleep(0.02)", "time.sleep(2.0)")  # a step longer than the 0.3 s grace period
    child = subprocess.run([sys.executable, "-c", slow, "0.3"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    events = [json.loads(line) for line in child.stdout.splitlines()]
    assert events[:2] == [{"previous_handler": "SIGTERM"}, {"active": True}]
    assert events[2] == {"previous_handler": "SIGTERM"}, events  # the grace period ran out: Ray's handler (exit)


def _agreement_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from trainables import preemption
    from trainables.loop import agreed_stop_signal

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        answers = [agreed_stop_signal(torch.device("cpu"))]  # no rank signalled
        if rank == 1:  # what the handler records when SIGTERM reaches this rank only
            preemption._REQUEST.signal_name = "SIGTERM"
        answers.append(agreed_stop_signal(torch.device("cpu")))
        Path(out, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        preemption._REQUEST.clear()
        dist.destroy_process_group()


def test_a_signal_that_reaches_one_rank_stops_every_rank_at_the_same_step_boundary(tmp_path):
    """A trial of several workers: SIGTERM to one worker must stop all of them after the same step, or the ranks
    that go on would wait forever for the stopped one in their next collective (and the checkpoint would be torn)."""
    import torch.multiprocessing as mp

    mp.spawn(_agreement_rank, args=(3, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=3, join=True)
    answers = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert answers == [[None, "SIGTERM"]] * 3, answers
