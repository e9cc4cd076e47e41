"""What a searched dimension (`sweep.beta`, `sweep.kl_weight`, `sweep.learning_rate`) may hold: the one
rule, used by the config when it is loaded (the sweep section and every study arm's `sweep:` overrides)
and by the Tune search space when it is built.

A dimension is a number (fixed), a non-empty list of numbers (grid: every value; random and optuna:
a choice), or, for random and optuna only, a range {min, max, log} with min < max and log true or false.
Every value a trial could get is finite and > 0 (kl_weight: >= 0); true and false are not numbers.
Messages show at most a short excerpt of the value. Pure Python.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

RANGE_KEYS = {"min", "max", "log"}
RANGE_STRATEGIES = ("random", "optuna")
SHOWN_CHARS = 80


def _shown(value: Any) -> str:
    from orchestrator.redaction import excerpt

    return excerpt(value, SHOWN_CHARS)


def _check_number(name: str, number: Any) -> float:
    zero_ok = name == "kl_weight"
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or (
            number < 0 if zero_ok else number <= 0):
        hint = ""
        if isinstance(number, str):
            try:
                float(number)
                hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
            except ValueError:
                pass
        raise ValueError(f"{_shown(number)} is not a finite number {'>= 0' if zero_ok else '> 0'}{hint}")
    return float(number)


def refuse_booleans(name: str, value: Any) -> Any:
    """`value` unless true/false stands where a number must (alone, in a list, or as min/max); else ValueError."""
    if isinstance(value, Mapping):
        items = [item for key, item in value.items() if key != "log"]
    else:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(item, bool) for item in items):
        raise ValueError(f"search space {name}: true and false are not numbers; got {_shown(value)}")
    return value


def check_search_values(name: str, value: Any, strategy: str | None) -> Any:
    """Return `value` if dimension `name` may hold it under `strategy` (None: any strategy); else ValueError."""
    refuse_booleans(name, value)
    if isinstance(value, Mapping):
        if not {"min", "max"} <= set(value) or set(value) - RANGE_KEYS:
            raise ValueError(f"a range needs exactly the keys min and max (and optional log), got {_shown(sorted(map(str, value)))}")
        if strategy is not None and strategy not in RANGE_STRATEGIES:
            raise ValueError(
                f"search space {name}: a range needs strategy 'random' and exactly the keys min, max "
                f"(and optional log); got {_shown(dict(value))} with strategy {strategy!r}. For a grid give a list.")
        if "log" in value and not isinstance(value["log"], bool):
            raise ValueError(f"search space {name}: log must be true or false; got {_shown(value['log'])}")
        low, high = _check_number(name, value["min"]), _check_number(name, value["max"])
        if not low < high or (bool(value.get("log", False)) and low <= 0):
            raise ValueError(f"search space {name}: need min < max (and min > 0 with log); got {_shown(dict(value))}.")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"search space {name}: expected a number, a non-empty list, or {{min, max, log}}; got an empty list.")
        for number in value:
            _check_number(name, number)
        return value
    _check_number(name, value)
    return value
