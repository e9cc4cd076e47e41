"""`dpo analyze`, `dpo export` and `dpo quickstart`: from a config (or a sweep name) to the chosen beta,
the report and the exported model.

    dpo analyze CONFIG|NAME [--set k=v ...] [rule options] [--report-dir DIR] [--no-log]
    dpo export  CONFIG|NAME --out DIR [--trial ID] [--register MODEL_NAME [--alias A]] [--adapter] [--prompt TEXT] [rule options]
    dpo quickstart CONFIG [--set k=v ...] [--out DIR] [rule options]     sweep -> analyze -> export -> benchmark

CONFIG is a YAML experiment config: the sweep is its `name`, the runs are read from the tracking URI it
resolves to (tracking.uri, MLFLOW_TRACKING_URI or the embedded server of its storage_path), exactly as
`dpo sweep` wrote them. NAME is a bare sweep name, read with `--tracking-uri` or from the embedded server
of `--storage-path` (default ./runs). Rule options: --metric, --kl-metric, --kl-budget,
--benchmark-tolerance, --tie-tolerance, --stage, --arm (analysis/selection.py). The command table is in
orchestrator/cli/main.py.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, NotFoundError
from orchestrator.redaction import excerpt, excerpt_text, redact_text

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_STORAGE = "./runs"


@dataclass(frozen=True)
class Source:
    """Where a sweep's runs are: tracking URI, sweep name, experiment, its storage layout (and the config, if any)."""

    uri: str
    name: str
    experiment: str
    layout: Any  # orchestrator.config.layout.StorageLayout
    config: Any | None  # orchestrator.config.ExperimentConfig when a config file was given


# ---- arguments ---------------------------------------------------------------------------------------

