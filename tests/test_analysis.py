"""Beta selection, MLflow runs -> pandas, the report and its plots (analysis/).

Fast, unmarked tests apply the rule to hand-made trial tables and check the curve deduplication and the
stability columns. The `mlflow` tests start one real `mlflow server` on 127.0.0.1 (as tests/test_tracking.py
does; shared with tests/test_export.py), log a sweep in the layout `dpo sweep` writes (a parent run, child runs
with trial_id/sweep tags, beta/kl_weight/learning_rate params, train/* and eval/* step curves, the
decision log), and run `dpo analyze` on it: an unstable high-beta trial with the best accuracy must lose,
a near-tie goes to the smaller beta, the KL budget excludes a trial, and the plots are real images.
Run: `python -m pytest tests/test_analysis.py -q` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.runs import curve_from_points, trial_row
from analysis.selection import SelectionRule, benchmark_regressions, select_trial

STEPS = list(range(10, 210, 10))  # 20 logged steps


def smooth_loss(end: float = 0.45) -> list[float]:
    """A loss falling smoothly from ln 2 to `end`."""
    return [end + (math.log(2) - end) * math.exp(-step / 50) for step in STEPS]


def oscillating_loss() -> list[float]:
    """Falls, then zig-zags by +-30 % around 0.4 (oscillation score far above 0.05)."""
    return [0.69 - 0.01 * i if i < 6 else 0.4 * (1.3 if i % 2 else 0.7) for i in range(len(STEPS))]


def row(trial_id: str, beta: float, accuracy: float, *, kl: float = 5.0, stable: bool = True,
        status: str = "FINISHED", **extra) -> dict:
    """One row of the trial table as analysis.runs.load_sweep builds it."""
    return {"run_id": f"run-{trial_id}", "trial_id": trial_id, "status": status, "stage": "dpo", "beta": beta,
            "kl_weight": 0.0, "learning_rate": 1e-3, "start_time": int(beta * 1000), "error": None,
            "eval/preference_accuracy": accuracy, "eval/kl": kl, "eval/kl.max": kl, "stable": stable,
            "non_finite": False, "stability_reason": "stable" if stable else "oscillating: score 0.290 > threshold 0.05",
            **extra}


# ---- the rule on hand-made tables ----------------------------------------------------------------

def test_an_unstable_high_beta_trial_with_the_best_accuracy_does_not_win():
    table = pd.DataFrame([row("a", 0.1, 0.80), row("b", 0.2, 0.86), row("c", 0.5, 0.95, stable=False)])
    selection = select_trial(table)
    assert selection.chosen["trial_id"] == "b" and selection.runner_up["trial_id"] == "a"
    assert "c (beta 0.5, 0.9500): unstable training" in selection.reason
    verdicts = selection.table.set_index("trial_id")
    assert not verdicts.loc["c", "eligible"] and "oscillating" in verdicts.loc["c", "excluded_because"]


def test_a_near_tie_goes_to_the_smaller_beta_and_a_clear_win_does_not():
    near = pd.DataFrame([row("low", 0.2, 0.905), row("high", 0.4, 0.910)])
    selection = select_trial(near, SelectionRule(tie_tolerance=0.01))
    assert selection.chosen["trial_id"] == "low" and selection.runner_up["trial_id"] == "high"
    assert "tie tolerance 0.01" in selection.reason and "smaller beta" in selection.reason
    clear = pd.DataFrame([row("low", 0.2, 0.88), row("high", 0.4, 0.91)])
    assert select_trial(clear, SelectionRule(tie_tolerance=0.01)).chosen["trial_id"] == "high"


def test_the_kl_budget_excludes_a_trial_that_drifted_too_far():
    table = pd.DataFrame([row("calm", 0.1, 0.85, kl=8.0), row("far", 0.3, 0.93, kl=250.0)])
    assert select_trial(table, SelectionRule(kl_budget=None)).chosen["trial_id"] == "far"  # no budget
    selection = select_trial(table, SelectionRule(kl_budget=50))
    assert selection.chosen["trial_id"] == "calm"
    assert "eval/kl reached 250, over the KL budget 50" in selection.table.set_index("trial_id").loc["far", "excluded_because"]
    by_train_kl = pd.DataFrame([row("x", 0.1, 0.85, **{"train/kl.max": 900.0}), row("y", 0.2, 0.84, **{"train/kl.max": 10.0})])
    assert select_trial(by_train_kl, SelectionRule(kl_metric="train/kl", kl_budget=100)).chosen["trial_id"] == "y"


def test_benchmark_regressions_beyond_the_tolerance_exclude_a_trial():
    regressed = row("r", 0.3, 0.95, **{"bench/exact_match": 0.55, "bench_delta/exact_match": -0.10})  # -15 % of 0.65
    kept = row("k", 0.2, 0.90, **{"bench/exact_match": 0.64, "bench_delta/exact_match": -0.01,  # -1.5 %
                                  "bench/perplexity": 10.2, "bench_delta/perplexity": 0.2})  # +2 % perplexity
    assert benchmark_regressions(kept) == pytest.approx({"exact_match": 0.01 / 0.65, "perplexity": 0.2 / 10.0})
    selection = select_trial(pd.DataFrame([regressed, kept]), SelectionRule(benchmark_tolerance=0.05))
    assert selection.chosen["trial_id"] == "k"
    assert "bench/exact_match regressed by 15.4%" in selection.table.set_index("trial_id").loc["r", "excluded_because"]


def test_win_rate_is_the_score_when_logged_and_failed_runs_never_win():
    table = pd.DataFrame([row("a", 0.1, 0.95, **{"eval/win_rate": 0.55}), row("b", 0.2, 0.80, **{"eval/win_rate": 0.70}),
                          row("f", 0.3, 0.99, status="FAILED", error="NonFiniteLossError: non-finite loss")])
    selection = select_trial(table)
    assert selection.metric == "eval/win_rate" and selection.chosen["trial_id"] == "b"
    assert "run ended FAILED: NonFiniteLossError" in selection.table.set_index("trial_id").loc["f", "excluded_because"]


def test_no_eligible_trial_is_a_verdict_with_every_reason_not_an_exception():
    selection = select_trial(pd.DataFrame([row("u", 0.5, 0.9, stable=False)]))
    assert selection.chosen is None and selection.runner_up is None
    assert "no trial passes the rule" in selection.reason and "u: unstable training" in selection.reason


def test_a_restarted_trials_repeated_steps_keep_the_last_value():
    point = lambda step, value, timestamp: SimpleNamespace(step=step, value=value, timestamp=timestamp)
    curve = curve_from_points([point(1, 0.69, 100), point(2, 0.60, 200), point(3, 0.55, 300),
                               point(2, 0.61, 400), point(3, 0.52, 500), point(4, 0.50, 600)])
    assert curve.to_dict() == {1: 0.69, 2: 0.61, 3: 0.52, 4: 0.50}


def test_trial_rows_carry_final_best_and_stability_columns():
    run = lambda tags: SimpleNamespace(info=SimpleNamespace(run_id="r1", run_name="t1", status="FINISHED", start_time=1),
                                       data=SimpleNamespace(tags={"trial_id": "t1", **tags}, params={"beta": "0.2"}))
    accuracy = pd.Series([0.6, 0.9, 0.8], index=[10, 20, 30])
    stable = trial_row(run({}), {"train/loss": pd.Series(smooth_loss(), index=STEPS), "eval/preference_accuracy": accuracy,
                                 "eval/kl": pd.Series([1.0, 7.0, 4.0], index=[10, 20, 30])})
    assert stable["beta"] == 0.2 and math.isnan(stable["kl_weight"]) and stable["steps"] == STEPS[-1]
    assert stable["eval/preference_accuracy"] == 0.8 and stable["eval/preference_accuracy.best"] == 0.9
    assert stable["eval/kl.max"] == 7.0 and stable["eval/kl.best"] == 1.0 and stable["stable"]
    wobbly = trial_row(run({}), {"train/loss": pd.Series(oscillating_loss(), index=STEPS)})
    assert wobbly["oscillating"] and not wobbly["stable"]
    broken = trial_row(run({}), {"train/loss": pd.Series(smooth_loss(), index=STEPS),
                                 "eval/loss": pd.Series([0.6, float("nan")], index=[10, 20])})
    assert broken["non_finite"] and not broken["stable"] and "eval/loss" in broken["stability_reason"]


# ---- real MLflow ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real server for this module and tests/test_export.py (which imports this fixture): both start
    it on the same root, so the second finds it running and reuses it; it stops at the end of the session."""
    from orchestrator.tracking.server import EmbeddedServer

    storage = tmp_path_factory.getbasetemp() / "analysis-export-storage"
    embedded = EmbeddedServer(storage / "mlflow")
    url = embedded.start_or_reuse()
    try:
        yield {"url": url, "storage": storage}
    finally:
        embedded.stop()  # by its recorded process group; a no-op for the second user


