"""Tests of trainables/tokenization.py: the truncation rule, special tokens, pad fallback and collation masks.
Run with `python -m pytest tests/test_tokenization.py -q`.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from tests.helpers_tokenizer import build_bpe_tokenizer
from trainables.data import PreferencePair, PromptAnswer
from trainables.tokenization import (
    TokenizedExample,
    TokenizedPair,
    collate_examples,
    collate_pairs,
    example_token_count,
    keep_prompt_end,
    pair_answer_token_count,
    pair_token_count,
    prepare_tokenizer,
    resolve_max_prompt_length,
    tokenize_examples,
    tokenize_pairs,
    truncation_plan,
)

BOS, EOS = 0, 1


@pytest.mark.parametrize(
    "prompt, longest_answer, max_length, max_prompt, expected",
    [
        (10, 5, 20, 10, (10, 5)),  # fits: nothing cut
        (100, 30, 120, 60, (90, 30)),  # prompt cut only as far as needed, answers intact
        (100, 100, 120, 60, (60, 60)),  # prompt down to max_prompt_length, then answers cut
        (30, 200, 120, 60, (30, 90)),  # short prompt untouched, answers cut from the right
        (100, 1, 50, 25, (49, 1)),  # one-token answer: the prompt gives way
        (1, 10, 2, 1, (1, 1)),  # the smallest legal max_length keeps one token of each
    ],
)
def test_truncation_rule_on_constructed_lengths(prompt, longest_answer, max_length, max_prompt, expected):
    assert truncation_plan(prompt, longest_answer, max_length, max_prompt) == expected


def test_prompt_limit_defaults_to_half_and_rejects_impossible_limits():
    assert resolve_max_prompt_length(512, None) == 256
    with pytest.raises(ValueError, match="max_length=1 cannot hold one prompt token and one answer token"):
        resolve_max_prompt_length(1, None)
    for bad in (0, 512, 600):
        with pytest.raises(ValueError, match="max_prompt_length"):
            resolve_max_prompt_length(512, bad)


def test_left_cut_keeps_prompt_end_and_leading_bos():
    assert keep_prompt_end((BOS, 10, 11, 12, 13), 3, BOS) == (BOS, 12, 13)
    assert keep_prompt_end((10, 11, 12, 13), 3, BOS) == (11, 12, 13)
    assert keep_prompt_end((BOS, 10, 11), 5, BOS) == (BOS, 10, 11)


def test_prompt_gets_bos_and_answers_get_eos_without_bos():
    tokenizer = build_bpe_tokenizer()
    [pair] = tokenize_pairs([PreferencePair("the cat sat", " on the mat", " on the rug")], tokenizer, max_length=64)
    assert pair.prompt_ids == tuple(tokenizer("the cat sat")["input_ids"])
    assert pair.prompt_ids[0] == tokenizer.bos_token_id
    answer_ids = tuple(tokenizer(" on the mat", add_special_tokens=False)["input_ids"])
    assert pair.chosen_ids == answer_ids + (tokenizer.eos_token_id,)
    assert pair.rejected_ids[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in pair.rejected_ids


def test_chat_rendered_bos_text_is_not_doubled():
    tokenizer = build_bpe_tokenizer()
    [pair] = tokenize_pairs([PreferencePair("<s>hello", "yes", "no")], tokenizer, max_length=64)
    assert pair.prompt_ids.count(tokenizer.bos_token_id) == 1 and pair.prompt_ids[0] == tokenizer.bos_token_id


def test_tokenized_pairs_obey_the_rule_for_random_lengths():
    tokenizer = build_bpe_tokenizer()
    rng = random.Random(0)
    words = "the cat sat on mat dog ran rug good bad".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    pairs = [PreferencePair(text(rng.randint(1, 40)), " " + text(rng.randint(1, 40)), " " + text(rng.randint(1, 40)))
             for _ in range(50)]
    full = tokenize_pairs(pairs, tokenizer, max_length=10_000)
    for max_length, max_prompt in ((24, None), (24, 4), (40, 30), (2, 1)):
        cut = tokenize_pairs(pairs, tokenizer, max_length, max_prompt)
        limit = max_prompt or max_length // 2
        for whole, short in zip(full, cut):
            assert len(short.prompt_ids) + max(len(short.chosen_ids), len(short.rejected_ids)) <= max_length
            assert short.chosen_ids == whole.chosen_ids[: len(short.chosen_ids)] and len(short.chosen_ids) >= 1
            assert short.rejected_ids == whole.rejected_ids[: len(short.rejected_ids)] and len(short.rejected_ids) >= 1
            kept_end = whole.prompt_ids[len(whole.prompt_ids) - len(short.prompt_ids) :]
            if len(short.prompt_ids) >= 2:  # the prompt's end, behind the BOS that stays in front
                assert short.prompt_ids == (BOS,) + kept_end[1:]
            else:  # no room for BOS and a prompt token: the last prompt token alone
                assert short.prompt_ids == kept_end
            if len(short.prompt_ids) < len(whole.prompt_ids):  # cut: to the limit, or only as far as needed
                longest = max(len(whole.chosen_ids), len(whole.rejected_ids))
                assert len(short.prompt_ids) == max(limit, max_length - longest)
            if short.chosen_ids != whole.chosen_ids or short.rejected_ids != whole.rejected_ids:
                assert len(short.prompt_ids) <= limit  # answers are only cut once the prompt is at its limit


def test_max_length_too_small_is_an_error():
    with pytest.raises(ValueError, match="max_length=1"):
        tokenize_pairs([PreferencePair("a", "b", "c")], build_bpe_tokenizer(), max_length=1)


def test_missing_pad_token_falls_back_to_eos_and_is_logged(caplog):
    tokenizer = build_bpe_tokenizer(with_pad=False)
    with caplog.at_level(logging.WARNING, logger="trainables.tokenization"):
        prepared = prepare_tokenizer(tokenizer)
    assert prepared.pad_token_id == prepared.eos_token_id and "no pad token" in caplog.text
    padded = build_bpe_tokenizer(with_pad=True)
    assert prepare_tokenizer(padded).pad_token == "<pad>"
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        prepare_tokenizer(build_bpe_tokenizer(with_eos=False))


def test_tokenizing_without_eos_is_an_error():
    with pytest.raises(ValueError, match="no eos token"):
        tokenizer = build_bpe_tokenizer(with_eos=False, with_pad=True)
        tokenize_pairs([PreferencePair("a", "b", "c")], tokenizer, max_length=16)


def test_collate_pairs_stacks_chosen_then_rejected_and_masks_exactly_the_answers():
    pad = 99
    batch = [TokenizedPair((BOS, 5, 6), (7, 8, EOS), (9, EOS)), TokenizedPair((BOS,), (10, EOS), (11, 12, 13, EOS))]
    collated = collate_pairs(batch, pad_token_id=pad)
    assert collated["input_ids"].tolist() == [
        [BOS, 5, 6, 7, 8, EOS],
        [BOS, 10, EOS, pad, pad, pad],
        [BOS, 5, 6, 9, EOS, pad],
        [BOS, 11, 12, 13, EOS, pad],
    ]
    assert collated["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 5 + [0], [1] * 5 + [0]]
    assert collated["answer_mask"].int().tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],
    ]
    assert collated["input_ids"].dtype == torch.long and collated["attention_mask"].dtype == torch.long
    assert collated["answer_mask"].dtype == torch.bool and not collated["answer_mask"][:, 0].any()


def test_a_rows_tokens_and_masks_do_not_depend_on_the_longest_row():
    short = TokenizedPair((BOS, 5), (6, EOS), (7, EOS))
    long = TokenizedPair((BOS,) + tuple(range(20, 40)), (8, EOS), (9, 10, 11, EOS))
    alone, together = collate_pairs([short], pad_token_id=EOS), collate_pairs([short, long], pad_token_id=EOS)
    for key in ("input_ids", "attention_mask", "answer_mask"):
        width = alone[key].shape[1]
        assert torch.equal(together[key][0, :width], alone[key][0])  # chosen row of the short pair
        assert torch.equal(together[key][2, :width], alone[key][1])  # its rejected row
    width = alone["input_ids"].shape[1]
    assert not together["attention_mask"][[0, 2], width:].any() and not together["answer_mask"][[0, 2], width:].any()


def test_collate_rejects_empty_batches_and_prompts():
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], pad_token_id=0)
    with pytest.raises(ValueError, match="at least one prompt token"):
        collate_examples([TokenizedExample((), (5, EOS))], pad_token_id=0)


def test_sft_examples_tokenize_truncate_and_collate():
    tokenizer = prepare_tokenizer(build_bpe_tokenizer())
    examples = tokenize_examples([PromptAnswer("the cat sat on the mat", " yes"), PromptAnswer("hi", " the dog ran")],
                                 tokenizer, max_length=6)
    assert all(example_token_count(e) <= 6 and e.prompt_ids[0] == BOS for e in examples)
    collated = collate_examples(examples, tokenizer.pad_token_id)
    assert collated["input_ids"].shape == (2, max(map(example_token_count, examples)))
    assert collated["answer_mask"].sum(dim=1).tolist() == [len(e.answer_ids) for e in examples]


def test_token_count_helpers():
    pair = TokenizedPair((BOS, 5), (6, 7, EOS), (8, EOS))
    assert pair_token_count(pair) == 2 * 2 + 3 + 2 and pair_answer_token_count(pair) == 5


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_a_custom_tokenizer_saved_beside_any_architecture_is_the_one_loaded(tmp_path, architecture):
    """transformers 5 would pick Qwen2Tokenizer for any qwen2 directory, which turns these words into no
    tokens at all; load_tokenizer keeps the tokenizer.json the directory declares."""
    from tests.tiny_world import build_model_dir
    from trainables.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(build_model_dir(tmp_path / architecture, architecture)))
    ids = tokenizer("good yes blue rug", add_special_tokens=False).input_ids
    assert len(ids) == 4 and tokenizer.unk_token_id not in ids
    assert tokenizer.pad_token == "<pad>" and tokenizer.chat_template
