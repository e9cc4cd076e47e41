"""The built-in benchmarks: held-out preference accuracy, win rate, exact match, perplexity.

- `preference_accuracy`: share of held-out pairs whose implicit reward margin is positive,
  (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) > 0, with ref the `start` model
  (the DPO reference: for a DPO model this is its eval/preference_accuracy), the `base` model, or
  `none` (reference-free: log pi(y_w|x) > log pi(y_l|x)). A margin of exactly 0 counts one half, so a
  model measured against itself scores 0.5.
- `win_rate`: greedy answers of the model and of the `start` (or `base`) model to the same prompts,
  scored by a judge (judges.py); the share the model wins, ties one half.
- `exact_match`: greedy answers to prompt/answer rows from a local JSONL; the share equal to the answer
  once whitespace runs are collapsed.
- `perplexity`: exp of the mean negative log-likelihood per token of held-out texts (rows with a `text`
  field), each text scored after one BOS token (eos when there is no BOS); texts longer than max_length
  tokens are cut. Lower is better; a model that spreads probability evenly over V tokens scores V.
Data files are read and validated with the same loaders as training data (trainables/data.py).
Tested by `python -m pytest tests/test_benchmarks.py -q`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from trainables.benchmarks.base import ComparisonModels, register_benchmark
from trainables.benchmarks.generation import batches_by_length, continuation_logps, generate_texts
from trainables.benchmarks.judges import build_judge, win_rate
from trainables.data import InvalidDataError, load_preference_pairs, load_prompt_answers
from trainables.data_sources import RowProblem, read_rows
from trainables.logprobs import forward_logps, split_chosen_rejected
from trainables.tokenization import collate_pairs, tokenize_pairs


def _first(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def read_text_column(source: str, column: str) -> list[str]:
    """Every row's non-empty string `column` (e.g. `text` or `prompt`); every bad row is reported at once."""
    raw = read_rows(source)
    problems = list(raw.problems)
    values: list[str] = []
    for index, row in enumerate(raw.rows):
        if row is None:
            continue
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            reason = "missing" if column not in row else f"must be a non-empty string, got {value!r:.40}"
            problems.append(RowProblem(index, column, reason, raw.line_of(index)))
            continue
        values.append(value)
    if problems or not values:
        raise InvalidDataError(source, problems, "" if problems else "no rows",
                               f"every row needs a non-empty string '{column}' field")
    return values


@dataclass
class PreferenceAccuracy:
    name: str
    data: str  # preference pairs (any layout the training loader accepts)
    reference: str = "start"  # start | base | none
    limit: int | None = None
    max_length: int = 512
    batch_size: int = 32

    def pairs(self, tokenizer) -> list:
        pairs = _first(load_preference_pairs(self.data, chat_template_tokenizer=tokenizer), self.limit)
        return tokenize_pairs(pairs, tokenizer, self.max_length)

    def check(self, tokenizer) -> None:
        self.pairs(tokenizer)

    def evaluate(self, model, tokenizer, comparisons: ComparisonModels) -> float:
        pairs = self.pairs(tokenizer)
        policy_chosen, policy_rejected = sequence_logps(model, pairs, tokenizer.pad_token_id, self.batch_size)
        if self.reference == "none":
            reference_chosen = reference_rejected = torch.zeros_like(policy_chosen)
        else:
            reference_model = comparisons.model(self.reference)
            reference_chosen, reference_rejected = sequence_logps(reference_model, pairs, tokenizer.pad_token_id, self.batch_size)
        margins = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # (N,)
        return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


@torch.no_grad()
def sequence_logps(model, pairs, pad_token_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen|prompt) and log pi(rejected|prompt) of every pair: two (N,) float32 tensors."""
    device = next(model.parameters()).device
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for indices in batches_by_length([len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in indices], pad_token_id).items()}
        batch_chosen, batch_rejected = split_chosen_rejected(forward_logps(model, batch).sequence_logps)  # (B,), (B,)
        chosen[indices], rejected[indices] = batch_chosen.float().cpu(), batch_rejected.float().cpu()
    return chosen, rejected


@dataclass
class WinRate:
    name: str
    data: str  # rows with a `prompt` string (pair or prompt/answer files work as they are)
    against: str = "start"  # start | base
    judge: str = "program"  # program | reward_model
    reward_model: str | None = None
    limit: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 32

    def prompts(self) -> list[str]:
        return _first(read_text_column(self.data, "prompt"), self.limit)

    def check(self, tokenizer) -> None:
        self.prompts()

    def evaluate(self, model, tokenizer, comparisons: ComparisonModels) -> float:
        prompts = self.prompts()
        mine = generate_texts(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        theirs = generate_texts(comparisons.model(self.against), tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                                batch_size=self.batch_size)
        judge = build_judge(self.judge, reward_model=self.reward_model, device=next(model.parameters()).device)
        return win_rate(judge.scores(prompts, mine), judge.scores(prompts, theirs))


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


@dataclass
class ExactMatch:
    name: str
    data: str  # prompt + answer rows (`answer`, `completion` or `response`), or chat `messages`
    limit: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 32

    def examples(self, tokenizer) -> list:
        return _first(load_prompt_answers(self.data, chat_template_tokenizer=tokenizer), self.limit)

    def check(self, tokenizer) -> None:
        self.examples(tokenizer)

    def evaluate(self, model, tokenizer, comparisons: ComparisonModels) -> float:
        examples = self.examples(tokenizer)
        answers = generate_texts(model, tokenizer, [e.prompt for e in examples], max_new_tokens=self.max_new_tokens,
                                 batch_size=self.batch_size)
        right = sum(normalize_whitespace(given) == normalize_whitespace(e.answer) for given, e in zip(answers, examples))
        return right / len(examples)


@dataclass
class Perplexity:
    name: str
    data: str  # rows with a `text` string
    limit: int | None = None
    max_length: int = 512
    batch_size: int = 32
    cut_texts: int = field(default=0, init=False)  # how many texts the last evaluation cut to max_length

    def texts(self) -> list[str]:
        return _first(read_text_column(self.data, "text"), self.limit)

    def check(self, tokenizer) -> None:
        self.texts()

    def evaluate(self, model, tokenizer, comparisons: ComparisonModels) -> float:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError(f"benchmark {self.name}: the tokenizer has neither a BOS nor an EOS token to start texts with")
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in self.texts()]
        self.cut_texts = sum(len(ids) > self.max_length - 1 for ids in encoded)
        rows = [([prefix], ids[: self.max_length - 1]) for ids in encoded if ids]
        scored = continuation_logps(model, rows, pad_token_id=tokenizer.pad_token_id or 0, batch_size=self.batch_size)
        total_logp = sum(logp for logp, _ in scored)
        total_tokens = sum(len(target) for _, target in rows)
        return float(torch.exp(torch.tensor(-total_logp / total_tokens, dtype=torch.float64)))


for _kind, _class in (("preference_accuracy", PreferenceAccuracy), ("win_rate", WinRate),
                      ("exact_match", ExactMatch), ("perplexity", Perplexity)):
    register_benchmark(_kind, _class)

