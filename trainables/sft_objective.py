"""The SFT objective: token-mean negative log-likelihood of the answer tokens given the prompt.

L_SFT = - sum_t mask_t log pi(y_t | x, y_<t) / sum_t mask_t over the global batch's answer tokens
(prompt and padding masked), the usual "completion only" supervised fine-tuning that precedes DPO.
Used by trainables/loop.py; tested by `python -m pytest tests/test_engine.py -q`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from trainables.bucketing import PaddingBuckets
from trainables.logprobs import forward_logps, padding_buckets_for_world
from trainables.loop import all_reduce_sums, rank_and_world
from trainables.sharding import lockstep_padding
from trainables.tokenization import TokenizedExample, collate_examples


class SFTObjective:
    """Computes one micro-batch's SFT loss and the sums behind train/ and eval/ metrics."""

    def __init__(
        self,
        *,
        train_examples: Sequence[TokenizedExample],
        eval_examples: Sequence[TokenizedExample],
        pad_token_id: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        eval_batch_size: int,
        padding_buckets: PaddingBuckets,
    ):
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.padding_buckets = padding_buckets_for_world(padding_buckets)  # forwards per micro-batch: 1, K or "auto"
        self.pad_token_id, self.device = pad_token_id, device
        self.autocast_dtype, self.eval_batch_size = autocast_dtype, eval_batch_size
        self.dataset_size = len(train_examples)
        self.answer_tokens = [len(example.answer_ids) for example in train_examples]

    def token_count(self, indices: Sequence[int]) -> int:
        return sum(self.answer_tokens[i] for i in indices)

    def _sums(self, model, examples, indices) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(self.device) for k, v in collate_examples([examples[i] for i in indices], self.pad_token_id).items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            result = forward_logps(model, batch, padding_buckets=self.padding_buckets)
        negative_log_likelihood = -result.sequence_logps.sum()  # summed over the batch's answer tokens
        sums = {
            "nll": negative_log_likelihood.detach().item(),
            "answer_tokens": batch["answer_mask"].sum().item(),
            "examples": float(len(indices)),
            "tokens": batch["attention_mask"].sum().item(),
        }
        return negative_log_likelihood, sums

    def micro_batch(self, model, indices, global_batch_size, global_token_count):
        negative_log_likelihood, sums = self._sums(model, self.train_examples, indices)
        return negative_log_likelihood / max(global_token_count, 1), sums

    def summarize(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        loss = sums["nll"] / max(sums["answer_tokens"], 1.0)
        return {f"{prefix}/loss": loss, f"{prefix}/perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        rank, world = rank_and_world()
        mine = list(range(rank, len(self.eval_examples), world))
        totals = {"nll": 0.0, "answer_tokens": 0.0, "examples": 0.0, "tokens": 0.0}
        for start in range(0, len(mine), self.eval_batch_size):
            _, sums = self._sums(model, self.eval_examples, mine[start : start + self.eval_batch_size])
            for key, value in sums.items():
                totals[key] += value
        for _ in range(lockstep_padding(model, len(self.eval_examples), len(mine), self.eval_batch_size)):
            self._sums(model, self.eval_examples, [0])  # FSDP: keep in step with the other ranks' forwards
        return self.summarize(all_reduce_sums(totals, self.device), "eval")
