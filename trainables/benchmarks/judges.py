"""Judges for the win-rate benchmark: who wrote the better answer to a prompt.

A judge scores (prompt, answer) pairs; higher is better. Two built in:
- `ProgramJudge`: the embedded task's program (trainables.synthetic_task.judge_score): 1.0 for the exact
  answer, partial credit for a well-formed one, 0.0 for a malformed one. Right for `demo:` data only.
- `RewardModelJudge`: a reward model for real tasks, any AutoModelForSequenceClassification directory
  with one output (num_labels=1, e.g. a Skywork or OpenAssistant reward model); the score of
  prompt + answer is its logit. Texts are scored in right-padded batches; the model's config needs the
  pad id to find each row's last token, so it is set from the tokenizer when missing.
Tested by `python -m pytest tests/test_benchmarks.py -q`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from trainables import synthetic_task
from trainables.benchmarks.generation import batches_by_length, model_device


class Judge(Protocol):
    """Scores answers to prompts; a higher score is a better answer."""

    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]: ...


class ProgramJudge:
    """The embedded reverse/sort task's own grader (synthetic_task.judge_score)."""

    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [synthetic_task.judge_score(prompt, answer) for prompt, answer in zip(prompts, answers)]


class RewardModelJudge:
    """A sequence-classification reward model loaded from a directory (safetensors, one logit per text)."""

    def __init__(self, path: str, *, device: torch.device | str = "cpu", batch_size: int = 16, max_length: int = 1024,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, use_safetensors=True, trust_remote_code=trust_remote_code).to(device).eval()
        except (OSError, ValueError) as error:
            raise OSError(f"could not load the reward model {path!r} as an AutoModelForSequenceClassification with "
                          f"safetensors weights and a tokenizer: {error}") from error
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path!r} has num_labels={self.model.config.num_labels}; a reward model "
                             "scores each text with one logit (num_labels=1)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        texts = [prompt + answer for prompt, answer in zip(prompts, answers)]
        encoded = [self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"] for text in texts]
        results = [0.0] * len(texts)
        device = model_device(self.model)
        for indices in batches_by_length([len(ids) for ids in encoded], self.batch_size):
            rows = [encoded[i] for i in indices]
            longest = max(len(ids) for ids in rows)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in rows], device=device)  # (B, L)
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in rows], device=device)  # (B, L)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 1)
            for index, value in zip(indices, logits[:, 0].float().tolist()):
                results[index] = value
        return results


def build_judge(kind: str, *, reward_model: str | None = None, device: torch.device | str = "cpu",
                batch_size: int = 16, max_length: int = 1024) -> Judge:
    """`program` (the embedded task) or `reward_model` (needs the reward model's directory)."""
    if kind == "program":
        return ProgramJudge()
    if kind == "reward_model":
        if not reward_model:
            raise ValueError("judge: reward_model needs reward_model: <directory of an AutoModelForSequenceClassification>")
        return RewardModelJudge(reward_model, device=device, batch_size=batch_size, max_length=max_length)
    raise ValueError(f"unknown judge {kind!r}; use program or reward_model")


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    """Share of prompts where the policy's answer scores higher; a tie counts one half."""
    if len(policy_scores) != len(reference_scores) or not policy_scores:
        raise ValueError(f"win rate needs two equally long, non-empty score lists (got {len(policy_scores)} and "
                         f"{len(reference_scores)})")
    wins = sum(1.0 if mine > theirs else 0.5 if mine == theirs else 0.0
               for mine, theirs in zip(policy_scores, reference_scores))
    return wins / len(policy_scores)
