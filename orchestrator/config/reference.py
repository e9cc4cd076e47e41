"""The config reference: every key of the experiment config, its default and its description, as Markdown.

Generated from the typed config (orchestrator/config/schema.py, orchestrator/config/study_schema.py), so it
cannot drift: the table of the "Config reference" section of docs/configuration.md is this output, and
tests/test_config.py checks that they match. Print it with `dpo config-reference`.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orchestrator.config import ExperimentConfig

SECTION_ORDER_NOTE = "`required` marks keys without a default. Unknown keys are errors."


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: X, X | None, list[X], list[Annotated[A | B, ...]]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list):
        return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]
    return []


def _yaml_text(value: Any) -> str:
    """A default as it is written in a config file: true, 0.1, float32, [sft_then_dpo, dpo_only]."""
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"


def _choices_text(annotation: Any) -> str:
    """' (one of: a, b)' for a Literal annotation (also inside X | None); '' otherwise."""
    if typing.get_origin(annotation) is typing.Literal:
        return " (one of: " + ", ".join(str(choice) for choice in typing.get_args(annotation)) + ")"
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return "".join(_choices_text(argument) for argument in typing.get_args(annotation))
    return ""


def _default_text(field) -> str:
    if field.is_required() or (field.default_factory is None and field.default is PydanticUndefined):
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "empty" if value in ([], {}) else _yaml_text(value)


def reference_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every field of `model`, nested sections flattened with dots."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        is_list = typing.get_origin(field.annotation) is list
        if nested and not is_list and len(nested) == 1:
            if field.description:
                rows.append((key, _default_text(field), field.description))
            rows.extend(reference_rows(nested[0], f"{key}."))
            continue
        rows.append((key, _default_text(field), (field.description or "") + _choices_text(field.annotation)))
        if nested and is_list:  # a list of tagged entries: each kind's own keys
            kinds = [typing.get_args(entry.model_fields["kind"].annotation)[0] for entry in nested
                     if "kind" in entry.model_fields]
            if kinds:
                rows.append((f"{key}[].kind", "required", "Which benchmark: " + ", ".join(kinds)))
            for entry in nested:
                kind = entry.model_fields.get("kind")
                tag = typing.get_args(kind.annotation)[0] if kind is not None else entry.__name__
                rows.extend((f"{key}[].{sub} (kind {tag})", default, text)
                            for sub, default, text in reference_rows(entry) if sub != "kind")
    return rows


def config_reference_markdown() -> str:
    """The whole reference as one Markdown table."""
    lines = [SECTION_ORDER_NOTE, "", "| key | default | what it is |", "|---|---|---|"]
    for key, default, text in reference_rows(ExperimentConfig):
        lines.append(f"| `{key}` | {default} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
