"""Config sections of `dpo study` (`study:`) and of the downstream benchmark suite (`benchmarks:`).

`study:` says which arms run (sft_then_dpo, dpo_only), the SFT stage's training values and, per arm,
whether its DPO uses fixed hyperparameters or a sweep of its own, with per-arm overrides of the `dpo`,
`train` and `sweep` sections (SFT-then-DPO usually wants a much smaller learning rate than DPO from a
base model). `benchmarks:` is a list of entries, each with a `name` (its MLflow metric is
`bench/<name>`) and a `kind` whose fields it takes (extra keys are errors). `demo:` data paths resolve
to the embedded default's files. Overrides are checked against the sections they override when the
config is loaded (`check_study`), so `dpo check` reports them. Used by orchestrator/config/schema.py;
tested by `python -m pytest tests/test_study.py -m "not ray" -q`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from orchestrator.config.value_rules import (MAX_BATCH, MAX_CPUS, MAX_GPUS, MAX_ROWS, MAX_TOKENS, at_most,
                                             check_scalar_kind)
from orchestrator.tracking.schema import NAME_PATTERN

ARMS = ("sft_then_dpo", "dpo_only")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # .inf / .nan are errors

    @field_validator("*", mode="before")
    @classmethod
    def _scalar_kind(cls, value: Any, info: ValidationInfo) -> Any:
        """true is not a number and 1 is not true (orchestrator/config/value_rules.py)."""
        return check_scalar_kind(value, cls.model_fields[info.field_name].annotation)


class StudyArmSection(_Section):
    mode: Literal["fixed", "sweep"] = Field("fixed", description="fixed: one DPO job with this arm's values; sweep: a `dpo sweep` of its own whose best trial is kept")
    dpo: dict[str, Any] = Field(default_factory=dict, description="This arm's overrides of the dpo section, e.g. {beta: 0.5}")
    train: dict[str, Any] = Field(default_factory=dict, description="This arm's overrides of the train section, e.g. {learning_rate: 1.0e-4}")
    sweep: dict[str, Any] = Field(default_factory=dict, description="mode sweep: this arm's overrides of the sweep section, e.g. {strategy: grid, beta: [0.1, 0.5]}")


class StudySection(_Section):
    arms: list[Literal["sft_then_dpo", "dpo_only"]] = Field(default_factory=lambda: list(ARMS), min_length=1, description="Arms to run: sft_then_dpo (base -> SFT -> DPO) and/or dpo_only (base -> DPO)")
    sft: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train section for the SFT stage, e.g. {learning_rate: 1.0e-3, max_steps: 600}")
    sft_then_dpo: StudyArmSection = Field(default_factory=StudyArmSection, description="The DPO of the SFT-then-DPO arm (starts from, and is referenced to, the SFT model)")
    dpo_only: StudyArmSection = Field(default_factory=StudyArmSection, description="The DPO of the DPO-only arm (starts from, and is referenced to, the base model)")
    eval_cpus: float = Field(1, gt=0, le=MAX_CPUS, description="CPUs each evaluation task reserves (also its torch threads)" + at_most(MAX_CPUS))
    eval_gpus: float = Field(0, ge=0, le=MAX_GPUS, description="GPUs each evaluation task reserves (1 on a GPU cluster)" + at_most(MAX_GPUS))


def _resolve_demo(value: str | None) -> str | None:
    from orchestrator.workflows.demo_assets import DEMO_PREFIX, resolve_demo_path

    return resolve_demo_path(value) if isinstance(value, str) and value.startswith(DEMO_PREFIX) else value


class _Benchmark(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # .inf / .nan are errors

    @model_validator(mode="before")
    @classmethod
    def _scalar_kinds(cls, values: Any) -> Any:
        """true is not a number and 1 is not true; checked per entry, as `kind` picks the fields (value_rules.py)."""
        if isinstance(values, dict):
            for key, value in values.items():
                if key != "kind" and key in cls.model_fields:
                    try:
                        check_scalar_kind(value, cls.model_fields[key].annotation)
                    except ValueError as error:
                        from orchestrator.redaction import excerpt

                        raise ValueError(f"{key} {error} (got {excerpt(value)})") from None
        return values

    name: str = Field(description="Metric name: logged as bench/<name>, bench_delta/<name> and bench_delta_vs_base/<name>")
    limit: int | None = Field(None, gt=0, le=MAX_ROWS, description="Use only the first N rows (or documents)" + at_most(MAX_ROWS))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it is part of an MLflow metric name)")
        return value

    @field_validator("data", "reward_model", "include_path", mode="before", check_fields=False)
    @classmethod
    def _demo(cls, value: Any) -> Any:
        return _resolve_demo(value)


class PreferenceAccuracyBenchmark(_Benchmark):
    kind: Literal["preference_accuracy"] = Field(description="Held-out preference accuracy: share of pairs with a positive implicit reward margin")
    data: str = Field(description="Held-out preference pairs (any layout training accepts), e.g. demo:preference_eval")
    reference: Literal["start", "base", "none"] = Field("start", description="Margins against the model it started from (its DPO reference), the base model, or none (reference-free)")
    max_length: int = Field(512, gt=1, le=MAX_TOKENS, description="Max tokens of prompt + answer (training's truncation rule)" + at_most(MAX_TOKENS))
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Pairs per forward pass" + at_most(MAX_BATCH))


class WinRateBenchmark(_Benchmark):
    kind: Literal["win_rate"] = Field(description="Share of prompts where the model's greedy answer beats the comparison model's, per a judge (ties 1/2)")
    data: str = Field(description="Rows with a `prompt` string, e.g. demo:benchmark")
    against: Literal["start", "base"] = Field("start", description="Compare with the model it started from (its DPO reference) or the base model")
    judge: Literal["program", "reward_model"] = Field("program", description="program: the embedded task's grader (demo data only); reward_model: a sequence-classification model")
    reward_model: str | None = Field(None, description="judge reward_model: directory of an AutoModelForSequenceClassification with num_labels=1")
    max_new_tokens: int = Field(32, gt=0, le=MAX_TOKENS, description="Greedy tokens generated per prompt" + at_most(MAX_TOKENS))
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Prompts per generation batch" + at_most(MAX_BATCH))

    @model_validator(mode="after")
    def _judge(self) -> "WinRateBenchmark":
        if (self.judge == "reward_model") != (self.reward_model is not None):
            raise ValueError("reward_model: set it exactly when judge is reward_model (a directory of the reward model)")
        return self


class ExactMatchBenchmark(_Benchmark):
    kind: Literal["exact_match"] = Field(description="Share of greedy answers equal to the reference answer (whitespace runs collapsed)")
    data: str = Field(description="JSONL of prompt + answer (or completion/response), e.g. demo:benchmark")
    max_new_tokens: int = Field(32, gt=0, le=MAX_TOKENS, description="Greedy tokens generated per prompt" + at_most(MAX_TOKENS))
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Prompts per generation batch" + at_most(MAX_BATCH))


class PerplexityBenchmark(_Benchmark):
    kind: Literal["perplexity"] = Field(description="Per-token perplexity of held-out text (lower is better): the capability kept or lost")
    data: str = Field(description="JSONL rows with a `text` string, e.g. demo:general_text")
    max_length: int = Field(512, gt=1, le=MAX_TOKENS, description="Tokens per text scored; longer texts are cut" + at_most(MAX_TOKENS))
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Texts per forward pass" + at_most(MAX_BATCH))


class LmEvalBenchmarkSection(_Benchmark):
    kind: Literal["lm_eval"] = Field(description="One task or group of EleutherAI's lm-evaluation-harness (extra: lmeval)")
    task: str = Field(description="Task or group name, e.g. mmlu, gsm8k, or one of yours under include_path")
    metric: str | None = Field(None, description="Result key, e.g. acc,none or exact_match,strict-match; default: the task's only metric")
    include_path: str | None = Field(None, description="Folder of your own task YAMLs")
    include_defaults: bool | None = Field(None, description="Index lm_eval's ~15k built-in tasks (about 15 s); default: only when include_path is unset")
    num_fewshot: int | None = Field(None, ge=0, le=10_000, description="Few-shot examples (default: the task's)" + at_most(10_000))
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="Requests per forward pass" + at_most(MAX_BATCH))
    max_length: int = Field(2048, gt=1, le=MAX_TOKENS, description="Context length in tokens; longer contexts are cut from the left" + at_most(MAX_TOKENS))
    max_gen_toks: int = Field(256, gt=0, le=MAX_TOKENS, description="Default generation budget of generate_until tasks" + at_most(MAX_TOKENS))


class PythonBenchmark(_Benchmark):
    kind: Literal["python"] = Field(description="Your own benchmark: factory(name=..., **options) returns an object with name and evaluate(model, tokenizer, comparisons)")
    factory: str = Field(description="package.module:callable, importable on every Ray node")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory")


BenchmarkEntry = Annotated[
    Union[PreferenceAccuracyBenchmark, WinRateBenchmark, ExactMatchBenchmark, PerplexityBenchmark,
          LmEvalBenchmarkSection, PythonBenchmark],
    Field(discriminator="kind"),
]


def _merged(section_class, base: BaseModel, overrides: dict[str, Any], where: str) -> BaseModel:
    """base's values with overrides on top, validated as section_class; errors name the override key."""
    from orchestrator.redaction import REDACTED, excerpt, is_secret_key

    try:
        return section_class.model_validate({**base.model_dump(), **overrides})
    except ValidationError as error:
        problems = []
        for item in error.errors()[:10]:
            key = ".".join(str(part) for part in item["loc"] if not re.match(r"^(float|list\[|dict\[|function-)", str(part)))
            shown = REDACTED if is_secret_key(key) else excerpt(item.get("input"))
            detail = "unknown key" if item["type"] == "extra_forbidden" else \
                f"{item['msg'].removeprefix('Value error, ')} (got {shown})"
            problems.append(f"{where}.{key}: {detail}")
        raise ValueError("; ".join(problems)) from None


