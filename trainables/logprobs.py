"""Per-token and per-sequence log-probabilities of answer tokens under a causal LM.

log pi(y|x) is the sum of the log-probabilities of the answer tokens given everything before them;
prompt and padding positions are masked out. Chosen and rejected rows go through the model in one
forward pass (see tokenization.collate_pairs). The log-softmax is never materialised for the whole
batch in float32: `token_logps_from_logits` gathers the target logit and subtracts a logsumexp computed
in chunks. Tested by `python -m pytest tests/test_engine.py -q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows x positions per chunk of the float32 logsumexp; bounds the transient float32 copy of the logits.
LOGSUMEXP_CHUNK_TOKENS = 4096


def token_logps_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, <t]) at position t; position 0 (nothing predicts it) is 0.

    logits: (rows, seq, vocab) in any float dtype; input_ids: (rows, seq). Returns float32 (rows, seq).
    """
    rows, seq_len, vocab = logits.shape
    predicting = logits[:, :-1, :].reshape(-1, vocab)  # (rows*(seq-1), vocab)
    targets = input_ids[:, 1:].reshape(-1)  # (rows*(seq-1),)
    picked = predicting.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (rows*(seq-1),)
    normalisers = torch.cat(
        [
            torch.logsumexp(chunk.float(), dim=-1)  # (chunk,)
            for chunk in predicting.split(LOGSUMEXP_CHUNK_TOKENS, dim=0)
        ]
    )
    shifted = (picked - normalisers).view(rows, seq_len - 1)  # (rows, seq-1)
    return torch.nn.functional.pad(shifted, (1, 0), value=0.0)  # (rows, seq)


@dataclass
class ForwardLogps:
    """What one forward pass over a collated batch yields."""

    token_logps: torch.Tensor  # (rows, seq) float32, zero outside the answer mask
    sequence_logps: torch.Tensor  # (rows,) sum over answer tokens
    logits: torch.Tensor | None  # (rows, seq, vocab) kept only when an exact KL needs them


def forward_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    keep_logits: bool = False,
) -> ForwardLogps:
    """Run the model on a collated batch and return masked answer-token log-probs."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = outputs.logits  # (rows, seq, vocab)
    answer_mask = batch["answer_mask"]  # (rows, seq) bool
    token_logps = token_logps_from_logits(logits, batch["input_ids"]) * answer_mask  # (rows, seq)
    aligned_logits = None
    if keep_logits:
        # logits[t-1] predicts token t: shift so position t holds the distribution over token t.
        aligned_logits = torch.nn.functional.pad(logits[:, :-1, :], (0, 0, 1, 0))  # (rows, seq, vocab)
    return ForwardLogps(token_logps=token_logps, sequence_logps=token_logps.sum(-1), logits=aligned_logits)


def split_chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0:B] are chosen, [B:2B] rejected (the collate_pairs layout)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def scatter_answer_values(answer_mask: torch.Tensor, per_row_values: list[torch.Tensor]) -> torch.Tensor:
    """Place each row's answer-token values (in order) at that row's answer positions.

    answer_mask: (rows, seq) bool; per_row_values[r]: (answer tokens of row r,). Returns (rows, seq) float32.
    Boolean-mask assignment fills positions in row-major order, which is exactly the concatenation order.
    """
    placed = torch.zeros(answer_mask.shape, dtype=torch.float32, device=answer_mask.device)  # (rows, seq)
    placed[answer_mask] = torch.cat(per_row_values).to(placed.device, torch.float32)
    return placed
