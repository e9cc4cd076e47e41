"""Reading a config: YAML file + `--set key=value` overrides -> a validated ExperimentConfig, once.

This is the CLI edge: the file is parsed, overridden, validated against orchestrator/config/schema.py
and its `demo:` paths (e.g. `demo:model`) resolved to the embedded default assets; local paths that do
not exist are errors before any work. Every problem raises ConfigError naming the file and each bad
key. Nothing after this point validates the config again: orchestrator/config/spec.py turns it into
the run spec.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.config.schema import ExperimentConfig
from orchestrator.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`dpo.beta=0.2` -> (["dpo", "beta"], 0.2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set dpo.beta=0.2")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return raw


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        if not item["loc"] and item["type"] == "value_error":
            # A cross-field rule of _consistent: its message already starts with the key; the input is the whole config.
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
            continue
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key (check the spelling; see `dpo config-reference` or docs/configuration.md)" if item["type"] == "extra_forbidden" else item["msg"]
        got = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {item.get('input')!r})"
        lines.append(f"  {key}: {message}{got}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def _looks_local(value: str) -> bool:
    """Paths (absolute, ./relative, ~, nested, or data-file names) are checked; `name` or `org/name` may be hub ids."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or bool(re.search(r"\.(jsonl?|parquet|csv)$", value))


def check_paths_exist(config: ExperimentConfig, source: str) -> None:
    """A local model directory or data file that does not exist is an error before any work."""
    candidates = {"model.path": config.model.path, "model.tokenizer_path": config.model.tokenizer_path,
                  "reference.path": config.reference.path, "data.train": config.data.train, "data.eval": config.data.eval,
                  "data.sft_train": config.data.sft_train, "data.sft_eval": config.data.sft_eval}
    missing = [f"  {key}: {value!r} does not exist" for key, value in candidates.items()
               if value and _looks_local(value) and not Path(value).expanduser().exists()]
    if missing:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(missing) + "\n(hub names look like org/name)")


def resolve_demo_paths(config: ExperimentConfig) -> None:
    """Replace `demo:...` values under model/data/reference with the embedded default's paths (built on first use)."""
    from orchestrator.workflows.demo_assets import DEMO_PREFIX, resolve_demo_path

    for section_name in ("model", "data", "reference"):
        section = getattr(config, section_name)
        for key, value in section:
            if isinstance(value, str) and value.startswith(DEMO_PREFIX):
                try:
                    setattr(section, key, resolve_demo_path(value))
                except ValueError as error:
                    raise ConfigError(f"{section_name}.{key}: {error}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override, validate (once). Raises ConfigError naming the file and every bad key."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {source} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping of sections")
    for key, value in list(raw.items()):
        if value is None and key in ExperimentConfig.model_fields and key not in ("output_dir", "name"):
            raw[key] = {}  # a section header whose entries are all commented out
    apply_overrides(raw, overrides or [])
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    resolve_demo_paths(config)
    check_paths_exist(config, source)
    return config
