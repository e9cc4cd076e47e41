"""What a person sees while `dpo sweep`, `dpo quickstart` and `dpo study` run: one line per trial, the
searcher's decisions as they happen, and nothing of Ray's internals unless `--verbose` asks for them.

Two pieces:
- `quiet_session(log_file, verbose)`: a context manager that sends the INFO chatter of Ray, Tune and
  our own modules, and everything Ray's worker processes print (per-report dumps, weight-loading bars,
  tracebacks of retried trials) to `log_file` (the sweep's `console.log`, StorageLayout.console_log)
  instead of the terminal. Warnings of our own modules and errors of Ray's still reach stderr. The file
  is opened only once its folder exists (Tune creates the sweep folder): a sweep refused for bad data
  writes nothing. With verbose=True everything is shown as before and also kept in the file.
- `SweepConsole` and its Tune callback `ConsoleCallback` (it replaces Tune's status table: the Tuner is
  built with verbose=0): on a terminal one line per trial (trial, beta, kl_weight, learning rate,
  step/total, loss, the sweep's metric, ETA, status) redrawn in place at most twice a second; on a pipe
  (CI, `ray job submit`, a test) plain lines, appended: a line when a trial ends and, every
  `heartbeat_s`, one line per running trial. A new round's decision of the searcher (carried by the
  trial's config, orchestrator/ray/searchers.py) is printed when its first trial starts.
`print_sweep_summary` prints the end: the best trial, every trial's final metric, the decision log and
the MLflow URL of the runs view. Tested by `python -m pytest tests/test_console.py -q`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from ray.tune import Callback

LOSS_KEY = "train/loss"
REDRAW_EVERY_S = 0.5
HEARTBEAT_S = 60.0
WAIT_NOTE_S = 30.0  # how often a sweep whose trials all wait for resources says so
TRAINING_VIEW = "workflowType=machine_learning"  # the MLflow 3 UI's "Model training" mode, as a URL parameter
MAX_BUFFERED_RECORDS = 20_000  # log records kept while the sweep folder does not exist yet
WORKER_LOGGER = "dpo.workers"  # what Ray's worker processes print, as log records of this logger
QUIET_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "ray.serve")  # ERROR and above still shown
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1",  # the driver's weight-loading and writing bars
             "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # MLflow's "View run ... at" after each run ends
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # MLflow's download bars (the analysis reads artifacts)
# Tune's newer output prints its experiment box whatever the verbosity; its classic reporter obeys verbose=0.
TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0"}


# ---- the log file -------------------------------------------------------------------------------

class SweepLogHandler(logging.Handler):
    """Appends records to `path` once its folder exists; until then keeps (a bounded number of) them."""

    def __init__(self, path: Path, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.path = Path(path)
        self._file: TextIO | None = None
        self._pending: deque[str] = deque(maxlen=MAX_BUFFERED_RECORDS)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never break the sweep
            self.handleError(record)
            return
        with self.lock:
            if self._file is None and self.path.parent.is_dir():
                self._file = self.path.open("a", encoding="utf-8")
                self._file.writelines(line + "\n" for line in self._pending)
                self._pending.clear()
            if self._file is None:
                self._pending.append(text)
            else:
                self._file.write(text + "\n")
                self._file.flush()

    def close(self) -> None:
        with self.lock:
            if self._file is None and self._pending and self.path.parent.is_dir():
                self._file = self.path.open("a", encoding="utf-8")
                self._file.writelines(line + "\n" for line in self._pending)
            if self._file is not None:
                self._file.close()
                self._file = None
            self._pending.clear()  # the folder never appeared: the sweep was refused before it started
        super().close()


def _worker_lines(data: dict[str, Any]) -> list[str]:
    """One worker-output batch of Ray's log monitor as prefixed lines, e.g. `(warm_trial pid=12) text`."""
    name = data.get("actor_name") or data.get("task_name") or ""
    pid = data.get("pid", "")
    lines = list(data.get("lines", []))
    if pid == "autoscaler":  # its status table every few seconds: only its events, as Ray's driver shows them
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except Exception:  # noqa: BLE001 - no Ray connection (a test), another Ray version
            lines = [line for line in lines if ":event_summary:" in line]
    prefix = f"({pid})" if pid in ("raylet", "autoscaler") else f"({name + ' ' if name else ''}pid={pid})"
    return [f"{prefix} {line}" for line in lines if str(line).strip()]