def log_sweep(url: str, sweep: str, trials: list[dict], decision_log: list[dict] | None = None,
              experiment: str | None = None) -> str:
    """A sweep as `dpo sweep` records it; trials: {trial_id, beta, kl_weight, curves: {key: {step: value}},
    restarted_curves (logged again later, as a restarted trial does), status, checkpoint_dir}. Returns the parent id."""
    from mlflow.entities import Metric

    from orchestrator.tracking import records as tracking

    experiment_id, parent = tracking.start_parent_run(
        url, experiment or sweep, sweep, {"name": sweep, "dpo": {"beta": 0.1}},
        tags={"data.train.sha256": "a" * 64, "reference_cache_key": "cafe1234"})
    client = tracking.client_for(url)
    for trial in trials:
        run_id = tracking.find_or_create_trial_run(
            url, experiment_id, parent, trial["trial_id"], sweep,
            {"beta": trial["beta"], "kl_weight": trial.get("kl_weight", 0.0), "learning_rate": 1e-3,
             "model": {"path": trial.get("model_path", "/models/base")}, "dpo": {"loss": "sigmoid"}},
            checkpoint_dir=trial.get("checkpoint_dir"))
        now = int(time.time() * 1000)
        for offset, curves in enumerate((trial["curves"], trial.get("restarted_curves", {}))):
            metrics = [Metric(key, float(value), now + offset * 1000 + int(step), int(step))
                       for key, points in curves.items() for step, value in points.items()]
            for start in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[start:start + 1000])
        tracking.end_run(url, run_id, trial.get("status", "FINISHED"))
    if decision_log is not None:
        tracking.log_text_artifact(url, parent, "decision_log.json", json.dumps(decision_log))
    tracking.end_run(url, parent, "FINISHED")
    return parent


