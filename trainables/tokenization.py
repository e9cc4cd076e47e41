"""Token ids for preference pairs and SFT examples, the truncation rule, and padding into model batches.

Tokenisation: the prompt gets the tokenizer's default special tokens (a BOS if it adds one; not a second
one when a chat template already wrote the BOS text, and never a trailing EOS); answers are tokenised with
add_special_tokens=False and end with eos_token_id.

Truncation rule TRUNCATION_RULE = "prompt-left-then-answer-right-v1" (part of the reference-cache
fingerprint: change the name whenever the rule changes). Let P = prompt tokens, A = the longer answer
(chosen or rejected) including its eos, M = max_length, Q = max_prompt_length (default M // 2):
1. if P + A <= M nothing is cut;
2. otherwise the prompt is cut from the LEFT (its end is kept) to min(P, max(Q, M - A)) tokens: down to
   Q at most, but no more than needed; a leading BOS token stays in front and counts as one of them;
3. every answer is then cut from the RIGHT to M - (kept prompt tokens); cut answers lose their eos.
Each answer keeps >= 1 token; M must be >= 2 and 1 <= Q < M, so one prompt and one answer token always fit.

Checks after tokenisation and truncation (`pair_token_check`, `example_token_check`: a RowCheck that
trainables/data.py runs on every valid row, so a faulted row is listed with its file and line, or dropped
and counted under data.drop_invalid like any other bad row):
- a prompt that tokenises to no tokens;
- an answer that tokenises to no tokens of its own (only characters the tokenizer drops): empty after
  tokenisation, only the eos would be trained on;
- chosen and rejected identical after tokenisation/truncation (the same token ids): texts that differ only
  in what the tokenizer does not keep (whitespace, words it maps to its unknown token), or only beyond
  max_length. Such a pair has loss ln 2 and zero gradient forever: it is never trained on silently.
`load_tokenized_pairs` / `load_tokenized_examples` load, validate, tokenise and check in one call.

Collation: collate_pairs puts prompt+chosen in rows [0:B] and prompt+rejected in rows [B:2B] of one
right-padded batch, so both go through the model in one forward pass. The attention mask is built from
lengths, not from pad ids, so pad == eos is safe. Tested by `python -m pytest tests/test_tokenization.py -q`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from trainables.data import PreferencePair, PromptAnswer, RowCheck, load_preference_pairs, load_prompt_answers
from trainables.errors import UserError

logger = logging.getLogger(__name__)

TRUNCATION_RULE = "prompt-left-then-answer-right-v1"
TOKEN_CHECK_FIXES = {
    "identical after tokenisation/truncation": (
        "for a pair identical after tokenisation/truncation, make chosen and rejected differ in words the tokenizer "
        "keeps, or, when they differ only beyond max_length, raise data.max_length (or lower data.max_prompt_length, "
        "which leaves more of max_length to the answers); or remove the row"),
    "empty after tokenisation/truncation": (
        "for an answer empty after tokenisation, write text the tokenizer keeps (visible words), or remove the row"),
    "the prompt tokenises to nothing": "for a prompt without tokens, write a prompt the tokenizer keeps, or remove the row",
}


class TokenizationError(UserError, ValueError):
    """The tokenizer or the length limits cannot tokenise the data (no eos token, max_length too small)."""


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]  # ends with eos unless truncated
    rejected_ids: tuple[int, ...]  # ends with eos unless truncated


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # ends with eos unless truncated


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token (its eos, logged) when it has none; error when it has neither."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise TokenizationError(
                f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; answers must end with "
                "an eos token: use a tokenizer that has one (model.tokenizer_path), or set eos_token in its "
                "tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("tokenizer has no pad token: using its eos token %r (id %d) for padding",
                       tokenizer.eos_token, tokenizer.eos_token_id)
    return tokenizer


def resolve_max_prompt_length(max_length: int, max_prompt_length: int | None) -> int:
    """Check the limits and return max_prompt_length (default max_length // 2)."""
    if max_length < 2:
        raise TokenizationError(f"data.max_length: max_length={max_length} cannot hold one prompt token and one "
                                "answer token; use at least 2")
    limit = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 1 <= limit < max_length:
        raise TokenizationError(
            f"data.max_prompt_length: max_prompt_length={max_prompt_length} must be between 1 and max_length - 1 = "
            f"{max_length - 1} so that at least one answer token fits; lower it or raise data.max_length"
        )
    return limit


def truncation_plan(prompt_length: int, longest_answer: int, max_length: int,
                    max_prompt_length: int) -> tuple[int, int]:
    """(prompt tokens to keep, answer token limit) under the module's truncation rule."""
    if prompt_length + longest_answer <= max_length:
        return prompt_length, longest_answer
    kept_prompt = min(prompt_length, max(max_prompt_length, max_length - longest_answer))
    return kept_prompt, max_length - kept_prompt


def keep_prompt_end(prompt_ids: Sequence[int], keep: int, bos_token_id: int | None) -> tuple[int, ...]:
    """The last `keep` prompt tokens, with a leading BOS kept in front (it counts towards `keep`)."""
    ids = tuple(prompt_ids)
    if keep >= len(ids):
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id and keep >= 2:
        return (ids[0],) + ids[len(ids) - (keep - 1) :]
    return ids[len(ids) - keep :]


def _eos_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise TokenizationError("the tokenizer has no eos token, so answers cannot be terminated; use a tokenizer "
                                "that has one (model.tokenizer_path), or set eos_token in its tokenizer_config.json")
    return tokenizer.eos_token_id


def _tokenize_prompts(tokenizer, prompts: Sequence[str]) -> list[tuple[int, ...]]:
    """Default special tokens, except: no second BOS after a rendered BOS text, no trailing EOS."""
    bos_text, eos_text = tokenizer.bos_token, tokenizer.eos_token
    has_bos_text = [bool(bos_text) and prompt.startswith(bos_text) for prompt in prompts]
    ids: list[tuple[int, ...]] = [()] * len(prompts)
    for add_special_tokens in (True, False):
        positions = [i for i, flag in enumerate(has_bos_text) if flag != add_special_tokens]
        if positions:
            encoded = tokenizer([prompts[i] for i in positions], add_special_tokens=add_special_tokens)["input_ids"]
            for position, token_ids in zip(positions, encoded):
                ids[position] = tuple(token_ids)
    eos_id = tokenizer.eos_token_id

    def appended_eos(prompt: str, token_ids: tuple[int, ...]) -> bool:  # added by the tokenizer, not in the text
        ends_with_eos = eos_id is not None and bool(token_ids) and token_ids[-1] == eos_id
        return ends_with_eos and not (eos_text and prompt.endswith(eos_text))

    return [token_ids[:-1] if appended_eos(prompt, token_ids) else token_ids for prompt, token_ids in zip(prompts, ids)]


def _tokenize_answers(tokenizer, answers: Sequence[str], eos_token_id: int) -> list[tuple[int, ...]]:
    if not answers:
        return []
    encoded = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [tuple(token_ids) + (eos_token_id,) for token_ids in encoded]


@dataclass(frozen=True)
class _Cut:
    """One row's token ids: the prompt and answers as kept by the truncation rule, and before truncation."""

    prompt: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]
    full_prompt: tuple[int, ...]
    full_answers: tuple[tuple[int, ...], ...]


