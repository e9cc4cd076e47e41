"""`dpo study`: its config, stage configs, the table and deltas, and the whole pipeline on a real Ray and MLflow.

The pipeline test runs configs/quickstart-study.yaml shrunk to a few steps on a slice of the embedded
data (the DPO-only arm as a one-trial sweep, so both arm modes run), checks every stage's output, the
MLflow runs with their tags, bench/ metrics and deltas, then runs the study again and checks that
nothing is trained or recorded twice. It writes only under pytest's tmp folders and stops the Ray and
the MLflow server it starts.
Run: `python -m pytest tests/test_study.py -q --durations=5` (about 2 minutes on 2 CPU cores);
without Ray: `python -m pytest tests/test_study.py -m "not ray" -q`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import config as cfg
from orchestrator.cli.main import main
from orchestrator.config.layout import StorageLayout
from orchestrator.config.study_schema import arm_sections, sft_train_section
from orchestrator.workflows.study import (COMPLETE_FILE, STARTED_FILE, StudyTracking, _check_same_settings, run_study,
                                          stage_experiment, stage_fingerprint)
from orchestrator.workflows.study_records import bench_metrics, deltas, study_table

REPO = Path(__file__).resolve().parents[1]
STUDY_CONFIG = REPO / "configs/quickstart-study.yaml"
BENCHMARKS = ["exact_match", "preference_accuracy", "win_rate", "win_rate_vs_base", "perplexity"]


@pytest.fixture(autouse=True)
def demo_assets_in_tmp(demo_cache):
    """Every test here resolves demo: paths into the session's temporary demo cache."""


def load(tmp_path: Path, *overrides: str) -> cfg.ExperimentConfig:
    return cfg.load_config(STUDY_CONFIG, [f"storage_path={tmp_path / 'runs'}", f"output_dir={tmp_path / 'out'}", *overrides])


# ---- config, stage configs, table: no Ray ----------------------------------------------------------

def test_the_shipped_study_config_resolves_benchmarks_and_per_arm_overrides(tmp_path):
    config = load(tmp_path)
    assert [entry.name for entry in config.benchmarks] == BENCHMARKS
    assert all(Path(entry.data).is_file() for entry in config.benchmarks)  # demo: paths resolved
    assert sft_train_section(config)["learning_rate"] == 1e-3 and sft_train_section(config)["max_steps"] == 400
    after_sft, only = arm_sections(config, "sft_then_dpo"), arm_sections(config, "dpo_only")
    assert after_sft["train"]["learning_rate"] == 1e-4 and after_sft["dpo"]["beta"] == 0.5
    assert only["train"]["learning_rate"] == 1e-3 and only["dpo"]["beta"] == 0.2
    assert after_sft["train"]["max_steps"] == only["train"]["max_steps"] == 450  # what an arm does not override


@pytest.mark.parametrize("override, message", [
    ("study.sft_then_dpo.train.learning_rate=-1", r"study.sft_then_dpo.train.learning_rate: Input should be greater than 0"),
    ("study.dpo_only.dpo.betta=0.3", r"study.dpo_only.dpo.betta: unknown key"),
    ("study.sft.max_steps=0", r"study.sft.max_steps: Input should be greater than 0"),
    ("study.dpo_only.mode=grid", r"study.dpo_only.mode: Input should be 'fixed' or 'sweep'"),
    ("benchmarks.0={name: em, kind: exact_match, data: demo:benchmark, judge: program}", r"benchmarks.0.exact_match.judge: unknown key"),
    ("benchmarks.1={name: w, kind: win_rate, data: demo:benchmark, judge: reward_model}", r"reward_model: set it exactly when judge is reward_model"),
    ("benchmarks.1={name: exact_match, kind: perplexity, data: demo:general_text}", r"names must be unique.*exact_match"),
    ("benchmarks.0={name: em, kind: bleu, data: x.jsonl}", r"benchmarks.0: Input tag 'bleu' found using 'kind' does not match"),
])
def test_bad_study_overrides_and_benchmark_entries_are_config_errors(tmp_path, override, message):
    raw_list_override = override.startswith("benchmarks.")
    if raw_list_override:  # --set cannot index into a list: write the whole list with the bad entry
        import yaml

        raw = yaml.safe_load(STUDY_CONFIG.read_text())
        index, entry = override.split("=", 1)
        raw["benchmarks"][int(index.split(".")[1])] = yaml.safe_load(entry)
        source = tmp_path / "study.yaml"
        source.write_text(yaml.safe_dump(raw))
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.load_config(source)
        return
    with pytest.raises(cfg.ConfigError, match=message):
        load(tmp_path, override)
    assert main(["study", str(STUDY_CONFIG), "--set", f"storage_path={tmp_path}", "--set", override]) == 2


