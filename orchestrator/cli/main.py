"""The `dpo` command line: one command table, one place where errors become exit codes.

    dpo demo-assets [--force]                          build the embedded default model and data
    dpo check CONFIG [--set key=value ...]             validate config and data, train nothing
    dpo config-reference                               every config key, its default and description
    dpo train CONFIG [--set key=value ...]             DPO in this process (no Ray)
    dpo sft CONFIG [--set key=value ...]               SFT in this process on data.sft_train
    dpo sweep CONFIG [--set ...] [--address ADDR] [--resume] [--verbose]   Ray Tune sweep of Ray Train trials
    dpo study CONFIG [--set ...] [--address ADDR] [--resume] [--verbose]   SFT-then-DPO vs DPO-only, benchmarked
    dpo ui [CONFIG] [--stop]                           start (or reuse) the MLflow UI and print its URL
    dpo analyze CONFIG|NAME [--kl-budget X ...]        pick beta from the sweep's MLflow runs, write the report
    dpo export CONFIG|NAME --out DIR [--trial ID] [--register MODEL_NAME [--alias A]]   best checkpoint -> HF model
    dpo quickstart CONFIG [--out DIR]                  sweep -> analyze -> export in one command
    dpo plan CONFIG [--gpu-memory GB] [--json]         per-GPU memory from config.json only; does it fit

The config is loaded and validated once, here, and resolved into the run spec before any work. A user
error (trainables.errors.UserError: bad config, bad data, a missing sweep or checkpoint, an unreachable
tracking server) exits with status 2 and a message naming the key, file, rows and reason; nothing is
trained and nothing is written. A bad command line (an unknown flag, a --log-level that is not a level)
is argparse's exit 2. Any other exception is a bug: its traceback is printed and the exit status is 1.
`dpo sweep`, `study` and `quickstart` show their trials through orchestrator/console.py and keep Ray's
own output in the sweep's console.log (`--verbose` shows it too). Nothing `main` prints or logs shows a secret (orchestrator/redaction.py: messages, tracebacks and every
log record are redacted). `python -m orchestrator ...` is the same as `dpo ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from orchestrator.cli import journey
from orchestrator.redaction import excerpt_text, install_log_redaction, redact_text, redacted_traceback
from trainables.errors import UserError

EXIT_BAD_INPUT = UserError.exit_code
EXIT_BUG = 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ARGUMENT_MESSAGE_CHARS = 300
MAX_MESSAGE_CHARS = 3000


class Parser(argparse.ArgumentParser):
    """argparse with its error messages cut short and redacted (they quote the command line)."""

    def error(self, message: str):
        super().error(excerpt_text(message, ARGUMENT_MESSAGE_CHARS))


def log_level(text: str) -> str:
    """--log-level: a real level, any case (argparse turns the ValueError into exit 2)."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{excerpt_text(repr(text), 60)} is not a log level; use one of "
                                         f"{', '.join(LOG_LEVELS)} (any case)")
    return level


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment config, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set dpo.beta=0.2 --set model.path=/models/qwen (repeatable)")


def add_cluster_arguments(parser: argparse.ArgumentParser, resume_help: str) -> None:
    add_config_arguments(parser)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: auto or ray://host:10001 (default: start a local Ray on 127.0.0.1)")
    parser.add_argument("--resume", action="store_true", help=resume_help)
    add_verbose_argument(parser)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own logs and what its workers print "
                        "(always kept in the sweep's console.log)")


def add_force_config_change(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--force-config-change", action="store_true",
                        help="resume even if keys that can change results differ from the run's stored config.yaml "
                        "(they are listed; without this flag the resume is refused)")
    return parser


def add_resumable_config_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_force_config_change(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached assets exist")
    parser.add_argument("--seed", type=int, default=0, help="seed of the embedded default (default 0)")


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="config whose tracking.uri / storage_path to use (default ./runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--stop", action="store_true", help="stop the embedded server instead")


# ---- handlers: each takes the parsed arguments and returns the exit status ---------------------------

def demo_assets(args: argparse.Namespace) -> int:
    from orchestrator.workflows.demo_assets import build_demo_assets

    assets = build_demo_assets(seed=args.seed, force=args.force)
    print(f"model: {assets.model_dir}")
    for split, path in sorted(assets.data_files.items()):
        print(f"{split}: {path}")
    return 0


def config_reference(args: argparse.Namespace) -> int:
    from orchestrator.config.reference import config_reference_markdown

    print(config_reference_markdown(), end="")
    return 0


