"""The experiment config: unknown keys, bad values, missing paths, `--set` overrides, cross-field rules, demo: paths.

Nothing trains here; `demo:` assets are built once per module into a temporary DPO_DEMO_CACHE (never ~/.cache).
Run: `python -m pytest tests/test_config.py -q` (a few seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import ConfigError, load_config
from orchestrator.config.loading import parse_override
from orchestrator.config.spec import flatten, resolve_run

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module", autouse=True)
def _demo_cache_for_module(demo_cache) -> Path:
    return demo_cache


@pytest.fixture(scope="module")
def demo_assets(demo_cache):
    from orchestrator.workflows.demo_assets import build_demo_assets

    return build_demo_assets()  # ~1 min the first time in a session (the SFT model); reused (hash-checked) after that


@pytest.fixture
def local_world(tmp_path) -> dict[str, str]:
    """An existing model folder and pair file: load_config only checks that they exist."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return {"model": str(model_dir), "train": str(train), "root": str(tmp_path)}


def write_config(directory: str | Path, raw: dict[str, Any]) -> Path:
    path = Path(directory) / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def minimal_raw(world: dict[str, str], **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": "unit", "model": {"path": world["model"]}, "data": {"train": world["train"]}}
    raw.update(sections)
    return raw


def load(world: dict[str, str], overrides: list[str] | None = None, **sections: Any):
    return load_config(write_config(world["root"], minimal_raw(world, **sections)), overrides)


def config_error(world: dict[str, str], overrides: list[str] | None = None, **sections: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(world, overrides, **sections)
    return str(caught.value)


# ---- unknown keys and bad values -------------------------------------------------------------

def test_minimal_config_loads_with_documented_defaults(local_world):
    config = load(local_world)
    assert config.model.path == local_world["model"]
    assert config.dpo.beta == 0.1 and config.dpo.kl_weight == 0.0 and config.reference.mode == "precomputed"


def test_unknown_top_level_key_is_named(local_world):
    message = config_error(local_world, learning_rate=1e-3)
    assert "learning_rate: unknown key" in message
    assert "experiment.yaml" in message  # the file is named too


def test_unknown_nested_key_is_named_with_its_section(local_world):
    message = config_error(local_world, dpo={"betta": 0.2})
    assert "dpo.betta: unknown key" in message


def test_every_bad_key_is_reported_at_once(local_world):
    message = config_error(local_world, dpo={"betta": 0.2}, train={"learning_rate": -1.0})
    assert "dpo.betta" in message and "train.learning_rate" in message


@pytest.mark.parametrize(
    "override, key, shown",
    [("dpo.beta=0", "dpo.beta", "0"), ("dpo.beta=-0.5", "dpo.beta", "-0.5"),
     ("train.learning_rate=0", "train.learning_rate", "0"),
     ("train.learning_rate=-1.0e-4", "train.learning_rate", "-0.0001"),
     ("data.max_length=1", "data.max_length", "1"), ("data.max_length=0", "data.max_length", "0")],
)
def test_out_of_range_values_name_the_key_and_the_value(local_world, override, key, shown):
    message = config_error(local_world, [override])
    line = next(line for line in message.splitlines() if line.strip().startswith(f"{key}:"))
    assert f"(got {shown})" in line


def test_smallest_valid_values_are_accepted(local_world):
    config = load(local_world, ["dpo.beta=0.001", "train.learning_rate=1.0e-8", "data.max_length=2"])
    assert (config.dpo.beta, config.train.learning_rate, config.data.max_length) == (0.001, 1e-8, 2)


def test_missing_or_broken_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)


# ---- paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model.path", "data.train", "data.eval", "model.tokenizer_path", "reference.path"])
def test_missing_local_path_names_the_key(local_world, key):
    missing = str(Path(local_world["root"]) / "not-there" / "thing.jsonl")
    message = config_error(local_world, [f"{key}={missing}"])
    assert f"{key}: {missing!r} does not exist" in message


def test_all_missing_paths_are_reported_together(local_world):
    message = config_error(local_world, ["model.path=./no-such-model", "data.train=no-such-pairs.jsonl"])
    assert "model.path" in message and "data.train" in message


def test_hub_names_are_accepted_without_a_local_check(local_world):
    config = load(local_world, ["model.path=my-org/my-model", "data.train=my-org/preference-pairs",
                                "data.eval=other-org/heldout"])
    assert config.model.path == "my-org/my-model"
    assert (config.data.train, config.data.eval) == ("my-org/preference-pairs", "other-org/heldout")


# ---- --set overrides --------------------------------------------------------------------------

def test_parse_override_reads_the_value_as_yaml():
    assert parse_override("dpo.beta=0.2") == (["dpo", "beta"], 0.2)
    assert parse_override("train.max_steps=7") == (["train", "max_steps"], 7)
    assert parse_override("sweep.beta=[0.1, 0.3]") == (["sweep", "beta"], [0.1, 0.3])
    assert parse_override("data.eval=null") == (["data", "eval"], None)
    assert parse_override("model.path=a=b") == (["model", "path"], "a=b")  # only the first '=' splits


def test_overrides_set_numbers_lists_and_null_in_nested_sections(local_world):
    config = load(
        local_world,
        ["train.learning_rate=3.0e-4", "train.max_steps=7", "train.max_grad_norm=null", "data.max_length=96",
         "sweep.strategy=grid", "sweep.beta=[0.1, 0.2, 0.3]", "train.device=cpu"],
        train={"max_steps": 100, "max_grad_norm": 0.5},
    )
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.train.max_steps == 7 and config.train.max_grad_norm is None
    assert config.data.max_length == 96
    assert config.sweep.strategy == "grid" and config.sweep.beta == [0.1, 0.2, 0.3]  # section created by --set


def test_override_wins_over_the_file_and_can_clear_a_path(local_world):
    config = load(local_world, ["data.eval=null"], data={"train": local_world["train"], "eval": local_world["train"]})
    assert config.data.eval is None


def test_override_of_an_unknown_key_is_named(local_world):
    assert "trian: unknown key" in config_error(local_world, ["trian.max_steps=3"])  # the misspelt section


def test_malformed_overrides_are_config_errors(local_world):
    with pytest.raises(ConfigError, match="expected key=value"):
        load(local_world, ["dpo.beta"])
    with pytest.raises(ConfigError, match="not a section"):
        load(local_world, ["model.path.extra=1"])


# ---- cross-field rules ------------------------------------------------------------------------

def test_cdpo_needs_label_smoothing(local_world):
    message = config_error(local_world, ["dpo.loss=cdpo"])
    assert "dpo.label_smoothing" in message and "cdpo" in message


def test_cdpo_with_label_smoothing_below_half_is_accepted(local_world):
    config = load(local_world, ["dpo.loss=cdpo", "dpo.label_smoothing=0.1"])
    assert config.dpo.label_smoothing == 0.1


def test_cdpo_label_smoothing_of_half_or_more_is_rejected(local_world):
    assert "dpo.label_smoothing" in config_error(local_world, ["dpo.loss=cdpo", "dpo.label_smoothing=0.5"])


def test_label_smoothing_without_cdpo_is_rejected(local_world):
    message = config_error(local_world, ["dpo.loss=sigmoid", "dpo.label_smoothing=0.1"])
    assert "dpo.label_smoothing: only used by dpo.loss=cdpo" in message


def test_exact_kl_requires_a_live_reference(local_world):
    message = config_error(local_world, ["dpo.kl_estimator=exact"])
    assert "dpo.kl_estimator" in message and "reference.mode: live" in message
    assert load(local_world, ["dpo.kl_estimator=exact", "reference.mode=live"]).dpo.kl_estimator == "exact"


def test_kl_weight_needs_a_reference(local_world):
    assert "dpo.kl_weight" in config_error(local_world, ["dpo.kl_weight=0.1", "reference.mode=none"])
    assert load(local_world, ["dpo.kl_weight=0", "reference.mode=none"]).reference.mode == "none"
    assert load(local_world, ["dpo.kl_weight=0.1"]).dpo.kl_weight == 0.1  # precomputed reference: fine


def test_cross_field_errors_are_one_short_line_without_the_whole_config(local_world):
    message = config_error(local_world, ["dpo.kl_weight=0.1", "reference.mode=none"])
    problem_lines = message.splitlines()[1:]
    assert problem_lines == ["  dpo.kl_weight: must be 0 with reference.mode: none (there is no reference to stay close to)"]


# ---- defaults and flattening ------------------------------------------------------------------

def test_output_dir_defaults_to_outputs_slash_name(local_world):
    assert load(local_world, ["name=beta-sweep-1"]).output_dir == "outputs/beta-sweep-1"
    assert load(local_world, ["output_dir=/tmp/elsewhere"]).output_dir == "/tmp/elsewhere"


def test_name_that_cannot_name_a_folder_is_rejected(local_world):
    assert "name:" in config_error(local_world, ["name=../escape"])


def test_flatten_gives_dotted_leaf_keys(local_world):
    config = load(local_world, ["dpo.beta=0.3", "sweep.beta=[0.1, 0.2]"])
    flat = flatten(config.model_dump())
    assert flat["dpo.beta"] == 0.3 and flat["dpo.kl_weight"] == 0.0
    assert flat["train.learning_rate"] == config.train.learning_rate
    assert flat["model.path"] == local_world["model"] and flat["name"] == "unit"
    assert flat["sweep.beta"] == [0.1, 0.2]
    assert not any(isinstance(value, dict) and value for value in flat.values())
    assert "dpo" not in flat and "train" not in flat  # sections appear only through their leaves


def test_sft_arguments_need_sft_data(local_world):
    with pytest.raises(ConfigError, match="data.sft_train"):
        resolve_run(load(local_world), stage="sft")


# ---- demo: paths ------------------------------------------------------------------------------

def test_quickstart_demo_paths_resolve_into_the_demo_cache(demo_assets, demo_cache):
    config = load_config(QUICKSTART)
    assert config.model.path == str(demo_assets.sft_model_dir)  # the quickstart's DPO starts from the SFT model
    assert (Path(config.model.path) / "config.json").is_file()
    for value in (config.data.train, config.data.eval, config.data.sft_train):
        assert Path(value).is_file() and Path(value).is_relative_to(demo_cache)
    assert Path(config.data.train).name == "preference_train.jsonl"


def test_demo_paths_are_resolved_from_overrides_too(demo_assets, local_world):
    config = load(local_world, ["model.path=demo:model", "data.eval=demo:preference_eval"])
    assert config.model.path == str(demo_assets.model_dir)
    assert config.data.eval == str(demo_assets.data_files["preference_eval"])


def test_unknown_demo_name_is_a_config_error_listing_valid_names(demo_assets, local_world):
    with pytest.raises(ConfigError) as caught:
        load(local_world, ["data.train=demo:preference_trian"])
    message = str(caught.value)
    assert "data.train" in message and "demo:preference_trian" in message
    assert "demo:preference_train" in message  # the valid names are listed


def test_docs_config_reference_lists_every_key_as_the_typed_config_defines_it():
    """docs/configuration.md's "Config reference" is the generated table: a new or changed key without a docs update fails."""
    from orchestrator.config import ExperimentConfig
    from orchestrator.config.reference import config_reference_markdown, reference_rows

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert start in page and end in page, "docs/configuration.md lost its config-reference markers"
    documented = page.split(start, 1)[1].split(end, 1)[0]
    assert documented == config_reference_markdown(), "docs/configuration.md 'Config reference' is stale: dpo config-reference"
    keys = {key for key, _, _ in reference_rows(ExperimentConfig)}
    assert {"dpo.beta", "dpo.kl_weight", "train.learning_rate", "sweep.strategy", "resources.num_workers",
            "tracking.uri", "study.arms", "benchmarks[].kind"} <= keys
    assert all(text for key, _, text in reference_rows(ExperimentConfig)), "a config field has no description"


def test_loading_resolving_and_the_config_reference_import_no_torch(tmp_path):
    """The config layer stays torch-free: a driver (or a laptop) can check a config without torch's import,
    and `dpo config-reference` starts fast. Run in a fresh interpreter so nothing imported earlier counts."""
    import subprocess
    import sys

    from tests.tiny_world import minimal_config_file

    config_file = minimal_config_file(tmp_path)
    code = (
        "import sys\n"
        "from orchestrator.config import load_config\n"
        "from orchestrator.config.spec import resolve_experiment, resolve_run\n"
        "from orchestrator.cli.main import main\n"
        f"config = load_config({str(config_file)!r}, ['sweep.strategy=grid', 'sweep.beta=[0.1, 0.2]'])\n"
        "resolve_run(config); resolve_experiment(config)\n"
        "assert main(['config-reference']) == 0\n"
        "print('TORCH', sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "TORCH []" in result.stdout, result.stdout.splitlines()[-1]