def test_each_stage_starts_from_and_is_referenced_to_the_model_before_it(tmp_path):
    config = load(tmp_path)
    root = tmp_path / "runs" / config.name
    layout = StorageLayout.of(str(tmp_path / "runs"), config.name)
    tracking = {"uri": "http://127.0.0.1:5000", "experiment": "quickstart-study"}
    sft = stage_experiment(config, "sft", config.model.path, layout, StudyTracking(**tracking))
    assert sft.model.path == config.model.path and sft.train.max_steps == 400 and sft.train.learning_rate == 1e-3
    arm = stage_experiment(config, "sft_then_dpo", str(root / "sft/model"), layout, StudyTracking(**tracking))
    assert arm.model.path == arm.reference.path == str(root / "sft/model")  # the reference is the SFT model
    assert (arm.dpo.beta, arm.train.learning_rate, arm.train.max_steps) == (0.5, 1e-4, 450)
    assert arm.name == "quickstart-study-sft_then_dpo" and arm.storage_path == str(root)
    assert arm.tracking.uri == tracking["uri"] and arm.tracking.experiment == "quickstart-study"
    assert arm.reference.cache_dir == str(root / "reference_cache")


def test_a_stage_fingerprint_follows_what_changes_its_model_and_nothing_else(tmp_path):
    def fingerprints(*overrides: str) -> tuple[str, str]:
        config = load(tmp_path, *overrides)
        layout = StorageLayout.of(str(tmp_path / "runs"), config.name)
        sft = stage_experiment(config, "sft", config.model.path, layout, None)
        arm = stage_experiment(config, "dpo_only", config.model.path, layout, None)
        return stage_fingerprint(sft, "sft", "fixed"), stage_fingerprint(arm, "dpo_only", "fixed")

    sft, dpo_only = fingerprints()
    assert fingerprints("dpo.beta=0.3") == (sft, fingerprints("dpo.beta=0.3")[1]) != (sft, dpo_only)
    assert fingerprints("train.eval_every=50", "train.log_every=5") == (sft, dpo_only)  # cadence changes no model
    assert fingerprints("study.sft.learning_rate=5.0e-4")[0] != sft
    assert fingerprints("study.dpo_only.train.max_steps=100") == (sft, fingerprints("train.max_steps=100")[1])


def test_a_stage_started_with_other_settings_is_refused(tmp_path):
    stage = tmp_path / "sft"
    stage.mkdir()
    _check_same_settings(stage, "abc")  # nothing recorded yet
    (stage / STARTED_FILE).write_text('{"fingerprint": "abc"}')
    _check_same_settings(stage, "abc")
    with pytest.raises(cfg.ConfigError, match=r"stage sft .* was run with other settings .*new `name`"):
        _check_same_settings(stage, "def")
    (stage / COMPLETE_FILE).write_text('{"fingerprint": "xyz"}')
    with pytest.raises(cfg.ConfigError, match="fingerprint xyz"):
        _check_same_settings(stage, "abc")


