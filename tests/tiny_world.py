"""Tiny models, tokenizers and pair files built on the spot for tests (no hub, a few seconds).

Models are random-init transformers of three architectures saved with save_pretrained; the tokenizer
is a word-level one trained with `tokenizers` and given a chat template; pair files come in the three
layouts the loader accepts. Everything loads through the same code path as a user's real model and data,
and the engine's argument groups come from a config, as a user's do (`engine_args`).
Used by the engine and CLI tests and by bench/; not run on its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.spec import RunSpec, resolve_run

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


POSITIONS = 512  # as many as the config's default data.max_length, which the model checks hold it to


def build_model(directory: Path, architecture: str, vocab_size: int, seed: int = 0) -> Path:
    """A random-init causal LM (llama | qwen2 | gpt2) of a few hundred thousand parameters."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=1, eos_token_id=2)
    else:
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
        config = config_class(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=POSITIONS,
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


# 4 optimizer steps of 8 pairs in 2 micro-batches, logged every step: for forward-equivalence training tests.
FOUR_STEP_LOOP = dict(train__learning_rate=5e-3, train__batch_size=8, train__micro_batch_size=4, train__max_steps=4,
                      train__warmup_steps=0, train__schedule="cosine", train__weight_decay=0.0, train__max_grad_norm=1.0,
                      train__eval_every=4, train__checkpoint_every=4, train__keep_checkpoints=1, train__log_every=1,
                      train__seed=0)


def engine_args(model: str, train: str, eval: str | None = None, *, reference_cache: str | Path | None = None,
                output_dir: str | Path | None = None, stage: str = "dpo", **settings: Any) -> RunSpec:
    """The engine's argument groups as a user's config gives them: .model .data .preference .loop .runtime.

    A config {name, model.path: model, data.train: train, data.eval: eval} plus `settings`, config keys with
    "__" for the dot (`data__max_length=48`, `train__device="cpu"`, `model__lora={"r": 4}`: what
    `--set data.max_length=48` would set), validated by the schema and resolved as `dpo train` resolves it
    (no progress bars). Every key not given takes the config's default. reference_cache and output_dir: where
    precomputed log-probs and checkpoints go (None: the config's defaults, outside the test's folders).
    """
    raw: dict[str, Any] = {"name": "tiny", "model": {"path": str(model)}, "data": {"train": str(train), "eval": eval}}
    for dotted, value in settings.items():
        *sections, key = dotted.split("__")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    config = ExperimentConfig.model_validate(raw)
    return resolve_run(config, stage=stage, reference_cache=None if reference_cache is None else str(reference_cache),
                       output_dir=None if output_dir is None else str(output_dir), show_progress=False)