def _cut_rows(prompts: Sequence[str], answer_lists: Sequence[Sequence[str]], tokenizer, max_length: int,
              max_prompt_length: int | None, what: str, tally: Counter | None = None) -> list[_Cut]:
    """Token ids (prompt, *answers) per row, truncated by the rule. How many rows were cut is logged, or,
    with `tally`, added to it (a checked load logs once for all its row ranges: _log_truncation)."""
    prompt_limit = resolve_max_prompt_length(max_length, max_prompt_length)
    eos_token_id = _eos_token_id(tokenizer)
    prompt_ids = _tokenize_prompts(tokenizer, prompts)
    answer_ids = [_tokenize_answers(tokenizer, answers, eos_token_id) for answers in answer_lists]
    rows, counts = [], Counter()
    for index, prompt in enumerate(prompt_ids):
        answers = tuple(ids[index] for ids in answer_ids)
        kept_prompt, answer_limit = truncation_plan(len(prompt), max(map(len, answers)), max_length, prompt_limit)
        counts["prompts_cut"] += kept_prompt < len(prompt)
        counts["answers_cut"] += any(len(answer) > answer_limit for answer in answers)
        kept = keep_prompt_end(prompt, kept_prompt, tokenizer.bos_token_id) if prompt else ()
        rows.append(_Cut(kept, tuple(answer[:answer_limit] for answer in answers), prompt, answers))
    counts["rows"] += len(rows)
    if tally is not None:
        tally.update(counts)
    else:
        _log_truncation(counts, max_length, what)
    return rows


