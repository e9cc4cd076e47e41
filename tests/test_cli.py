"""The `dpo` command line: any causal LM + any pair layout trains from configs/quickstart.yaml with `--set` only.

Tiny Llama-, GPT-2- and Qwen2-shaped models (save_pretrained) train 3 steps on pairs in each of the three
layouts; bad data and bad config exit with status 2 and write nothing; `check`, `sft` and `demo-assets` work.
`orchestrator.cli.main` runs in-process; one test runs the real `dpo` console script in a subprocess.
Run: `python -m pytest tests/test_cli.py -q` (about half a minute on 2 CPU cores; `-m "not integration"`
skips the runs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.cli.main import EXIT_BAD_INPUT, main
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"
ARCHITECTURES = ["llama", "gpt2", "qwen2"]
LAYOUTS = ["explicit", "conversational", "implicit_prompt"]
TRAIN_PAIRS, EVAL_PAIRS = 12, 8


@pytest.fixture(scope="module", autouse=True)
def _demo_cache_for_module(demo_cache) -> Path:
    return demo_cache


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Model folders per architecture (plus a pad-less Llama) and train/eval pair files per layout."""
    root = tmp_path_factory.mktemp("cli-world")
    models = {architecture: str(build_model_dir(root / architecture, architecture)) for architecture in ARCHITECTURES}
    models["llama-no-pad"] = str(build_model_dir(root / "llama-no-pad", "llama", with_pad=False))
    pairs = {
        layout: (str(write_jsonl(root / f"{layout}-train.jsonl", pair_rows(layout, TRAIN_PAIRS, seed=1))),
                 str(write_jsonl(root / f"{layout}-eval.jsonl", pair_rows(layout, EVAL_PAIRS, seed=2))))
        for layout in LAYOUTS
    }
    return {"root": root, "models": models, "pairs": pairs}


