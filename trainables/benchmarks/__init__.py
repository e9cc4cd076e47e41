"""Downstream benchmarks, a small pluggable harness: the protocol, the registry and `evaluate_model`, the
one-model entry point a Ray evaluation task runs (base.py); the built-in preference accuracy, win rate,
exact match and perplexity (builtin.py); lm-evaluation-harness (lm_eval_adapter.py); batched greedy
generation (generation.py); judges (judges.py). Importing the package registers the built-in kinds.
Tested by `python -m pytest tests/test_benchmarks.py -q`.
"""

from trainables.benchmarks import builtin, lm_eval_adapter  # noqa: F401  (registers the built-in kinds)
from trainables.benchmarks.base import (Benchmark, ComparisonModels, build_benchmark, check_benchmarks,
                                        evaluate_model, register_benchmark, registered_kinds, run_benchmarks)

__all__ = ["Benchmark", "ComparisonModels", "build_benchmark", "check_benchmarks", "evaluate_model",
           "register_benchmark", "registered_kinds", "run_benchmarks"]
