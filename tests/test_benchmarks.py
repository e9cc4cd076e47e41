"""The benchmark harness on inputs with known answers: scripted models whose every output is known.

`ScriptedLM` puts a logit of 30 on the next token of a script (prompt ids -> answer ids, then eos) and
0 everywhere else, so its greedy answers, log-probs and perplexity are known exactly: it answers the
scripted prompts perfectly, and with no script it is the uniform model (perplexity = vocabulary size).
The tokenizer and data are the embedded task's, at a small size, written under pytest's tmp folders.
Run: `python -m pytest tests/test_benchmarks.py -q` (about 30 s on 2 CPU cores; the lm-evaluation-harness
test is skipped without the `lmeval` extra).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.workflows.demo_assets import build_tokenizer
from trainables import synthetic_task
from trainables.benchmarks import ComparisonModels, build_benchmark, run_benchmarks
from trainables.benchmarks.base import evaluate_model
from trainables.benchmarks.generation import greedy_generate, tokenize_prompts
from trainables.benchmarks.judges import ProgramJudge, RewardModelJudge, win_rate

SIZES = {"preference_train": 40, "preference_eval": 12, "sft_train": 40, "benchmark": 12, "general_text": 8}
SCRIPT_LOGIT = 30.0


class ScriptedLM(torch.nn.Module):
    """Greedy-decodes each script's answer after its prompt, then eos; uniform everywhere else."""

    def __init__(self, vocab_size: int, eos_token_id: int, scripts: list[tuple[tuple[int, ...], list[int]]] = ()):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.vocab_size, self.eos_token_id, self.scripts = vocab_size, eos_token_id, list(scripts)

    def next_token(self, prefix: tuple[int, ...]) -> int | None:
        for prompt, answer in self.scripts:
            produced, script = list(prefix[len(prompt):]), list(answer) + [self.eos_token_id]
            if prefix[:len(prompt)] == prompt and len(produced) < len(script) and produced == script[:len(produced)]:
                return script[len(produced)]
        return None

    def forward(self, input_ids, attention_mask=None, **unused):
        rows, length = input_ids.shape
        logits = torch.zeros(rows, length, self.vocab_size)  # (rows, seq, vocab)
        for row in range(rows):
            real = [t for t in range(length) if attention_mask is None or attention_mask[row, t]]
            tokens = tuple(input_ids[row, t].item() for t in real)
            for index, position in enumerate(real):
                token = self.next_token(tokens[:index + 1])
                if token is not None:
                    logits[row, position, token] = SCRIPT_LOGIT
        return SimpleNamespace(logits=logits, past_key_values=None)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> SimpleNamespace:
    """The embedded task at a small size: tokenizer, splits, and their JSONL files."""
    root = tmp_path_factory.mktemp("bench-task")
    splits = synthetic_task.build_splits(0, SIZES)
    files = {}
    for name, rows in splits.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = build_tokenizer(splits)
    return SimpleNamespace(splits=splits, files={k: str(v) for k, v in files.items()}, tokenizer=tokenizer, root=root)


def answer_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scripted(task, answers: dict[str, str]) -> ScriptedLM:
    """A model answering each prompt (chat-rendered text) with the given answer text."""
    prompts = list(answers)
    scripts = [(tuple(ids), answer_ids(task.tokenizer, answers[p])) for p, ids in zip(prompts, tokenize_prompts(task.tokenizer, prompts))]
    return ScriptedLM(len(task.tokenizer), task.tokenizer.eos_token_id, scripts)


def oracle(task) -> ScriptedLM:
    """Answers every benchmark and preference prompt correctly (synthetic_task.solve)."""
    prompts = [row["prompt"] for split in ("benchmark", "preference_eval") for row in task.splits[split]]
    return scripted(task, {prompt: synthetic_task.solve(prompt) for prompt in prompts})


def silent(task) -> ScriptedLM:
    """Ends every answer at once (eos first): an empty answer to every prompt."""
    prompts = [row["prompt"] for row in task.splits["benchmark"]]
    return scripted(task, {prompt: "" for prompt in prompts})


def uniform(task) -> ScriptedLM:
    return ScriptedLM(len(task.tokenizer), task.tokenizer.eos_token_id)


def score(task, settings: dict, model, comparisons: dict | None = None) -> float:
    """One benchmark's score; comparisons: role (start, base) -> model."""
    models = comparisons or {}
    benchmark = build_benchmark({"name": "b", **settings})
    pool = ComparisonModels({role: role for role in models}, lambda role: models[role])
    return run_benchmarks([benchmark], model, task.tokenizer, pool)["b"]


# ---- exact match -----------------------------------------------------------------------------------

