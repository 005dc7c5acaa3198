"""`quantbench search` on a study built here with Optuna (no jobs): the front, the states and reasons of every trial,
the importances, and the grid runs a front trial beats."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
from optuna.trial import TrialState

from quantbench.study import search


def study_with_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    study.set_user_attr("objectives", ["quality_kl_mean", "disk_gb"])
    for g, keep, kl, disk in [(64, "none", 0.002, 2.2), (128, "none", 0.003, 2.1), (128, "attn", 0.001, 2.6),
                              (256, "none", 0.009, 2.0), (64, "attn", 0.0015, 2.7), (256, "attn", 0.002, 2.4)]:  # fmt: skip
        t = study.ask({"g": optuna.distributions.CategoricalDistribution([64, 128, 256]),
                       "keep": optuna.distributions.CategoricalDistribution(["none", "attn"])})  # fmt: skip
        t.set_user_attr("run_id", f"run{t.number}")
        t.set_constraint("quality_kl_mean <= 0.005", kl - 0.005)
        study.tell(t, [kl, disk])
    failed = study.ask()
    failed.set_user_attr("failed", "ConfigError: bad")
    study.tell(failed, state=TrialState.FAIL)
    return storage


def test_front_states_and_reasons(tmp_path):
    study = search.load(study_with_trials(tmp_path), "s")
    rows = {r.number: r for r in search.trials(study)}
    assert {n for n, r in rows.items() if r.on_front} == {0, 1, 2}  # 3 violates the KL bound; 4, 5 are dominated
    assert not rows[3].feasible and "violates quality_kl_mean <= 0.005" in rows[3].why
    assert rows[6].state == "FAIL" and rows[6].why == "ConfigError: bad"
    assert rows[0].values == {"quality_kl_mean": 0.002, "disk_gb": 2.2} and rows[0].run_id == "run0"
    imp = search.importances(study)
    assert set(imp) == {"quality_kl_mean", "disk_gb"}
    text = search.page(study, list(rows.values()), imp, [], "sweep grid")
    assert "none found" in text and "violates" in text
    assert "| 2 | **front**, best quality_kl_mean |" in text and "| 1 | **front**, best disk_gb |" in text


def test_beaten_needs_every_objective_strictly_better(tmp_path):
    study = search.load(study_with_trials(tmp_path), "s")
    front = [r for r in search.trials(study) if r.on_front]
    grid = [SimpleNamespace(label="bnb_nf4", metrics={"quality_kl_mean": 0.0025, "disk_gb": 2.25}),
            SimpleNamespace(label="fp16", metrics={"quality_kl_mean": 0.0, "disk_gb": 7.0})]  # fmt: skip
    pairs = search.beaten(front, grid, {"quality_kl_mean": "minimize", "disk_gb": "minimize"})
    assert [(t.number, row.label) for t, row in pairs] == [(0, "bnb_nf4")]


def test_no_importance_is_shown_from_fewer_than_four_complete_trials(tmp_path):
    """On two trials PED-ANOVA still gives figures (every parameter about equal): not a finding, so none is shown."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="two", storage=storage, directions=["maximize"])
    study.set_user_attr("objectives", ["tokens_per_s_1_stream"])
    for g, speed in [(64, 219.5), (128, 241.7), (32, 0.0)]:
        t = study.ask({"g": optuna.distributions.CategoricalDistribution([32, 64, 128])})
        study.tell(t, state=TrialState.FAIL) if g == 32 else study.tell(t, [speed])
    study = search.load(storage, "two")
    imp = search.importances(study)
    assert imp == {"tokens_per_s_1_stream": {}}
    assert "too few complete trials to say" in search.page(study, search.trials(study), imp, None, "")


def test_importance_from_four_complete_trials_compares_the_best_two_with_the_rest(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="four", storage=storage, directions=["maximize"])
    study.set_user_attr("objectives", ["tokens_per_s_1_stream"])
    for g, speed in [(64, 220.0), (128, 240.0), (32, 200.0), (64, 221.0)]:
        study.tell(study.ask({"g": optuna.distributions.CategoricalDistribution([32, 64, 128])}), [speed])
    assert search.importance_quantile(4) == 0.5 and search.importance_quantile(40) == 0.1
    study = search.load(storage, "four")
    imp = search.importances(study)
    assert set(imp["tokens_per_s_1_stream"]) == {"g"}
    assert "Over 4 complete trials, the best 50% against the rest." in search.page(
        study, search.trials(study), imp, None, ""
    )
