"""What `dpo quickstart` shows at its end besides the chosen beta: did the exported model get better at the task?

Two checks, both on models loaded from disk as a user would load them:
- the config's `benchmarks:` (trainables/benchmarks) on the model the sweep started from and on the exported
  model, side by side (`before -> after`), with `start` and `base` both meaning the start model;
- the exported model's greedy answers to the first held-out prompts (data.eval), each marked correct when
  it equals the pair's preferred answer once whitespace runs are collapsed (on the embedded default the
  preferred answer is the task program's, so `correct` means right).
A config without benchmarks gets only the answers, one without data.eval only the benchmarks.
Used by orchestrator/cli/journey.py; tested by `python -m pytest tests/test_quickstart.py -q`.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from orchestrator.redaction import excerpt_text

logger = logging.getLogger(__name__)

SAMPLE_ANSWERS = 3  # held-out prompts the summary answers: enough to see a pattern, few enough to read
SAMPLE_MAX_NEW_TOKENS = 32  # a model that never stops still shows what it writes
SHOWN_CHARS = 60  # of a prompt or an answer in the summary
LABEL_WIDTH = 16  # the end summary's `chosen beta:    ` column


@dataclass(frozen=True)
class SampleAnswer:
    prompt: str  # as the user would type it: template markers removed, whitespace collapsed
    answer: str  # the exported model's greedy answer, special tokens removed
    expected: str  # the held-out pair's preferred answer
    correct: bool


@dataclass(frozen=True)
class DownstreamCheck:
    before: dict[str, float]  # benchmark name -> score of the start model
    after: dict[str, float]  # benchmark name -> score of the exported model
    answers: list[SampleAnswer]

    def lines(self) -> list[str]:
        """The end summary's lines: one per benchmark, one per sample answer."""
        lines = []
        for index, name in enumerate(self.before):
            label = "benchmark:" if index == 0 else ""
            lines.append(f"{label:<{LABEL_WIDTH}}{name} {self.before[name]:.3f} -> {self.after[name]:.3f} "
                         "(start model -> exported model)")
        for index, sample in enumerate(self.answers):
            label = "held-out:" if index == 0 else ""
            verdict = "correct" if sample.correct else f"wrong, expected {excerpt_text(sample.expected, SHOWN_CHARS)!r}"
            lines.append(f"{label:<{LABEL_WIDTH}}{excerpt_text(sample.prompt, SHOWN_CHARS)} -> "
                         f"{excerpt_text(sample.answer, SHOWN_CHARS)!r} {verdict}")
        return lines


def held_out_pairs(config: Any | None) -> list:
    """The config's held-out preference pairs (data.eval) as PreferencePair texts; [] without data.eval.

    Conversational pairs are rendered with the model's chat template, as in training; a data problem is
    the user's to see, not hidden behind a default.
    """
    if config is None or not config.data.eval:
        return []
    from orchestrator.config.spec import resolve_run
    from trainables.data import load_preference_pairs
    from trainables.entrypoints import tokenizer_for

    spec = resolve_run(config)
    return load_preference_pairs(spec.data.eval, split=spec.data.eval_split, layout=spec.data.layout,
                                 columns=spec.data.column_map, chat_template_tokenizer=tokenizer_for(spec.model))


def _collapse(text: str) -> str:
    return " ".join(text.split())


def shown_prompt(prompt: str, tokenizer) -> str:
    """A rendered prompt as the user wrote it: the tokenizer's special tokens (chat markers) removed."""
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        prompt = prompt.replace(token, " ")
    return _collapse(prompt)


def sample_answers(model, tokenizer, pairs: list, count: int = SAMPLE_ANSWERS) -> list[SampleAnswer]:
    """The model's greedy answers to the first `count` held-out prompts, each judged against the preferred one."""
    from trainables.benchmarks.generation import generate_texts

    chosen = pairs[:count]
    if not chosen:
        return []
    answers = generate_texts(model, tokenizer, [pair.prompt for pair in chosen], max_new_tokens=SAMPLE_MAX_NEW_TOKENS,
                             batch_size=len(chosen))
    return [SampleAnswer(prompt=shown_prompt(pair.prompt, tokenizer), answer=_collapse(answer),
                         expected=_collapse(pair.chosen), correct=_collapse(answer) == _collapse(pair.chosen))
            for pair, answer in zip(chosen, answers)]


def downstream_check(config, exported_dir: str | Path, samples: int = SAMPLE_ANSWERS) -> DownstreamCheck:
    """The config's benchmarks on config.model.path and on exported_dir, and exported_dir's sample answers."""
    with _quiet_transformers():
        return _downstream_check(config, exported_dir, samples)


def _downstream_check(config, exported_dir: str | Path, samples: int) -> DownstreamCheck:
    from trainables.benchmarks.base import ComparisonModels, build_benchmark, load_benchmark_tokenizer, run_benchmarks
    from trainables.modeling import load_causal_lm, resolve_device

    model = config.model
    device = resolve_device(config.train.device)

    def load(path: str):
        return load_causal_lm(path, revision=None if path == str(exported_dir) else model.revision,
                              trust_remote_code=model.trust_remote_code, dtype="float32").to(device).eval()

    exported_path = str(exported_dir)
    tokenizer = load_benchmark_tokenizer(exported_path, model.trust_remote_code)  # export writes the tokenizer
    exported = load(exported_path)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    if config.benchmarks:
        suite = [build_benchmark(entry.model_dump()) for entry in config.benchmarks]
        start = load(model.path)
        roles = {"start": model.path, "base": model.path}  # the quickstart's start model is its base too
        comparisons = ComparisonModels(roles, load, evaluated_path=model.path, evaluated_model=start)
        before = run_benchmarks(suite, start, tokenizer, comparisons)
        after = run_benchmarks(suite, exported, tokenizer, comparisons)
    answers = sample_answers(exported, tokenizer, held_out_pairs(config), samples)
    return DownstreamCheck(before=before, after=after, answers=answers)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence Transformers' deprecation notices while generating: the installed version warns, three lines
    on the console, that the `past_key_values` argument of the greedy decoder (trainables/benchmarks/
    generation.py) will be renamed. The summary is for the user's results, not for that."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