def test_exact_match_is_1_for_the_right_answers_0_for_none_and_one_half_for_half(task):
    settings = {"kind": "exact_match", "data": task.files["benchmark"], "max_new_tokens": 16, "batch_size": 5}
    assert score(task, settings, oracle(task)) == 1.0
    assert score(task, settings, silent(task)) == 0.0
    rows = task.splits["benchmark"]
    half = {row["prompt"]: row["answer"] if index % 2 == 0 else "= 0 ." for index, row in enumerate(rows)}
    assert score(task, settings, scripted(task, half)) == 0.5
    assert score(task, {**settings, "limit": 1}, scripted(task, half)) == 1.0


# ---- win rate ----------------------------------------------------------------------------------------

def test_win_rate_under_the_program_judge(task):
    settings = {"kind": "win_rate", "data": task.files["benchmark"], "against": "start", "max_new_tokens": 16}
    assert score(task, settings, oracle(task), {"start": silent(task)}) == 1.0
    assert score(task, settings, silent(task), {"start": oracle(task)}) == 0.0
    assert score(task, settings, oracle(task), {"start": oracle(task)}) == 0.5  # every prompt a tie
    assert win_rate([1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.2]) == 0.5
    judge = ProgramJudge()
    prompt = task.splits["benchmark"][0]["prompt"]
    assert judge.scores([prompt, prompt], [synthetic_task.solve(prompt), "no answer"]) == [1.0, 0.0]