def check_study(config) -> None:
    """Every study override validates against its section, and benchmark names are unique (ValueError if not)."""
    from orchestrator.config.schema import DPOSection, SweepSection, TrainSection

    study = config.study
    _merged(TrainSection, config.train, study.sft, "study.sft")
    for arm in ARMS:
        section = getattr(study, arm)
        _merged(DPOSection, config.dpo, section.dpo, f"study.{arm}.dpo")
        _merged(TrainSection, config.train, section.train, f"study.{arm}.train")
        _merged(SweepSection, config.sweep, section.sweep, f"study.{arm}.sweep")
    names = [entry.name for entry in config.benchmarks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"benchmarks: names must be unique (they name MLflow metrics); repeated: {repeated}")


def arm_sections(config, arm: str) -> dict[str, dict[str, Any]]:
    """The dpo, train and sweep sections an arm's DPO runs with (the config's, with the arm's overrides)."""
    from orchestrator.config.schema import DPOSection, SweepSection, TrainSection

    section = getattr(config.study, arm)
    return {"dpo": _merged(DPOSection, config.dpo, section.dpo, f"study.{arm}.dpo").model_dump(),
            "train": _merged(TrainSection, config.train, section.train, f"study.{arm}.train").model_dump(),
            "sweep": _merged(SweepSection, config.sweep, section.sweep, f"study.{arm}.sweep").model_dump()}


def sft_train_section(config) -> dict[str, Any]:
    """The train section of the SFT stage (the config's, with study.sft on top)."""
    from orchestrator.config.schema import TrainSection

    return _merged(TrainSection, config.train, config.study.sft, "study.sft").model_dump()
