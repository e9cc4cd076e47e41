"""Screenshots of the MLflow UI and the analysis report after a quickstart, taken with a real headless
browser, for docs/images/ (shown in docs/mlflow.md and the README's tour).

It installs nothing: it needs a Chromium on PATH (`chromium` or `chromium-browser`; on Debian
`apt-get install -y chromium`), a finished sweep (e.g. `dpo quickstart configs/quickstart.yaml`) and, for
the registry picture, a registered model (`dpo export configs/quickstart.yaml --out models/quickstart
--register quickstart-dpo`). It starts or reuses the embedded MLflow server of the storage path and shoots:

    mlflow-experiment.png   the experiment's runs table (the URL dpo prints): the sweep's parent run, its trials
    mlflow-trial-curves.png one trial's metric curves (train/loss, eval/preference_accuracy, ...)
    mlflow-model.png        the registered model, its versions and the alias
    analysis-report.png     the HTML report of `dpo analyze`

    python bench/screenshots.py [--storage runs] [--name quickstart] [--model quickstart-dpo] [--out docs/images]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = "1500,950"
WAIT_MS = 20000  # virtual time for the UI's JavaScript to load its data


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    sys.exit(f"no headless browser found ({', '.join(BROWSERS)}); on Debian: apt-get install -y chromium")


def shoot(url: str, out: Path, wait_ms: int = WAIT_MS) -> Path:
    """One screenshot of `url` by a headless Chromium (a fresh profile, no sandbox: it runs as any user)."""
    command = [browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={WINDOW}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"chromium could not shoot {url}: {done.stderr[-2000:]}")
    print(f"{out}  <-  {url}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="runs", help="the sweep's storage_path (default runs)")
    parser.add_argument("--name", default="quickstart", help="the sweep's name (default quickstart)")
    parser.add_argument("--model", default="quickstart-dpo", help="registered model to show (default quickstart-dpo)")
    parser.add_argument("--out", default="docs/images", help="where the PNGs go (default docs/images)")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from orchestrator.config.layout import StorageLayout
    from orchestrator.console import TRAINING_VIEW, runs_view_url
    from orchestrator.tracking.schema import PARENT_ROLE, ROLE_TAG, SWEEP_TAG, TRIAL_ROLE, tag_filter
    from orchestrator.tracking.server import prepare_tracking_uri

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    uri = prepare_tracking_uri(None, args.storage)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(args.name)
    if experiment is None:
        sys.exit(f"no MLflow experiment {args.name!r} at {uri}: run `dpo quickstart` first")
    eid = experiment.experiment_id
    [parent] = client.search_runs([eid], tag_filter({SWEEP_TAG: args.name, ROLE_TAG: PARENT_ROLE}))
    trials = client.search_runs([eid], tag_filter({SWEEP_TAG: args.name, ROLE_TAG: TRIAL_ROLE}),
                                order_by=["metrics.`eval/preference_accuracy` DESC"])
    base = uri.rstrip("/")
    shoot(runs_view_url(uri, eid), out / "mlflow-experiment.png")
    if trials:
        trial = trials[0].info.run_id
        shoot(f"{base}/#/experiments/{eid}/runs/{trial}/model-metrics?{TRAINING_VIEW}", out / "mlflow-trial-curves.png")
    if client.search_registered_models(f"name = '{args.model}'"):
        shoot(f"{base}/#/models/{args.model}?{TRAINING_VIEW}", out / "mlflow-model.png")
    else:
        print(f"no registered model {args.model!r}: `dpo export ... --register {args.model}` first; skipped")
    report = StorageLayout.of(args.storage, args.name).analysis_dir / "report.html"
    if report.is_file():
        shoot(report.resolve().as_uri(), out / "analysis-report.png", wait_ms=3000)
    else:
        print(f"no report at {report}: `dpo analyze` first; skipped")
    print(f"parent run: {base}/#/experiments/{eid}/runs/{parent.info.run_id}")


if __name__ == "__main__":
    main()
