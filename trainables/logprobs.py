"""Per-token and per-sequence log-probabilities of answer tokens under a causal LM.

log pi(y|x) is the sum of the log-probabilities of the answer tokens given everything before them;
prompt and padding positions are masked out. Chosen and rejected rows come in one right-padded batch
(see tokenization.collate_pairs); with `padding_buckets` other than 1, `forward_logps` sorts the rows by
length, runs one forward per length bucket (trainables/bucketing.py), each cut to its own longest row
(right padding: cutting pad columns changes no position id and no attention of a real token), and puts
the per-row results back in the original order at the batch's width, zeros beyond each row's bucket
(only pad positions, which every consumer masks). Downstream (losses, KL, metrics, one backward) sees
the same values as with one forward. The log-softmax is never materialised for the whole batch in
float32, and without the exact KL's need for full distributions no (rows, seq, vocab) tensor is kept at
all: the output layer computes only the answer tokens' log-probs, in chunks (trainables/answer_head.py).
With full logits, `token_logps_from_logits` gathers the target logit and subtracts a logsumexp computed
in chunks (`target_logps`). DPO's shared-prompt forward (trainables/shared_prompt.py) returns the same
ForwardLogps layout from one row per pair. Tested by `python -m pytest tests/test_engine.py tests/test_bucketing.py -q`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainables.bucketing import PaddingBuckets, plan_buckets

logger = logging.getLogger(__name__)

# Rows x positions per chunk of the float32 logsumexp; bounds the transient float32 copy of the logits.
LOGSUMEXP_CHUNK_TOKENS = 4096


def token_logps_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, <t]) at position t; position 0 (nothing predicts it) is 0.

    logits: (rows, seq, vocab) in any float dtype; input_ids: (rows, seq). Returns float32 (rows, seq).
    """
    rows, seq_len, vocab = logits.shape
    predicting = logits[:, :-1, :].reshape(-1, vocab)  # (rows*(seq-1), vocab)
    targets = input_ids[:, 1:].reshape(-1)  # (rows*(seq-1),)
    shifted = target_logps(predicting, targets).view(rows, seq_len - 1)  # (rows, seq-1)
    return torch.nn.functional.pad(shifted, (1, 0), value=0.0)  # (rows, seq)


