"""Adversarial corpus, models, devices and the environment: every unusable model is refused by `dpo check`,
`dpo train` and `dpo sft` before any work (exit 2, one message naming the key and what is wrong, nothing
written), so what passes `check` does not fail at load; a corrupt reference cache is recomputed, never a traceback.

Inputs are RULES applied to the tiny world's models (tests/tiny_world.py): edits of config.json, of the
weight and tokenizer files, rebuilt models of another vocabulary, and `--set` overrides. The harness is
tests/adversarial.py. Run: `python -m pytest tests/test_adversarial_model.py -q` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.adversarial import SECRET, refused, run_cli
from tests.tiny_world import POSITIONS, build_model, build_model_dir, pair_rows, write_jsonl

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
COMMANDS = ["check", "train"]
Edit = Callable[[Path, dict], None]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A Llama- and a GPT-2-shaped model folder and explicit train/eval pair files, built once."""
    root = tmp_path_factory.mktemp("adversarial-model")
    return {"root": root, "llama": build_model_dir(root / "llama", "llama"), "gpt2": build_model_dir(root / "gpt2", "gpt2"),
            "train": write_jsonl(root / "train.jsonl", pair_rows("explicit", 8, seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", pair_rows("explicit", 4, seed=2))}


def argv(command: str, world: dict, model: Path, run: Path, *extra: str) -> list[str]:
    """`dpo COMMAND configs/quickstart.yaml --set ...` on the test's files, outputs under `run`."""
    settings = {"model.path": model, "data.train": world["train"], "data.eval": world["eval"], "data.sft_train": "null",
                "output_dir": run / "out", "reference.cache_dir": run / "cache", "train.max_steps": 1,
                "train.batch_size": 4, "train.eval_every": 1, "train.eval_batch_size": 4, "train.device": "cpu",
                "train.checkpoint_every": 1}
    args = [command, str(QUICKSTART)]
    for key, value in [*settings.items(), *(item.split("=", 1) for item in extra)]:
        args += ["--set", f"{key}={value}"]
    return args


def copy_of(world: dict, architecture: str, folder: Path, edit: Edit | None = None) -> Path:
    shutil.copytree(world[architecture], folder)
    if edit is not None:
        edit(folder, world)
    return folder


# ---- rules that break a model folder --------------------------------------------------------------

def set_config(**changes) -> Edit:
    """Set (or, with None, delete) keys of config.json."""
    def edit(folder: Path, world: dict) -> None:
        settings = json.loads((folder / "config.json").read_text())
        settings.update(changes)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    return edit


def write(name: str, content: bytes) -> Edit:
    return lambda folder, world: (folder / name).write_bytes(content)


def delete(*names: str) -> Edit:
    def edit(folder: Path, world: dict) -> None:
        for name in names:
            (folder / name).unlink()
    return edit


def truncate(name: str, keep: float) -> Edit:
    def edit(folder: Path, world: dict) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
    return edit


def sharded_without_a_shard(folder: Path, world: dict) -> None:
    """An index naming two shards, one of them missing."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))


def rebuilt(vocab_size: int) -> Edit:
    """The same architecture with another vocabulary size, its weights saved consistently."""
    def edit(folder: Path, world: dict) -> None:
        architecture = json.loads((folder / "config.json").read_text())["model_type"]
        build_model(folder, architecture, vocab_size)
    return edit


def weights_of(other: str) -> Edit:
    def edit(folder: Path, world: dict) -> None:
        shutil.copy(world[other] / "model.safetensors", folder / "model.safetensors")
    return edit


def tokenizer_with_more_tokens(count: int) -> Edit:
    def edit(folder: Path, world: dict) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(count)])
        tokenizer.save_pretrained(folder)
    return edit


def tokenizer_without_eos(folder: Path, world: dict) -> None:
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(eos_token=None, pad_token=None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def permuted_tokenizer(folder: Path, world: dict) -> None:
    """Same size, two ordinary words swap their ids."""
    settings = json.loads((folder / "tokenizer.json").read_text())
    vocab = settings["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    (folder / "tokenizer.json").write_text(json.dumps(settings))


def needs_its_own_code(folder: Path, world: dict) -> None:
    marker = folder / "code-ran"
    (folder / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                    "from transformers import PretrainedConfig\n"
                                                    "class Custom(PretrainedConfig):\n    model_type = 'custom'\n")
    set_config(model_type="custom", auto_map={"AutoConfig": "configuration_custom.Custom",
                                              "AutoModelForCausalLM": "configuration_custom.Custom"})(folder, world)


# (architecture, edit, extra --set, what the message names)
MODEL_FOLDERS = [
    pytest.param("llama", delete("config.json"), (), ["model.path", "config.json"], id="no-config-json"),
    pytest.param("llama", write("config.json", b'{"model_type": "llama", "token": "' + SECRET.encode() + b'",'),
                 (), ["model.path", "config.json"], id="config-json-cut-short-with-a-secret"),
    pytest.param("llama", write("config.json", b"\xff\xfe\x00not utf-8"), (), ["config.json"], id="config-json-not-utf8"),
    pytest.param("llama", write("config.json", b"[1, 2, 3]"), (), ["config.json", "model_type"], id="config-json-a-list"),
    pytest.param("llama", set_config(model_type=None), (), ["config.json", "model_type"], id="config-without-model-type"),
    pytest.param("llama", set_config(model_type="no-such-architecture"), (), ["model.path"], id="unknown-model-type"),
    pytest.param("llama", set_config(model_type="vit"), (), ["model.path", "causal"], id="not-a-causal-lm"),
    pytest.param("llama", set_config(vocab_size="many"), (), ["vocab_size"], id="vocab-size-not-a-number"),
    pytest.param("gpt2", set_config(n_positions=-1), (), ["n_positions"], id="negative-positions"),
    pytest.param("llama", set_config(vocab_size=10), (), ["model.path", "vocabulary"], id="config-vocab-below-tokenizer"),
    pytest.param("gpt2", set_config(vocab_size=7), (), ["model.path", "vocabulary"], id="gpt2-config-vocab-below-tokenizer"),
    pytest.param("llama", rebuilt(vocab_size=12), (), ["model.path", "vocabulary"], id="model-built-with-a-small-vocab"),
    pytest.param("llama", tokenizer_with_more_tokens(5), (), ["model.path", "vocabulary"], id="tokenizer-grew-model-did-not"),
    pytest.param("llama", set_config(vocab_size=64), (), ["model.path", "config.json"], id="config-vocab-above-weights"),
    pytest.param("llama", set_config(intermediate_size=48), (), ["model.path", "config.json"], id="config-sizes-not-the-weights"),
    pytest.param("llama", weights_of("gpt2"), (), ["model.path"], id="weights-of-another-architecture"),
    pytest.param("llama", set_config(max_position_embeddings=32), (), ["data.max_length", "32"], id="positions-below-max-length"),
    pytest.param("gpt2", set_config(n_positions=16), (), ["data.max_length", "16"], id="gpt2-learned-positions-below-max-length"),
    pytest.param("llama", delete("model.safetensors"), (), ["model.path", "safetensors"], id="no-weights"),
    pytest.param("llama", lambda f, w: (f / "model.safetensors").rename(f / "pytorch_model.bin"), (),
                 ["model.path", "safetensors"], id="pickled-weights-only"),
    pytest.param("llama", truncate("model.safetensors", 0.5), (), ["model.path", "model.safetensors"], id="weights-truncated"),
    pytest.param("llama", write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"), (),
                 ["model.path", "model.safetensors"], id="weights-garbage-header"),
    pytest.param("llama", sharded_without_a_shard, (), ["model.path", "model-00002-of-00002"], id="shard-missing"),
    pytest.param("llama", lambda f, w: (sharded_without_a_shard(f, w), write("model.safetensors.index.json", b"{}")(f, w)),
                 (), ["model.path", "model.safetensors.index.json"], id="shard-index-without-map"),
    pytest.param("llama", delete("tokenizer.json", "tokenizer_config.json"), (), ["model.path", "tokenizer"],
                 id="no-tokenizer-files"),
    pytest.param("llama", write("tokenizer.json", b'{"model": '), (), ["model.path", "tokenizer"], id="tokenizer-json-broken"),
    pytest.param("llama", tokenizer_without_eos, (), ["model.path", "eos"], id="tokenizer-without-eos-or-pad"),
    pytest.param("llama", needs_its_own_code, (), ["model.trust_remote_code"], id="model-ships-its-own-code"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("architecture, edit, extra, names", MODEL_FOLDERS)
def test_unusable_model_folder_is_refused_before_any_work(world, tmp_path, command, architecture, edit, extra, names):
    model = copy_of(world, architecture, tmp_path / "model", edit)
    refused(argv(command, world, model, tmp_path, *extra), names=names, untouched=[model, world["train"], world["eval"]],
            written_roots=[tmp_path / "out", tmp_path / "cache"], must_not_exist=[tmp_path / "out", tmp_path / "cache"])
    assert not (model / "code-ran").exists(), "code shipped with the model ran"


def test_model_path_that_is_a_file_is_refused(world, tmp_path):
    model = copy_of(world, "llama", tmp_path / "model")
    refused(argv("check", world, model / "config.json", tmp_path), names=["model.path"], untouched=[model])


# ---- the tokenizer, the data and the config against the model -------------------------------------

def unusable_device() -> list:
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = [pytest.param(f"cuda:{cuda}", id="cuda-index-past-the-last-gpu"), pytest.param(f"cuda:{cuda + 6}", id="cuda-7ish")]
    if cuda == 0:
        cases.append(pytest.param("cuda", id="cuda-without-a-gpu"))
    if not torch.backends.mps.is_available():
        cases.append(pytest.param("mps", id="mps-without-apple-gpu"))
    return cases


SETTINGS = [  # --set overrides that no model can train with, on a sound model
    pytest.param((f"data.max_length={POSITIONS + 1}",), ["data.max_length", str(POSITIONS)], id="max-length-one-past-positions"),
    pytest.param(("model.lora={r: 4, target_modules: [nosuch_proj]}",), ["model.lora.target_modules", "nosuch_proj"],
                 id="lora-target-matches-nothing"),
    pytest.param(("model.lora={r: 4, target_modules: 'nothing.*here'}",), ["model.lora.target_modules"],
                 id="lora-target-regex-matches-nothing"),
    pytest.param(("model.lora={r: 4, target_modules: [input_layernorm]}",), ["model.lora.target_modules"],
                 id="lora-target-not-a-layer-lora-supports"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("overrides, names", SETTINGS + [pytest.param((f"train.device={device.values[0]}",), ["train.device"],
                                                                      id=device.id) for device in unusable_device()])
def test_setting_the_model_cannot_train_with_is_refused(world, tmp_path, command, overrides, names):
    refused(argv(command, world, world["llama"], tmp_path, *overrides), names=names,
            untouched=[world["llama"]], written_roots=[tmp_path / "out", tmp_path / "cache"], must_not_exist=[tmp_path / "out", tmp_path / "cache"])


def test_max_length_equal_to_the_positions_passes_check(world, tmp_path):
    outcome = run_cli(argv("check", world, world["gpt2"], tmp_path, f"data.max_length={POSITIONS}"))
    assert outcome.code == 0, outcome.stderr
    assert outcome.stdout.startswith("ok: 8 training pairs, 4 held-out pairs, config quickstart")


def test_tokenizer_path_with_more_ids_than_the_model_is_refused(world, tmp_path):
    tokenizer = copy_of(world, "llama", tmp_path / "tokenizer", tokenizer_with_more_tokens(3))
    refused(argv("train", world, world["llama"], tmp_path, f"model.tokenizer_path={tokenizer}"),
            names=["model.tokenizer_path", "vocabulary"], must_not_exist=[tmp_path / "out", tmp_path / "cache"])


REFERENCES = [  # a reference.path model the policy's tokenizer does not fit
    pytest.param(set_config(vocab_size=10), ["reference.path", "vocabulary"], id="reference-vocab-below-tokenizer"),
    pytest.param(rebuilt(vocab_size=40), ["reference.path", "vocabulary"], id="reference-with-a-larger-vocab"),
    pytest.param(permuted_tokenizer, ["reference.path", "tokenizer"], id="reference-tokenizer-with-other-ids"),
    pytest.param(delete("config.json"), ["reference.path", "config.json"], id="reference-without-config"),
    pytest.param(set_config(max_position_embeddings=16), ["data.max_length", "reference.path"], id="reference-with-few-positions"),
]


@pytest.mark.parametrize("mode", ["precomputed", "live"])
@pytest.mark.parametrize("edit, names", REFERENCES)
def test_reference_model_that_does_not_fit_the_policy_is_refused(world, tmp_path, mode, edit, names):
    reference = copy_of(world, "llama", tmp_path / "reference", edit)
    for command in COMMANDS:
        refused(argv(command, world, world["llama"], tmp_path, f"reference.path={reference}", f"reference.mode={mode}"),
                names=names, untouched=[reference], must_not_exist=[tmp_path / "out", tmp_path / "cache"])


# ---- what is not refused -------------------------------------------------------------------------

@pytest.mark.skipif(__import__("transformers.utils", fromlist=["x"]).is_flash_attn_2_available(),
                    reason="flash-attn is installed here: nothing to fall back from")
def test_flash_attention_without_flash_attn_falls_back_to_sdpa_with_a_warning(world, tmp_path):
    for command in COMMANDS:
        outcome = run_cli(argv(command, world, world["llama"], tmp_path, "model.attn_implementation=flash_attention_2"))
        assert outcome.escaped is None and outcome.code == 0, outcome.everything
        assert "flash_attention_2" in outcome.logs and "sdpa" in outcome.logs
    assert (tmp_path / "out" / "metrics.jsonl").is_file()


def corrupt_header(path: Path) -> None:
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


def other_tensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"something_else": torch.zeros(3)}, str(path), metadata={"fingerprint": path.stem.split("-", 1)[1]})


def reshaped(transform: Callable[[dict], dict]) -> Callable[[Path], None]:
    """A valid safetensors file under the right fingerprint whose tensors `transform` changed."""
    def corrupt(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
        save_file(transform(tensors), str(path), metadata=metadata)
    return corrupt


CORRUPT_CACHES = [
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), id="cache-truncated"),
    pytest.param(lambda p: p.write_bytes(b""), id="cache-empty"),
    pytest.param(corrupt_header, id="cache-header-garbage"),
    pytest.param(other_tensors, id="cache-other-tensors"),
    pytest.param(reshaped(lambda t: {**t, "chosen_logps": t["chosen_logps"][:-1]}), id="cache-one-pair-short"),
    pytest.param(reshaped(lambda t: {**t, "chosen_offsets": t["chosen_offsets"] + 1}), id="cache-offsets-shifted"),
    pytest.param(reshaped(lambda t: {**t, "rejected_token_logps": t["rejected_token_logps"] * float("nan")}),
                 id="cache-not-finite"),
    pytest.param(reshaped(lambda t: {k: v.double() if v.is_floating_point() else v.int() for k, v in t.items()}),
                 id="cache-other-dtypes"),
]


def cache_contents(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a cache file: its bytes vary with the order safetensors writes the metadata in."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return metadata, {name: tensor.clone() for name, tensor in load_file(str(path)).items()}  # not mapped: it changes


@pytest.fixture(scope="module")
def filled_cache(world, tmp_path_factory) -> Path:
    """The reference cache folder of one successful run."""
    run = tmp_path_factory.mktemp("cache-run")
    outcome = run_cli(argv("train", world, world["llama"], run))
    assert outcome.code == 0, outcome.everything
    return run / "cache"


@pytest.mark.parametrize("corrupt", CORRUPT_CACHES)
def test_corrupt_reference_cache_is_recomputed_with_a_warning(world, filled_cache, tmp_path, corrupt):
    shutil.copytree(filled_cache, tmp_path / "cache")
    [cache_file] = (tmp_path / "cache").glob("reference-*.safetensors")
    original = cache_contents(cache_file)
    corrupt(cache_file)
    outcome = run_cli(argv("train", world, world["llama"], tmp_path))
    assert outcome.escaped is None and outcome.code == 0, outcome.everything
    assert f"reference cache {cache_file} is unusable" in outcome.logs and "recomputing" in outcome.logs
    recomputed = cache_contents(cache_file)
    assert recomputed[0] == original[0] and recomputed[1].keys() == original[1].keys(), "another cache was written"
    assert all(torch.equal(recomputed[1][name], original[1][name]) for name in original[1]), "other values recomputed"
    assert (tmp_path / "out" / "metrics.jsonl").is_file()


def test_sound_reference_cache_is_reused_without_a_warning(world, filled_cache, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    shutil.copytree(filled_cache, tmp_path / "cache")
    outcome = run_cli(argv("train", world, world["llama"], tmp_path))
    assert outcome.code == 0, outcome.everything
    assert "reusing reference log-probs" in outcome.logs and "unusable" not in outcome.logs


@pytest.mark.parametrize("edit, overrides, names", [
    pytest.param(delete("config.json"), (), ["model.path", "config.json"], id="sft-model-without-config"),
    pytest.param(set_config(max_position_embeddings=32), (), ["data.max_length"], id="sft-positions-below-max-length"),
    pytest.param(None, ("train.device=mps",) if not torch.backends.mps.is_available() else ("train.device=cuda:99",),
                 ["train.device"], id="sft-device-missing"),
])
def test_sft_runs_the_same_model_checks(world, tmp_path, edit, overrides, names):
    model = copy_of(world, "llama", tmp_path / "model", edit)
    examples = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in pair_rows("explicit", 6, seed=3)]
    sft_train = write_jsonl(tmp_path / "sft.jsonl", examples)
    refused(argv("sft", world, model, tmp_path, f"data.sft_train={sft_train}", *overrides), names=names,
            untouched=[model, sft_train], written_roots=[tmp_path / "out"], must_not_exist=[tmp_path / "out"])
