"""Unit tests for trainables/synthetic_task.py: the program, the judge, corruptions and the data splits.

Pure Python, well under a second. Run: `python -m pytest tests/test_synthetic_task.py -q`.
"""

from __future__ import annotations

import random

import pytest

from trainables.synthetic_task import (
    DEFAULT_SPLIT_SIZES,
    TaskProblem,
    build_splits,
    corrupt_answer,
    general_text_lines,
    is_exact_match,
    judge_score,
    parse_prompt,
    render_prompt,
    sample_problem,
    solve,
)

SMALL_SIZES = {"preference_train": 300, "preference_eval": 60, "sft_train": 300, "benchmark": 50, "general_text": 40}


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("reverse: 3 7 1 4", "= 4 1 7 3 ."),
        ("sort: 3 7 1 4", "= 1 3 4 7 ."),
        ("sort: 9 0 5", "= 0 5 9 ."),
        ("reverse: 2 8 6 0 5 1 9", "= 9 1 5 0 6 8 2 ."),
        # A chat-rendered prompt is solved the same way as the plain text.
        ("<s><|user|>\nreverse: 3 7 1 4\n<|assistant|>\n", "= 4 1 7 3 ."),
    ],
)
def test_solve_hand_cases(prompt: str, answer: str) -> None:
    assert solve(prompt) == answer


@pytest.mark.parametrize("prompt", ["shuffle: 1 2 3", "reverse:", "sort: 1 a 3", "hello there"])
def test_solve_rejects_prompts_without_a_task_and_says_what_was_expected(prompt: str) -> None:
    with pytest.raises(ValueError, match="e.g. 'reverse: 3 7 1 4'"):
        solve(prompt)


def test_exact_match_ignores_whitespace_only() -> None:
    prompt = "reverse: 3 7 1 4"
    assert is_exact_match(prompt, "= 4 1 7 3 .")
    assert is_exact_match(prompt, "  =4 1 7 3.\n")
    assert not is_exact_match(prompt, "= 4 1 7 3")  # missing the end mark
    assert not is_exact_match(prompt, "4 1 7 3 .")  # missing the start mark
    assert not is_exact_match(prompt, "= 1 3 4 7 .")  # sorted, not reversed
    assert not is_exact_match(prompt, "= 4 1 7 3 . = 4")  # kept generating after the answer


def test_judge_gives_full_partial_and_zero_credit() -> None:
    prompt = "sort: 3 7 1 4"  # correct: = 1 3 4 7 .
    assert judge_score(prompt, "= 1 3 4 7 .") == 1.0
    assert judge_score(prompt, "= 1 3 9 7 .") == pytest.approx(3 / 4)
    assert judge_score(prompt, "= 1 3 .") == pytest.approx(2 / 4)  # too short: divided by the longer length
    assert judge_score(prompt, "= 1 3 4 7 8 .") == pytest.approx(4 / 5)  # too long
    assert judge_score(prompt, "= 7 4 3 1 .") == 0.0  # well formed, every position wrong
    assert judge_score(prompt, "1 3 4 7") == 0.0  # malformed: no = ... .
    assert judge_score(prompt, "= 1 three 4 7 .") == 0.0  # malformed: a non-digit element
    assert judge_score(prompt, "= .") == 0.0  # empty list