def finite_float(text: str) -> float:
    """A command-line number that is finite (argparse turns the error into exit 2 naming the flag)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{excerpt(text, 60)} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{excerpt(text, 60)} is not a finite number")
    return value


def _add_source_arguments(parser: argparse.ArgumentParser, *, name_allowed: bool) -> None:
    if name_allowed:
        parser.add_argument("target", help="a YAML experiment config (the sweep is its name) or a bare sweep name")
    else:
        parser.add_argument("target", metavar="config", help="YAML experiment config, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (with a config file), e.g. --set storage_path=/mnt/runs")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the config's, else "
                        "MLFLOW_TRACKING_URI, else the embedded server of the storage path)")
    parser.add_argument("--storage-path", default=None, help="the sweep's storage_path (default: the config's, or ./runs)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment or the sweep name)")
    rule = parser.add_argument_group("selection rule (docs/analysis-and-export.md)")
    rule.add_argument("--metric", default="auto", help="score to maximise (default auto: eval/win_rate when logged, "
                      "else eval/preference_accuracy)")
    rule.add_argument("--kl-metric", default="eval/kl", help="KL curve the budget applies to (default eval/kl)")
    rule.add_argument("--kl-budget", default="default", help="largest KL a trial may reach, or none (default: 5 nats "
                      "per answer token of the exact eval/kl, analysis.selection.DEFAULT_KL_BUDGET)")
    rule.add_argument("--benchmark-tolerance", type=finite_float, default=0.05,
                      help="largest bench/* regression, as a fraction of the starting score (default 0.05)")
    rule.add_argument("--tie-tolerance", type=finite_float, default=0.01,
                      help="scores this close to the best are tied and go to the smaller beta (default 0.01)")
    rule.add_argument("--stage", default="dpo", help="only runs of this dpo.stage tag, or any (default dpo)")
    rule.add_argument("--arm", default=None, help="a study's arm only, e.g. sft_then_dpo (default: every trial)")


def _add_model_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="store_true", help="LoRA trials: also write the unmerged adapter to DIR/adapter")
    parser.add_argument("--register", metavar="MODEL_NAME", default=None, help="also log it as an MLflow model "
                        "(transformers flavor) and register it in the MLflow Model Registry")
    parser.add_argument("--alias", default="champion", help="the registered version's alias (default champion: "
                        "load it with mlflow.transformers.load_model('models:/MODEL_NAME@champion'))")
    parser.add_argument("--prompt", default=None, help="prompt of the generation check (default: the first held-out "
                        "prompt of the config's data, else 'Hello')")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weight dtype of the written model (default auto: the checkpoint's fp32 master weights "
                        "as trained; bfloat16 halves the files)")


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    _add_source_arguments(parser, name_allowed=True)
    parser.add_argument("--report-dir", default=None, help="where the report goes (default <storage_path>/<name>/analysis)")
    parser.add_argument("--no-log", action="store_true", help="do not upload the report to the sweep's parent run")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    _add_source_arguments(parser, name_allowed=True)
    parser.add_argument("--out", required=True, help="the directory to write (new, empty or an earlier export)")
    parser.add_argument("--trial", default=None, help="trial id to export (default: the one the rule chooses)")
    _add_model_output_arguments(parser)


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    _add_source_arguments(parser, name_allowed=False)
    parser.add_argument("--out", default=None, help="export directory (default <output_dir>/model)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray on 127.0.0.1)")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own logs and what its workers print "
                        "(always kept in the sweep's console.log)")
    _add_model_output_arguments(parser)


# ---- resolution -------------------------------------------------------------------------------------

def selection_rule(args: argparse.Namespace):
    from analysis.selection import DEFAULT_KL_BUDGET, SelectionRule

    budget = None if str(args.kl_budget).lower() in ("none", "null", "off", "") else args.kl_budget
    budget = DEFAULT_KL_BUDGET if budget == "default" else budget
    try:
        if budget is not None and math.isnan(float(budget)):
            raise ValueError(f"--kl-budget must be a number > 0 or none (got {excerpt_text(str(budget), 40)})")
        return SelectionRule(metric=args.metric, kl_metric=args.kl_metric,
                             kl_budget=None if budget is None else float(budget),
                             benchmark_tolerance=args.benchmark_tolerance, tie_tolerance=args.tie_tolerance,
                             stage=None if args.stage == "any" else args.stage, arm=args.arm)
    except ValueError as error:
        detail = str(error).removeprefix("SelectionRule: ")  # the rule's own name means nothing on the command line
        if detail.startswith("could not convert"):
            detail = f"--kl-budget must be a number > 0 or none (got {excerpt_text(str(budget), 40)})"
        raise ConfigError(f"selection rule (--kl-budget, --benchmark-tolerance, --tie-tolerance): "
                          f"{excerpt_text(detail, 300)}") from None


def resolve_source(args: argparse.Namespace, *, require_records: bool = True) -> Source:
    """The tracking URI (embedded server started or reused), sweep name and storage of a config or a bare name.

    require_records: the embedded server's database must exist already (a sweep ran with this storage path).
    """
    from orchestrator.config import load_config
    from orchestrator.config.layout import StorageLayout
    from orchestrator.tracking.schema import NAME_PATTERN
    from orchestrator.tracking.server import prepare_tracking_uri, resolve_tracking_uri

    target = str(args.target)
    config = None
    if target.endswith(CONFIG_SUFFIXES) or _is_file(target):
        config = load_config(target, args.overrides)
        name, storage = config.name, args.storage_path or config.storage_path
        uri_setting = args.tracking_uri or config.tracking.uri
        experiment = args.experiment or config.tracking.experiment or config.name
    else:
        if not re.fullmatch(NAME_PATTERN, target):
            raise ConfigError(f"{excerpt(target)} is neither a config file (.yaml, .yml or .json) nor a sweep name "
                              "(letters, digits, '.', '_' and '-'); give the sweep's config or its name")
        if args.overrides:
            raise ConfigError(f"--set needs a config file; {excerpt(target)} is taken as a sweep name")
        name, storage, uri_setting = target, args.storage_path or DEFAULT_STORAGE, args.tracking_uri
        experiment = args.experiment or target
    uri, embedded = resolve_tracking_uri(uri_setting, storage)
    if require_records and embedded and not _is_file(str(Path(uri) / "mlflow.db")):
        raise NotFoundError(f"no MLflow records for sweep {name!r}: {excerpt_text(uri, 400)}/mlflow.db does not exist. "
                            "Pass the sweep's storage path (--storage-path or storage_path in the config) or --tracking-uri")
    return Source(uri=prepare_tracking_uri(uri_setting, storage), name=name, experiment=experiment,
                  layout=StorageLayout.of(storage, name), config=config)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL character
        return False


def first_held_out_prompt(config: Any | None, default: str) -> str:
    """The first prompt of the config's held-out pairs (a realistic generation check), else `default`."""
    from orchestrator.workflows.downstream import held_out_pairs

    pairs = held_out_pairs(config)
    return pairs[0].prompt if pairs else default


