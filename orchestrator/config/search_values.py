"""What a searched dimension (`sweep.beta`, `sweep.kl_weight`, `sweep.learning_rate`) may hold: the one
rule, used by the config when it is loaded and by the Tune search space when it is built.

A dimension is a number (fixed), a non-empty list of numbers (grid: every value; random and optuna:
a choice), or, for random and optuna only, a range {min, max, log}. Every value a trial could get is
finite and > 0 (kl_weight: >= 0). Pure Python.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

RANGE_KEYS = {"min", "max", "log"}
RANGE_STRATEGIES = ("random", "optuna")


def _check_number(name: str, number: Any) -> float:
    zero_ok = name == "kl_weight"
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or (
            number < 0 if zero_ok else number <= 0):
        raise ValueError(f"{number!r} is not a finite number {'>= 0' if zero_ok else '> 0'}")
    return float(number)


def check_search_values(name: str, value: Any, strategy: str | None) -> Any:
    """Return `value` if dimension `name` may hold it under `strategy` (None: any strategy); else ValueError."""
    if isinstance(value, Mapping):
        if not {"min", "max"} <= set(value) or set(value) - RANGE_KEYS:
            raise ValueError(f"a range needs exactly the keys min and max (and optional log), got {sorted(value)}")
        if strategy is not None and strategy not in RANGE_STRATEGIES:
            raise ValueError(
                f"search space {name}: a range needs strategy 'random' and exactly the keys min, max "
                f"(and optional log); got {dict(value)} with strategy {strategy!r}. For a grid give a list.")
        low, high = _check_number(name, value["min"]), _check_number(name, value["max"])
        if not low < high or (bool(value.get("log", False)) and low <= 0):
            raise ValueError(f"search space {name}: need min < max (and min > 0 with log); got {dict(value)}.")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"search space {name}: expected a number, a non-empty list, or {{min, max, log}}; got {value!r}.")
        for number in value:
            _check_number(name, number)
        return value
    _check_number(name, value)
    return value
