"""A tiny byte-level BPE tokenizer for the data and tokenization tests (built in memory in milliseconds).

Byte-level, so any text tokenises without unknown tokens; "</s>" is eos, "<s>" an optional BOS that the
post-processor prepends, "<pad>" an optional pad token; the chat template renders
"<|role|>\\ncontent</s>\\n" per message and "<|assistant|>\\n" as the generation prompt.
Used by tests/test_data.py and tests/test_tokenization.py; not run on its own.
"""

from __future__ import annotations

from functools import lru_cache

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "the cat sat on the mat and the dog ran on the rug",
    "Human: what is two plus two? Assistant: it is four, a small number",
    "good answer, bad answer, yes no maybe hello world question",
]


@lru_cache(maxsize=None)
def _trained_bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer.to_str()


def build_bpe_tokenizer(*, with_bos: bool = True, with_pad: bool = False, with_eos: bool = True,
                        chat_template: str | None = CHAT_TEMPLATE):
    """A fresh transformers fast tokenizer (a new object each call, so tests may mutate it)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_trained_bpe_json())
    if with_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>" if with_bos else None,
        eos_token="</s>" if with_eos else None,
        pad_token="<pad>" if with_pad else None,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped
