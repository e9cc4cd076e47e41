"""Screenshots of the MLflow UI and the analysis report after a quickstart, taken with a real headless
browser, for docs/images/ (shown in docs/mlflow.md and the README's tour).

It installs nothing: it drives a Chromium on PATH over its DevTools protocol (with aiohttp, which Ray
installs) and needs it (`chromium` or `chromium-browser`; on Debian
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
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = "1600,900"
WAIT_MS = 12000  # for the UI's JavaScript to load its data


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    sys.exit(f"no headless browser found ({', '.join(BROWSERS)}); on Debian: apt-get install -y chromium")


# Run in the page before the picture: open the sweep's parent run (nested trials shown), close the side panel.
EXPAND_NESTED_RUNS = """[...document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]')].forEach(b => b.click());"""
CLOSE_ASSISTANT = """[...document.querySelectorAll('button')].filter(b => /close/i.test(b.getAttribute('aria-label') || ''))
  .forEach(b => b.click());"""


def shoot(url: str, out: Path, wait_s: float = WAIT_MS / 1000, script: str = CLOSE_ASSISTANT) -> Path:
    """One screenshot of `url` by a headless Chromium driven over its DevTools protocol (aiohttp's websocket
    client, installed with Ray): load, wait, run `script` in the page, wait, capture."""
    import asyncio
    import base64
    import json
    import tempfile
    import urllib.request

    import aiohttp

    port = 9333
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen([browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--window-size={WINDOW}", f"--remote-debugging-port={port}",
                                    f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
                    break
                except OSError:
                    time.sleep(0.3)
            else:
                sys.exit("chromium did not open its DevTools port")
            target = [page for page in pages if page["type"] == "page"][0]["webSocketDebuggerUrl"]

            async def drive() -> bytes:
                async with aiohttp.ClientSession() as session, session.ws_connect(target, max_msg_size=0) as socket:
                    counter = 0

                    async def call(method: str, **params):
                        nonlocal counter
                        counter += 1
                        await socket.send_json({"id": counter, "method": method, "params": params})
                        while True:
                            message = await socket.receive_json()
                            if message.get("id") == counter:
                                return message.get("result", {})

                    await call("Page.enable")
                    await call("Page.navigate", url=url)
                    await asyncio.sleep(wait_s)
                    await call("Runtime.evaluate", expression=script)
                    await asyncio.sleep(3)
                    return base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])

            out.write_bytes(asyncio.run(drive()))
        finally:
            process.terminate()
            process.wait(30)
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
    shoot(runs_view_url(uri, eid), out / "mlflow-experiment.png", script=EXPAND_NESTED_RUNS + CLOSE_ASSISTANT)
    if trials:
        trial = trials[0].info.run_id
        shoot(f"{base}/#/experiments/{eid}/runs/{trial}/model-metrics?{TRAINING_VIEW}", out / "mlflow-trial-curves.png")
    if client.search_registered_models(f"name = '{args.model}'"):
        shoot(f"{base}/#/models/{args.model}?{TRAINING_VIEW}", out / "mlflow-model.png")
    else:
        print(f"no registered model {args.model!r}: `dpo export ... --register {args.model}` first; skipped")
    report = StorageLayout.of(args.storage, args.name).analysis_dir / "report.html"
    if report.is_file():
        shoot(report.resolve().as_uri(), out / "analysis-report.png", wait_s=3)
    else:
        print(f"no report at {report}: `dpo analyze` first; skipped")
    print(f"parent run: {base}/#/experiments/{eid}/runs/{parent.info.run_id}")


if __name__ == "__main__":
    main()
