"""Rules every typed config section shares, beyond what each key's type says.

- A boolean is never a number and a number never a boolean: `train.max_steps: true` and
  `resources.use_gpu: 1` are errors (pydantic alone would read them as 1 and true).
- Counts have upper bounds no real run needs (the bound is in each key's description): a batch of 1e23
  pairs or 1e12 workers is a typo that would otherwise hang or crash deep inside a run.
- Non-finite numbers are refused by the sections themselves (allow_inf_nan=False) and, for free-form
  mappings, by orchestrator/config/loading.py.
Used by orchestrator/config/schema.py and orchestrator/config/study_schema.py. Pure Python.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

MAX_BATCH = 1_000_000  # pairs, prompts or texts per batch
MAX_STEPS = 100_000_000  # optimizer steps, intervals counted in steps
MAX_TOKENS = 1_048_576  # tokens of one sequence (2^20)
MAX_ROWS = 1_000_000_000  # rows held out or read
MAX_WORKERS = 10_000  # workers, concurrent trials
MAX_TRIALS = 100_000  # trials of a sweep
MAX_ROUNDS = 10_000  # incremental rounds, patience, restarts
MAX_CPUS = 4096  # CPUs reserved by one worker or task
MAX_GPUS = 64  # GPUs reserved by one worker or task
MAX_LORA_RANK = 65_536
MAX_SEED = 2**32 - 1  # numpy's and Ray's seed range
MAX_PADDING_BUCKETS = 1024

_NONE = type(None)


def _kinds(annotation: Any) -> set[type]:
    """The scalar kinds a field accepts: {int}, {bool, str} (bool | Literal['auto']), {float, object, NoneType}..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_kinds(argument) for argument in typing.get_args(annotation)))
    if origin is Literal:
        return {type(choice) for choice in typing.get_args(annotation)}
    if annotation in (bool, int, float, str, _NONE):
        return {annotation}
    return {object}  # a list, a mapping or a section


def check_scalar_kind(value: Any, annotation: Any) -> Any:
    """`value` if it is not a boolean given for a number, nor a non-boolean given for a true/false key."""
    kinds = _kinds(annotation)
    if isinstance(value, bool):
        if bool not in kinds and kinds & {int, float}:
            raise ValueError(f"must be a number, not {str(value).lower()} (true and false are not numbers)")
    elif bool in kinds and value is not None and not kinds - {bool, _NONE}:
        raise ValueError("must be true or false")
    return value


def at_most(bound: int | float) -> str:
    """The text a description ends with: ' (at most 1,000,000)'."""
    return f" (at most {bound:,})"
