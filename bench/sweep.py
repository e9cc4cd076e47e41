"""Sweep benchmark: Ray overhead of a `dpo sweep` and the reference compute the shared cache saves.

    python bench/sweep.py                                   # the quickstart sweep, as `dpo sweep` runs it
    python bench/sweep.py --config configs/quickstart.yaml --set train.max_steps=200

It runs the sweep in a fresh storage folder and reports:
- wall time of the whole sweep, and the time the trials spent inside optimizer steps and evaluation
  (each trial reports `perf/step_seconds_total` and `perf/eval_seconds_total`);
- Ray overhead = 1 - (trial step + eval seconds) / (wall seconds x trial slots), where trial slots is
  how many trials fit the machine at once; it counts start-up of Ray, trial actors, Train workers,
  model and data loading, checkpoint upload and the reference pass as overhead;
- the fixed cost of each trial: the wall time from the moment its slot became free (the last trial that
  ended before it started; the trial's own start for the first ones) to its last report, less its steps
  and evaluation. It holds the searcher's decision, Tune's scheduling, the MLflow run, loading, reports,
  checkpoints and the previous trial's teardown. `fixed_seconds_per_trial` is its median over the trials
  after the first (the first pays for the trial actor's imports and waits for the reference pass);
- where the seconds before each first step went, as the trials measured them: Ray Train start-up (Ray
  Train trials only), waiting for the reference task, and loading (imports, data, cache, model)
  (`perf/ray_train_start_seconds`, `perf/reference_wait_seconds`, `perf/load_seconds`); the rest of the
  trials (reports, checkpoints, teardown); and the seconds outside trials;
- the reference pass: its cold cost (measured once more, outside the sweep) and the compute that
  per-trial recomputation would have spent, K x cold cost, against 1 x cold cost with the shared cache;
- with --floor, warm trials: Ray and Tune's floor, the wall time of start_ray, a Tuner.fit() of as many
  trials as the sweep ran, each importing the trial module and reporting once, and ray.shutdown() (the
  part of the overhead no change to this project's code removes);
- Ray Train trials only: Ray Train's floor, the wall time of a TorchTrainer.fit() whose
  workers run an empty loop, on a local Ray started as `dpo sweep` starts it, with the trial's resources
  (the per-trial cost no engine change can remove), and the CPU seconds Ray's processes spend in one such
  fit, by process (controller, worker, helper actors);
- the projection: the overhead is fixed seconds (per sweep and per trial), so it also prints how long each
  trial would have to train for those seconds to be 10% of the wall time.
Writes the figures as JSON to --out and ends with one JSON line on stdout: wall_seconds,
ray_overhead_fraction, fixed_seconds_per_trial, betas (in the order tried), trial_mode, trials, load
average. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config import ExperimentConfig, load_config  # noqa: E402
from orchestrator.config.spec import resolve_experiment, resolve_run  # noqa: E402
from orchestrator.workflows.sweep import run_sweep  # noqa: E402
from trainables.entrypoints import load_preference_data, precompute_reference  # noqa: E402

TARGET = 0.10  # issue 20: Ray overhead at most 10% of the sweep's wall time
FIXED_TARGET = 3.0  # issue 20: at most 3 fixed seconds per single-worker trial after the first


def cold_reference_seconds(config: ExperimentConfig) -> float:
    """One reference pass over train + eval pairs into an empty cache, as the sweep's Ray task does it."""
    with tempfile.TemporaryDirectory() as cache_dir:
        spec = resolve_run(config, reference_cache=cache_dir, show_progress=False)
        data = load_preference_data(spec.model, spec.data)
        started = time.perf_counter()
        precompute_reference(spec.model, spec.preference, data, spec.runtime)
        return time.perf_counter() - started


def empty_train_loop(_: dict) -> None:
    """What a Train worker runs to time Ray Train's own start-up and teardown: nothing."""


