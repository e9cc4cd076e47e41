"""The embedded default task: list reversal and sorting, whose ground truth is a program.

A prompt asks for one operation on a short list of distinct digits, e.g. `reverse: 3 7 1 4` or
`sort: 3 7 1 4`; the correct answer is `= 4 1 7 3 .` (or `= 1 3 4 7 .`). `solve` computes it, so
preference pairs, exact-match benchmarks and a win-rate judge all come from one function, with no hub.

Why it is shaped this way:
- Rejected answers share the chosen answer's format (`= ... .`) and differ in one locally visible way:
  most replace one element with a digit that is absent from the prompt, a minority swap two elements.
  The format tokens cancel in the DPO margin, so DPO alone on a random model learns preference accuracy
  quickly but never learns to *produce* the format; SFT on prompt + correct answer does. SFT-then-DPO
  therefore beats DPO-only on exact match, which is the comparison the project reproduces.
- Sequences stay under ~24 tokens, so a 1-3M parameter model trains in minutes on 2 CPU cores.

Pure Python (no torch). Tested by `python -m pytest tests/test_synthetic_task.py -q`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPERATIONS = ("reverse", "sort")  # the instructions a prompt can carry
ELEMENT_ALPHABET = "0123456789"  # list elements are distinct single digits
MIN_LIST_LENGTH = 3
MAX_LIST_LENGTH = 7
SWAP_CORRUPTION_PROBABILITY = 0.2  # the rest of the rejected answers substitute an absent digit
ANSWER_START = "="
ANSWER_END = "."

# Renders [{"role": "user", "content": p}] with add_generation_prompt=True as
# "<s><|user|>\n{p}\n<|assistant|>\n"; assistant turns end with the eos token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, "<|system|>", "<|user|>", "<|assistant|>")

DEFAULT_SPLIT_SIZES = {
    "preference_train": 4000,
    "preference_eval": 256,
    "sft_train": 4000,
    "benchmark": 200,
    "general_text": 500,
}
HELD_OUT_SPLITS = ("preference_eval", "benchmark")  # their prompts never appear in a train split

_INSTRUCTION = re.compile(r"\b(" + "|".join(OPERATIONS) + r"):([^\n<]*)")


@dataclass(frozen=True)
class TaskProblem:
    prompt: str  # user-visible prompt text, no chat template, e.g. "reverse: 3 7 1 4"
    answer: str  # the correct answer, e.g. "= 4 1 7 3 ."


def render_prompt(user_text: str) -> str:
    """The chat-template rendering of one user turn plus the generation prompt (pure Python)."""
    return f"{BOS_TOKEN}<|user|>\n{user_text}\n<|assistant|>\n"


def format_answer(elements: list[str]) -> str:
    return " ".join([ANSWER_START, *elements, ANSWER_END])


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """(operation, elements) of a plain or chat-rendered prompt; ValueError if it carries no task."""
    found = _INSTRUCTION.search(prompt)
    elements = [symbol for symbol in found.group(2) if not symbol.isspace()] if found else []
    if not found or not elements or any(symbol not in ELEMENT_ALPHABET for symbol in elements):
        raise ValueError(
            f"prompt {prompt!r} holds no task instruction: expected one of {list(OPERATIONS)} followed by "
            "a colon and digits separated by spaces, e.g. 'reverse: 3 7 1 4'"
        )
    return found.group(1), elements


def _apply(operation: str, elements: list[str]) -> list[str]:
    return list(reversed(elements)) if operation == "reverse" else sorted(elements)


def solve(prompt: str) -> str:
    """The program that defines the task: the correct answer for a (plain or rendered) prompt."""
    operation, elements = parse_prompt(prompt)
    return format_answer(_apply(operation, elements))


def sample_problem(rng: random.Random) -> TaskProblem:
    operation = rng.choice(OPERATIONS)
    length = rng.randint(MIN_LIST_LENGTH, MAX_LIST_LENGTH)
    elements = rng.sample(ELEMENT_ALPHABET, length)
    prompt = f"{operation}: {' '.join(elements)}"
    return TaskProblem(prompt=prompt, answer=format_answer(_apply(operation, elements)))


def corrupt_answer(problem: TaskProblem, rng: random.Random) -> str:
    """A well-formed wrong answer: one element replaced by an absent digit, or (sometimes) two swapped."""
    _, prompt_elements = parse_prompt(problem.prompt)
    elements = _answer_elements(problem.answer)
    if elements is None:
        raise ValueError(f"answer {problem.answer!r} is not of the form '= d d d .'; cannot corrupt it")
    corrupted = list(elements)
    if len(set(elements)) >= 2 and rng.random() < SWAP_CORRUPTION_PROBABILITY:
        first, second = rng.sample(range(len(corrupted)), 2)
        while corrupted[first] == corrupted[second]:
            first, second = rng.sample(range(len(corrupted)), 2)
        corrupted[first], corrupted[second] = corrupted[second], corrupted[first]
    else:
        absent = [symbol for symbol in ELEMENT_ALPHABET if symbol not in prompt_elements]
        position = rng.randrange(len(corrupted))
        corrupted[position] = rng.choice(absent or [s for s in ELEMENT_ALPHABET if s != corrupted[position]])
    wrong = format_answer(corrupted)
    if wrong == problem.answer:
        raise RuntimeError(f"corrupting {problem.answer!r} gave the correct answer back; this is a bug")
    return wrong


def _answer_elements(answer: str) -> list[str] | None:
    """The elements of a well-formed answer `= d d .` (whitespace ignored), or None if malformed."""
    symbols = [symbol for symbol in answer if not symbol.isspace()]
    if len(symbols) < 2 or symbols[0] != ANSWER_START or symbols[-1] != ANSWER_END:
        return None
    inner = symbols[1:-1]
    if any(symbol not in ELEMENT_ALPHABET for symbol in inner):
        return None
    return inner


def judge_score(prompt: str, answer: str) -> float:
    """Score in [0, 1]: 1.0 for the exact answer, the fraction of right positions for a well-formed
    answer (divided by the longer of the two lengths), 0.0 for a malformed one."""
    expected = _answer_elements(solve(prompt))
    given = _answer_elements(answer)
    if given is None or not given:
        return 0.0
    right = sum(1 for mine, truth in zip(given, expected) if mine == truth)
    return right / max(len(given), len(expected))


def is_exact_match(prompt: str, answer: str) -> bool:
    """True when the answer equals solve(prompt) once whitespace is ignored."""
    return "".join(answer.split()) == "".join(solve(prompt).split())


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def general_text_lines(rng: random.Random, count: int) -> list[str]:
    """Simple true English sentences about small numbers: a perplexity corpus that is not task Q/A."""
    templates = (
        lambda a, b: f"{min(a, b)} is smaller than {max(a, b)} ." if a != b else f"{a} is equal to {b} .",
        lambda a, b: f"{a} plus {b} is {a + b} .",
        lambda a, b: f"the word {_NUMBER_WORDS[a]} means {a} .",
        lambda a, b: f"we counted {a} red birds and {b} blue birds , so {a + b} birds in all .",
        lambda a, b: f"after {a} comes {a + 1} and before {b + 1} comes {b} .",
        lambda a, b: f"{_NUMBER_WORDS[max(a, b)]} is larger than {_NUMBER_WORDS[min(a, b)]} ."
        if a != b
        else f"{_NUMBER_WORDS[a]} is the same as {a} .",
    )
    lines = []
    for _ in range(count):
        template = rng.choice(templates)
        lines.append(template(rng.randrange(10), rng.randrange(10)))
    return lines


def _unique_problems(rng: random.Random, count: int, excluded: set[str]) -> list[TaskProblem]:
    problems: list[TaskProblem] = []
    seen = set(excluded)
    attempts_left = 100 * count + 1000
    while len(problems) < count:
        attempts_left -= 1
        if attempts_left < 0:
            raise ValueError(f"could not draw {count} distinct prompts; ask for a smaller split size")
        problem = sample_problem(rng)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems


def build_splits(seed: int, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """All demo data splits, deterministic from the seed; held-out prompts never appear in train splits.

    Keys: preference_train/preference_eval {prompt, chosen, rejected}, sft_train/sft_eval {prompt,
    completion}, benchmark {prompt, answer}, general_text {text}. Prompts are chat-rendered
    (render_prompt); sft_eval reuses the preference_eval prompts, so it has that split's size.
    """
    unknown = set(sizes or {}) - set(DEFAULT_SPLIT_SIZES)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)} in sizes; valid: {sorted(DEFAULT_SPLIT_SIZES)}")
    resolved = {**DEFAULT_SPLIT_SIZES, **(sizes or {})}
    negative = {name: size for name, size in resolved.items() if size < 0}
    if negative:
        raise ValueError(f"split sizes must be >= 0, got {negative}")

    def split_rng(name: str) -> random.Random:
        return random.Random(f"synthetic-task:{seed}:{name}")

    held_out: set[str] = set()
    problems: dict[str, list[TaskProblem]] = {}
    for name in HELD_OUT_SPLITS:
        problems[name] = _unique_problems(split_rng(name), resolved[name], held_out)
        held_out.update(problem.prompt for problem in problems[name])
    for name in ("preference_train", "sft_train"):
        problems[name] = _unique_problems(split_rng(name), resolved[name], held_out)

    def preference_rows(name: str) -> list[dict]:
        corruption_rng = split_rng(f"{name}:corruption")
        return [
            {"prompt": render_prompt(p.prompt), "chosen": p.answer, "rejected": corrupt_answer(p, corruption_rng)}
            for p in problems[name]
        ]

    return {
        "preference_train": preference_rows("preference_train"),
        "preference_eval": preference_rows("preference_eval"),
        "sft_train": [{"prompt": render_prompt(p.prompt), "completion": p.answer} for p in problems["sft_train"]],
        # The held-out preference prompts with their correct answers, for the SFT loop's eval loss.
        "sft_eval": [
            {"prompt": render_prompt(p.prompt), "completion": p.answer} for p in problems["preference_eval"]
        ],
        "benchmark": [{"prompt": render_prompt(p.prompt), "answer": p.answer} for p in problems["benchmark"]],
        "general_text": [
            {"text": line} for line in general_text_lines(split_rng("general_text"), resolved["general_text"])
        ],
    }