def test_resume_without_an_earlier_study_is_an_error(tmp_path):
    with pytest.raises(cfg.ConfigError, match="--resume: no study named 'quickstart-study'"):
        run_study(load(tmp_path), resume=True)


def test_table_and_deltas_of_known_scores():
    scores = {"base": {"em": 0.0, "ppl": 50.0}, "sft": {"em": 0.9, "ppl": 40.0},
              "dpo_only": {"em": 0.1, "ppl": 55.0}, "sft_then_dpo": {"em": 0.95, "ppl": 41.0}}
    table = study_table(scores, [("em", "exact_match"), ("ppl", "perplexity")])
    assert "| SFT+DPO  | 0.9500 (+0.0500) | 41.0000 (+1.0000)" in table  # against the SFT model it started from
    assert "| DPO-only | 0.1000 (+0.1000) | 55.0000 (+5.0000)" in table
    assert "| SFT+DPO - DPO-only | +0.8500" in table and "ppl (lower is better)" in table
    assert deltas(scores)["sft_then_dpo"]["vs_start"]["em"] == pytest.approx(0.05)
    assert deltas(scores)["sft_then_dpo"]["vs_base"]["ppl"] == pytest.approx(-9.0)
    metrics = bench_metrics(scores["sft_then_dpo"], scores["sft"], scores["base"])
    assert metrics == pytest.approx({"bench/em": 0.95, "bench/ppl": 41.0, "bench_delta/em": 0.05, "bench_delta/ppl": 1.0,
                                     "bench_delta_vs_base/em": 0.95, "bench_delta_vs_base/ppl": -9.0})
    assert bench_metrics(scores["base"], None, None) == {"bench/em": 0.0, "bench/ppl": 50.0}


def test_a_benchmark_measured_against_the_start_model_is_compared_with_a_self_comparison():
    """win_rate against start: the start model measured that way meets itself (0.5), whatever it scored
    against its own start."""
    scores = {"base": {"wins": 0.5}, "sft": {"wins": 1.0}, "sft_then_dpo": {"wins": 0.45}}
    assert bench_metrics(scores["sft_then_dpo"], scores["sft"], scores["base"], {"wins"}) == pytest.approx(
        {"bench/wins": 0.45, "bench_delta/wins": -0.05, "bench_delta_vs_base/wins": -0.05})
    assert deltas(scores, {"wins"})["sft"]["vs_start"]["wins"] == pytest.approx(0.5)
    table = study_table(scores, [("wins", "win_rate")], {"wins"})
    assert "| SFT+DPO | 0.4500 (-0.0500) |" in table and "wins: measured against the model it was trained from" in table


# ---- the pipeline on Ray, recorded in MLflow ----------------------------------------------------------

TINY = [
    "data.train=demo:preference_eval", "data.sft_train=demo:sft_eval", "train.batch_size=8", "train.max_steps=4",
    "train.warmup_steps=0", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=2",
    "train.eval_batch_size=64", "study.sft.max_steps=4", "resources.cpus_per_worker=1",
    "study.dpo_only.mode=sweep", "study.dpo_only.sweep={strategy: grid, beta: [0.1]}",
]


@pytest.fixture
def tiny_study(tmp_path):
    """The shipped study config, a few steps on 256 pairs, benchmarks on 8 to 16 rows; its server is stopped after."""
    import ray
    import yaml

    from orchestrator.config.layout import mlflow_root
    from orchestrator.tracking.server import EmbeddedServer

    raw = yaml.safe_load(STUDY_CONFIG.read_text())
    for entry in raw["benchmarks"]:
        entry["limit"] = 8 if entry["kind"] in ("exact_match", "win_rate") else 16
    source = tmp_path / "tiny-study.yaml"
    source.write_text(yaml.safe_dump(raw))
    config = cfg.load_config(source, [f"storage_path={tmp_path / 'runs'}", f"output_dir={tmp_path / 'out'}", *TINY])
    yield config
    ray.shutdown()
    EmbeddedServer(mlflow_root(config.storage_path)).stop()