def cli_args(command: str, model: str, train: str, eval_: str | None, output_dir: Path, *extra: str) -> list[str]:
    """`dpo <command> configs/quickstart.yaml --set ...` pointing everything at the test's files."""
    settings = {
        "model.path": model, "data.train": train, "data.eval": eval_ or "null", "data.sft_train": "null",
        "output_dir": str(output_dir), "reference.cache_dir": str(output_dir.parent / "reference-cache"),
        "train.max_steps": "3", "train.batch_size": "4", "train.eval_every": "3", "train.eval_batch_size": "8",
        "train.device": "cpu",
    }
    args = [command, str(QUICKSTART)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    for override in extra:
        args += ["--set", override]
    return args


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_nothing_written(output_dir: Path) -> None:
    assert not output_dir.exists(), f"{output_dir} was created: {sorted(p.name for p in output_dir.rglob('*'))}"
    assert not (output_dir.parent / "reference-cache").exists()


# ---- acceptance: every architecture x every layout --------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_any_model_and_layout_trains_with_overrides_only(world, tmp_path, architecture, layout):
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "run"
    train, eval_ = world["pairs"][layout]
    assert main(cli_args("train", world["models"][architecture], train, eval_, output_dir)) == 0

    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == [1, 3]  # step 1 always, then the last step
    first, last = records[0], records[-1]
    assert abs(first["train/loss"] - math.log(2)) < 1e-4  # policy == reference at the start
    for key in ("train/loss", "train/preference_accuracy", "train/reward_margin", "train/kl", "train/lr"):
        assert math.isfinite(last[key]), key
    for key in ("eval/loss", "eval/preference_accuracy", "eval/reward_margin"):
        assert math.isfinite(last[key]), key
    assert (output_dir / "config.yaml").is_file()

    checkpoint = Path(last["checkpoint"])
    assert checkpoint.parent == output_dir / "checkpoints"
    trained = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    base = AutoModelForCausalLM.from_pretrained(world["models"][architecture])
    assert trained.config.model_type == architecture
    base_weights = base.state_dict()
    assert any(not torch.equal(value, base_weights[name]) for name, value in trained.state_dict().items())


@pytest.mark.integration
def test_tokenizer_without_pad_token_trains_with_eos_as_pad(world, tmp_path):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(world["models"]["llama-no-pad"]).pad_token is None
    output_dir = tmp_path / "run"
    train, eval_ = world["pairs"]["explicit"]
    assert main(cli_args("train", world["models"]["llama-no-pad"], train, eval_, output_dir)) == 0
    records = read_metrics(output_dir)
    assert abs(records[0]["train/loss"] - math.log(2)) < 1e-4
    assert math.isfinite(records[-1]["eval/loss"])
    saved = AutoTokenizer.from_pretrained(Path(records[-1]["checkpoint"]) / "model")
    assert saved.pad_token == saved.eos_token == "</s>"


# ---- bad input: exit 2, a message that says where, nothing written -----------------------------

@pytest.mark.integration
@pytest.mark.parametrize(
    "bad_row, field",
    [({"prompt": "question cat", "chosen": "", "rejected": "bad no"}, "chosen"),
     ({"prompt": "question cat", "chosen": "good yes"}, "rejected")],
    ids=["empty-chosen", "missing-rejected"],
)
def test_bad_pair_row_exits_2_naming_file_row_and_field(world, tmp_path, capsys, bad_row, field):
    rows = pair_rows("explicit", TRAIN_PAIRS, seed=1)
    rows[5] = bad_row
    train = write_jsonl(tmp_path / "broken-pairs.jsonl", rows)
    output_dir = tmp_path / "run"
    code = main(cli_args("train", world["models"]["llama"], str(train), world["pairs"]["explicit"][1], output_dir))
    assert code == EXIT_BAD_INPUT == 2
    error = capsys.readouterr().err
    assert str(train) in error
    problem = next(line for line in error.splitlines() if "row 5" in line)
    assert f"'{field}'" in problem
    assert_nothing_written(output_dir)


@pytest.mark.parametrize(
    "override, named",
    [("dpo.betta=0.2", "dpo.betta: unknown key"), ("learning_rate=0.1", "learning_rate: unknown key"),
     ("dpo.beta=0", "dpo.beta"), ("model.path=/no/such/model", "model.path")],
)
def test_bad_config_exits_2_naming_the_key_and_writes_nothing(world, tmp_path, capsys, override, named):
    output_dir = tmp_path / "run"
    train, eval_ = world["pairs"]["explicit"]
    assert main(cli_args("train", world["models"]["llama"], train, eval_, output_dir, override)) == 2
    captured = capsys.readouterr()
    assert named in captured.err and str(QUICKSTART) in captured.err
    assert "Traceback" not in captured.err
    assert_nothing_written(output_dir)


@pytest.mark.integration
def test_dpo_console_script_exits_2_on_bad_config(tmp_path, demo_cache):
    """The real installed `dpo` script: the exit status reaches the shell and stderr names the key."""
    executable = shutil.which("dpo")
    command = [executable] if executable else [sys.executable, "-m", "orchestrator"]
    output_dir = tmp_path / "run"
    result = subprocess.run(
        command + ["train", str(QUICKSTART), "--set", "dpo.betta=0.2", "--set", f"output_dir={output_dir}"],
        cwd=tmp_path, env={**os.environ, "DPO_DEMO_CACHE": str(demo_cache)}, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "dpo.betta: unknown key" in result.stderr
    assert not output_dir.exists() and not (tmp_path / "outputs").exists()


# ---- the other commands -------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_prints_pair_counts_and_writes_nothing(world, tmp_path, capsys, layout):
    output_dir = tmp_path / "run"
    train, eval_ = world["pairs"][layout]
    assert main(cli_args("check", world["models"]["llama"], train, eval_, output_dir)) == 0
    assert f"ok: {TRAIN_PAIRS} training pairs, {EVAL_PAIRS} held-out pairs" in capsys.readouterr().out
    assert_nothing_written(output_dir)


@pytest.mark.integration
def test_sft_trains_on_prompt_completion_file(world, tmp_path):
    from transformers import AutoModelForCausalLM

    examples = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in pair_rows("explicit", 12, seed=3)]
    sft_train = write_jsonl(tmp_path / "sft-train.jsonl", examples[:8])
    sft_eval = write_jsonl(tmp_path / "sft-eval.jsonl", examples[8:])
    output_dir = tmp_path / "sft-run"
    train, eval_ = world["pairs"]["explicit"]
    args = cli_args("sft", world["models"]["gpt2"], train, eval_, output_dir,
                    f"data.sft_train={sft_train}", f"data.sft_eval={sft_eval}", "train.learning_rate=1.0e-2",
                    "train.warmup_steps=0")
    assert main(args) == 0
    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == [1, 3]
    assert records[-1]["train/loss"] < records[0]["train/loss"]  # 3 steps at a high rate on 8 examples
    assert math.isfinite(records[-1]["eval/loss"]) and records[-1]["eval/perplexity"] > 1
    checkpoint = Path(records[-1]["checkpoint"]) / "model"
    assert AutoModelForCausalLM.from_pretrained(checkpoint).config.model_type == "gpt2"


def test_sft_without_sft_data_exits_2_naming_the_key(world, tmp_path, capsys):
    output_dir = tmp_path / "run"
    train, eval_ = world["pairs"]["explicit"]
    assert main(cli_args("sft", world["models"]["llama"], train, eval_, output_dir)) == 2
    assert "data.sft_train" in capsys.readouterr().err
    assert_nothing_written(output_dir)


@pytest.mark.integration
def test_demo_assets_prints_paths_inside_the_cache(demo_cache, capsys):
    assert main(["demo-assets"]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert {"model", "preference_train", "preference_eval", "sft_train"} <= set(printed)
    assert (Path(printed["model"]) / "config.json").is_file()
    for name, path in printed.items():
        assert Path(path).exists() and Path(path).is_relative_to(demo_cache), name


def test_export_prompt_is_the_first_held_out_prompt_rendered_with_the_chat_template(world, tmp_path):
    """Conversational eval data: the generation check's prompt is the first held-out prompt as training
    renders it (through the model's chat template), not the fallback (it used to be 'Hello' always)."""
    from orchestrator.cli.journey import first_held_out_prompt
    from orchestrator.config import load_config
    from orchestrator.config.spec import resolve_run
    from trainables.data import load_preference_pairs
    from trainables.entrypoints import tokenizer_for

    train, eval_ = world["pairs"]["conversational"]
    args = cli_args("check", world["models"]["llama"], train, eval_, tmp_path / "out", "data.layout=conversational")
    overrides = [value for flag, value in zip(args[2::2], args[3::2]) if flag == "--set"]
    config = load_config(QUICKSTART, overrides)

    prompt = first_held_out_prompt(config, default="FALLBACK")

    spec = resolve_run(config)
    expected = load_preference_pairs(eval_, layout="conversational", chat_template_tokenizer=tokenizer_for(spec.model))[0]
    assert prompt != "FALLBACK" and prompt == expected.prompt
    first_user_message = json.loads(Path(eval_).read_text().splitlines()[0])["prompt"][0]["content"]
    assert first_user_message in prompt


def test_check_also_reads_the_sft_examples_and_refuses_a_bad_one(world, tmp_path, capsys):
    """`dpo check` validates data.sft_train as `dpo sft` reads it: a good file is counted, a row without a
    completion is refused naming the file, the line and the field, before any training."""
    examples = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in pair_rows("explicit", 6, seed=4)]
    good = write_jsonl(tmp_path / "sft-good.jsonl", examples)
    bad = write_jsonl(tmp_path / "sft-bad.jsonl", [*examples[:3], {"prompt": "p", "completion": ""}, *examples[3:]])
    train, eval_ = world["pairs"]["explicit"]
    output_dir = tmp_path / "never-written"

    assert main(cli_args("check", world["models"]["llama"], train, eval_, output_dir, f"data.sft_train={good}")) == 0
    assert "6 SFT examples" in capsys.readouterr().out

    assert main(cli_args("check", world["models"]["llama"], train, eval_, output_dir, f"data.sft_train={bad}")) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and "(line 4)" in error and "completion" in error, error
    assert_nothing_written(output_dir)