def _log_truncation(counts: Counter, max_length: int, what: str) -> None:
    if counts["prompts_cut"] or counts["answers_cut"]:
        logger.info("truncated to max_length=%d (%s): prompts cut in %d of %d %ss, answers cut in %d", max_length,
                    TRUNCATION_RULE, counts["prompts_cut"], counts["rows"], what, counts["answers_cut"])


def _tokenize(prompts: Sequence[str], answer_lists: Sequence[Sequence[str]], tokenizer, max_length: int,
              max_prompt_length: int | None, what: str) -> list[tuple[tuple[int, ...], ...]]:
    """Token ids (prompt, *answers) per row; a prompt without tokens is an error (checked loading reports rows)."""
    rows = _cut_rows(prompts, answer_lists, tokenizer, max_length, max_prompt_length, what)
    for index, row in enumerate(rows):
        if not row.prompt:
            raise TokenizationError(
                f"{what} {index}: the prompt {prompts[index][:60]!r} tokenised to no tokens; every prompt needs at "
                "least one token (a non-empty prompt, or a tokenizer that adds BOS)")
    return [(row.prompt, *row.answers) for row in rows]


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_length: int,
                   max_prompt_length: int | None = None) -> list[TokenizedPair]:
    """Tokenise and truncate preference pairs (see the module docstring for the rule); no row checks."""
    rows = _tokenize([p.prompt for p in pairs], [[p.chosen for p in pairs], [p.rejected for p in pairs]],
                     tokenizer, max_length, max_prompt_length, "pair")
    return [TokenizedPair(prompt, chosen, rejected) for prompt, chosen, rejected in rows]


def tokenize_examples(examples: Sequence[PromptAnswer], tokenizer, max_length: int,
                      max_prompt_length: int | None = None) -> list[TokenizedExample]:
    """Tokenise and truncate SFT examples with the same rule (one answer per prompt)."""
    rows = _tokenize([e.prompt for e in examples], [[e.answer for e in examples]], tokenizer, max_length,
                     max_prompt_length, "example")
    return [TokenizedExample(prompt, answer) for prompt, answer in rows]


def _faults(row: _Cut, answer_fields: Sequence[str], tokenizer, max_length: int) -> list[tuple[str, str]]:
    """What makes a tokenised row unusable for training (see the module docstring), as (field, reason)."""
    faults = []
    if not row.full_prompt:
        faults.append(("prompt", "no tokens: the prompt tokenises to nothing with this tokenizer (only characters "
                                 "it drops); every prompt needs at least one token"))
    for name, full in zip(answer_fields, row.full_answers):
        if len(full) <= 1:  # only the eos appended to every answer
            faults.append((name, "empty after tokenisation/truncation: the text becomes no tokens with this tokenizer "
                                 "(only characters it drops, e.g. zero-width or control characters)"))
    if len(row.answers) == 2 and row.answers[0] == row.answers[1] and not faults:
        count = len(row.answers[0])
        if row.full_answers[0] == row.full_answers[1]:
            unk = tokenizer.unk_token_id
            unknown = (f", or words it maps to its unknown token {tokenizer.unk_token!r}"
                       if unk is not None and unk in row.answers[0] else "")
            why = f"the texts differ only in what the tokenizer does not keep (whitespace{unknown})"
        else:
            why = (f"they differ only after answer token {count}, beyond data.max_length={max_length} "
                   f"(the prompt keeps {len(row.prompt)} of its {len(row.full_prompt)} tokens)")
        faults.append(("", f"chosen and rejected are identical after tokenisation/truncation to {count} tokens: {why}; "
                           "the pair expresses no preference"))
    return faults


def pair_token_check(tokenizer, max_length: int, max_prompt_length: int | None = None) -> RowCheck:
    """A RowCheck that tokenises preference pairs: per pair (TokenizedPair, faults); see the module docstring."""
    resolve_max_prompt_length(max_length, max_prompt_length)  # a bad limit is a config error, not a row's

    def run(pairs: list[PreferencePair], tally: Counter) -> list[tuple[TokenizedPair, list[tuple[str, str]]]]:
        rows = _cut_rows([p.prompt for p in pairs], [[p.chosen for p in pairs], [p.rejected for p in pairs]],
                         tokenizer, max_length, max_prompt_length, "pair", tally)
        return [(TokenizedPair(row.prompt, *row.answers), _faults(row, ("chosen", "rejected"), tokenizer, max_length))
                for row in rows]

    return RowCheck(run, TOKEN_CHECK_FIXES, report=lambda tally: _log_truncation(tally, max_length, "pair"))