def test_judge_ranks_better_answers_higher() -> None:
    prompt = "reverse: 5 2 8 6"  # correct: = 6 8 2 5 .
    ranked = ["= 6 8 2 5 .", "= 6 8 2 0 .", "= 6 0 0 0 .", "6 8 2 5"]
    scores = [judge_score(prompt, answer) for answer in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_sample_problem_answers_are_what_the_program_says() -> None:
    rng = random.Random(1)
    for _ in range(200):
        problem = sample_problem(rng)
        operation, elements = parse_prompt(problem.prompt)
        assert problem.answer == solve(problem.prompt)
        assert 3 <= len(elements) <= 7 and len(set(elements)) == len(elements)
        assert operation in ("reverse", "sort")


def test_corrupt_answer_is_always_wrong_but_well_formed() -> None:
    rng = random.Random(7)
    kinds = {"absent_digit": 0, "swap": 0}
    for _ in range(2000):
        problem = sample_problem(rng)
        wrong = corrupt_answer(problem, rng)
        assert wrong != problem.answer and not is_exact_match(problem.prompt, wrong)
        assert wrong.startswith("= ") and wrong.endswith(" .")
        assert len(wrong.split()) == len(problem.answer.split())  # same format, same length
        assert 0.0 < judge_score(problem.prompt, wrong) < 1.0
        _, prompt_elements = parse_prompt(problem.prompt)
        wrong_elements = wrong.split()[1:-1]
        if sorted(wrong_elements) == sorted(prompt_elements):
            kinds["swap"] += 1
        else:
            outsiders = [element for element in wrong_elements if element not in prompt_elements]
            assert len(outsiders) == 1, f"{problem} -> {wrong}: expected exactly one digit absent from the prompt"
            kinds["absent_digit"] += 1
    # Most rejections are locally visible (a digit the prompt lacks); a minority are swaps.
    assert kinds["absent_digit"] > 3 * kinds["swap"] > 0


def test_corrupt_answer_explains_a_malformed_answer() -> None:
    with pytest.raises(ValueError, match="not of the form"):
        corrupt_answer(TaskProblem(prompt="sort: 1 2 3", answer="1 2 3"), random.Random(0))


def test_render_prompt_wraps_the_user_text_in_the_chat_format() -> None:
    assert render_prompt("sort: 2 1 3") == "<s><|user|>\nsort: 2 1 3\n<|assistant|>\n"


def test_splits_have_the_documented_shapes_and_sizes() -> None:
    splits = build_splits(seed=0, sizes=SMALL_SIZES)
    assert set(splits) == set(DEFAULT_SPLIT_SIZES) | {"sft_eval"}
    for name, size in SMALL_SIZES.items():
        assert len(splits[name]) == size, name
    assert len(splits["sft_eval"]) == SMALL_SIZES["preference_eval"]
    expected_keys = {
        "preference_train": {"prompt", "chosen", "rejected"},
        "preference_eval": {"prompt", "chosen", "rejected"},
        "sft_train": {"prompt", "completion"},
        "sft_eval": {"prompt", "completion"},
        "benchmark": {"prompt", "answer"},
        "general_text": {"text"},
    }
    for name, keys in expected_keys.items():
        assert all(set(row) == keys for row in splits[name]), name
    for row in splits["preference_train"]:
        assert row["prompt"].startswith("<s><|user|>\n") and row["prompt"].endswith("\n<|assistant|>\n")
        assert row["chosen"] == solve(row["prompt"]) and row["rejected"] != row["chosen"]
    for row in splits["benchmark"]:
        assert is_exact_match(row["prompt"], row["answer"])


def test_splits_are_deterministic_from_the_seed() -> None:
    assert build_splits(seed=3, sizes=SMALL_SIZES) == build_splits(seed=3, sizes=SMALL_SIZES)
    assert build_splits(seed=3, sizes=SMALL_SIZES) != build_splits(seed=4, sizes=SMALL_SIZES)


def test_held_out_prompts_never_appear_in_training_splits() -> None:
    splits = build_splits(seed=0)  # full default sizes: the overlap check must hold at scale
    train_prompts = {row["prompt"] for name in ("preference_train", "sft_train") for row in splits[name]}
    eval_prompts = {row["prompt"] for row in splits["preference_eval"]}
    benchmark_prompts = {row["prompt"] for row in splits["benchmark"]}
    assert len(eval_prompts) == DEFAULT_SPLIT_SIZES["preference_eval"]
    assert not train_prompts & eval_prompts
    assert not train_prompts & benchmark_prompts
    assert not eval_prompts & benchmark_prompts


def test_build_splits_rejects_unknown_split_names() -> None:
    with pytest.raises(ValueError, match="unknown split names \\['preference_tain'\\]"):
        build_splits(seed=0, sizes={"preference_tain": 10})


def test_general_text_is_plain_sentences_not_task_questions() -> None:
    lines = general_text_lines(random.Random(0), 100)
    assert len(lines) == 100 and len(set(lines)) > 30
    for line in lines:
        assert line.endswith(" .")
        assert "reverse:" not in line and "sort:" not in line and not line.startswith("=")
