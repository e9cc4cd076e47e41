"""Tiny models, tokenizers and pair files built on the spot for tests (no hub, a few seconds).

Models are random-init transformers of three architectures saved with save_pretrained; the tokenizer
is a word-level one trained with `tokenizers` and given a chat template; pair files come in the three
layouts the loader accepts. Everything loads through the same code path as a user's real model and data.
Used by tests/test_engine.py and the CLI tests; not run on its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from trainables.loop import LoopSettings

WORDS = "the cat dog sat ran on mat rug red blue big small yes no good bad answer question".split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(directory: Path, with_pad: bool = True):
    """A word-level tokenizer with bos/eos (and optionally pad) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator([" ".join(WORDS)] * 3 + [":", "Human: Assistant:"],
                                  trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>" if with_pad else None, chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(directory)
    return wrapped


def build_model(directory: Path, architecture: str, vocab_size: int, seed: int = 0) -> Path:
    """A random-init causal LM (llama | qwen2 | gpt2) of a few hundred thousand parameters."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=1, eos_token_id=2)
    else:
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
        config = config_class(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def build_model_dir(directory: Path, architecture: str = "llama", with_pad: bool = True) -> Path:
    """Tokenizer and model in one directory, as a user's downloaded model would be."""
    tokenizer = build_tokenizer(directory, with_pad=with_pad)
    return build_model(directory, architecture, len(tokenizer))


def _answer(rng: random.Random, good: bool) -> str:
    core = " ".join(rng.choice(WORDS[:12]) for _ in range(rng.randint(2, 5)))
    return f"{'good yes' if good else 'bad no'} {core}"


def pair_rows(layout: str, count: int, seed: int = 0) -> list[dict]:
    """Pairs in the given layout: explicit | conversational | implicit_prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        question = "question " + " ".join(rng.choice(WORDS[:12]) for _ in range(rng.randint(2, 6)))
        chosen, rejected = _answer(rng, True), _answer(rng, False)
        if layout == "explicit":
            rows.append({"prompt": question, "chosen": chosen, "rejected": rejected})
        elif layout == "conversational":
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"chosen": f"Human: {question} Assistant: {chosen}",
                         "rejected": f"Human: {question} Assistant: {rejected}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def minimal_config_file(directory: Path) -> Path:
    """The smallest valid experiment YAML (an empty model folder, one pair): for config validation tests."""
    (directory / "model").mkdir(exist_ok=True)
    (directory / "train.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    path = directory / "experiment.yaml"
    path.write_text(f"name: unit\nmodel: {{path: {directory / 'model'}}}\ndata: {{train: {directory / 'train.jsonl'}}}\n")
    return path


def far_apart_pairs():
    """Six tokenised pairs: prompts of 1 to 20 tokens, chosen/rejected of 1 to 60 (eos 2 included), very
    unequal within a pair (ids 4 to 27, any tiny_world vocabulary)."""
    from trainables.tokenization import TokenizedPair

    generator = torch.Generator().manual_seed(0)

    def ids(count: int) -> tuple[int, ...]:
        return tuple(torch.randint(4, 28, (count,), generator=generator).tolist())

    shapes = [(2, 1, 30), (20, 30, 2), (3, 3, 3), (1, 60, 1), (5, 5, 40), (4, 2, 2)]  # prompt, chosen, rejected
    return [TokenizedPair(ids(p), ids(c) + (2,), ids(r) + (2,)) for p, c, r in shapes]


def four_step_loop(output_dir: Path) -> LoopSettings:
    """4 optimizer steps of 8 pairs in 2 micro-batches, logged every step: for forward-equivalence training tests."""
    return LoopSettings(learning_rate=5e-3, batch_size=8, micro_batch_size=4, max_steps=4, warmup_steps=0,
                        schedule="cosine", weight_decay=0.0, max_grad_norm=1.0, eval_every=4, checkpoint_every=4,
                        keep_checkpoints=1, log_every=1, seed=0, output_dir=str(output_dir), show_progress=False)
