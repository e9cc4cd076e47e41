"""The chunked log-prob head (trainables/answer_head.py): the same log-probs and gradients as the full
logits, without keeping a (tokens x vocab) tensor for backward, and a safe fall-back for models whose
logits are more than their output layer's."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_world import build_model_dir, far_apart_pairs
from trainables import answer_head, logprobs
from trainables.modeling import load_causal_lm
from trainables.tokenization import collate_pairs

QWEN2_VOCAB, QWEN2_HIDDEN = 151936, 896  # Qwen2-0.5B's output layer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer-head")
    return {architecture: str(build_model_dir(root / architecture, architecture)) for architecture in ("llama", "gpt2", "qwen2")}


def _logps_and_grads(model: torch.nn.Module, batch: dict, use_head: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    object.__setattr__(model, answer_head._DECISION, use_head)  # skip the probe: force the route
    model.zero_grad()
    result = logprobs.forward_logps(model, batch)
    (result.sequence_logps * torch.linspace(-1.0, 1.0, result.sequence_logps.shape[0])).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return result.token_logps.detach(), grads


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen2"])
def test_head_gives_the_full_logits_log_probs_and_gradients(models, architecture):
    """fp32: every answer token's log-prob and every parameter's gradient (output layer included) within 1e-5."""
    model = load_causal_lm(models[architecture], disable_dropout=True)
    batch = collate_pairs(far_apart_pairs(), pad_token_id=3)
    standard, standard_grads = _logps_and_grads(model, batch, use_head=False)
    head, head_grads = _logps_and_grads(model, batch, use_head=True)
    assert torch.allclose(head, standard, atol=1e-5, rtol=0), (head - standard).abs().max()
    assert (head != 0).sum() == batch["answer_mask"][:, 1:].sum()  # every answer token, nothing else
    assert head_grads.keys() == standard_grads.keys()
    for name, grad in standard_grads.items():
        assert torch.allclose(head_grads[name], grad, atol=1e-5, rtol=1e-4), (name, (head_grads[name] - grad).abs().max())


def _saved_bytes(function, *inputs, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the tensors autograd keeps for backward while `function(*inputs)` runs (parameters excluded:
    they live anyway)."""
    excluded = {tensor.data_ptr() for tensor in exclude}
    sizes: list[int] = []

    def pack(tensor: torch.Tensor):
        if tensor.data_ptr() not in excluded:
            sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*inputs)
    return sum(sizes)


def test_head_keeps_under_a_tenth_of_one_bf16_logits_tensor_at_a_152k_vocabulary():
    """Qwen2-0.5B's output layer in bf16, 128 answer tokens: the head keeps the hidden states, a float32
    normaliser and the targets; the full route keeps the logits themselves (and more)."""
    torch.manual_seed(0)
    tokens = 128
    weight = (torch.randn(QWEN2_VOCAB, QWEN2_HIDDEN) * 0.02).to(torch.bfloat16).requires_grad_()
    hidden = torch.randn(tokens, QWEN2_HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, QWEN2_VOCAB, (tokens,))
    one_bf16_logits = tokens * QWEN2_VOCAB * 2

    head = _saved_bytes(lambda: answer_head.chunked_target_logps(hidden, weight, None, targets), exclude=(weight,))
    full = _saved_bytes(lambda: logprobs.target_logps(torch.nn.functional.linear(hidden, weight), targets),
                        exclude=(weight,))
    print(f"saved for backward: head {head / 2**20:.2f} MiB, full logits {full / 2**20:.1f} MiB, "
          f"one bf16 logits tensor {one_bf16_logits / 2**20:.1f} MiB")
    assert head <= 0.10 * one_bf16_logits
    assert full >= one_bf16_logits  # what the head saves: the route it replaces keeps at least the logits


def test_chunks_agree_with_one_pass_and_gradcheck():
    """Several chunks (CHUNK_TOKENS made small) give the one-pass values; float64 gradcheck of the backward."""
    torch.manual_seed(1)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    expected = torch.log_softmax(hidden @ weight.t() + bias, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    original = answer_head.CHUNK_TOKENS
    answer_head.CHUNK_TOKENS = 3
    try:
        assert torch.allclose(answer_head.chunked_target_logps(hidden, weight, bias, targets).double(), expected, atol=1e-6)
        function = lambda h, w, b: answer_head.ChunkedTargetLogps.apply(h, w, b, targets, torch.float64)
        assert torch.autograd.gradcheck(function, (hidden, weight, bias))
    finally:
        answer_head.CHUNK_TOKENS = original


def test_a_model_whose_logits_are_not_its_output_layers_keeps_the_standard_route(models):
    """A soft-capped model (logits rescaled after the output layer, as Gemma 2 does) fails the probe, and
    its log-probs are those of its real logits."""
    model = load_causal_lm(models["llama"], disable_dropout=True)

    def soft_cap(module, args, output):
        output.logits = 3.0 * torch.tanh(output.logits / 3.0)
        return output

    model.register_forward_hook(soft_cap)
    batch = collate_pairs(far_apart_pairs(), pad_token_id=3)
    with torch.no_grad():
        result = logprobs.forward_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert getattr(model, answer_head._DECISION) is False
    expected = logprobs.token_logps_from_logits(logits, batch["input_ids"]) * batch["answer_mask"]
    assert torch.allclose(result.token_logps, expected, atol=1e-6)


def test_a_plain_model_passes_the_probe_once(models):
    model = load_causal_lm(models["qwen2"], disable_dropout=True)
    batch = collate_pairs(far_apart_pairs(), pad_token_id=3)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        logprobs.forward_logps(model, batch)
        first = len(calls)
        logprobs.forward_logps(model, batch)
    assert getattr(model, answer_head._DECISION) is True
    assert first == 3 and len(calls) == 4  # the probe's two forwards, then one forward per call


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_probe_computes_logits_for_a_few_positions_of_one_row_only(models, architecture, monkeypatch):
    """The first call's probe must not hold a batch's logits (at a 152k vocabulary, 8 pairs x 256 tokens of
    float32 logits are 2.5 GB, twice the step's own peak): its standard route gets one row and at most
    PROBE_POSITIONS positions from the output layer."""
    monkeypatch.setattr(answer_head, "PROBE_POSITIONS", 3)
    model = load_causal_lm(models[architecture], disable_dropout=True)
    batch = collate_pairs(far_apart_pairs(), pad_token_id=3)
    seen: list[int] = []  # positions the output layer projects to full logits (the head's own output is (1, N, 1))
    vocab = model.get_output_embeddings().weight.shape[0]
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(output[..., 0].numel()) if output.shape[-1] == vocab else None)
    with torch.no_grad():
        logprobs.forward_logps(model, batch)
    assert getattr(model, answer_head._DECISION) is True
    assert seen and max(seen) <= 3, seen