@contextlib.contextmanager
def divert_worker_output(verbose: bool) -> Iterator[None]:
    """What Ray's workers print goes to the WORKER_LOGGER log records (the log file), and to the terminal
    only when verbose. Ray's driver prints worker output through one dispatcher object; its emit is
    wrapped for the session and restored after (no other Ray state is touched)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray version: worker output stays on the terminal
        yield
        return
    original = dispatcher.emit
    worker_log = logging.getLogger(WORKER_LOGGER)

    def emit(data: dict[str, Any]) -> None:
        for line in _worker_lines(data):
            worker_log.info(line)
        if verbose:
            original(data)

    dispatcher.emit = emit
    try:
        yield
    finally:
        dispatcher.emit = original


@contextlib.contextmanager
def quiet_session(log_file: Path | str, verbose: bool = False, show: tuple[str, ...] = (),
                  stream: TextIO | None = None) -> Iterator[Path]:
    """Logs (ours, Ray's, the workers' output) into `log_file`; the terminal keeps warnings and errors
    (everything, with verbose) and the INFO lines of the `show` loggers (a study's stage progress), bare,
    on `stream` (stdout). Restores the logging set-up when it ends."""
    log_file = Path(log_file)
    handler = SweepLogHandler(log_file)
    progress = logging.StreamHandler(stream or sys.stdout)
    progress.setFormatter(logging.Formatter("%(message)s"))
    progress.setLevel(logging.INFO)
    shown = [logging.getLogger(name) for name in show] if not verbose else []
    for logger in shown:
        logger.addHandler(progress)
    root = logging.getLogger()
    previous_root_level = root.level
    root.setLevel(min(root.level, logging.INFO) if root.level != logging.NOTSET else logging.NOTSET)  # --log-level DEBUG kept
    changed: list[tuple[logging.Handler, int]] = []
    if not verbose:
        for existing in root.handlers:  # main()'s stderr handler: only warnings and errors now
            if isinstance(existing, logging.StreamHandler) and not isinstance(existing, logging.FileHandler):
                changed.append((existing, existing.level))
                existing.setLevel(max(existing.level, logging.WARNING))
    root.addHandler(handler)
    import ray  # noqa: F401 - its loggers get their handlers when ray is imported

    ray_loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    for logger in ray_loggers:
        if not logger.propagate or logger.name == "ray":
            logger.addHandler(handler)
        if not verbose:
            for existing in logger.handlers:
                if existing is not handler:
                    changed.append((existing, existing.level))
                    existing.setLevel(max(existing.level, logging.ERROR))
    ray_logger = logging.getLogger("ray")
    ray_propagates = ray_logger.propagate
    ray_logger.propagate = False  # it has its own handler now: no record twice in the file
    saved_env = {name: os.environ.get(name) for name in {**QUIET_ENV, **TUNE_ENV}}
    os.environ.update(TUNE_ENV if verbose else {**QUIET_ENV, **TUNE_ENV})
    try:
        with divert_worker_output(verbose):
            yield log_file
    finally:
        for existing, old_level in changed:
            existing.setLevel(old_level)
        for logger in [root, *ray_loggers]:
            if handler in logger.handlers:
                logger.removeHandler(handler)
        for logger in shown:
            logger.removeHandler(progress)
        ray_logger.propagate = ray_propagates
        root.setLevel(previous_root_level)
        handler.close()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---- the trial lines ------------------------------------------------------------------------------

@dataclass
class TrialState:
    trial_id: str
    config: dict[str, Any]
    status: str = "pending"  # pending | running | done | stopped | error | retrying
    step: int = 0
    loss: float | None = None
    score: float | None = None
    first_seen: tuple[float, int] | None = None  # (clock, step) of the first report
    last_seen: tuple[float, int] | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fixed(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _general(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:g}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta_seconds(trial: TrialState, total_steps: int, now: float) -> float | None:
    """Steps left times the pace between the first and the latest report (None until two reports)."""
    if trial.status != "running" or trial.first_seen is None or trial.last_seen is None:
        return None
    (t0, s0), (t1, s1) = trial.first_seen, trial.last_seen
    if s1 <= s0 or t1 <= t0:
        return None
    per_step = (t1 - t0) / (s1 - s0)
    return max(0.0, (total_steps - s1) * per_step - (now - t1))


def format_trial(trial: TrialState, total_steps: int, metric_label: str, now: float) -> str:
    """`trial 3f2a1b  beta 0.2  kl_weight 0  lr 0.001  step 240/450  loss 0.412  accuracy 0.871  ETA 0:42  running`"""
    beta, kl_weight, lr = (_general(trial.config.get(key)) for key in ("beta", "kl_weight", "learning_rate"))
    eta = format_duration(eta_seconds(trial, total_steps, now)) if trial.status == "running" else "-"
    return (f"trial {trial.trial_id:<8}  beta {beta:<5}  kl_weight {kl_weight:<4}  "
            f"lr {lr:<7}  step {trial.step:>{len(str(total_steps))}}/{total_steps}  "
            f"loss {_fixed(trial.loss)}  {metric_label} {_fixed(trial.score)}  ETA {eta:<5}  {trial.status}")


def metric_label(metric: str) -> str:
    """`eval/preference_accuracy` -> `eval accuracy` (short enough for one line per trial)."""
    split, _, name = metric.partition("/")
    name = {"preference_accuracy": "accuracy", "reward_margin": "margin"}.get(name, name)
    return f"{split} {name}" if name else split


class SweepConsole:
    """The live view of a sweep's trials (module docstring); thread-safe, fed by ConsoleCallback."""

    def __init__(self, stream: TextIO | None = None, *, total_steps: int, metric: str, tty: bool | None = None,
                 heartbeat_s: float = HEARTBEAT_S, clock: Callable[[], float] = time.monotonic,
                 trial_values: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.stream = stream or sys.stdout
        # what a trial runs with beyond its searched config (RunSpec.trial_values: a loss's prior beta)
        self.trial_values = trial_values or (lambda config: {})
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_steps, self.metric, self.label = total_steps, metric, metric_label(metric)
        self.heartbeat_s, self.clock = heartbeat_s, clock
        self.trials: dict[str, TrialState] = {}
        self._drawn = 0  # lines of the live block on screen (terminal only)
        self._last_draw = -math.inf
        self._last_heartbeat = clock()
        self._last_round: Any = None
        self._waiting_since: float | None = None  # when the first trial started waiting for resources
        self._last_wait_note = -math.inf
        self._lock = threading.RLock()

    def _config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**config, **self.trial_values(config)}

    # ---- events -------------------------------------------------------------------------------
    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None:
        with self._lock:
            round_number = config.get("round")
            if config.get("decision") and round_number != self._last_round:
                self._last_round = round_number
                self.note(f"searcher: {config['decision']}")
            trial = self.trials.setdefault(trial_id, TrialState(trial_id, self._config(config)))
            trial.status = "running"
            self._waiting_since = None  # placed: a later wait (the next round's trials) is counted afresh
            self._refresh(force=True)

    def trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        with self._lock:
            trial = self.trials.setdefault(trial_id, TrialState(trial_id, self._config(result.get("config") or {})))
            trial.status = "running"
            step = _number(result.get("step"))
            if step is not None:
                trial.step = int(step)
                seen = (self.clock(), trial.step)
                trial.first_seen = trial.first_seen or seen
                trial.last_seen = seen
            loss, score = _number(result.get(LOSS_KEY)), _number(result.get(self.metric))
            trial.loss = loss if loss is not None else trial.loss
            trial.score = score if score is not None else trial.score
            self._refresh()

    def trial_finished(self, trial_id: str, status: str) -> None:
        """status: done (its last step), stopped (a scheduler stopped it early), error or retrying."""
        with self._lock:
            trial = self.trials.setdefault(trial_id, TrialState(trial_id, {}))
            trial.status = status
            if not self.tty:
                self._print(format_trial(trial, self.total_steps, self.label, self.clock()))
            self._refresh(force=True)

    def waiting_for_resources(self, pending: int, cluster_now: Callable[[], str]) -> None:
        """Every WAIT_NOTE_S while no trial could be placed yet: say so, with what the cluster has now, so
        that a sweep waiting for the autoscaler's nodes does not look hung."""
        with self._lock:
            now = self.clock()
            if self._waiting_since is None:
                self._waiting_since = self._last_wait_note = now
            elif now - self._last_wait_note >= WAIT_NOTE_S:
                self._last_wait_note = now
                self.note(f"waiting {format_duration(now - self._waiting_since)} for the cluster to place "
                          f"{pending} pending trial(s); it has {cluster_now()} now (an autoscaler adds nodes "
                          "in minutes)")

    def note(self, text: str) -> None:
        """A line printed above the trial lines (a decision, a warning), kept on screen."""
        with self._lock:
            self._erase()
            self._print(text)
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._refresh(force=True)
            self._drawn = 0  # the last state of the block stays on screen

    # ---- output -------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def _lines(self) -> list[str]:
        now = self.clock()
        return [format_trial(trial, self.total_steps, self.label, now) for trial in self.trials.values()]

    def _refresh(self, force: bool = False) -> None:
        now = self.clock()
        if self.tty:
            if force or now - self._last_draw >= REDRAW_EVERY_S:
                self._erase()
                self._draw()
        elif now - self._last_heartbeat >= self.heartbeat_s:
            self._last_heartbeat = now
            for trial in self.trials.values():
                if trial.status == "running" and trial.step > 0:
                    self._print(format_trial(trial, self.total_steps, self.label, now))

    def _erase(self) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # to the block's first line; clear to the end
            self._drawn = 0

    def _draw(self) -> None:
        if not self.tty:
            return
        width = max(40, shutil.get_terminal_size((120, 24)).columns - 1)  # a wrapped line breaks the redraw
        lines = [line[:width] for line in self._lines()]
        if lines:
            self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self._drawn, self._last_draw = len(lines), self.clock()


_ACTIVE: dict[str, SweepConsole] = {}  # the console of this process's running sweep (for a restored Tuner)


class ConsoleCallback(Callback):
    """Tune events -> SweepConsole (the Tuner's status table is off: RunConfig(verbose=0))."""

    def __init__(self, console: SweepConsole | None) -> None:
        self.console = console

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune pickles its callbacks with the Tuner (the stream and lock stay here)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.console = _ACTIVE.get("console")  # a Tuner restored by `--resume` shows this session's console

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console:
            self.console.trial_started(trial.trial_id, dict(trial.config or {}))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if self.console:
            self.console.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console:
            last = (trial.last_result or {}).get("step")
            finished = isinstance(last, (int, float)) and last >= self.console.total_steps
            self.console.trial_finished(trial.trial_id, "done" if finished else "stopped")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console:
            self.console.trial_finished(trial.trial_id, "retrying")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console:
            self.console.trial_finished(trial.trial_id, "error")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.console and trials and all(trial.status == "PENDING" for trial in trials):
            self.console.waiting_for_resources(len(trials), _cluster_now)

    def on_experiment_end(self, trials: list, **info) -> None:
        if self.console:
            self.console.close()


def _cluster_now() -> str:
    """`CPU 8, GPU 0`: what the connected Ray cluster has now (an autoscaler may be adding nodes)."""
    import ray

    resources = ray.cluster_resources()
    return ", ".join(f"{name} {resources.get(name, 0):g}" for name in ("CPU", "GPU"))


@contextlib.contextmanager
def sweep_session(experiment: Any, verbose: bool = False, stream: TextIO | None = None) -> Iterator[ConsoleCallback]:
    """The console of one sweep (an orchestrator.config.spec.Experiment): quiet logs into the sweep's
    console.log, and the Tune callback to pass to run_sweep(console=...)."""
    layout, sweep, loop = experiment.layout, experiment.sweep, experiment.run.loop
    from orchestrator.workflows.run_lock import refuse_if_running

    refuse_if_running(None if layout.remote else layout.root, "sweep")  # before console.log is opened
    console = SweepConsole(stream, total_steps=loop.max_steps, metric=sweep.metric,
                           trial_values=experiment.run.trial_values)
    _ACTIVE["console"] = console
    with quiet_session(layout.console_log, verbose):
        console.note(f"sweep {experiment.name}: {sweep.strategy} search on {sweep.metric}, {loop.max_steps} steps "
                     f"per trial; Ray's logs: {layout.console_log}" + ("" if verbose else " (--verbose shows them)"))
        try:
            yield ConsoleCallback(console)
        finally:
            console.close()
            _ACTIVE.pop("console", None)


# ---- the end --------------------------------------------------------------------------------------

def runs_view_url(uri: str | None, experiment_id: str | None) -> str | None:
    """The MLflow UI's runs table of an experiment, in its "Model training" view (MLflow 3 opens an experiment
    on the GenAI overview, and its sidebar in GenAI mode, unless told: `workflowType`)."""
    if not uri or not experiment_id or not uri.startswith(("http://", "https://")):
        return uri
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def summary_lines(summary: dict[str, Any], every_trial: bool = False) -> list[str]:
    """The end of a sweep: the decision log, the best trial, where its records are; each failed trial (every
    trial with every_trial: the console's trial lines already show each one's beta and final metric)."""
    from orchestrator.redaction import redact_text

    metric = summary["metric"]
    out = [f"sweep {summary['name']}: {len(summary['trials'])} trials"]
    shown = summary["trials"] if every_trial else [t for t in summary["trials"] if t.get("error")]
    for trial in sorted(shown, key=lambda t: (_number(t["config"].get("beta")) or 0.0, str(t["trial_id"]))):
        config = trial["config"]
        value = _number(trial.get("metric"))
        what = f"error: {str(trial['error']).splitlines()[0][:100]}" if trial.get("error") else \
            f"{metric} {_fixed(value, 4)} at step {trial.get('step')}"
        out.append(f"  trial {trial['trial_id']}  beta {config.get('beta', '-'):g}  kl_weight "
                   f"{config.get('kl_weight', 0):g}  lr {config.get('learning_rate', 0):g}  {what}"
                   if isinstance(config.get("beta"), (int, float)) else f"  trial {trial['trial_id']}  {what}")
    if summary.get("decision_log"):
        out.append("searcher decisions:")
        for entry in summary["decision_log"]:
            out.append(f"  round {entry.get('round')}: beta {entry.get('beta')} -> {entry.get('action')}: "
                       f"{entry.get('reason')}")
    best = summary.get("best")
    if best is None:
        out.append(f"no trial produced a finite {metric}")
    else:
        config = best["config"]
        out.append(f"best trial {best['trial_id']}: {metric} {best['metric']:.4f} (beta {config.get('beta')}, "
                   f"kl_weight {config.get('kl_weight')}, learning_rate {config.get('learning_rate')})")
    out.append(f"results: {summary['storage']}/sweep_summary.json; logs: {summary['storage']}/console.log; "
               f"reference cache key {summary.get('reference_cache_key')}")
    mlflow = summary.get("mlflow")
    if mlflow:
        url = runs_view_url(mlflow.get("uri"), mlflow.get("experiment_id"))
        out.append(f"MLflow: {redact_text(str(url))} (parent run {mlflow['parent_run_id']})")
    return out


def print_sweep_summary(summary: dict[str, Any], stream: TextIO | None = None, every_trial: bool = False) -> None:
    stream = stream or sys.stdout
    stream.write("\n".join(summary_lines(summary, every_trial)) + "\n")
    stream.flush()