def example_token_check(tokenizer, max_length: int, max_prompt_length: int | None = None) -> RowCheck:
    """A RowCheck that tokenises SFT examples: per example (TokenizedExample, faults)."""
    resolve_max_prompt_length(max_length, max_prompt_length)

    def run(examples: list[PromptAnswer], tally: Counter) -> list[tuple[TokenizedExample, list[tuple[str, str]]]]:
        rows = _cut_rows([e.prompt for e in examples], [[e.answer for e in examples]], tokenizer, max_length,
                         max_prompt_length, "example", tally)
        return [(TokenizedExample(row.prompt, row.answers[0]), _faults(row, ("answer",), tokenizer, max_length))
                for row in rows]

    return RowCheck(run, TOKEN_CHECK_FIXES, report=lambda tally: _log_truncation(tally, max_length, "example"))


def load_tokenized_pairs(source: str, *, max_length: int, max_prompt_length: int | None = None, tokenizer=None,
                         **loader_args) -> list[TokenizedPair]:
    """Load, validate, tokenise and check preference pairs in one pass (load_preference_pairs' arguments);
    rows faulted after tokenisation are reported or dropped with the others. tokenizer: default
    chat_template_tokenizer, which renders conversational rows (and is `tokenizer` when not given)."""
    tokenizer = tokenizer if tokenizer is not None else loader_args.get("chat_template_tokenizer")
    if tokenizer is None:
        raise TypeError("a tokenizer is needed: pass tokenizer= or chat_template_tokenizer=")
    loader_args.setdefault("chat_template_tokenizer", tokenizer)
    check = pair_token_check(tokenizer, max_length, max_prompt_length)
    return load_preference_pairs(source, after=check, **loader_args)


def load_tokenized_examples(source: str, *, max_length: int, max_prompt_length: int | None = None, tokenizer=None,
                            **loader_args) -> list[TokenizedExample]:
    """As load_tokenized_pairs, for SFT examples (load_prompt_answers' arguments)."""
    tokenizer = tokenizer if tokenizer is not None else loader_args.get("chat_template_tokenizer")
    if tokenizer is None:
        raise TypeError("a tokenizer is needed: pass tokenizer= or chat_template_tokenizer=")
    loader_args.setdefault("chat_template_tokenizer", tokenizer)
    check = example_token_check(tokenizer, max_length, max_prompt_length)
    return load_prompt_answers(source, after=check, **loader_args)


def _collate_rows(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  pad_token_id: int) -> dict[str, torch.Tensor]:
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every row needs at least one prompt token (the first answer token is predicted from it)")
    lengths = [len(prompt) + len(answer) for prompt, answer in zip(prompts, answers)]
    longest = max(lengths)
    input_ids = torch.tensor(
        [list(prompt) + list(answer) + [pad_token_id] * (longest - length)
         for prompt, answer, length in zip(prompts, answers, lengths)],
        dtype=torch.long,
    )  # (rows, seq)
    positions = torch.arange(longest).unsqueeze(0)  # (1, seq)
    ends = torch.tensor(lengths).unsqueeze(1)  # (rows, 1)
    starts = torch.tensor([len(prompt) for prompt in prompts]).unsqueeze(1)  # (rows, 1)
    attention_mask = (positions < ends).long()  # (rows, seq)
    answer_mask = (positions >= starts) & (positions < ends)  # (rows, seq) bool
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}


def collate_pairs(batch: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: rows [0:B] prompt+chosen, rows [B:2B] prompt+rejected.

    Returns input_ids (2B, L) long, attention_mask (2B, L) long and answer_mask (2B, L) bool, True exactly
    at answer tokens (the ones whose log-probs count; answer_mask[:, 0] is always False).
    """
    prompts = [pair.prompt_ids for pair in batch] * 2
    answers = [pair.chosen_ids for pair in batch] + [pair.rejected_ids for pair in batch]
    return _collate_rows(prompts, answers, pad_token_id)


def collate_examples(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Like collate_pairs with one row per example: prompt+answer, (B, L) tensors."""
    return _collate_rows([e.prompt_ids for e in batch], [e.answer_ids for e in batch], pad_token_id)


def pair_token_count(pair: TokenizedPair) -> int:
    """Tokens the pair puts through the model (prompt twice, both answers)."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def pair_answer_token_count(pair: TokenizedPair) -> int:
    """Answer tokens of the pair whose log-probs count (chosen + rejected)."""
    return len(pair.chosen_ids) + len(pair.rejected_ids)


def example_token_count(example: TokenizedExample) -> int:
    return len(example.prompt_ids) + len(example.answer_ids)