@pytest.fixture(scope="module")
def reward_model_dir(task) -> Path:
    """A tiny random LlamaForSequenceClassification (num_labels=1) with the task's tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    directory = task.root / "reward-model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(task.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=task.tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    task.tokenizer.save_pretrained(directory)
    return directory


def test_reward_model_judge_scores_like_one_text_at_a_time_and_ties_itself(task, reward_model_dir):
    judge = RewardModelJudge(str(reward_model_dir), batch_size=4)
    rows = task.splits["benchmark"][:6]
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] if i % 2 else "= 1 ." for i, r in enumerate(rows)]
    batched = judge.scores(prompts, answers)
    one_by_one = [judge.scores([p], [a])[0] for p, a in zip(prompts, answers)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)  # padding changes nothing
    assert len(set(round(s, 6) for s in batched)) > 1  # and the scores do depend on the text
    assert win_rate(batched, batched) == 0.5
    settings = {"kind": "win_rate", "data": task.files["benchmark"], "judge": "reward_model",
                "reward_model": str(reward_model_dir), "max_new_tokens": 8}
    assert score(task, settings, oracle(task), {"start": oracle(task)}) == 0.5


# ---- preference accuracy ------------------------------------------------------------------------------

def test_preference_accuracy_against_none_start_and_a_uniform_reference(task):
    settings = {"kind": "preference_accuracy", "data": task.files["preference_eval"], "max_length": 64}
    right = oracle(task)  # log pi(chosen) ~ 0, the rejected answer's wrong token costs ~30 nats
    assert score(task, {**settings, "reference": "none"}, right) == 1.0
    assert score(task, {**settings, "reference": "start"}, right, {"start": right}) == 0.5  # itself: every margin 0
    assert score(task, {**settings, "reference": "base"}, right, {"base": uniform(task)}) == 1.0
    assert score(task, {**settings, "reference": "start"}, uniform(task), {"start": right}) == 0.0


# ---- perplexity -------------------------------------------------------------------------------------

def test_perplexity_of_the_uniform_model_is_the_vocabulary_size_and_of_a_model_that_knows_the_text_1(task):
    settings = {"kind": "perplexity", "data": task.files["general_text"], "batch_size": 3}
    assert score(task, settings, uniform(task)) == pytest.approx(len(task.tokenizer), rel=1e-6)
    text = task.splits["general_text"][0]["text"]
    knows = ScriptedLM(len(task.tokenizer), task.tokenizer.eos_token_id,
                       [((task.tokenizer.bos_token_id,), answer_ids(task.tokenizer, text))])
    assert score(task, {**settings, "limit": 1}, knows) == pytest.approx(1.0, abs=1e-9)
    assert score(task, {**settings, "limit": 2}, knows) > 1.5  # the second text is not known


# ---- generation, loading, errors ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(task) -> Path:
    from orchestrator.workflows.demo_assets import build_model

    directory = task.root / "policy"
    build_model(task.tokenizer, seed=3).save_pretrained(directory, safe_serialization=True)
    task.tokenizer.save_pretrained(directory)
    return directory


def test_batched_left_padded_generation_equals_one_prompt_at_a_time_and_hf_generate(task, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = tokenize_prompts(task.tokenizer, [row["prompt"] for row in task.splits["benchmark"]])
    assert len({len(p) for p in prompts}) > 1  # different lengths, so batches are padded
    common = dict(pad_token_id=task.tokenizer.pad_token_id, eos_token_id=task.tokenizer.eos_token_id, max_new_tokens=8)
    batched = greedy_generate(model, prompts, batch_size=len(prompts), **common)
    single = [greedy_generate(model, [p], batch_size=1, **common)[0] for p in prompts]
    assert batched == single
    reference = model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False,
                               pad_token_id=task.tokenizer.pad_token_id)[0, len(prompts[0]):].tolist()
    eos = task.tokenizer.eos_token_id
    assert single[0] == (reference[:reference.index(eos)] if eos in reference else reference)


def test_evaluate_model_loads_the_model_and_scores_every_kind(task, tiny_model_dir):
    suite = [{"name": "exact", "kind": "exact_match", "data": task.files["benchmark"], "max_new_tokens": 8, "batch_size": 8},
             {"name": "wins", "kind": "win_rate", "data": task.files["benchmark"], "max_new_tokens": 8},
             {"name": "prefs", "kind": "preference_accuracy", "data": task.files["preference_eval"], "max_length": 64},
             {"name": "ppl", "kind": "perplexity", "data": task.files["general_text"]}]
    path = str(tiny_model_dir)
    scores = evaluate_model(path, suite, comparison_paths={"start": path, "base": path}, device="cpu", threads=1)
    assert set(scores) == {"exact", "wins", "prefs", "ppl"}
    assert scores["wins"] == 0.5 and scores["prefs"] == 0.5  # the model against itself
    assert scores["exact"] == 0.0 and 1 < scores["ppl"] < 10 * len(task.tokenizer)  # random weights


def test_bad_benchmark_data_and_settings_are_clear_errors(task, tmp_path):
    from trainables.benchmarks import check_benchmarks
    from trainables.data import InvalidDataError

    bad = tmp_path / "texts.jsonl"
    bad.write_text('{"text": "one two"}\n{"text": ""}\n{"words": "x"}\n')
    perplexity = build_benchmark({"name": "ppl", "kind": "perplexity", "data": str(bad)})
    with pytest.raises(InvalidDataError, match=r"(?s)row 1 \(line 2\), field 'text'.*row 2 \(line 3\), field 'text': missing"):
        check_benchmarks([perplexity], task.tokenizer)
    with pytest.raises(ValueError, match="unknown benchmark kind 'bleu'"):
        build_benchmark({"name": "x", "kind": "bleu"})
    with pytest.raises(ValueError, match="names must be unique"):
        run_benchmarks([perplexity, perplexity], uniform(task), task.tokenizer, ComparisonModels({}, lambda p: None))
    with pytest.raises(KeyError, match="no 'start' model"):
        score(task, {"kind": "win_rate", "data": task.files["benchmark"]}, uniform(task), {})


def test_a_python_factory_plugs_in_a_benchmark_of_ones_own(task):
    plugged = build_benchmark({"name": "mine", "kind": "python", "factory": f"{__name__}:constant_benchmark",
                               "options": {"value": 0.25}})
    assert run_benchmarks([plugged], uniform(task), task.tokenizer, ComparisonModels({}, lambda p: None)) == {"mine": 0.25}


def constant_benchmark(name: str, value: float):
    return SimpleNamespace(name=name, evaluate=lambda model, tokenizer, comparisons: value)


# ---- lm-evaluation-harness ----------------------------------------------------------------------------

def write_tasks(task, folder: Path) -> None:
    data = f"{task.files['benchmark']}"
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'hf-cache'}\n"
              "test_split: test\ndoc_to_text: \"{{prompt}}\"\n")
    (folder / "reverse_sort_choice.yaml").write_text(
        "task: reverse_sort_choice\n" + common + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{[answer, '= 0 .']}}\"\ndoc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "reverse_sort_generate.yaml").write_text(
        "task: reverse_sort_generate\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"</s>\"]\n  max_gen_toks: 16\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def test_lm_eval_harness_adapter_on_local_tasks_offline(task, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional `lmeval` extra")
    from trainables.benchmarks.lm_eval_adapter import loaded_model_lm

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(task, tmp_path)
    common = {"kind": "lm_eval", "include_path": str(tmp_path), "limit": 6}
    right, empty = oracle(task), silent(task)
    assert score(task, {**common, "task": "reverse_sort_choice", "metric": "acc,none"}, right) == 1.0
    assert score(task, {**common, "task": "reverse_sort_generate"}, right) == 1.0
    assert score(task, {**common, "task": "reverse_sort_generate"}, empty) == 0.0
    with pytest.raises(ValueError, match="has no metric 'f1'"):
        score(task, {**common, "task": "reverse_sort_choice", "metric": "f1"}, right)

    lm = loaded_model_lm(uniform(task), task.tokenizer)
    text = task.splits["general_text"][0]["text"]
    [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert rolling == pytest.approx(-len(answer_ids(task.tokenizer, text)) * math.log(len(task.tokenizer)), rel=1e-6)
