"""The `dpo` command line.

    dpo demo-assets [--force]                          build the embedded default model and data
    dpo train CONFIG [--set key=value ...]             DPO in this process (no Ray)
    dpo sft CONFIG [--set key=value ...]               SFT in this process on data.sft_train
    dpo check CONFIG [--set key=value ...]             validate config and data, train nothing
    dpo sweep CONFIG [--set ...] [--address ADDR] [--resume]   Ray Tune sweep of Ray Train trials
    dpo ui [CONFIG] [--stop]                           start (or reuse) the MLflow UI and print its URL
    dpo study CONFIG [--set ...] [--address ADDR] [--resume]   SFT-then-DPO vs DPO-only with benchmark deltas
    dpo analyze CONFIG|NAME [--kl-budget X ...]        pick beta from the sweep's MLflow runs, write the report
    dpo export CONFIG|NAME --out DIR [--trial ID] [--register MODEL_NAME]   best checkpoint -> HF model directory
    dpo quickstart CONFIG [--out DIR]                  sweep -> analyze -> export in one command

Bad config or bad data exits with status 2 and a message naming the key, file, rows and reason;
nothing is trained and nothing is written. Run `dpo --help` or `python -m orchestrator --help`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.config import ConfigError, load_config

EXIT_BAD_INPUT = 2


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment config, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set dpo.beta=0.2 --set model.path=/models/qwen (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo", description="Ray-based DPO experiment orchestrator")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-assets", help="build (or show) the embedded default model and data set")
    demo.add_argument("--force", action="store_true", help="rebuild even if the cached assets exist")
    demo.add_argument("--seed", type=int, default=0, help="seed of the embedded default (default 0)")

    commands.add_parser("config-reference", help="print every config key with its default and description (Markdown)")

    for name, text in (("train", "train with DPO in this process"), ("sft", "supervised fine-tuning in this process"),
                       ("check", "validate the config and the data without training")):
        _add_config_arguments(commands.add_parser(name, help=text))
    sweep = commands.add_parser("sweep", help="sweep beta / kl_weight / learning_rate with Ray Tune over Ray Train")
    _add_config_arguments(sweep)
    sweep.add_argument("--address", default=None,
                       help="Ray cluster to join: auto or ray://host:10001 (default: start a local Ray on 127.0.0.1)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep of this config's name from its storage (finished trials are not rerun)")
    study = commands.add_parser("study", help="SFT-then-DPO versus DPO-only on Ray, each model benchmarked (resumable)")
    _add_config_arguments(study)
    study.add_argument("--address", default=None,
                       help="Ray cluster to join: auto or ray://host:10001 (default: start a local Ray on 127.0.0.1)")
    study.add_argument("--resume", action="store_true",
                       help="require an earlier run of this study; finished stages are skipped either way")
    ui = commands.add_parser("ui", help="start or reuse the MLflow server of a config's storage_path and print its URL")
    ui.add_argument("config", nargs="?", default=None, help="config whose tracking.uri / storage_path to use (default ./runs)")
    ui.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ui.add_argument("--stop", action="store_true", help="stop the embedded server instead")
    from orchestrator.journey import add_commands as add_journey_commands

    add_journey_commands(commands)  # analyze, export, quickstart
    return parser


def _check(config) -> None:
    from orchestrator.config import data_args, model_args
    from trainables.entrypoints import load_preference_data

    data = load_preference_data(model_args(config), data_args(config))
    print(f"ok: {len(data.train)} training pairs, {len(data.eval)} held-out pairs, config {config.name}")


def _ui(args) -> int:
    from orchestrator.mlflow_server import EmbeddedServer, embedded_root, prepare_tracking_uri

    config = load_config(args.config, args.overrides) if args.config else None
    storage = config.storage_path if config else "./runs"
    if args.stop:
        stopped = EmbeddedServer(embedded_root(storage)).stop()
        print("stopped" if stopped else "no embedded MLflow server was running")
        return 0
    uri = prepare_tracking_uri(config.tracking.uri if config else None, storage)
    print(f"open {uri} in a browser (experiment: {(config.tracking.experiment or config.name) if config else 'your sweep name'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from orchestrator.mlflow_server import TrackingConfigError, TrackingUnavailableError
    from trainables.data import DataSourceError, InvalidDataError

    try:
        if args.command == "demo-assets":
            from orchestrator.demo_assets import build_demo_assets

            assets = build_demo_assets(seed=args.seed, force=args.force)
            print(f"model: {assets.model_dir}")
            for split, path in sorted(assets.data_files.items()):
                print(f"{split}: {path}")
            return 0
        if args.command == "ui":
            return _ui(args)
        if args.command == "config-reference":
            from orchestrator.config_reference import config_reference_markdown

            print(config_reference_markdown(), end="")
            return 0
        if args.command in ("analyze", "export", "quickstart"):
            from orchestrator.journey import run_command

            return run_command(args)
        config = load_config(args.config, args.overrides)
        if args.command == "check":
            _check(config)
        elif args.command == "train":
            from orchestrator.local_run import train

            train(config)
        elif args.command == "sweep":
            from orchestrator.sweep import print_summary, run_sweep

            print_summary(run_sweep(config, address=args.address, resume=args.resume))
        elif args.command == "study":
            from orchestrator.study import print_results, run_study

            print_results(run_study(config, address=args.address, resume=args.resume))
        elif args.command == "sft":
            from orchestrator.local_run import sft

            sft(config)
        return 0
    except (ConfigError, InvalidDataError, DataSourceError, FileNotFoundError, TrackingConfigError,
            TrackingUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