class RayProcessCpu:
    """CPU seconds (user + system) that Ray's worker processes spend while a block runs, by actor class.

    Ray titles a worker process `ray::<actor class>` (`ray::IDLE` in the pool, the task's name while one
    runs); this samples /proc every `interval` seconds from a thread, names each process by the class its title
    showed most often, and keeps its last reading, less what it had used when the block began (a process
    that ends between two samples loses at most one interval). Linux only: elsewhere it reports nothing.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.baseline: dict[int, float] = {}
        self.latest: dict[int, float] = {}
        self.classes: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="ray-process-cpu", daemon=True)

    @staticmethod
    def snapshot() -> dict[int, tuple[str, float]]:
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        found = {}
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if not title.startswith("ray::"):
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while being read
                continue
            actor_class = title.removeprefix("ray::").split()[0].split(".")[0]  # "RayTrainWorker.execute" -> RayTrainWorker
            found[int(entry.name)] = (actor_class, (int(fields[11]) + int(fields[12])) / ticks)
        return found

    def _record(self) -> None:
        for pid, (actor_class, cpu) in self.snapshot().items():
            self.latest[pid] = cpu
            self.classes[pid][actor_class] += 1

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RayProcessCpu":
        self.baseline = {pid: cpu for pid, (_, cpu) in self.snapshot().items()}
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    def by_actor_class(self) -> dict[str, float]:
        """CPU seconds per actor class (IDLE: pooled workers that ran nothing), summed over its processes."""
        totals: dict[str, float] = {}
        for pid, cpu in self.latest.items():
            seen = self.classes[pid]
            actor_class = max((c for c in seen if c != "IDLE"), key=seen.__getitem__, default="IDLE")
            totals[actor_class] = totals.get(actor_class, 0.0) + max(0.0, cpu - self.baseline.get(pid, 0.0))
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


def ray_train_floor(config: ExperimentConfig, storage: str, fits: int = 3) -> tuple[list[float], dict[str, float]]:
    """Wall seconds of `fits` TorchTrainer.fit() calls of an empty loop (the trial's scaling, local Ray),
    and the CPU seconds per fit that Ray's processes spent in them, by actor class (RayProcessCpu)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.ray.cluster import start_ray

    resources = config.resources
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": resources.gpus_per_worker} if resources.use_gpu else {})
    start_ray(None, resolve_run(config).resources)
    try:
        seconds, cpu = [], RayProcessCpu()
        with cpu:
            for index in range(fits):
                trainer = TorchTrainer(empty_train_loop, scaling_config=ScalingConfig(
                    num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker),
                    run_config=RunConfig(name=f"floor-{index}", storage_path=f"{storage}/floor"))
                started = time.perf_counter()
                trainer.fit()
                seconds.append(time.perf_counter() - started)
            time.sleep(1.0)  # let the last fit's processes finish exiting inside the sample window
        return seconds, {actor_class: value / fits for actor_class, value in cpu.by_actor_class().items()}
    finally:
        ray.shutdown()


def tune_floor(config: ExperimentConfig, trials: int) -> dict[str, float]:
    """What Ray and Tune cost a warm sweep with nothing to train: start_ray as `dpo sweep` starts it, one
    Tuner.fit() of `trials` trials of a function trainable that imports the trial module (torch, transformers,
    the engine) and reports once, with the sweep's per-trial resources and reuse_actors; then ray.shutdown().
    The part of the overhead no change of this project's code removes."""
    import ray
    from ray import tune

    from orchestrator.ray.cluster import start_ray
    from orchestrator.ray.trial import warm_resources

    run = resolve_run(config)
    started = time.perf_counter()
    start_ray(None, run.resources)
    ray_started = time.perf_counter()
    try:
        tuner = tune.Tuner(tune.with_resources(empty_trial, warm_resources(run.resources)),
                           param_space={"index": tune.grid_search(list(range(trials)))},
                           tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
                           run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="dpo-bench-floor-"), verbose=0))
        fit_started = time.time()
        results = tuner.fit()
        fitted = time.perf_counter()
        starts = sorted(result.metrics["started"] for result in results)
    finally:
        ray.shutdown()
    ended = time.perf_counter()
    return {"ray_start_seconds": ray_started - started, "fit_seconds": fitted - ray_started,
            "fit_to_first_trial_seconds": starts[0] - fit_started,
            "shutdown_seconds": ended - fitted, "total_seconds": ended - started, "trials": trials}


