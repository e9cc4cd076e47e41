"""Tests for orchestrator/workflows/demo_assets.py: the embedded default model, tokenizer, data and SFT model
build locally, deterministically, load through the normal Hugging Face paths, and resolve from `demo:` names.

The base assets take a few seconds per build. The full SFT model (about a minute) is built once per test
session in the shared `demo_cache` (tests/conftest.py), which test_quickstart.py and test_console.py reuse;
its determinism is checked on 3-step SFT builds. Run: `python -m pytest tests/test_demo_assets.py -q`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.workflows.demo_assets import (
    DEMO_PREFIX,
    MARKER_FILE,
    SFT_MARKER_FILE,
    SFT_STEPS,
    DemoAssets,
    build_demo_assets,
    resolve_demo_path,
)
from trainables.synthetic_task import DEFAULT_SPLIT_SIZES, is_exact_match, render_prompt


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo_assets(cache_dir=tmp_path_factory.mktemp("demo-cache"), seed=0, sft_model=False)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_layout_is_under_the_cache_dir_and_names_every_split(assets: DemoAssets) -> None:
    assert assets.root.name == "demo-v2-seed0"
    assert (assets.model_dir / "model.safetensors").is_file()
    assert assets.sft_model_dir is None and not (assets.root / "sft_model").exists()  # only built when asked for
    assert set(assets.data_files) == set(DEFAULT_SPLIT_SIZES) | {"sft_eval"}
    assert all(path.suffix == ".jsonl" and path.is_file() for path in assets.data_files.values())
    assert not [path for path in assets.root.parent.iterdir() if path.name.startswith(".")], "staging dir left behind"


def test_same_seed_gives_byte_identical_files(assets: DemoAssets, tmp_path: Path) -> None:
    again = build_demo_assets(cache_dir=tmp_path, seed=0, sft_model=False)
    assert _file_bytes(again.root) == _file_bytes(assets.root)  # includes model.safetensors and the marker


def test_a_complete_copy_is_reused_and_a_broken_one_rebuilt(tmp_path: Path) -> None:
    first = build_demo_assets(cache_dir=tmp_path, seed=1, sft_model=False)
    weights = first.model_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert build_demo_assets(cache_dir=tmp_path, seed=1, sft_model=False).root == first.root
    assert weights.stat().st_mtime_ns == built_at  # reused, not rebuilt

    original = first.data_files["benchmark"].read_bytes()
    first.data_files["benchmark"].write_text("tampered\n")  # content no longer matches the marker's hash
    rebuilt = build_demo_assets(cache_dir=tmp_path, seed=1, sft_model=False)
    assert rebuilt.data_files["benchmark"].read_bytes() == original
    marker = json.loads((rebuilt.root / MARKER_FILE).read_text())
    assert marker["seed"] == 1 and len(marker["content_sha256"]) == 64


def test_model_loads_with_auto_classes_and_is_small(assets: DemoAssets) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 1_000_000 <= parameters <= 10_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    input_ids = tokenizer(render_prompt("sort: 3 1 2"), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits  # (1, seq, vocab)
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))


def test_tokenizer_renders_the_chat_template_and_round_trips(assets: DemoAssets) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    user_text = "reverse: 3 7 1 4"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == render_prompt(user_text)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    for text in (user_text, "= 4 1 7 3 .", "3 plus 4 is 7 ."):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(prompt_ids) == [
        "<s>", "<|user|>", "reverse:", "3", "7", "1", "4", "<|assistant|>"
    ]
    answer_ids = tokenizer("= 4 1 7 3 .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert is_exact_match(user_text, tokenizer.decode(answer_ids, skip_special_tokens=True))


def test_every_data_file_loads_with_datasets_and_is_fully_in_vocabulary(assets: DemoAssets) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    for split, path in assets.data_files.items():
        rows = load_dataset("json", data_files=str(path), split="train")
        assert len(rows) == DEFAULT_SPLIT_SIZES.get(split, DEFAULT_SPLIT_SIZES["preference_eval"]), split
        for column in rows.column_names:
            ids = tokenizer(list(rows[column][:50]), add_special_tokens=False)["input_ids"]
            assert all(tokenizer.unk_token_id not in row for row in ids), f"{split}.{column} has unknown tokens"


def test_longest_pair_fits_the_model_context(assets: DemoAssets) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    rows = [json.loads(line) for line in assets.data_files["preference_train"].read_text().splitlines()]
    longest = max(
        len(tokenizer(row["prompt"] + row["rejected"], add_special_tokens=False)["input_ids"]) + 1 for row in rows
    )
    assert longest <= 32
    assert AutoModelForCausalLM.from_pretrained(assets.model_dir).config.max_position_embeddings >= longest


def test_resolve_demo_path(assets: DemoAssets) -> None:
    cache = assets.root.parent
    assert resolve_demo_path(DEMO_PREFIX + "model", cache_dir=cache) == str(assets.model_dir)
    assert resolve_demo_path("demo:preference_train", cache_dir=cache) == str(assets.data_files["preference_train"])
    assert resolve_demo_path("demo:benchmark", cache_dir=cache) == str(assets.data_files["benchmark"])
    assert resolve_demo_path("/models/my-llama", cache_dir=cache) == "/models/my-llama"
    assert resolve_demo_path("meta-llama/Llama-3.2-1B", cache_dir=cache) == "meta-llama/Llama-3.2-1B"
    with pytest.raises(ValueError, match="unknown demo asset 'demo:preference_tain'.*demo:sft_model.*demo:preference_train"):
        resolve_demo_path("demo:preference_tain", cache_dir=cache)


def test_cache_dir_defaults_to_the_environment_variable(
    assets: DemoAssets, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPO_DEMO_CACHE", str(assets.root.parent))
    assert build_demo_assets(seed=0, sft_model=False).root == assets.root
    assert resolve_demo_path("demo:model") == str(assets.model_dir)


# ---- the SFT model -------------------------------------------------------------------------------

def _greedy_answers(model_dir: Path, prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainables.benchmarks.generation import generate_texts

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    return generate_texts(model.eval(), tokenizer, prompts, max_new_tokens=16, batch_size=len(prompts))


@pytest.mark.integration
def test_sft_model_is_trained_by_the_sft_engine_and_answers_the_task(demo_cache: Path) -> None:
    """`demo:sft_model`: `dpo sft`'s engine ran SFT_STEPS steps on sft_train; the model writes right answers
    to held-out benchmark prompts that the random-init model it started from cannot answer."""
    full = build_demo_assets()  # the session's copy (about a minute the first time), shared with other modules
    assert full.root.parent == demo_cache and full.sft_model_dir == full.root / "sft_model"
    assert resolve_demo_path("demo:sft_model") == str(full.sft_model_dir)
    record = json.loads((full.root / SFT_MARKER_FILE).read_text())
    assert record["trained_by"].startswith("trainables.entrypoints.run_sft") and record["stage"] == "sft"
    assert record["steps"] == SFT_STEPS and record["metrics"]["eval/loss"] < 0.1
    assert record["base_sha256"] == json.loads((full.root / MARKER_FILE).read_text())["content_sha256"]

    rows = [json.loads(line) for line in full.data_files["benchmark"].read_text().splitlines()[:20]]
    prompts = [row["prompt"] for row in rows]
    sft_right = sum(is_exact_match(p, a) for p, a in zip(prompts, _greedy_answers(full.sft_model_dir, prompts)))
    base_right = sum(is_exact_match(p, a) for p, a in zip(prompts, _greedy_answers(full.model_dir, prompts)))
    assert sft_right >= 15 and base_right == 0, (sft_right, base_right)  # 17 of these 20 at 300 SFT steps


def test_sft_model_is_deterministic_and_a_stale_one_is_retrained(tmp_path: Path) -> None:
    """Two caches, the same seed: byte-identical SFT models and markers (3 SFT steps keep it cheap). Adding the
    SFT model leaves the base assets valid; a tampered SFT model is retrained, the base assets kept."""
    first = build_demo_assets(cache_dir=tmp_path / "one", seed=0, sft_steps=3)
    # The second cache gets a copy of the base assets (their determinism is tested above): only SFT runs again.
    shutil.copytree(first.root, tmp_path / "two" / first.root.name,
                    ignore=shutil.ignore_patterns("sft_model", SFT_MARKER_FILE))
    second = build_demo_assets(cache_dir=tmp_path / "two", seed=0, sft_steps=3)
    assert _file_bytes(first.sft_model_dir) == _file_bytes(second.sft_model_dir)
    assert (first.root / SFT_MARKER_FILE).read_bytes() == (second.root / SFT_MARKER_FILE).read_bytes()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(_file_bytes(first.sft_model_dir))
    assert _file_bytes(first.sft_model_dir) != _file_bytes(first.model_dir)  # it trained

    base_weights = first.model_dir / "model.safetensors"
    base_built_at = base_weights.stat().st_mtime_ns
    original = (first.sft_model_dir / "model.safetensors").read_bytes()
    (first.sft_model_dir / "model.safetensors").write_bytes(original[:-8] + bytes(8))  # no longer the marker's
    again = build_demo_assets(cache_dir=tmp_path / "one", seed=0, sft_steps=3)
    assert (again.sft_model_dir / "model.safetensors").read_bytes() == original
    assert base_weights.stat().st_mtime_ns == base_built_at  # the base assets were not rebuilt
    assert not [path for path in (tmp_path / "one").iterdir() if path.name.startswith(".")], "staging dir left behind"
