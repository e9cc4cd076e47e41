"""Does Ray Train's local mode (`ScalingConfig(num_workers=0)`) report and checkpoint inside a Tune trial?

    python bench/train_local_mode.py          # writes only to a temporary folder

Why the warm trials of `dpo sweep` call the engine with `ray.tune.report` instead (docs/sweeps.md#warm-trials):
this runs a Tuner of two trials (`reuse_actors=True`, `FailureConfig(max_failures=1)`) whose function fits a
`TorchTrainer(num_workers=0)`; the training function reports three steps, each with a checkpoint, once
starting with `ray.train.get_checkpoint()` (what a retried or resumed trial needs) and once without it. For
each variant it prints every trial's error (None when the fit worked), the metrics and checkpoint the fit
returned, and ends with one JSON line. A probe of Ray's behaviour, never a test.
"""

from __future__ import annotations

import json
import os
import tempfile

import ray
from ray import tune
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def train_function(config: dict) -> None:
    """Three steps, each reported with a checkpoint holding its step; continues from a restored checkpoint."""
    import ray.train

    start = 0
    restored = ray.train.get_checkpoint() if config["restore"] else None
    if restored is not None:
        with restored.as_directory() as folder:
            start = int(open(os.path.join(folder, "step")).read())
    for step in range(start + 1, 4):
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "step"), "w") as file:
            file.write(str(step))
        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(folder))


def trial(config: dict) -> None:
    """The Tune trial: a local-mode TorchTrainer; what its fit returned goes to Tune."""
    trainer = TorchTrainer(train_function, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name=f"local-{config['restore']}-{config['x']}",
                                                storage_path=config["storage"]))
    result = trainer.fit()
    tune.report({"fit_step": (result.metrics or {}).get("step"), "fit_checkpoint": result.checkpoint is not None,
                 "fit_error": repr(result.error) if result.error else None})


def probe(restore: bool, storage: str) -> list[dict]:
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 1}),
        param_space={"x": tune.grid_search([1, 2]), "restore": restore, "storage": storage},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=f"probe-{restore}", storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=0))
    found = []
    for result in tuner.fit():
        metrics = result.metrics or {}
        found.append({"restore": restore, "error": str(result.error).splitlines()[-1][:300] if result.error else None,
                      "fit_step": metrics.get("fit_step"), "fit_checkpoint": metrics.get("fit_checkpoint"),
                      "tune_checkpoint": result.checkpoint is not None})
    return found


def main() -> None:
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a Ray of its own, next to any other
    try:
        with tempfile.TemporaryDirectory(prefix="dpo-local-mode-") as storage:
            trials = probe(True, storage) + probe(False, storage)
    finally:
        ray.shutdown()
    for found in trials:
        print(f"get_checkpoint {'used' if found['restore'] else 'not used'}: error {found['error']}; the fit "
              f"returned step {found['fit_step']}, checkpoint {found['fit_checkpoint']}")
    print(json.dumps({"ray": ray.__version__, "trials": len(trials),
                      "failed": sum(1 for found in trials if found["error"]), "per_trial": trials}))


if __name__ == "__main__":
    main()
