"""The log-prob head: answer-token log-probs straight from the final hidden states, in chunks of tokens,
without ever keeping a (tokens x vocab) tensor between forward and backward.

A causal LM ends in an output layer W (vocab x hidden). The usual route materialises the logits
h W^T for every position, (rows, seq, vocab), and autograd keeps them (and their float32 copy for the
log-softmax) until backward: at a 152k vocabulary that is the largest tensor of a DPO step. DPO needs
only log p(y_t | y_<t) of the answer tokens:

    log p(y_t) = z_t[y_t] - logsumexp(z_t),      z_t = W h_{t-1} (+ b)

`ChunkedTargetLogps` computes that for N answer tokens, a chunk of tokens at a time (at most 1024 and
128 MiB of float32 logits: trainables/memory_plan.head_chunk_tokens), and keeps only
h (N x hidden, in the compute dtype), the float32 logsumexp (N) and the targets. Backward recomputes each
chunk's logits and uses d/dz = g (onehot(y) - softmax(z)), so its peak is one chunk of logits.

It plugs into any Hugging Face causal LM, wrapped or not (DDP, FSDP2, peft), by replacing the output
layer's forward for the duration of one model call (`answer_head`): the model runs exactly as usual up
to its output layer, which receives the final hidden states and returns the answer log-probs instead
of logits. Models whose logits are more than `h W^T + b` (a final soft-cap or logit scale) are caught
by a no-grad probe against the standard route on the first call, and keep the standard route.
Tested by `python -m pytest tests/test_answer_head.py -q`.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from trainables.memory_plan import head_chunk_tokens  # dpo plan plans with the same chunk size

logger = logging.getLogger(__name__)

CHUNK_TOKENS = None  # tokens per chunk of logits; None: memory_plan.head_chunk_tokens (<= 1024, <= 128 MiB of float32)
PROBE_TOLERANCE_FP32 = 1e-4  # max |log-prob difference|, head vs standard route, without autocast
PROBE_TOLERANCE_AUTOCAST = 5e-2  # the same under bf16/fp16 autocast
PROBE_POSITIONS = 64  # answer positions of one row the probe compares: its standard route keeps their logits only
_DECISION = "_dpo_answer_head"  # attribute on the unwrapped model: True / False once probed


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """float32 for the log-softmax and the weight gradient (float64 when computing in float64)."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


class ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(hidden W^T + b)[targets] row by row, float32 (N,) (float64 in float64); saves no (N x vocab) tensor."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                compute_dtype: torch.dtype, log_sum_sq_out: torch.Tensor | None = None) -> torch.Tensor:
        # hidden: (N, hidden); weight: (vocab, hidden); bias: (vocab,) or None; targets: (N,) long
        # log_sum_sq_out: (N,) float32 or None, filled (no gradient) with log sum_v p(v)^2 per row for WPO
        hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        accumulate = _accumulate_dtype(compute_dtype)
        picked = torch.empty(hidden.shape[0], dtype=accumulate, device=hidden.device)  # (N,)
        normalisers = torch.empty_like(picked)  # (N,)
        ctx.chunk = CHUNK_TOKENS or head_chunk_tokens(weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                stop = min(start + ctx.chunk, hidden.shape[0])
                logits = torch.nn.functional.linear(hidden_c[start:stop], weight_c, bias_c).to(accumulate)  # (chunk, vocab)
                normalisers[start:stop] = torch.logsumexp(logits, dim=-1)
                picked[start:stop] = logits.gather(-1, targets[start:stop, None]).squeeze(-1)
                if log_sum_sq_out is not None:  # log sum_v p^2 = logsumexp(2z) - 2 logsumexp(z), from the same chunk
                    log_sum_sq_out[start:stop] = torch.logsumexp(2 * logits, dim=-1) - 2 * normalisers[start:stop]
        ctx.save_for_backward(hidden_c, weight, bias, targets, normalisers)
        ctx.compute_dtype, ctx.input_dtype = compute_dtype, hidden.dtype
        return picked - normalisers

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden_c, weight, bias, targets, normalisers = ctx.saved_tensors
        weight_c = weight.to(ctx.compute_dtype)
        bias_c = None if bias is None else bias.to(ctx.compute_dtype)
        grad_hidden = torch.empty_like(hidden_c, dtype=ctx.input_dtype) if ctx.needs_input_grad[0] else None
        accumulate = _accumulate_dtype(ctx.compute_dtype)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(hidden_c.device.type, enabled=False):
            for start in range(0, hidden_c.shape[0], ctx.chunk):
                stop = min(start + ctx.chunk, hidden_c.shape[0])
                chunk = hidden_c[start:stop]  # (chunk, hidden)
                logits = torch.nn.functional.linear(chunk, weight_c, bias_c).to(accumulate)  # (chunk, vocab), recomputed
                grad = grad_output[start:stop, None].to(accumulate)  # (chunk, 1)
                grad_logits = torch.exp(logits - normalisers[start:stop, None]).mul_(-grad)  # -g softmax(z)
                grad_logits.scatter_add_(-1, targets[start:stop, None], grad)  # + g onehot(y)
                if grad_hidden is not None:
                    grad_hidden[start:stop] = (grad_logits.to(ctx.compute_dtype) @ weight_c).to(ctx.input_dtype)
                if grad_weight is not None:
                    grad_weight += grad_logits.t() @ chunk.to(accumulate)  # (vocab, hidden), float32 accumulation
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_target_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, log_sum_sq_out: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32 log-probs of `targets` under logits hidden W^T + b, computed in chunks (see module docstring);
    log_sum_sq_out (N,): also filled with WPO's log sum_v p(v)^2 of each row, at no extra matmul."""
    return ChunkedTargetLogps.apply(hidden, weight, bias, targets, _compute_dtype(weight), log_sum_sq_out)


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's output layer if it is a plain Linear (through DDP's `.module` and peft's delegation)."""
    inner = getattr(model, "module", model)  # DDP
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if type(head) is torch.nn.Linear else None


@contextlib.contextmanager
def answer_head(model: torch.nn.Module, predictor: torch.Tensor, targets: torch.Tensor,
                log_sum_sq_out: torch.Tensor | None = None):
    """For one call of `model`, its output layer returns the answer log-probs, shape (1, N, 1), instead of
    logits: predictor (N,) are flat indices into (rows * seq) of the positions predicting targets (N,).
    log_sum_sq_out (N,): filled with log sum_v p(v)^2 at those positions (WPO)."""
    head = output_layer(model)
    if head is None:
        raise ValueError("the model's output layer is not a plain Linear; use the standard route")

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # hidden: (rows, seq, hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])[predictor]  # (N, hidden): only the answer-predicting positions
        return chunked_target_logps(flat, head.weight, head.bias, targets, log_sum_sq_out).view(1, -1, 1)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def _standard(model: torch.nn.Module, inputs: dict[str, torch.Tensor], predictor: torch.Tensor,
              targets: torch.Tensor, log_sum_sq_out: torch.Tensor | None = None) -> torch.Tensor:
    from trainables.logprobs import target_logps

    logits = model(**inputs, use_cache=False).logits  # (rows, seq, vocab)
    predicting = logits.reshape(-1, logits.shape[-1])[predictor]  # (N, vocab)
    if log_sum_sq_out is not None:
        with torch.no_grad():
            size = CHUNK_TOKENS or head_chunk_tokens(predicting.shape[-1])
            for start in range(0, predicting.shape[0], size):  # float32 in chunks, as the head
                chunk = predicting[start : start + size].float()  # (chunk, vocab)
                log_sum_sq_out[start : start + size] = (torch.logsumexp(2 * chunk, dim=-1)
                                                                - 2 * torch.logsumexp(chunk, dim=-1))
    return target_logps(predicting, targets)  # (N,)


def _with_head(model: torch.nn.Module, inputs: dict[str, torch.Tensor], predictor: torch.Tensor,
               targets: torch.Tensor, log_sum_sq_out: torch.Tensor | None = None) -> torch.Tensor:
    with answer_head(model, predictor, targets, log_sum_sq_out):
        return model(**inputs, use_cache=False).logits.reshape(-1)  # (N,)


def _probe_slice(inputs: dict[str, torch.Tensor], predictor: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The first row holding an answer position, and its first PROBE_POSITIONS answer positions (predictor
    re-indexed into that one row): what the probe runs, so that its standard route stays small."""
    rows, seq = inputs["input_ids"].shape[:2]
    row = int(predictor[0]) // seq
    keep = torch.nonzero(predictor // seq == row).squeeze(-1)[:PROBE_POSITIONS]  # (k,)
    one_row = {key: value[row : row + 1] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows
               else value for key, value in inputs.items()}  # input_ids, 2D/4D masks, position ids: (1, ...)
    return one_row, predictor[keep] - row * seq, targets[keep]


def _standard_kept(model: torch.nn.Module, inputs: dict[str, torch.Tensor], predictor: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """_standard on one row, asking the model for the logits of the predicting positions only
    (`logits_to_keep`, which every recent transformers causal LM takes; else all of that row's logits)."""
    from trainables.logprobs import target_logps

    seq = inputs["input_ids"].shape[1]
    columns, position = torch.unique(predictor % seq, return_inverse=True)  # (k,) sorted, (N,) index into them
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=columns).logits  # (1, k, vocab)
    except TypeError:  # a model without logits_to_keep
        return _standard(model, inputs, predictor, targets)
    return target_logps(logits[0, position], targets)  # (N,)


def _decide(model: torch.nn.Module, inputs: dict[str, torch.Tensor], predictor: torch.Tensor,
            targets: torch.Tensor) -> bool | None:
    """Whether the head gives this model's log-probs: a plain Linear output layer, and a no-grad probe on
    the first call agrees with the standard route (a soft-capped or scaled model's would not). The probe
    runs one row and at most PROBE_POSITIONS of its answer positions, so that it never holds a batch's
    logits (at a 152k vocabulary, 8 pairs x 256 tokens of them are 2.5 GB in float32)."""
    if output_layer(model) is None:
        logger.info("log-prob head: standard route (the output layer is not a plain Linear)")
        return False
    if predictor.numel() == 0:
        return None  # nothing to compare in this call: decided at the next one
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs, predictor, targets = _probe_slice(inputs, predictor, targets)
            difference = (_with_head(model, inputs, predictor, targets)
                          - _standard_kept(model, inputs, predictor, targets))
            difference = difference.abs().max().item()
    finally:
        model.train(was_training)
    device_type = predictor.device.type
    tolerance = PROBE_TOLERANCE_AUTOCAST if torch.is_autocast_enabled(device_type) else PROBE_TOLERANCE_FP32
    if not difference <= tolerance:
        logger.warning("log-prob head: standard route (probe differs by %.3g > %g: the logits are more than the "
                       "output layer's)", difference, tolerance)
        return False
    logger.info("log-prob head: chunked, no (tokens x vocab) tensor kept (probe difference %.2g)", difference)
    return True


def answer_logps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], predictor: torch.Tensor,
                 targets: torch.Tensor, log_sum_sq_out: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32 log-probs of `targets` at flat positions `predictor` of model(**inputs): by the chunked
    head when this model passed its probe (decided once per model), else from the full logits.
    log_sum_sq_out: an (N,) float32 tensor to fill with log sum_v p(v)^2 at each position (WPO's weights;
    given only when dpo.use_weighting is on), from the same logits, without gradient."""
    inner = getattr(model, "module", model)
    decision = getattr(inner, _DECISION, None)
    if decision is None:
        decision = _decide(model, inputs, predictor, targets)
        if decision is not None:
            object.__setattr__(inner, _DECISION, decision)  # plain attribute: not a parameter, not a buffer
    if decision:
        return _with_head(model, inputs, predictor, targets, log_sum_sq_out)
    return _standard(model, inputs, predictor, targets, log_sum_sq_out)