def check(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.workflows.check import check as check_config

    config = load_config(args.config, args.overrides)
    report = check_config(config)
    sft = "" if report.sft_examples is None else f", {report.sft_examples} SFT examples"
    print(f"ok: {report.train_pairs} training pairs, {report.held_out_pairs} held-out pairs{sft}, config {config.name}")
    return 0


def train(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.workflows import local_run

    local_run.train(load_config(args.config, args.overrides), force_config_change=args.force_config_change)
    return 0


def sft(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.workflows import local_run

    local_run.sft(load_config(args.config, args.overrides), force_config_change=args.force_config_change)
    return 0


def sweep(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.config.spec import resolve_experiment
    from orchestrator.console import print_sweep_summary, sweep_session
    from orchestrator.workflows.sweep import run_sweep

    experiment = resolve_experiment(load_config(args.config, args.overrides))
    with sweep_session(experiment, verbose=args.verbose) as console:
        summary = run_sweep(experiment, address=args.address, resume=args.resume, console=console,
                            force_config_change=args.force_config_change)
    print_sweep_summary(summary)
    return 0


def study(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.console import quiet_session
    from orchestrator.workflows.study import print_results, run_study, study_layout

    config = load_config(args.config, args.overrides)
    from orchestrator.workflows.run_lock import refuse_if_running

    layout = study_layout(config)
    refuse_if_running(None if layout.remote else layout.root, "study")  # before its console.log is opened
    log_file = layout.console_log
    print(f"study {config.name}: Ray's logs go to {log_file}" + ("" if args.verbose else " (--verbose shows them)"))
    with quiet_session(log_file, verbose=args.verbose, show=("orchestrator.workflows.study",)):
        results = run_study(config, address=args.address, resume=args.resume)
    print_results(results)
    return 0


def ui(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.config.layout import mlflow_root
    from orchestrator.tracking.server import EmbeddedServer, prepare_tracking_uri

    config = load_config(args.config, args.overrides) if args.config else None
    storage = config.storage_path if config else "./runs"
    if args.stop:
        stopped = EmbeddedServer(mlflow_root(storage)).stop()
        print("stopped" if stopped else "no embedded MLflow server was running")
        return 0
    uri = prepare_tracking_uri(config.tracking.uri if config else None, storage)
    print(f"open {uri} in a browser (experiment: {(config.tracking.experiment or config.name) if config else 'your sweep name'})")
    return 0


def _plan():
    from orchestrator.workflows import plan

    return plan


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "demo-assets": Command("build (or show) the embedded default model and data set", add_demo_arguments, demo_assets),
    "config-reference": Command("print every config key with its default and description (Markdown)",
                                lambda parser: None, config_reference),
    "check": Command("validate the config and the data without training", add_config_arguments, check),
    "train": Command("train with DPO in this process", add_resumable_config_arguments, train),
    "sft": Command("supervised fine-tuning in this process", add_resumable_config_arguments, sft),
    "sweep": Command("sweep beta / kl_weight / learning_rate with Ray Tune over Ray Train",
                     lambda parser: add_cluster_arguments(add_force_config_change(parser), "continue the sweep of this "
                                                          "config's name from its storage (finished trials are not rerun)"),
                     sweep),
    "study": Command("SFT-then-DPO versus DPO-only on Ray, each model benchmarked (resumable)",
                     lambda parser: add_cluster_arguments(parser, "require an earlier run of this study; finished "
                                                          "stages are skipped either way"), study),
    "ui": Command("start or reuse the MLflow server of a config's storage_path and print its URL", add_ui_arguments, ui),
    "analyze": Command("pick beta from a sweep's MLflow runs and write the report", journey.add_analyze_arguments,
                       journey.analyze),
    "export": Command("write a trial's best checkpoint as a Hugging Face model directory", journey.add_export_arguments,
                      journey.export),
    "quickstart": Command("the whole journey: sweep, MLflow, analysis, export", journey.add_quickstart_arguments,
                          journey.quickstart),
    "plan": Command("per-GPU memory of a config's run, from the model's config.json alone, and whether it fits",
                    lambda parser: _plan().add_plan_arguments(parser), lambda args: _plan().plan_command(args)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dpo", description="Ray-based DPO experiment orchestrator")
    parser.add_argument("--log-level", default="INFO", type=log_level, metavar="LEVEL",
                        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case; default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    try:
        return COMMANDS[args.command].run(args)
    except UserError as error:
        message = redact_text(str(error))
        if len(message) > MAX_MESSAGE_CHARS:  # each part is cut at its source; this bounds the whole
            message = message[:MAX_MESSAGE_CHARS] + f"... ({len(message) - MAX_MESSAGE_CHARS:,} more characters)"
        print(f"error: {message}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # noqa: BLE001 - a bug: its traceback is shown (redacted), not hidden
        print(redacted_traceback(error), end="", file=sys.stderr)
        print("error: the failure above is a bug in dpo, not a problem with your input; please report it "
              "with the traceback", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