def synthetic_trial(trial_id: str, beta: float, accuracy: float, kl: float, losses: list[float]) -> dict:
    evals = STEPS[4::5]  # eval every 50 steps
    return {"trial_id": trial_id, "beta": beta, "curves": {
        "train/loss": dict(zip(STEPS, losses)),
        "train/reward_margin": {step: beta * step / 50 for step in STEPS},
        "eval/preference_accuracy": {step: accuracy - 0.1 * (len(evals) - 1 - i) / len(evals) for i, step in enumerate(evals)},
        "eval/reward_margin": {step: beta * step / 40 for step in evals},
        "eval/kl": {step: kl * step / STEPS[-1] for step in evals}}}


@pytest.mark.mlflow
def test_analyze_real_mlflow_runs_picks_by_the_rule_and_writes_a_report_with_plots(mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli.main import main

    url = mlflow_server["url"]
    low = synthetic_trial("t-low", 0.1, 0.880, 4.0, smooth_loss(0.50))
    mid = synthetic_trial("t-mid", 0.2, 0.905, 6.0, smooth_loss(0.45))
    mid["curves"]["eval/logp_chosen"] = {step: -30.0 - step / 20 for step in STEPS[4::5]}  # falls 8 nats: displacement
    # A restart re-logged steps 150..200 of the beta-0.3 trial; its last eval is what counts (0.910).
    near = synthetic_trial("t-near", 0.3, 0.930, 9.0, smooth_loss(0.42))
    near["restarted_curves"] = {"eval/preference_accuracy": {200: 0.910}, "train/loss": {200: smooth_loss(0.42)[-1]}}
    drifted = synthetic_trial("t-drift", 0.4, 0.935, 400.0, smooth_loss(0.40))
    wild = synthetic_trial("t-wild", 0.6, 0.990, 12.0, oscillating_loss())
    log = [{"round": i + 1, "beta": beta, "kl_weights": [0.0], "best_metric": acc, "action": action, "reason": "test"}
           for i, (beta, acc, action) in enumerate([(0.1, 0.88, "climb"), (0.2, 0.905, "climb"), (0.3, 0.91, "climb"),
                                                     (0.4, 0.935, "climb"), (0.6, 0.99, "back_off_halve_step")])]
    parent = log_sweep(url, "beta-sweep", [low, mid, near, drifted, wild], decision_log=log)

    report_dir = tmp_path / "report"
    code = main(["analyze", "beta-sweep", "--tracking-uri", url, "--kl-budget", "100", "--tie-tolerance", "0.01",
                 "--report-dir", str(report_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "chosen beta 0.2 (kl_weight 0, learning_rate 0.001, trial t-mid)" in printed
    assert "runner-up: trial t-near (beta 0.3" in printed
    assert "excluded t-wild (beta 0.6): unstable training" in printed
    assert "excluded t-drift (beta 0.4): eval/kl reached 400" in printed

    selection = json.loads((report_dir / "selection.json").read_text())
    assert selection["chosen"]["trial_id"] == "t-mid" and selection["runner_up"]["trial_id"] == "t-near"
    assert "tie tolerance" in selection["reason"]  # t-near (0.910, after its restart) ties t-mid (0.905)
    trials = pd.read_csv(report_dir / "trials.csv").set_index("trial_id")
    assert trials.loc["t-near", "eval/preference_accuracy"] == pytest.approx(0.910)

    import matplotlib.image

    for name in ("metrics_vs_beta", "training_curves", "reward_kl_frontier", "search_path"):
        png = report_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and float(np.std(pixels[..., :3])) > 0.05, name
        assert f"{name}.png" in (report_dir / "report.md").read_text()
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "t-wild" in html
    report = (report_dir / "report.md").read_text()
    diagnoses = report.split("## Diagnoses")[1].split("## Trials")[0]
    assert "### Likelihood displacement" in diagnoses and "trial `t-mid`: eval/logp_chosen fell from -32.5 to -40" in diagnoses
    assert "t-low" not in diagnoses and "dpo.loss: [sigmoid, sft]" in diagnoses
    assert "## Losses ranked" not in report  # one loss only

    client = MlflowClient(tracking_uri=url)
    logged = {item.path for item in client.list_artifacts(parent, "analysis")}
    assert {"analysis/report.html", "analysis/report.md", "analysis/metrics_vs_beta.png"} <= logged
    assert client.get_run(parent).data.tags["analysis.chosen_beta"] == "0.2"


@pytest.mark.mlflow
def test_analyze_names_the_sweep_and_uri_when_nothing_is_there(mlflow_server, capsys):
    from orchestrator.cli.main import main

    assert main(["analyze", "no-such-sweep", "--tracking-uri", mlflow_server["url"]]) == 2
    error = capsys.readouterr().err
    assert "no runs found for sweep 'no-such-sweep'" in error and mlflow_server["url"] in error


@pytest.mark.mlflow
def test_a_studys_arm_sweeps_are_read_through_the_study_parent_run(mlflow_server):
    from analysis.runs import load_sweep
    from orchestrator.workflows import study_records

    url = mlflow_server["url"]
    experiment_id, study_parent = study_records.open_study_run(url, "arms", "arms", {"name": "arms"})
    for arm, accuracy in (("sft_then_dpo", 0.95), ("dpo_only", 0.90)):
        sweep = f"arms-{arm}"
        round_one = [{"round": 1, "beta": 0.1, "best_metric": accuracy, "action": "stop", "reason": "test"}]
        log_sweep(url, sweep, [synthetic_trial(f"{arm}-t1", 0.1, accuracy, 3.0, smooth_loss())], round_one,
                  experiment="arms")
        study_records.adopt_sweep_runs(url, experiment_id, study_parent, sweep, arm)

    study = load_sweep(url, "arms")
    assert study.parent_run_id == study_parent and study.parent_tags["data.train.sha256"] == "a" * 64
    assert dict(zip(study.trials["trial_id"], study.trials["arm"])) == {"sft_then_dpo-t1": "sft_then_dpo",
                                                                       "dpo_only-t1": "dpo_only"}
    assert sorted(entry["arm"] for entry in study.decision_log) == ["dpo_only", "sft_then_dpo"]
    assert select_trial(study.trials).chosen["trial_id"] == "sft_then_dpo-t1"
    assert select_trial(study.trials, SelectionRule(arm="dpo_only")).chosen["trial_id"] == "dpo_only-t1"


# ---- diagnoses on synthetic curves (analysis/diagnoses.py) ---------------------------------------

def curve(values, steps=None) -> pd.Series:
    return pd.Series([float(v) for v in values], index=steps or [50 * (i + 1) for i in range(len(values))])


def test_likelihood_displacement_needs_chosen_logps_falling_while_the_margin_grows():
    from analysis.diagnoses import likelihood_displacement

    falling, growing = curve([-30, -31, -33, -36]), curve([0.0, 0.5, 1.2, 2.0])
    evidence = likelihood_displacement({"eval/logp_chosen": falling, "eval/reward_margin": growing})
    assert evidence == "eval/logp_chosen fell from -30 to -36 while eval/reward_margin grew from 0 to 2"
    assert likelihood_displacement({"eval/logp_chosen": curve([-30, -30.5]), "eval/reward_margin": growing}) is None  # < 1 nat
    assert likelihood_displacement({"eval/logp_chosen": curve([-30, -28]), "eval/reward_margin": growing}) is None  # rose
    assert likelihood_displacement({"eval/logp_chosen": falling, "eval/reward_margin": curve([2, 1.9])}) is None  # shrank
    # train/ curves stand in when the trial logged no eval/ ones; one point is no curve
    assert likelihood_displacement({"train/logp_chosen": falling, "train/reward_margin": growing}) is not None
    assert likelihood_displacement({"eval/logp_chosen": curve([-30]), "eval/reward_margin": curve([1])}) is None


def test_length_exploitation_needs_a_high_and_rising_margin_length_correlation():
    from analysis.diagnoses import length_exploitation

    assert "rose from 0.05 to 0.62" in length_exploitation({"eval/margin_length_correlation": curve([0.05, 0.3, 0.62])})
    assert length_exploitation({"eval/margin_length_correlation": curve([0.55, 0.6])}) is None  # high from the start
    assert length_exploitation({"eval/margin_length_correlation": curve([0.0, 0.2])}) is None  # rising but low
    assert length_exploitation({}) is None


def test_exploding_rewards_or_kl_by_size_growth_and_non_finite_values():
    from analysis.diagnoses import exploding_rewards_or_kl

    assert exploding_rewards_or_kl({"eval/reward_margin": curve([0.1, 2, 4]), "eval/kl": curve([0.01, 0.2, 0.4])}) is None
    assert "eval/reward_rejected reached -35" in exploding_rewards_or_kl({"eval/reward_rejected": curve([0, -10, -35])})
    assert "eval/kl reached 12 nats" in exploding_rewards_or_kl({"eval/kl": curve([0.1, 3, 12])})
    assert "grew 5.0x over the last third" in exploding_rewards_or_kl({"eval/kl": curve([0.1, 0.5, 0.8, 1.0, 4.0])})
    assert exploding_rewards_or_kl({"eval/kl": curve([0.01, 0.02, 0.2])}) is None  # x10 but far below 1 nat
    assert "train/kl is not finite" in exploding_rewards_or_kl({"train/kl": curve([0.1, math.inf])})


def test_diagnose_lists_each_rule_with_the_trials_concerned():
    from analysis.diagnoses import curves_by_trial, diagnose
    from analysis.report import diagnosis_lines

    frame = pd.DataFrame([
        {"trial_id": trial, "key": key, "step": step, "value": value}
        for trial, values in {"a": [-30, -40], "b": [-30, -29]}.items()
        for key, series in (("eval/logp_chosen", values), ("eval/reward_margin", [0, 3]))
        for step, value in zip((50, 100), series)])
    diagnoses = {d.name: d for d in diagnose(curves_by_trial(frame))}
    assert [f.trial_id for f in diagnoses["likelihood_displacement"].findings] == ["a"]
    assert not diagnoses["length_exploitation"].findings and not diagnoses["exploding_rewards_or_kl"].findings
    lines = diagnosis_lines(list(diagnoses.values()))
    assert lines[0] == "### Likelihood displacement: chosen log-probs fall while the margin grows"
    assert any(line.startswith("- trial `a`: eval/logp_chosen fell") for line in lines)
    assert diagnosis_lines(diagnose({})) == [
        "None found (checked: likelihood displacement, length exploitation, exploding rewards or kl)."]


def test_losses_are_ranked_by_their_best_eligible_trial_with_its_beta():
    from analysis.selection import rank_losses

    table = pd.DataFrame([row("s1", 0.1, 0.80, loss="sigmoid"), row("s2", 0.2, 0.84, loss="sigmoid"),
                          row("i1", 0.01, 0.86, loss="ipo"), row("n1", 2.0, 0.95, loss="sigmoid_norm", stable=False),
                          row("n2", 4.0, 0.83, loss="sigmoid_norm", kl=60.0)])
    selection = select_trial(table, SelectionRule(kl_budget=50))
    ranked = rank_losses(selection.table)
    assert ranked[["loss", "beta", "trial_id", "eligible"]].values.tolist() == [
        ["ipo", 0.01, "i1", True], ["sigmoid", 0.2, "s2", True], ["sigmoid_norm", 2.0, "n1", False]]
    assert "unstable training" in ranked.iloc[2]["excluded_because"]


def test_the_default_kl_budget_applies_to_the_exact_eval_kl():
    from analysis.selection import DEFAULT_KL_BUDGET

    assert SelectionRule().kl_budget == DEFAULT_KL_BUDGET == 5.0
    table = pd.DataFrame([row("near", 0.1, 0.80, kl=0.8), row("far", 0.01, 0.90, kl=7.0)])
    selection = select_trial(table)
    assert selection.chosen["trial_id"] == "near"
    assert "eval/kl reached 7, over the KL budget 5" in selection.table.set_index("trial_id").loc["far", "excluded_because"]