def empty_trial(config: dict) -> None:
    """The floor's trainable: the trial module's imports, then one report."""
    import orchestrator.ray.trial  # noqa: F401 - what a real trial actor imports
    from ray import tune

    tune.report({"started": time.time()})


STARTUP_PHASES = ("ray_train_start_seconds", "reference_wait_seconds", "load_seconds")  # ray_trial.StartupClock


def fixed_by_phase(slot_seconds: float, trials: list[dict]) -> dict[str, float]:
    """The sweep's non-step seconds split by where they went: each trial's start-up phases (as its workers
    measured them), the rest of each trial (MLflow run, reports, checkpoints, Ray Train teardown), and
    what lies outside trials (data validation, Ray and MLflow start, Tune, gaps between trials)."""
    phases = {name: sum(t.get(name) or 0.0 for t in trials) for name in STARTUP_PHASES}
    in_trials = sum((t.get("trial_seconds") or 0.0) - (t.get("step_seconds") or 0.0) - (t.get("eval_seconds") or 0.0)
                    for t in trials)
    phases["rest_of_trials"] = in_trials - sum(phases.values())
    phases["outside_trials"] = slot_seconds - sum(t.get("trial_seconds") or 0.0 for t in trials)
    return phases


def outside_trials_split(started: float, ended: float, trials: list[dict]) -> dict[str, float]:
    """The wall seconds outside trials (epoch times) split: before the first trial's function started,
    between trials (no trial running), after the last trial's last report. Empty if trials lack start times."""
    spans = sorted((t["trial_started_at"], t["trial_started_at"] + (t.get("trial_seconds") or 0.0))
                   for t in trials if t.get("trial_started_at"))
    if not spans:
        return {}
    between, running_until = 0.0, spans[0][1]
    for start, end in spans[1:]:
        between += max(0.0, start - running_until)
        running_until = max(running_until, end)
    return {"before_first_trial_seconds": spans[0][0] - started, "between_trials_seconds": between,
            "after_last_trial_seconds": ended - running_until}


