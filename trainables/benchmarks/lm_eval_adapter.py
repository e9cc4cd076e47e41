"""EleutherAI's lm-evaluation-harness on an already loaded model: the standard suites as benchmarks.

`LoadedModelLM` implements lm_eval's `LM` interface (loglikelihood, loglikelihood_rolling,
generate_until) on top of the model and tokenizer this project loaded, with this package's batched
scoring and batched greedy generation, so MMLU, GSM8K, HellaSwag, ... run on the model being evaluated
without lm_eval loading it a second time. `LmEvalBenchmark` (config kind `lm_eval`) runs one task or
group through `lm_eval.simple_evaluate` and returns one of its metrics, e.g. task `gsm8k` with metric
`exact_match,strict-match`, or task `mmlu` with `acc,none`.

Needs the optional extra: `pip install -e '.[lmeval]'`. The built-in tasks download their data sets
from the hub on first use; `include_path` adds folders of your own task YAMLs (local JSONL data works
offline, as tests/test_benchmarks.py shows). Indexing the ~15k built-in task files takes about 15 s, so
with `include_path` set they are only indexed when `include_defaults: true`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from trainables.benchmarks.base import ComparisonModels, register_benchmark
from trainables.benchmarks.generation import continuation_logps, greedy_generate

LM_EVAL_MISSING = "the lm_eval benchmark kind needs lm-evaluation-harness: pip install -e '.[lmeval]'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.api.model import LM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(LM_EVAL_MISSING) from error
    return lm_eval, LM, TaskManager


def loaded_model_lm(model, tokenizer, *, batch_size: int = 32, max_length: int = 2048, max_gen_toks: int = 256):
    """An lm_eval LM over a loaded causal LM and its tokenizer (lm_eval is imported here, not at module load)."""
    _, LM, _ = _import_lm_eval()

    class LoadedModelLM(LM):
        """lm_eval's three request types answered by the loaded model."""

        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
            self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def encode(self, text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

        def context_and_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """Token ids of the two parts, split as lm_eval's HF model does (trailing spaces go to the continuation)."""
            moved = len(context) - len(context.rstrip())
            if moved:
                context, continuation = context[:-moved], context[-moved:] + continuation
            whole = self.encode(context + continuation)
            context_ids = self.encode(context)
            continuation_ids = whole[len(context_ids):]
            context_ids = context_ids or [self.prefix_token_id]
            room = max(1, self.max_length - len(continuation_ids))
            return context_ids[-room:], continuation_ids[-(self.max_length - 1):]

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            rows = [self.context_and_continuation(*request.args) for request in requests]
            return continuation_logps(self.model, rows, pad_token_id=self.pad_token_id, batch_size=self.batch_size)

        def loglikelihood_rolling(self, requests) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            totals = []
            for request in requests:
                windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                    token_list=self.encode(request.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scored = continuation_logps(self.model, windows, pad_token_id=self.pad_token_id, batch_size=self.batch_size)
                totals.append(sum(logp for logp, _ in scored))
            return totals

        def generate_until(self, requests) -> list[str]:
            answers: list[str] = [""] * len(requests)
            groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
            for index, request in enumerate(requests):
                _, settings = request.args
                until = settings.get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                groups.setdefault((until, int(settings.get("max_gen_toks", self.max_gen_toks))), []).append(index)
            for (until, max_new_tokens), indices in groups.items():
                room = max(1, self.max_length - max_new_tokens)
                prompts = [(self.encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in indices]
                generated = greedy_generate(self.model, prompts, pad_token_id=self.pad_token_id,
                                            eos_token_id=self.tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                                            batch_size=self.batch_size)
                for index, tokens in zip(indices, generated):
                    answers[index] = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
            return answers

    return LoadedModelLM()


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """text up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        position = text.find(stop) if stop else -1
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


@dataclass
class LmEvalBenchmark:
    name: str
    task: str  # an lm_eval task or group name, e.g. mmlu, gsm8k, or one defined under include_path
    metric: str | None = None  # lm_eval's result key, e.g. acc,none; None: the task's only metric
    include_path: str | None = None  # a folder of your own task YAMLs
    include_defaults: bool | None = None  # index lm_eval's built-in tasks; None: only without include_path
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 32
    max_length: int = 2048
    max_gen_toks: int = 256

    def check(self, tokenizer) -> None:
        _import_lm_eval()

    def evaluate(self, model, tokenizer, comparisons: ComparisonModels) -> float:
        lm_eval, _, TaskManager = _import_lm_eval()
        defaults = self.include_path is None if self.include_defaults is None else self.include_defaults
        manager = TaskManager(include_path=self.include_path, include_defaults=defaults)
        lm = loaded_model_lm(model, tokenizer, batch_size=self.batch_size, max_length=self.max_length,
                             max_gen_toks=self.max_gen_toks)
        output = lm_eval.simple_evaluate(model=lm, tasks=[self.task], num_fewshot=self.num_fewshot, limit=self.limit,
                                         task_manager=manager, log_samples=False, bootstrap_iters=0)
        return pick_metric(output, self.task, self.metric)


def pick_metric(output: dict[str, Any], task: str, metric: str | None) -> float:
    """The chosen metric of `task` (or of its group) from simple_evaluate's output."""
    found = (output.get("groups") or {}).get(task) or (output.get("results") or {}).get(task)
    if found is None:
        raise ValueError(f"lm_eval returned no results for task {task!r}; it returned {sorted(output.get('results', {}))}")
    numbers = {key: value for key, value in found.items()  # metric keys are "<metric>,<filter>"
               if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    if metric is None:
        if len(numbers) != 1:
            raise ValueError(f"task {task!r} reports several metrics {sorted(numbers)}; choose one with metric:")
        return float(next(iter(numbers.values())))
    if metric not in numbers:
        raise ValueError(f"task {task!r} has no metric {metric!r}; it reports {sorted(numbers)}")
    return float(numbers[metric])


register_benchmark("lm_eval", LmEvalBenchmark)
