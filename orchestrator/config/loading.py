"""Reading a config: YAML file + `--set key=value` overrides -> a validated ExperimentConfig, once.

This is the CLI edge: the file is read (a regular UTF-8 file of at most 256 KB), parsed with limits
(orchestrator/config/yaml_safety.py: duplicate keys, nesting depth and alias expansion are bounded),
overridden, checked for values no key may hold (non-finite numbers, NUL characters, text that is not
Unicode), validated against orchestrator/config/schema.py and its `demo:` paths (e.g. `demo:model`)
resolved to the embedded default assets; local paths that do not exist are errors before any work.
Every problem raises ConfigError naming the file (or the `--set` argument) and each bad key; a bad value
is shown as a short excerpt (orchestrator/redaction.py), secrets redacted. Nothing after this point
validates the config again: orchestrator/config/spec.py turns it into the run spec.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.yaml_safety import MAX_CONFIG_CHARS, MAX_SET_VALUE_CHARS, YamlProblem, parse_yaml
from orchestrator.errors import ConfigError
from orchestrator.redaction import REDACTED, excerpt, excerpt_text, is_secret_key

PATH_EXCERPT_CHARS = 400  # a path is the user's own and worth showing whole
UNION_TAGS = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|literal\[.*\]|lax-.*|json-or-python.*)$")
USER_TERMS = {"model_type": "must be a section (indented key: value lines)",
              "dict_type": "must be a mapping (key: value pairs)"}


# ---- --set -------------------------------------------------------------------------------------

def shown_override(text: str) -> str:
    """A `--set` argument as a message shows it: cut short, a secret-named key's value hidden."""
    key, _, raw = str(text).partition("=")
    return excerpt_text(f"{key}={REDACTED}" if is_secret_key(key.strip()) and raw else str(text))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`dpo.beta=0.2` -> (["dpo", "beta"], 0.2); the value is parsed as YAML (with the file's limits)."""
    if "=" not in text:
        raise ConfigError(f"--set {shown_override(text)}: expected key=value, e.g. --set dpo.beta=0.2")
    key, raw = text.split("=", 1)
    keys = [part.strip() for part in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {shown_override(text)}: the key has an empty part; write section.key=value, "
                          "e.g. --set dpo.beta=0.2")
    try:
        value = parse_yaml(raw, "--set value", MAX_SET_VALUE_CHARS) if raw.strip() else None
    except YamlProblem as problem:
        hint = " (quote text that holds YAML characters, e.g. --set 'model.path=\"a: b\"')" \
            if str(problem).startswith("not valid YAML") else ""
        raise ConfigError(f"--set {shown_override(text)}: {problem}{hint}") from None
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(keys[:depth + 1])
                raise ConfigError(f"--set {shown_override(text)}: {where} is not a section (it holds a single value), "
                                  f"so it has no key {keys[depth + 1]!r}")
        node[keys[-1]] = value
    return raw


# ---- values no key may hold --------------------------------------------------------------------

def _check_values(node: Any, path: str, problems: list[str]) -> None:
    """Non-finite numbers, NUL characters and lone surrogates, anywhere in the raw config (with the key)."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                _check_values(key, f"{child} (the key)", problems)
            _check_values(value, child, problems)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_values(value, f"{path}.{index}", problems)
    elif isinstance(node, float) and not math.isfinite(node):
        problems.append(f"  {path}: must be a finite number (got {excerpt(node)})")
    elif isinstance(node, str):
        if "\x00" in node:
            problems.append(f"  {path}: holds a NUL character (\\0); remove it")
        elif any("\ud800" <= char <= "\udfff" for char in node):
            problems.append(f"  {path}: is not valid Unicode text (a lone surrogate, e.g. \\ud800, or bytes that "
                            "are not UTF-8); write it in UTF-8")


# ---- validation errors --------------------------------------------------------------------------

def _key_of(loc: tuple) -> str:
    """('sweep', 'beta', 'list[float]') -> 'sweep.beta': the union member tags pydantic adds are dropped."""
    return ".".join(str(part) for part in loc if not UNION_TAGS.match(str(part))) or "(top level)"


def _fields_at(key: str) -> list[str]:
    """The valid keys next to `key` (for a spelling suggestion), or [] when unknown."""
    model: Any = ExperimentConfig
    for part in key.split(".")[:-1]:
        field = getattr(model, "model_fields", {}).get(part.split("[")[0])
        if field is None:
            return []
        model = next((arg for arg in (field.annotation, *getattr(field.annotation, "__args__", ()))
                      if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _message(item: dict, key: str) -> tuple[str, str]:
    """(what is wrong, ' (got <excerpt>)' or '') of one pydantic error, in the user's terms."""
    if item["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], _fields_at(key), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown key ({hint}check the spelling; see `dpo config-reference` or docs/configuration.md)", ""
    message = USER_TERMS.get(item["type"], item["msg"].removeprefix("Value error, "))
    if item["type"] == "missing" or "got " in message:  # a rule's own message already shows the value
        return message, ""
    return message, f" (got {REDACTED if is_secret_key(key) else excerpt(item.get('input'))})"


def format_errors(error: ValidationError, source: str, max_lines: int = 20) -> str:
    lines: list[str] = []
    by_key: dict[str, tuple[list[str], str]] = {}
    for item in error.errors():
        if not item["loc"] and item["type"] == "value_error":
            # A cross-field rule of _consistent: its message already starts with the key; the input is the whole config.
            lines.append(f"  {excerpt_text(item['msg'].removeprefix('Value error, '), 2000)}")
            continue
        key = _key_of(tuple(item["loc"]))
        message, got = _message(item, key)
        messages, shown = by_key.setdefault(key, ([], got))
        if message not in messages:
            messages.append(message)
    lines += [f"  {key}: " + "; or ".join(messages) + got for key, (messages, got) in by_key.items()]
    more = f"\n  ... and {len(lines) - max_lines} more" if len(lines) > max_lines else ""
    return f"invalid config {source}:\n" + "\n".join(lines[:max_lines]) + more


_format_errors = format_errors  # the earlier name


# ---- paths ---------------------------------------------------------------------------------------

def _looks_local(value: str) -> bool:
    """Paths (absolute, ./relative, ~, nested, or data-file names) are checked; `name` or `org/name` may be hub ids."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or bool(re.search(r"\.(jsonl?|parquet|csv)$", value))


def _exists(value: str) -> bool:
    try:
        return Path(value).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # a name too long for the filesystem, ~unknownuser, ...
        return False


def check_paths_exist(config: ExperimentConfig, source: str) -> None:
    """A local model directory or data file that does not exist is an error before any work."""
    candidates = {"model.path": config.model.path, "model.tokenizer_path": config.model.tokenizer_path,
                  "reference.path": config.reference.path, "data.train": config.data.train, "data.eval": config.data.eval,
                  "data.sft_train": config.data.sft_train, "data.sft_eval": config.data.sft_eval}
    missing = [f"  {key}: {excerpt(value, PATH_EXCERPT_CHARS)} does not exist" for key, value in candidates.items()
               if value and _looks_local(value) and not _exists(value)]
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
                    raise ConfigError(f"{section_name}.{key}: {excerpt_text(str(error), 400)}") from None


# ---- the file ------------------------------------------------------------------------------------

def read_config_text(path: str | Path, source: str) -> str:
    """The text of a config file: it must be a regular, readable, UTF-8 file of reasonable size."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"config file {source} cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"config {source} is a directory; give the YAML file inside it, e.g. {source}/config.yaml")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"config {source} is not a regular file (a device, pipe or socket); give a YAML file")
    if info.st_size > MAX_CONFIG_CHARS:
        raise ConfigError(f"config {source} is {info.st_size:,} bytes; a config is a small YAML file "
                          f"(at most {MAX_CONFIG_CHARS // 1000} KB)")
    try:
        data = Path(path).read_bytes()
    except PermissionError:
        raise ConfigError(f"config {source} cannot be read: permission denied (check its permissions)") from None
    except OSError as error:
        raise ConfigError(f"config {source} cannot be read ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        hint = " (it looks like UTF-16: save it as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:200] \
            else "; save it as UTF-8 text"
        raise ConfigError(f"config {source} line {line}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}){hint}") from None


def load_raw(path: str | Path, source: str) -> dict[str, Any]:
    """The config file as a mapping of sections, parsed within the limits of yaml_safety."""
    try:
        raw = parse_yaml(read_config_text(path, source))
    except YamlProblem as problem:
        raise ConfigError(f"config {source} {problem.where()}{problem}") from None
    if raw is None:
        raise ConfigError(f"config {source} is empty; it needs at least name, model.path and data.train "
                          "(see configs/quickstart.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping of sections (name:, model:, data:, ...), "
                          f"not {'a list' if isinstance(raw, list) else 'a single value'}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override, validate (once). Raises ConfigError naming the file and every bad key."""
    source = excerpt_text(str(path), PATH_EXCERPT_CHARS)
    raw = load_raw(path, source)
    for key, value in list(raw.items()):
        if value is None and key in ExperimentConfig.model_fields and key not in ("output_dir", "name"):
            raw[key] = {}  # a section header whose entries are all commented out
    apply_overrides(raw, overrides or [])
    problems: list[str] = []
    _check_values(raw, "", problems)
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(problems[:20]))
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_errors(error, source)) from None
    resolve_demo_paths(config)
    check_paths_exist(config, source)
    return config