def fixed_seconds_of_trials(trials: list[dict]) -> list[dict]:
    """Each trial's fixed seconds: from the moment its slot became free (the end of the last trial that
    ended before it started, else its own start) to its last report, less its steps and evaluation; in
    the order the trials started. Trials without a start time (an older sweep) count from their own start."""
    timed = []
    for trial in trials:
        busy = (trial.get("step_seconds") or 0.0) + (trial.get("eval_seconds") or 0.0)
        started, seconds = trial.get("trial_started_at"), trial.get("trial_seconds") or 0.0
        timed.append({"trial_id": trial["trial_id"], "beta": trial["config"].get("beta"), "started": started,
                      "ended": started + seconds if started is not None else None, "seconds": seconds, "busy": busy})
    timed.sort(key=lambda t: (t["started"] is None, t["started"] or 0.0))
    for trial in timed:
        if trial["started"] is None:
            trial["fixed"] = trial["seconds"] - trial["busy"]
            continue
        freed = [other["ended"] for other in timed if other["ended"] is not None and other["ended"] <= trial["started"]]
        since = max(freed) if freed else trial["started"]
        trial["fixed"] = trial["ended"] - since - trial["busy"]
    return timed


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml", help="sweep config (default: the quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/sweep-<date>.json)")
    parser.add_argument("--floor", action="store_true", help="warm trials: also time Ray and Tune's floor (empty trials)")
    args = parser.parse_args()

    storage = tempfile.mkdtemp(prefix="dpo-bench-sweep-")
    config = load_config(args.config, args.overrides + [f"storage_path={storage}"])
    experiment = resolve_experiment(config)
    load_before = load_average()
    started, started_epoch = time.perf_counter(), time.time()
    summary = run_sweep(experiment)
    wall, ended_epoch = time.perf_counter() - started, time.time()
    load_after = load_average()
    trial_mode = summary.get("trial_mode", experiment.sweep.trial_mode)

    cpus = os.cpu_count() or 1
    per_trial_cpus = config.resources.num_workers * config.resources.cpus_per_worker
    slots = max(1, min(config.sweep.max_concurrent_trials or cpus, math.floor(cpus / per_trial_cpus)))
    trials = summary["trials"]
    step_seconds = sum(t.get("step_seconds") or 0.0 for t in trials)
    eval_seconds = sum(t.get("eval_seconds") or 0.0 for t in trials)
    overhead = 1.0 - (step_seconds + eval_seconds) / (wall * slots)
    if config.tracking.enabled and not config.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        from orchestrator.config.layout import mlflow_root
        from orchestrator.tracking.server import EmbeddedServer

        EmbeddedServer(mlflow_root(storage)).stop()  # the sweep's embedded server; this folder is temporary
    reference_seconds = cold_reference_seconds(config)
    floor, floor_cpu = ray_train_floor(config, storage) if trial_mode == "train" else ([], {})
    warm_floor = tune_floor(config, len(summary["trials"])) if trial_mode == "warm" and args.floor else {}
    # The overhead is a fixed cost (per sweep and per trial), so the fraction falls as trials train longer:
    # the training per trial at which this sweep's fixed seconds would be 10% of the wall time.
    fixed_seconds = wall * slots - step_seconds - eval_seconds
    busy_per_trial_for_target = fixed_seconds * (1 - TARGET) / TARGET / max(1, len(trials))
    timed = fixed_seconds_of_trials(trials)
    after_first = sorted(t["fixed"] for t in timed[1:])
    fixed_per_trial = statistics.median(after_first) if after_first else None
    figures = {
        "date": datetime.date.today().isoformat(), "cpus": cpus, "config": args.config, "overrides": args.overrides,
        "trial_mode": trial_mode, "trials": len(trials), "betas": [t["beta"] for t in timed],
        "betas_tried": sorted({t["config"].get("beta") for t in trials}),
        "trial_slots": slots, "wall_seconds": wall, "trial_step_seconds": step_seconds,
        "trial_eval_seconds": eval_seconds, "ray_overhead_fraction": overhead,
        "fixed_seconds_per_trial": fixed_per_trial, "fixed_seconds_of_each_trial": [t["fixed"] for t in timed],
        "load_average_before": load_before, "load_average_after": load_after,
        "reference_cold_seconds": reference_seconds,
        "reference_seconds_shared_cache": reference_seconds,
        "reference_seconds_per_trial_recompute": reference_seconds * len(trials),
        "ray_train_floor_seconds": floor, "ray_train_floor_cpu_seconds_by_process": floor_cpu,
        "fixed_seconds": fixed_seconds, "busy_seconds_per_trial_for_10_percent": busy_per_trial_for_target,
        "best": summary["best"],
        "per_trial": [{k: t.get(k) for k in ("trial_id", "trial_started_at", "trial_seconds", "step_seconds", "eval_seconds")
                       + STARTUP_PHASES} | {"beta": t["config"].get("beta"), "step": t.get("step"), "error": t.get("error"),
                                            summary["metric"]: t.get("metric")} for t in trials],
        "fixed_seconds_by_phase": fixed_by_phase(wall * slots, trials),
        "outside_trials_split": outside_trials_split(started_epoch, ended_epoch, trials),
        "tune_floor": warm_floor,
    }
    print(f"sweep {config.name} ({trial_mode} trials): {len(trials)} trials, betas {figures['betas']}, "
          f"{slots} trial slot(s) on {cpus} CPUs; load average {load_before} before, {load_after} after")
    print(f"  wall {wall:.1f} s; in optimizer steps {step_seconds:.1f} s, in evaluation {eval_seconds:.1f} s")
    print(f"  Ray overhead (wall not spent in steps or eval): {overhead:.1%} (target {TARGET:.0%})")
    if fixed_per_trial is not None:
        print(f"  fixed seconds per trial after the first (median): {fixed_per_trial:.1f} s (target {FIXED_TARGET:g} s); "
              "each trial, in the order started: " + ", ".join(f"{t['fixed']:.1f}" for t in timed))
    for trial in trials:
        busy = (trial.get("step_seconds") or 0.0) + (trial.get("eval_seconds") or 0.0)
        if trial.get("trial_seconds"):
            phases = ", ".join(f"{name.removesuffix('_seconds').replace('_', ' ')} {trial.get(name) or 0.0:.1f}" for name in STARTUP_PHASES)
            print(f"    trial {trial['trial_id']} (beta {trial['config'].get('beta')}): {trial['trial_seconds']:.1f} s from "
                  f"trial start to last report, {busy:.1f} s in steps and eval; before the first step: {phases} s; "
                  f"final {summary['metric']} {trial.get('metric')} at step {trial.get('step')}")
    print("  fixed seconds by phase (summed over trials): " + ", ".join(
        f"{name.replace('_', ' ')} {value:.1f}" for name, value in figures["fixed_seconds_by_phase"].items()))
    split = figures["outside_trials_split"]
    if split:
        print(f"  outside trials: {split['before_first_trial_seconds']:.1f} s before the first trial started "
              f"(data check, Ray, MLflow, reference pass, Tune, the trial actor), "
              f"{split['between_trials_seconds']:.1f} s between trials, "
              f"{split['after_last_trial_seconds']:.1f} s after the last one (summary, MLflow, Ray shutdown)")
    if warm_floor:
        print(f"  Ray + Tune floor (start_ray, Tuner.fit of {warm_floor['trials']} empty trials that import the trial "
              f"module, shutdown): {warm_floor['total_seconds']:.1f} s = Ray start {warm_floor['ray_start_seconds']:.1f} + "
              f"fit {warm_floor['fit_seconds']:.1f} (first trial started after {warm_floor['fit_to_first_trial_seconds']:.1f}) + "
              f"shutdown {warm_floor['shutdown_seconds']:.1f}")
    if floor:
        print(f"  Ray Train floor (TorchTrainer.fit of an empty loop, same resources): "
              f"{', '.join(f'{value:.1f}' for value in floor)} s; median {sorted(floor)[len(floor) // 2]:.1f} s per trial")
    if floor_cpu:
        cpu_total = sum(floor_cpu.values())
        print(f"    CPU per empty fit: {cpu_total:.1f} CPU-s in Ray's processes, at least {cpu_total / cpus:.1f} s on {cpus} cores ("
              + ", ".join(f"{actor_class} {value:.1f}" for actor_class, value in floor_cpu.items() if value >= 0.05) + ")")
    print(f"  {fixed_seconds:.1f} fixed seconds: overhead would be {TARGET:.0%} with {busy_per_trial_for_target:.0f} s of steps "
          f"and eval per trial (this sweep: {(step_seconds + eval_seconds) / max(1, len(trials)):.0f} s)")
    print(f"  reference pass: {reference_seconds:.1f} s once with the shared cache vs "
          f"{reference_seconds * len(trials):.1f} s recomputed per trial ({len(trials)}x)")
    out = Path(args.out or f"bench/results/sweep-{figures['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1, default=str))
    print(f"  written: {out}")
    print(json.dumps({key: figures[key] for key in (
        "wall_seconds", "ray_overhead_fraction", "fixed_seconds_per_trial", "betas", "trial_mode", "trials",
        "trial_slots", "cpus", "load_average_before", "load_average_after")}, default=str))


if __name__ == "__main__":
    main()