def target_logps(predicting: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(predicting)[targets], row by row: the picked logit minus a logsumexp taken in chunks.

    predicting: (tokens, vocab) any float dtype; targets: (tokens,) long. Returns float32 (tokens,).
    """
    picked = predicting.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (tokens,)
    normalisers = torch.cat(
        [
            torch.logsumexp(chunk.float(), dim=-1)  # (chunk,)
            for chunk in predicting.split(LOGSUMEXP_CHUNK_TOKENS, dim=0)
        ]
    )  # (tokens,)
    return picked - normalisers


@dataclass
class ForwardLogps:
    """What one forward pass over a collated batch yields."""

    token_logps: torch.Tensor  # (rows, seq) float32, zero outside the answer mask
    sequence_logps: torch.Tensor  # (rows,) sum over answer tokens
    logits: torch.Tensor | None  # (rows, seq, vocab) kept only when an exact KL needs them
    log_sum_sq_probs: torch.Tensor | None = None  # (rows, seq) log sum_v p(v)^2 at answer tokens: WPO only


def _forward_once(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep_logits: bool,
                  log_sum_sq: bool = False) -> ForwardLogps:
    if not keep_logits:
        return _answer_head_once(model, batch, log_sum_sq)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = outputs.logits  # (rows, seq, vocab)
    answer_mask = batch["answer_mask"]  # (rows, seq) bool
    token_logps = token_logps_from_logits(logits, batch["input_ids"]) * answer_mask  # (rows, seq)
    aligned_logits = None
    if keep_logits:
        # logits[t-1] predicts token t: shift so position t holds the distribution over token t.
        aligned_logits = F.pad(logits[:, :-1, :], (0, 0, 1, 0))  # (rows, seq, vocab)
    squares = None
    if log_sum_sq:  # WPO from the kept logits: log sum_v p^2 = logsumexp(2z) - 2 logsumexp(z), no gradient
        with torch.no_grad():
            squares = torch.stack([torch.logsumexp(2 * row.float(), -1) - 2 * torch.logsumexp(row.float(), -1)
                                   for row in aligned_logits]) * answer_mask  # (rows, seq), a row at a time
    return ForwardLogps(token_logps=token_logps, sequence_logps=token_logps.sum(-1), logits=aligned_logits,
                        log_sum_sq_probs=squares)


def _answer_head_once(model: torch.nn.Module, batch: dict[str, torch.Tensor], log_sum_sq: bool = False) -> ForwardLogps:
    """Answer-token log-probs without materialising the logits (trainables/answer_head.py)."""
    from trainables.answer_head import answer_logps

    input_ids, answer_mask = batch["input_ids"], batch["answer_mask"]  # (rows, seq) each
    rows, seq = input_ids.shape
    row, column = answer_mask[:, 1:].nonzero(as_tuple=True)  # position `column` predicts answer token column + 1
    squares = torch.empty(row.shape, dtype=torch.float32, device=input_ids.device) if log_sum_sq else None
    values = answer_logps(model, {"input_ids": input_ids, "attention_mask": batch["attention_mask"]},
                          predictor=row * seq + column, targets=input_ids[row, column + 1],
                          log_sum_sq_out=squares)  # (answer tokens,)
    token_logps = torch.zeros((rows, seq), dtype=torch.float32, device=input_ids.device).index_put(
        (row, column + 1), values)  # (rows, seq), zero outside the answers
    if squares is not None:
        squares = torch.zeros((rows, seq), dtype=torch.float32, device=input_ids.device).index_put(
            (row, column + 1), squares)  # (rows, seq)
    return ForwardLogps(token_logps=token_logps, sequence_logps=token_logps.sum(-1), logits=None,
                        log_sum_sq_probs=squares)


def forward_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    keep_logits: bool = False,
    padding_buckets: PaddingBuckets = 1,
    log_sum_sq: bool = False,
) -> ForwardLogps:
    """Run the model on a collated, right-padded batch and return masked answer-token log-probs.

    padding_buckets: 1 = one forward over the whole batch; "auto" or K > 1 = one forward per length
    bucket (trainables/bucketing.plan_buckets), results in the batch's row order and width.
    """
    if padding_buckets == 1:
        return _forward_once(model, batch, keep_logits, log_sum_sq)
    lengths = batch["attention_mask"].sum(-1).tolist()  # real tokens per row (right padding)
    buckets = plan_buckets(lengths, padding_buckets)
    if len(buckets) == 1:
        return _forward_once(model, batch, keep_logits, log_sum_sq)
    width = batch["input_ids"].shape[1]
    device = batch["input_ids"].device
    parts = []
    for rows in buckets:
        index = torch.tensor(rows, device=device)  # (bucket rows,)
        longest = max(lengths[row] for row in rows)
        part = _forward_once(model, {key: value[index, :longest] for key, value in batch.items()}, keep_logits,
                             log_sum_sq)
        parts.append(part)  # token_logps (bucket rows, longest), logits (bucket rows, longest, vocab)
    order = torch.tensor([row for rows in buckets for row in rows], device=device)  # (rows,) sorted position -> row
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=device)  # (rows,) row -> sorted position
    token_logps = torch.cat([F.pad(p.token_logps, (0, width - p.token_logps.shape[1])) for p in parts])[inverse]
    logits = None
    if keep_logits:
        logits = torch.cat([F.pad(p.logits, (0, 0, 0, width - p.logits.shape[1])) for p in parts])[inverse]
    sequence_logps = torch.cat([p.sequence_logps for p in parts])[inverse]  # (rows,)
    squares = None
    if log_sum_sq:
        squares = torch.cat([F.pad(p.log_sum_sq_probs, (0, width - p.log_sum_sq_probs.shape[1])) for p in parts])[inverse]
    return ForwardLogps(token_logps=token_logps, sequence_logps=sequence_logps, logits=logits,
                        log_sum_sq_probs=squares)  # (rows, seq) etc.


def padding_buckets_for_world(padding_buckets: PaddingBuckets) -> PaddingBuckets:
    """1 under torch.distributed with more than one rank, `padding_buckets` otherwise.

    There every forward is a collective (DDP's buffer broadcast, FSDP's all-gathers), so all ranks must run
    the same number of forwards, while a bucket plan depends on each rank's own rows.
    """
    if padding_buckets != 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        logger.info("padding_buckets=%r -> 1 on %d ranks: forwards must stay in step", padding_buckets,
                    dist.get_world_size())
        return 1
    return padding_buckets


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
