"""The benchmark protocol, the registry of benchmark kinds, and the models a benchmark compares against.

A benchmark has a `name` (its MLflow metric is `bench/<name>`) and `evaluate(model, tokenizer,
comparisons) -> float`; it may also have `check(tokenizer)`, which loads and validates its data and is
called before any training starts, so bad benchmark data fails early. `comparisons` hands out the other
models a benchmark may need, by role: `start` (the model the evaluated one was trained from, which is
its DPO reference) and `base` (the study's base model); each is loaded once, on first use.

Kinds are registered by name (`register_benchmark`); the built-in ones live in builtin.py and
lm_eval_adapter.py. A config entry `kind: python` with `factory: package.module:callable` plugs in any
other benchmark: the callable gets the entry's `name` and `options` as keyword arguments and returns an
object with `name` and `evaluate`.

`evaluate_model` is what a study's Ray evaluation task runs: it loads a model and its tokenizer from
disk (through trainables.modeling, as training does), builds the benchmarks from their plain settings
(config entries as dicts) and returns {name: score}; no Ray and no MLflow here.
Run by hand: `python -m trainables.benchmarks.base MODEL_DIR BENCHMARKS.json` (a JSON list of entries);
tested by `python -m pytest tests/test_benchmarks.py -q`.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from trainables.modeling import load_causal_lm, load_tokenizer, resolve_device
from trainables.tokenization import prepare_tokenizer

logger = logging.getLogger(__name__)

COMPARISON_ROLES = ("start", "base")


class ComparisonModels:
    """Models to compare against, by role (`start`, `base`), loaded on first use and kept.

    paths: role -> model directory (or hub name); a role whose path is the evaluated model's own path
    gets the evaluated model itself, so the base model compared with itself costs no second load.
    """

    def __init__(self, paths: Mapping[str, str], load_model: Callable[[str], torch.nn.Module], *,
                 evaluated_path: str | None = None, evaluated_model: torch.nn.Module | None = None):
        self.paths = dict(paths)
        self.load_model = load_model
        self.loaded: dict[str, torch.nn.Module] = {}
        if evaluated_path is not None and evaluated_model is not None:
            self.loaded[evaluated_path] = evaluated_model

    def model(self, role: str) -> torch.nn.Module:
        if role not in self.paths:
            raise KeyError(f"no {role!r} model to compare against (known: {sorted(self.paths)}); the study passes "
                           "`start` and `base`, a single evaluation only those it was given")
        path = self.paths[role]
        if path not in self.loaded:
            started = time.perf_counter()
            self.loaded[path] = self.load_model(path).eval()
            logger.info("loaded %s model %s in %.1f s", role, path, time.perf_counter() - started)
        return self.loaded[path]


@runtime_checkable
class Benchmark(Protocol):
    """A downstream score of one model: higher or lower is better depending on the benchmark."""

    name: str

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, comparisons: ComparisonModels) -> float: ...


BenchmarkFactory = Callable[..., Benchmark]
_KINDS: dict[str, BenchmarkFactory] = {}


def register_benchmark(kind: str, factory: BenchmarkFactory) -> None:
    """Make `kind` usable in a config's benchmarks list; factory(**entry without kind) -> Benchmark."""
    if kind in _KINDS and _KINDS[kind] is not factory:
        raise ValueError(f"benchmark kind {kind!r} is already registered by {_KINDS[kind]!r}")
    _KINDS[kind] = factory


def registered_kinds() -> list[str]:
    return sorted(_KINDS) + ["python"]


def _import_factory(reference: str) -> BenchmarkFactory:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"benchmark factory {reference!r}: write it as package.module:callable")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"benchmark factory {reference!r} cannot be imported: {error}") from error


def build_benchmark(settings: Mapping[str, Any]) -> Benchmark:
    """One benchmark from its plain settings (a config entry as a dict: name, kind and the kind's fields)."""
    settings = dict(settings)
    kind = settings.pop("kind")
    if kind == "python":
        factory = _import_factory(settings.pop("factory"))
        benchmark = factory(name=settings["name"], **(settings.get("options") or {}))
    elif kind in _KINDS:
        benchmark = _KINDS[kind](**settings)
    else:
        raise ValueError(f"unknown benchmark kind {kind!r}; registered kinds: {registered_kinds()}")
    if not isinstance(benchmark, Benchmark):
        raise TypeError(f"benchmark {settings['name']!r} ({kind}) has no name attribute or evaluate method")
    return benchmark


def check_benchmarks(benchmarks: Sequence[Benchmark], tokenizer: Any) -> None:
    """Load and validate every benchmark's data (those with a `check`), before any training."""
    for benchmark in benchmarks:
        check = getattr(benchmark, "check", None)
        if check is not None:
            check(tokenizer)


def run_benchmarks(benchmarks: Sequence[Benchmark], model: torch.nn.Module, tokenizer: Any,
                   comparisons: ComparisonModels) -> dict[str, float]:
    """{name: score} of every benchmark on one model (in eval mode, without gradients)."""
    names = [benchmark.name for benchmark in benchmarks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"benchmark names must be unique (they are MLflow metric names); repeated: {duplicates}")
    model.eval()
    scores: dict[str, float] = {}
    for benchmark in benchmarks:
        started = time.perf_counter()
        with torch.no_grad():
            scores[benchmark.name] = float(benchmark.evaluate(model, tokenizer, comparisons))
        logger.info("bench/%s = %.4f (%.1f s)", benchmark.name, scores[benchmark.name], time.perf_counter() - started)
    return scores


# ---- one model, loaded from disk ------------------------------------------------------------------

def load_benchmark_tokenizer(path: str, trust_remote_code: bool = False):
    return prepare_tokenizer(load_tokenizer(path, trust_remote_code=trust_remote_code))


def check_benchmark_data(benchmarks: Sequence[Mapping[str, Any]], tokenizer_path: str, trust_remote_code: bool = False) -> None:
    """Build every benchmark and validate its data (raises InvalidDataError / ValueError naming the problem)."""
    check_benchmarks([build_benchmark(settings) for settings in benchmarks],
                     load_benchmark_tokenizer(tokenizer_path, trust_remote_code))


def evaluate_model(model_path: str, benchmarks: Sequence[Mapping[str, Any]], *, tokenizer_path: str | None = None,
                   comparison_paths: Mapping[str, str] | None = None, device: str = "auto", dtype: str = "float32",
                   trust_remote_code: bool = False, threads: int | None = None) -> dict[str, float]:
    """{benchmark name: score} of the model at model_path on every benchmark."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    target = resolve_device(device)

    def load(path: str) -> torch.nn.Module:
        return load_causal_lm(path, trust_remote_code=trust_remote_code, dtype=dtype).to(target)

    tokenizer = load_benchmark_tokenizer(tokenizer_path or model_path, trust_remote_code)
    suite = [build_benchmark(settings) for settings in benchmarks]
    model = load(model_path)
    comparisons = ComparisonModels(comparison_paths or {}, load, evaluated_path=model_path, evaluated_model=model)
    return run_benchmarks(suite, model, tokenizer, comparisons)


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    if len(sys.argv) != 3:
        sys.exit("usage: python -m trainables.benchmarks.base MODEL_DIR BENCHMARKS.json  (a JSON list of benchmark entries)")
    from trainables.benchmarks import base  # the module the built-in kinds registered with, not this __main__ copy

    print(json.dumps(base.evaluate_model(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()),
                                         comparison_paths={"start": sys.argv[1], "base": sys.argv[1]}), indent=1))
