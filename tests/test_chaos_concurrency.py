"""Two drivers of one sweep name (issue 23, promise 6): the second is refused at once, a dead one's lock taken over.

A child process holds the sweep folder's driver lock as a running `dpo sweep` does; `dpo sweep` of the
same name must then exit 2 within seconds naming that process and host, before Ray or MLflow start.
A lock left by a driver that died (SIGKILL: its lock file stays) is taken over by the next driver.
Run: `python -m pytest tests/test_chaos_concurrency.py -q` (a few seconds).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.workflows.run_lock import DRIVER_LOCK, RunLockedError, release_driver_lock, take_driver_lock
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
REFUSED_WITHIN_S = 20  # "at once": measured well under a second of its own; generous for 2 shared cores

HOLD_LOCK = r"""
import sys, time
from orchestrator.workflows.run_lock import take_driver_lock
lock = take_driver_lock(sys.argv[1], "sweep")
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture
def sweep_config(tmp_path) -> Path:
    model = build_model_dir(tmp_path / "model", "llama")
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows("explicit", 8, seed=1))
    raw = {"name": "twice", "storage_path": str(tmp_path / "runs"), "model": {"path": str(model)},
           "data": {"train": str(train), "max_length": 48}, "train": {"max_steps": 2, "batch_size": 4, "device": "cpu"},
           "sweep": {"strategy": "grid", "beta": [0.1]}, "tracking": {"enabled": False}}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray started although another driver runs this sweep")

    monkeypatch.setattr(ray, "init", forbidden)


def test_a_second_sweep_of_a_running_name_is_refused_at_once_naming_the_running_one(sweep_config, tmp_path, capsys, no_ray):
    root = tmp_path / "runs" / "twice"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        (root / "console.log").write_text("the running sweep's log\n")
        started = time.monotonic()
        code = main(["sweep", str(sweep_config)])
        took = time.monotonic() - started
        error = capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    print(f"refused in {took:.2f} s: {error.strip()}")
    assert code == 2 and took < REFUSED_WITHIN_S
    assert f"sweep {root} is in use by another run (process {holder.pid} on host {socket.gethostname()}" in error
    assert f"delete {root / DRIVER_LOCK}" in error
    assert (root / DRIVER_LOCK).is_file()  # the running driver's lock is left alone
    assert (root / "console.log").read_text() == "the running sweep's log\n"  # the refused one wrote nothing there


def test_the_lock_of_a_driver_killed_with_sigkill_is_taken_over(tmp_path, caplog):
    root = tmp_path / "runs" / "killed"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(RunLockedError, match=f"process {holder.pid} on host"):
        take_driver_lock(root, "sweep")  # alive: refused
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((root / DRIVER_LOCK).read_text())["pid"] == holder.pid  # a kill leaves the lock file behind

    with caplog.at_level(logging.WARNING, logger="orchestrator.workflows.run_lock"):
        lock = take_driver_lock(root, "sweep")
    assert f"taking over the lock of process {holder.pid}" in caplog.text
    assert json.loads((root / DRIVER_LOCK).read_text())["pid"] == os.getpid()
    release_driver_lock(lock)
    assert not (root / DRIVER_LOCK).exists()


def test_a_lock_held_from_another_host_is_refused_naming_that_host(tmp_path):
    root = tmp_path / "runs" / "shared"
    root.mkdir(parents=True)
    (root / DRIVER_LOCK).write_text(json.dumps({"pid": 4242, "host": "gpu-node-7", "started": time.time()}))
    with pytest.raises(RunLockedError, match="locked by a run on another host \\(process 4242 on host gpu-node-7"):
        take_driver_lock(root, "study")
