"""Batched greedy generation with left padding, and the token-level helpers the benchmarks share.

`greedy_generate` decodes many prompts at once: prompts of similar length share a batch, every batch
is left-padded (so each row's next token is read at the last position), position ids follow the real
tokens, and the key/value cache is reused when the model returns one (models that return none are
fed the whole sequence each step, which the test doubles in tests/test_benchmarks.py rely on). A row
stops at its eos token; the eos is not part of the result. Prompts are tokenised exactly as training
tokenises them (trainables/tokenization.py), so a chat-rendered prompt gets no second BOS.
Tested by `python -m pytest tests/test_benchmarks.py -q`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from trainables.logprobs import token_logps_from_logits
from trainables.tokenization import _tokenize_prompts as tokenize_prompts_as_in_training


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> list[tuple[int, ...]]:
    """Prompt token ids with the training rule: default special tokens, no second BOS, no trailing EOS."""
    if not prompts:
        return []
    return tokenize_prompts_as_in_training(tokenizer, list(prompts))


def batches_by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of at most batch_size, rows of similar length together (less padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], *, pad_token_id: int,
                    eos_token_id: int | None, max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """The greedy continuation of every prompt (new tokens only, eos excluded), in the prompts' order."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt needs at least one token to generate from")
    results: list[list[int]] = [[] for _ in prompt_ids]
    for indices in batches_by_length([len(ids) for ids in prompt_ids], batch_size):
        generated = _generate_batch(model, [prompt_ids[i] for i in indices], pad_token_id, eos_token_id, max_new_tokens)
        for index, tokens in zip(indices, generated):
            results[index] = tokens
    return results


def _generate_batch(model, prompts: Sequence[Sequence[int]], pad_token_id: int, eos_token_id: int | None,
                    max_new_tokens: int) -> list[list[int]]:
    device = model_device(model)
    longest = max(len(prompt) for prompt in prompts)
    sequence = torch.tensor([[pad_token_id] * (longest - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, P)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): 0 at each row's first real token
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # (B,)
    new_tokens: list[torch.Tensor] = []  # each (B,)
    cache = None
    feed_ids, feed_positions = sequence, positions
    for _ in range(max_new_tokens):
        outputs = model(input_ids=feed_ids, attention_mask=attention_mask, position_ids=feed_positions,
                        past_key_values=cache, use_cache=True)
        next_tokens = outputs.logits[:, -1, :].argmax(dim=-1)  # (B,)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        new_tokens.append(next_tokens)
        if eos_token_id is not None:
            finished |= next_tokens == eos_token_id
        if bool(finished.all()):
            break
        next_positions = positions[:, -1:] + 1  # (B, 1)
        sequence = torch.cat([sequence, next_tokens[:, None]], dim=1)  # (B, P + t)
        positions = torch.cat([positions, next_positions], dim=1)  # (B, P + t)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_positions)], dim=1)  # (B, P + t)
        cache = getattr(outputs, "past_key_values", None)
        if cache is None:  # a model without a cache sees the whole sequence again
            feed_ids, feed_positions = sequence, positions
        else:
            feed_ids, feed_positions = next_tokens[:, None], next_positions
    columns = torch.stack(new_tokens, dim=1).tolist()  # (B, T)
    rows = []
    for tokens in columns:
        if eos_token_id is not None and eos_token_id in tokens:
            tokens = tokens[:tokens.index(eos_token_id)]
        rows.append(tokens)
    return rows


def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers to text prompts, decoded without special tokens."""
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; generation needs one to left-pad batches")
    tokens = greedy_generate(model, prompt_ids, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]


@torch.no_grad()
def continuation_logps(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_token_id: int,
                       batch_size: int = 32) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per row.

    rows: (context ids, continuation ids); contexts must be non-empty. Batches are right-padded.
    """
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    for indices in batches_by_length([len(c) + len(t) for c, t in rows], batch_size):
        batch = [rows[i] for i in indices]
        lengths = [len(context) + len(target) for context, target in batch]
        longest = max(lengths)
        device = model_device(model)
        input_ids = torch.tensor([list(c) + list(t) + [pad_token_id] * (longest - n) for (c, t), n in zip(batch, lengths)],
                                 device=device)  # (B, L)
        attention_mask = (torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()  # (B, L)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, L, V)
        token_logps = token_logps_from_logits(logits, input_ids)  # (B, L) float32: log p(token t | tokens < t)
        for row, (index, (context, target)) in enumerate(zip(indices, batch)):
            start, end = len(context), len(context) + len(target)
            target_ids = input_ids[row, start:end]  # (T,)
            greedy = bool((logits[row, start - 1:end - 1].argmax(-1) == target_ids).all())  # position t-1 predicts t
            results[index] = (token_logps[row, start:end].sum().item(), greedy)
    return results