# ---- the commands -------------------------------------------------------------------------------------

def run_analyze(source: Source, args: argparse.Namespace):
    from analysis.report import analyze as analyze_sweep

    report_dir = Path(args.report_dir) if getattr(args, "report_dir", None) else source.layout.analysis_dir
    return analyze_sweep(source.uri, source.name, report_dir=report_dir, experiment=source.experiment,
                         rule=selection_rule(args), log_to_mlflow=not getattr(args, "no_log", False))


def run_export(source: Source, args: argparse.Namespace, out: str, sweep=None):
    from analysis.runs import load_sweep
    from orchestrator.workflows.export import DEFAULT_PROMPT, export_trial

    sweep = sweep or load_sweep(source.uri, source.name, source.experiment)
    prompt = args.prompt or first_held_out_prompt(source.config, DEFAULT_PROMPT)
    return export_trial(sweep, out, trial_id=getattr(args, "trial", None), rule=selection_rule(args),
                        include_adapter=args.adapter, register=args.register, alias=args.alias, prompt=prompt,
                        storage_path=source.layout.storage, dtype=args.dtype)


def print_export(result) -> None:
    print(f"exported trial {result.trial_id} (checkpoint step {result.checkpoint.step}: {result.checkpoint.reason}"
          f"{', LoRA merged' if result.lora else ''}) to {result.directory}")
    print(f"verified: AutoModelForCausalLM loads it and generates {result.generated!r} "
          f"from the prompt {result.lineage.get('verification_prompt', '')!r}")
    if result.registered_version:
        print(f"registered in the MLflow Model Registry as {result.registered_version}")


def analyze(args: argparse.Namespace) -> int:
    """Exit 0 with a chosen trial, 1 when no trial is eligible under the rule."""
    selection_rule(args)  # the rule's options are checked before anything is read or started
    analysis = run_analyze(resolve_source(args), args)
    print(redact_text("\n".join(analysis.lines())))
    return 0 if analysis.selection.chosen else 1


def export(args: argparse.Namespace) -> int:
    selection_rule(args)  # the rule's options are checked before anything is read or started
    print_export(run_export(resolve_source(args), args, args.out))
    return 0


def quickstart(args: argparse.Namespace) -> int:
    """sweep -> analyze -> export -> downstream check, then the facts: chosen beta, the config's benchmarks on the
    start model and the exported one, the exported model's answers to held-out prompts, report, exported
    directory, MLflow URLs."""
    from orchestrator.config.spec import resolve_experiment
    from orchestrator.console import print_sweep_summary, runs_view_url, sweep_session
    from orchestrator.workflows.downstream import downstream_check
    from orchestrator.workflows.sweep import run_sweep

    from orchestrator.config import load_config

    selection_rule(args)  # the rule's options are checked before anything is read or started
    config = load_config(args.target, args.overrides)
    if not config.tracking.enabled:
        raise ConfigError("tracking.enabled: quickstart reads the sweep back from MLflow; set it to true")
    experiment = resolve_experiment(config)
    with sweep_session(experiment, verbose=args.verbose) as console:  # MLflow's and Ray's INFO: console.log
        source = resolve_source(args, require_records=False)
        summary = run_sweep(experiment, address=args.address, console=console)
        print_sweep_summary(summary)
        analysis = run_analyze(source, args)
        print(redact_text("\n".join(analysis.lines())))
        if analysis.selection.chosen is None:
            return 1
        out = args.out or str(Path(str(config.output_dir)) / "model")
        exported = run_export(source, args, out, sweep=analysis.sweep)
        print_export(exported)
        check = downstream_check(config, exported.directory)  # the start model and the exported one, side by side
    chosen = analysis.selection.chosen
    print("")
    print(f"chosen beta:    {chosen['beta']:g} (kl_weight {chosen['kl_weight']:g}, learning_rate "
          f"{chosen['learning_rate']:g}, trial {chosen['trial_id']})")
    for line in check.lines():
        print(redact_text(line))
    print(f"report:         {analysis.report.html}")
    print(f"exported model: {exported.directory}")
    print(f"MLflow runs:    {redact_text(str(runs_view_url(analysis.sweep.uri, analysis.sweep.experiment_id)))}")
    print(f"chosen run:     {redact_text(analysis.run_url())}")
    return 0
