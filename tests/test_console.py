"""The sweep console (orchestrator/console.py): trial lines on a pipe and on a terminal, the searcher's
decisions, the end summary, the quiet log file; and, on a real local Ray, `dpo quickstart`'s whole output
through a pipe (the done-when of issue 22: at most about 60 lines, no `TrainingReport(` dump, every trial's
beta and final metric and the searcher's decisions shown).
Run: `python -m pytest tests/test_console.py -q` (the Ray test: `-m ray`, about a minute on 2 CPU cores).
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.console import (ConsoleCallback, SweepConsole, SweepLogHandler, eta_seconds, format_trial,
                                  quiet_session, runs_view_url, summary_lines)

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def config(beta: float, round_number: int, decision: str) -> dict:
    return {"beta": beta, "kl_weight": 0.0, "learning_rate": 1e-3, "round": round_number, "decision": decision}


def feed(console: SweepConsole, clock: Clock) -> None:
    """Two rounds of one trial each: reports every 10 steps, an eval at 20 and 40."""
    for trial_id, beta, round_number in (("t1", 0.1, 1), ("t2", 0.2, 2)):
        console.trial_started(trial_id, config(beta, round_number, f"round {round_number}: decision {round_number}"))
        for step in range(10, 41, 10):
            clock.now += 5.0
            result = {"step": step, "train/loss": 0.7 - step / 100}
            if step % 20 == 0:
                result["eval/preference_accuracy"] = 0.5 + step / 100 + beta
            console.trial_result(trial_id, result)
        console.trial_finished(trial_id, "done")
    console.close()


def test_on_a_pipe_each_trial_ends_with_one_plain_line_and_decisions_come_first():
    clock, stream = Clock(), io.StringIO()
    console = SweepConsole(stream, total_steps=40, metric="eval/preference_accuracy", tty=False, heartbeat_s=1e9,
                           clock=clock)
    feed(console, clock)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "searcher: round 1: decision 1",
        "trial t1        beta 0.1    kl_weight 0     lr 0.001    step 40/40  loss 0.300  eval accuracy 1.000  ETA -      done",
        "searcher: round 2: decision 2",
        "trial t2        beta 0.2    kl_weight 0     lr 0.001    step 40/40  loss 0.300  eval accuracy 1.100  ETA -      done",
    ]
    assert "\x1b" not in stream.getvalue()  # no cursor movement on a pipe


def test_on_a_pipe_running_trials_are_shown_every_heartbeat():
    clock, stream = Clock(), io.StringIO()
    console = SweepConsole(stream, total_steps=100, metric="eval/preference_accuracy", tty=False, heartbeat_s=30,
                           clock=clock)
    console.trial_started("t1", config(0.1, 1, "round 1: start"))
    for step in range(10, 101, 10):  # a report every 10 s
        clock.now += 10.0
        console.trial_result("t1", {"step": step, "train/loss": 0.5})
    running = [line for line in stream.getvalue().splitlines() if line.endswith("running")]
    assert [re.search(r"step +(\d+)/", line).group(1) for line in running] == ["30", "60", "90"]
    assert "ETA 0:10" in running[-1]  # 10 steps left at 1 s a step


def test_on_a_terminal_the_block_of_trial_lines_is_redrawn_in_place():
    clock, stream = Clock(), io.StringIO()
    console = SweepConsole(stream, total_steps=40, metric="eval/preference_accuracy", tty=True, clock=clock)
    feed(console, clock)
    text = stream.getvalue()
    assert "\x1b[1F\x1b[J" in text and "\x1b[2F\x1b[J" in text  # back over the block (one, then two trials)
    screen = render(text)
    assert screen[0] == "searcher: round 1: decision 1" and screen[1].startswith("searcher: round 2")
    assert len(screen) == 4 and screen[2].startswith("trial t1") and screen[3].startswith("trial t2")
    assert all(line.endswith("done") for line in screen[2:])


def render(text: str) -> list[str]:
    """What a terminal shows after `text`, for the two escapes the console uses (ESC[nF, ESC[J)."""
    screen: list[str] = []
    cursor = 0
    for part in re.split(r"(\x1b\[\d+F\x1b\[J)", text):
        match = re.fullmatch(r"\x1b\[(\d+)F\x1b\[J", part)
        if match:
            cursor -= int(match.group(1))
            del screen[cursor:]
            continue
        for line in part.split("\n")[:-1] if part.endswith("\n") else part.split("\n"):
            screen.append(line)
            cursor += 1
    return screen


def test_eta_is_the_remaining_steps_at_the_observed_pace():
    clock, stream = Clock(), io.StringIO()
    console = SweepConsole(stream, total_steps=100, metric="eval/preference_accuracy", tty=False, clock=clock)
    console.trial_started("t1", config(0.1, 1, "go"))
    console.trial_result("t1", {"step": 10})
    clock.now = 20.0
    console.trial_result("t1", {"step": 30})  # 1 s a step
    assert eta_seconds(console.trials["t1"], 100, now=25.0) == pytest.approx(70 - 5)
    line = format_trial(console.trials["t1"], 100, "eval accuracy", now=20.0)
    assert "step  30/100" in line and "ETA 1:10" in line and "eval accuracy -" in line


def test_the_tune_callback_maps_trial_events_and_pickles_without_its_stream():
    import pickle
    from types import SimpleNamespace

    clock, stream = Clock(), io.StringIO()
    callback = ConsoleCallback(SweepConsole(stream, total_steps=40, metric="eval/preference_accuracy", tty=False,
                                            heartbeat_s=1e9, clock=clock))
    done = SimpleNamespace(trial_id="a", config=config(0.1, 1, "start"), last_result={"step": 40})
    stopped = SimpleNamespace(trial_id="b", config=config(0.1, 1, "start"), last_result={"step": 20})
    for trial in (done, stopped):
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, {"step": trial.last_result["step"], "eval/preference_accuracy": 0.9})
        callback.on_trial_complete(0, [], trial)
    callback.on_trial_error(0, [], SimpleNamespace(trial_id="c", config={}, last_result={}))
    statuses = [line.split()[-1] for line in stream.getvalue().splitlines() if line.startswith("trial")]
    assert statuses == ["done", "stopped", "error"]
    assert stream.getvalue().count("searcher: start") == 1  # one round: its decision once
    restored = pickle.loads(pickle.dumps(callback))  # Tune pickles its callbacks with the Tuner
    restored.on_trial_start(0, [], done)  # no sweep session in this process: nothing to do, no error
    assert restored.console is None
    from orchestrator import console as console_module

    console_module._ACTIVE["console"] = callback.console  # as sweep_session sets it, before `--resume` restores Tune
    try:
        assert pickle.loads(pickle.dumps(callback)).console is callback.console
    finally:
        console_module._ACTIVE.pop("console", None)


def test_the_summary_has_the_decision_log_the_best_trial_failed_trials_and_the_runs_view():
    summary = {"name": "s", "metric": "eval/preference_accuracy", "storage": "/runs/s",
               "trials": [{"trial_id": "t1", "config": {"beta": 0.1, "kl_weight": 0.0, "learning_rate": 1e-3},
                           "metric": 0.8, "step": 40, "error": None},
                          {"trial_id": "t2", "config": {"beta": 0.2, "kl_weight": 0.0, "learning_rate": 1e-3},
                           "metric": None, "step": 10, "error": "RuntimeError: out of memory\nmore"}],
               "decision_log": [{"round": 1, "beta": 0.1, "action": "climb", "reason": "stable"},
                                {"round": 2, "beta": 0.2, "action": "stop", "reason": "upper bound"}],
               "best": {"trial_id": "t1", "metric": 0.8, "config": {"beta": 0.1, "kl_weight": 0.0, "learning_rate": 1e-3}},
               "mlflow": {"uri": "http://u:secret@127.0.0.1:5000", "parent_run_id": "p1", "experiment_id": "3"}}
    lines = summary_lines(summary)
    assert "  trial t2  beta 0.2  kl_weight 0  lr 0.001  error: RuntimeError: out of memory" in lines
    assert not any("trial t1  beta" in line for line in lines)  # the trial lines showed it already
    assert "  round 2: beta 0.2 -> stop: upper bound" in lines
    assert "best trial t1: eval/preference_accuracy 0.8000 (beta 0.1, kl_weight 0.0, learning_rate 0.001)" in lines
    assert lines[-1].startswith("MLflow: http://u:***@127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning ")
    assert sum("trial t1" in line for line in summary_lines(summary, every_trial=True)) == 2
    assert runs_view_url("file:///x", "3") == "file:///x"


def test_the_log_file_appears_only_once_its_folder_exists(tmp_path):
    handler = SweepLogHandler(tmp_path / "sweep" / "console.log")
    record = lambda text: logging.LogRecord("x", logging.INFO, __file__, 1, text, None, None)
    handler.emit(record("before the folder"))
    assert not (tmp_path / "sweep").exists()  # a refused sweep writes nothing
    (tmp_path / "sweep").mkdir()
    handler.emit(record("after"))
    handler.close()
    text = (tmp_path / "sweep" / "console.log").read_text()
    assert text.index("before the folder") < text.index("after")
    never = SweepLogHandler(tmp_path / "never" / "console.log")
    never.emit(record("x"))
    never.close()
    assert not (tmp_path / "never").exists()


def test_quiet_session_keeps_info_and_worker_output_in_the_file_and_warnings_on_the_terminal(tmp_path, capsys):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    shown: list[dict] = []
    dispatcher.add_handler("test-console", shown.append)
    log_file = tmp_path / "console.log"
    before = os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    root = logging.getLogger()
    terminal = logging.StreamHandler(sys.stderr)
    root.addHandler(terminal)
    try:
        with quiet_session(log_file, show=("tests.progress",)):
            logging.getLogger("tests.chatter").info("chatter line")
            logging.getLogger("tests.chatter").warning("warning line")
            logging.getLogger("tests.progress").info("stage sft done")
            dispatcher.emit({"pid": 42, "task_name": "warm_trial", "is_err": False,
                             "lines": ["TrainingReport(checkpoint=None, metrics={})"]})
            assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
        dispatcher.emit({"pid": 43, "lines": ["after the session"], "is_err": False})
    finally:
        root.removeHandler(terminal)
        dispatcher.remove_handler("test-console")
    captured = capsys.readouterr()
    assert "chatter line" not in captured.err and "warning line" in captured.err
    assert captured.out == "stage sft done\n"
    text = log_file.read_text()
    assert "chatter line" in text and "(warm_trial pid=42) TrainingReport(" in text
    assert [data["pid"] for data in shown] == [43]  # worker output reached the terminal again only after
    assert os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT") == before  # restored


def test_verbose_shows_worker_output_and_keeps_it_in_the_file(tmp_path):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    shown: list[dict] = []
    dispatcher.add_handler("test-console", shown.append)
    try:
        with quiet_session(tmp_path / "console.log", verbose=True):
            dispatcher.emit({"pid": 7, "lines": ["loading weights"], "is_err": True})
    finally:
        dispatcher.remove_handler("test-console")
    assert [data["pid"] for data in shown] == [7]
    assert "(pid=7) loading weights" in (tmp_path / "console.log").read_text()


# ---- the done-when: `dpo quickstart` through a pipe, on a real local Ray ----------------------------------

@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.integration
def test_quickstart_output_through_a_pipe_is_short_and_shows_every_trial_and_decision(tmp_path, demo_cache):
    """The embedded default, shortened to two rounds (beta 0.1 then 0.2) of 12 steps, in a subprocess whose
    stdout and stderr are pipes, as in CI or under `ray job submit`. The demo assets (with the SFT model the
    quickstart starts from) come from the session's shared cache."""
    env = {**os.environ, "DPO_DEMO_CACHE": str(demo_cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "orchestrator", "quickstart", str(REPO / "configs/quickstart.yaml"),
               "--set", f"output_dir={tmp_path / 'outputs'}", "--set", f"storage_path={tmp_path / 'runs'}",
               "--set", "train.max_steps=12", "--set", "train.warmup_steps=2", "--set", "train.log_every=3",
               "--set", "train.eval_every=6", "--set", "train.checkpoint_every=12",
               "--set", "sweep.max_beta=0.2", "--set", "sweep.patience=1", "--set", "sweep.max_trials=4"]
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "ui", "--set", f"storage_path={tmp_path / 'runs'}",
                        str(REPO / "configs/quickstart.yaml"), "--stop"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = output.splitlines()
    assert len(lines) <= 60, output
    assert "TrainingReport(" not in output and "Trial status" not in output and "pid=" not in output, output
    summary = __import__("json").loads((tmp_path / "runs" / "quickstart" / "sweep_summary.json").read_text())
    assert len(summary["trials"]) >= 2 and summary["decision_log"], summary
    for trial in summary["trials"]:  # each trial's line: its beta and its final metric
        beta, final = trial["config"]["beta"], trial["metric"]
        assert any(line.startswith(f"trial {trial['trial_id']}") and f"beta {beta:g} " in line
                   and f"eval accuracy {final:.3f}" in line and line.endswith("done") for line in lines), output
    rounds = sorted({trial["config"]["round"] for trial in summary["trials"]})
    decisions = [line for line in lines if line.startswith("searcher: round")]  # each round's, when it started
    assert [line.split(":")[1].strip() for line in decisions] == [f"round {number}" for number in rounds], output
    for entry in summary["decision_log"]:  # and the log at the end, up to the final stop
        assert any(line.startswith(f"  round {entry['round']}: beta {entry['beta']} -> {entry['action']}")
                   for line in lines), output
    assert summary["decision_log"][-1]["action"] == "stop"
    assert "(warm_trial" in (tmp_path / "runs" / "quickstart" / "console.log").read_text()
    assert re.search(r"MLflow runs: +http://127\.0\.0\.1:\d+/#/experiments/\d+/runs\?workflowType=machine_learning$",
                     output, re.M), output
    # issue 22: the exported model against the SFT model it started from, and its answers to held-out prompts
    assert re.search(r"^benchmark: +exact_match \d\.\d{3} -> \d\.\d{3} \(start model -> exported model\)$",
                     output, re.M), output
    assert re.search(r"^(held-out:)? +(sort|reverse): [\d ]+ -> '= [\d ]+\.' correct$", output, re.M), output


def test_a_loss_dimension_trial_shows_the_prior_beta_it_runs_at(tmp_path):
    """A trial of `sweep.loss` without a beta dimension runs at its loss's prior beta (ipo: 0.01), which its
    Tune config does not hold: its line says that beta, not `beta -`."""
    from orchestrator.config.schema import ExperimentConfig
    from orchestrator.config.spec import resolve_experiment

    experiment = resolve_experiment(ExperimentConfig.model_validate(
        {"name": "s", "model": {"path": str(tmp_path)}, "data": {"train": "t.jsonl"},
         "sweep": {"strategy": "grid", "loss": ["sigmoid", "ipo"]}}))
    stream = io.StringIO()
    console = SweepConsole(stream, total_steps=40, metric="eval/preference_accuracy", tty=False, heartbeat_s=1e9,
                           clock=Clock(), trial_values=experiment.run.trial_values)
    console.trial_started("a", {"loss": "ipo", "learning_rate": 1e-3})
    console.trial_result("a", {"step": 40, "eval/preference_accuracy": 0.8})
    console.trial_finished("a", "done")
    line = [line for line in stream.getvalue().splitlines() if line.startswith("trial a")][-1]
    assert re.search(r"beta 0\.01\s", line) and "lr 0.001" in line


def test_a_sweep_whose_trials_wait_for_nodes_says_so_every_30_seconds():
    """Joined to an autoscaling cluster with no GPU node yet, every trial is PENDING: the console says what
    it waits for, with what the cluster has now, instead of looking hung; a placed trial ends the wait."""
    from types import SimpleNamespace

    clock, stream = Clock(), io.StringIO()
    console = SweepConsole(stream, total_steps=40, metric="eval/preference_accuracy", tty=False, heartbeat_s=1e9,
                           clock=clock)
    callback = ConsoleCallback(console)
    pending = [SimpleNamespace(trial_id="a", status="PENDING", config=config(0.1, 1, "start"))]
    for now in (0.0, 10.0, 31.0, 45.0, 62.0):
        clock.now = now
        console.waiting_for_resources(1, lambda: "CPU 8, GPU 0")
    notes = [line for line in stream.getvalue().splitlines() if line.startswith("waiting")]
    assert notes == ["waiting 0:31 for the cluster to place 1 pending trial(s); it has CPU 8, GPU 0 now (an "
                     "autoscaler adds nodes in minutes)",
                     "waiting 1:02 for the cluster to place 1 pending trial(s); it has CPU 8, GPU 0 now (an "
                     "autoscaler adds nodes in minutes)"]
    callback.on_trial_start(0, pending, pending[0])
    pending[0].status = "RUNNING"
    callback.on_step_end(0, pending)  # a trial runs: nothing to say
    assert len([line for line in stream.getvalue().splitlines() if line.startswith("waiting")]) == 2