@pytest.mark.ray
@pytest.mark.mlflow
def test_study_runs_every_stage_records_tags_and_deltas_and_resumes_without_retraining(tiny_study):
    from mlflow.tracking import MlflowClient

    results = run_study(tiny_study)

    models = ("base", "sft", "sft_then_dpo", "dpo_only")
    assert set(results["scores"]) == set(models)
    assert all(list(results["scores"][key]) == BENCHMARKS for key in models)
    base = results["scores"]["base"]
    assert base["preference_accuracy"] == base["win_rate"] == base["win_rate_vs_base"] == 0.5  # itself as reference
    root = Path(results["storage"])
    for stage in ("sft", "sft_then_dpo", "dpo_only"):
        assert (root / stage / COMPLETE_FILE).is_file() and (root / stage / "model" / "config.json").is_file()
    assert "| SFT+DPO - DPO-only |" in (root / "study_table.md").read_text()

    client = MlflowClient(tracking_uri=results["mlflow"]["uri"])
    parent = client.get_run(results["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dpo.role"] == "study"
    assert {"study_table.md", "study_results.json", "config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    experiment = [parent.info.experiment_id]
    evaluations = {(run.data.tags["dpo.stage"], run.data.tags["dpo.arm"]): run for run in client.search_runs(
        experiment, "tags.study = 'quickstart-study' and tags.`dpo.role` = 'evaluation'")}
    key_of = {("base", "shared"): "base", ("sft", "sft_then_dpo"): "sft", ("dpo", "sft_then_dpo"): "sft_then_dpo",
              ("dpo", "dpo_only"): "dpo_only"}
    assert set(evaluations) == set(key_of)
    start_of = {"sft": "base", "sft_then_dpo": "sft", "dpo_only": "base"}
    against_start = {"preference_accuracy", "win_rate"}  # their start model, measured that way, scores 0.5
    for tags, run in evaluations.items():
        key, metrics = key_of[tags], run.data.metrics
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for name in BENCHMARKS:
            score = results["scores"][key][name]
            assert metrics[f"bench/{name}"] == pytest.approx(score)
            if key == "base":
                assert f"bench_delta/{name}" not in metrics
                continue
            start_score = 0.5 if name in against_start else results["scores"][start_of[key]][name]
            assert metrics[f"bench_delta/{name}"] == pytest.approx(score - start_score)
            assert metrics[f"bench_delta_vs_base/{name}"] == pytest.approx(score - base[name])

    trained = client.search_runs(experiment, "tags.study = 'quickstart-study' and tags.`dpo.role` = 'train'")
    assert sorted((r.data.tags["dpo.stage"], r.data.tags["dpo.arm"]) for r in trained) == [("dpo", "sft_then_dpo"), ("sft", "sft_then_dpo")]
    assert all(len(client.get_metric_history(r.info.run_id, "train/loss")) >= 2 for r in trained)
    swept = client.search_runs(experiment, "tags.sweep = 'quickstart-study-dpo_only'")
    assert len(swept) == 2 and all(r.data.tags["dpo.arm"] == "dpo_only" for r in swept)  # the sweep's parent + 1 trial
    assert [r.data.tags["mlflow.parentRunId"] for r in swept if r.data.tags["dpo.role"] == "parent"] == [parent.info.run_id]

    run_count = len(client.search_runs(experiment, ""))
    marker_times = {stage: (root / stage / COMPLETE_FILE).stat().st_mtime_ns for stage in ("sft", "sft_then_dpo", "dpo_only")}
    again = run_study(tiny_study, resume=True)  # everything is complete: nothing trains, nothing is evaluated again
    assert again["scores"] == results["scores"]
    assert {stage: (root / stage / COMPLETE_FILE).stat().st_mtime_ns for stage in marker_times} == marker_times
    assert len(client.search_runs(experiment, "")) == run_count
    assert again["mlflow"]["parent_run_id"] == parent.info.run_id
