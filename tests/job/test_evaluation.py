"""lm-eval's results read by their real names, through the real lm-eval on the embedded model: a task's `acc` and
`acc_norm`, a group's aggregate as lm-eval computes it (lm-eval's `mmlu` is such a group: subgroups of subject tasks
gathered by tag, `acc` weighted by size), its subtasks as an artifact, and per-document rows that pair by subtask and
document. What yields no accuracy (a tag, a group that aggregates no `acc`, an exact-match task) is refused before
any model loads."""

from __future__ import annotations

import json

import pytest
from helpers.lm_eval_tasks import group, seed_like, task
from omegaconf import OmegaConf

from quantbench.study import stats
from quantbench.job import evaluation
from quantbench.errors import ConfigError

LIMIT = 12  # documents per task: enough to score, few enough to stay quick


@pytest.fixture(scope="module")
def tasks(tiny_root, tmp_path_factory):
    """A folder of lm-eval tasks shaped like lm-eval's own mmlu and arc_challenge, over the embedded model's facts:
    `qb_all` groups the subgroup `qb_knowledge` (whose tasks it gathers by tag, as mmlu_stem gathers its subjects)
    and the task `qb_arith`, with `acc` weighted by size at both levels; `qb_norm` scores acc and acc_norm (as
    arc_challenge). Besides them, what quantbench must refuse."""
    folder = seed_like(tmp_path_factory.mktemp("lm_eval_tasks"), tiny_root)
    facts, arith = tiny_root / "tasks" / "tiny_facts.jsonl", tiny_root / "tasks" / "tiny_arith.jsonl"
    task(folder, "qb_m1", facts)
    task(folder, "qb_m2", arith)
    group(folder, "qb_macro", ["qb_m1", "qb_m2"], weight_by_size=False)
    group(folder, "qb_no_aggregate", ["qb_facts", "qb_arith"], metric=None)
    task(folder, "qb_exact", arith, metrics=("exact_match",), output_type="generate_until")
    return folder


def plan_of(folder, *names: str, limit=LIMIT):
    cfg = {"tasks": list(names), "include_path": str(folder), "num_fewshot": 0, "batch_size": 16, "limit": limit}
    return evaluation.plan(OmegaConf.create(cfg), "/unused")


@pytest.fixture(scope="module")
def scored(tiny_root, tasks):
    """The embedded model through lm-eval on the group, the acc_norm task and the size-unweighted group."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_root / "model")
    return evaluation.evaluate(model, tokenizer, plan_of(tasks, "qb_all", "qb_norm", "qb_macro"), seed=0)


def test_a_group_is_logged_under_its_name_from_lm_evals_own_aggregate(scored):
    own = scored.results["results"]["qb_all"]
    assert scored.metrics["qb_all_acc"] == own["acc,none"]
    assert scored.metrics["qb_all_acc_stderr"] == own["acc_stderr,none"]
    # weighted by size over its subgroup and task: the mean over all 3 x LIMIT documents
    facts, facts2, arith = (scored.results["results"][t]["acc,none"] for t in ("qb_facts", "qb_facts2", "qb_arith"))
    assert scored.metrics["qb_all_acc"] == pytest.approx((facts + facts2 + arith) / 3)
    assert not any(k.startswith(("qb_facts", "qb_knowledge")) for k in scored.metrics)  # subtasks: the artifact


def test_a_task_with_acc_norm_logs_both_under_their_real_names(scored):
    own = scored.results["results"]["qb_norm"]
    assert {k: scored.metrics[f"qb_norm_{k}"] for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")} == {
        "acc": own["acc,none"],
        "acc_stderr": own["acc_stderr,none"],
        "acc_norm": own["acc_norm,none"],
        "acc_norm_stderr": own["acc_norm_stderr,none"],
    }


def test_the_groups_subtasks_and_subgroups_are_in_the_per_task_artifact(scored):
    per_task = json.loads(json.dumps(scored.per_task))  # what is logged must be JSON
    assert per_task["group_subtasks"]["qb_all"] == ["qb_knowledge", "qb_arith"]
    assert sorted(per_task["group_subtasks"]["qb_knowledge"]) == ["qb_facts", "qb_facts2"]
    for name in ("qb_facts", "qb_facts2", "qb_arith", "qb_knowledge", "qb_all"):
        assert 0 <= per_task["results"][name]["acc"] <= 1
    assert per_task["n_samples"]["qb_facts"]["effective"] == LIMIT


def test_a_groups_documents_pair_by_subtask_and_document(scored):
    rows = scored.samples["qb_all"]
    assert len(rows) == 3 * LIMIT and {r["task"] for r in rows} == {"qb_facts", "qb_facts2", "qb_arith"}
    a, b = stats.pair_by_doc(rows, rows)
    assert len(a) == 3 * LIMIT  # doc 0 of each subtask is its own document, not one
    assert a.mean() == pytest.approx(scored.metrics["qb_all_acc"])
    assert [r.keys() >= {"doc_id", "acc", "acc_norm"} for r in scored.samples["qb_norm"]] == [True] * LIMIT


def test_a_group_not_weighted_by_size_is_not_paired_over_its_documents(scored):
    """Its accuracy is the mean of its tasks' means, which resampling its documents would not estimate: the report
    falls back to the two standard errors."""
    assert "qb_macro" not in scored.samples and "qb_macro_acc" in scored.metrics


@pytest.mark.parametrize(
    "name, needle",
    [
        (
            "qb_knowledge_tasks",
            "'qb_knowledge_tasks' is a tag, not a group: lm-eval scores its tasks (qb_facts, qb_facts2)",
        ),
        ("qb_no_aggregate", "the group 'qb_no_aggregate' aggregates no metric (its aggregate_metric_list)"),
        ("qb_exact", "the task 'qb_exact' scores ['exact_match'], not 'acc'"),
    ],
)
def test_what_reports_no_accuracy_is_refused_before_any_model_loads(tasks, name, needle):
    with pytest.raises(ConfigError) as err:
        plan_of(tasks, "qb_norm", name)
    assert needle in str(err.value) and "quantbench compares runs by accuracy" in str(err.value)


def test_a_task_in_two_requested_groups_is_refused_before_lm_eval_loads_the_model(tasks):
    with pytest.raises(ConfigError, match="the task 'qb_arith' is part of both 'qb_all' and 'qb_arith'"):
        plan_of(tasks, "qb_all", "qb_arith")


def test_a_group_and_its_size_weighting_are_known_at_plan_time(tasks):
    plan = plan_of(tasks, "qb_all", "qb_macro", "qb_norm", limit=0.25)
    assert plan.groups == {"qb_all": True, "qb_macro": False}
    assert plan.limit == 0.25


def test_a_whole_limit_reaches_lm_eval_as_a_count(tasks):
    """Hydra types eval.limit as a float (10 -> 10.0); lm-eval reads a float of 1 or more as a count anyway, but the
    plan hands it the integer it means."""
    plan = plan_of(tasks, "qb_norm", limit=10.0)
    assert plan.limit == 10 and isinstance(plan.limit, int)


@pytest.fixture(scope="module")
def builtin_index():
    """lm-eval's own task definitions (its ~14,000 YAMLs, indexed once; no data is downloaded)."""
    return evaluation.task_manager(None).task_index


def test_lm_evals_own_mmlu_is_a_size_weighted_group_of_57_subjects(builtin_index):
    """The seed's MMLU: `mmlu` aggregates `acc` weighted by size through its four subgroups, so its logged accuracy
    is the mean over all 57 subjects' questions, and paired tests may resample them all."""
    assert evaluation._accuracy_problem("mmlu", builtin_index) is None
    assert evaluation._size_weighted(builtin_index["mmlu"].cfg, builtin_index)
    subjects = evaluation._tasks_under("mmlu", builtin_index)
    assert len(subjects) == 57 and "mmlu_anatomy" in subjects


def test_lm_evals_own_arc_challenge_scores_acc_and_acc_norm_and_its_tag_is_refused(builtin_index):
    assert evaluation.task_metrics(builtin_index["arc_challenge"].cfg) == ["acc", "acc_norm"]
    assert evaluation._accuracy_problem("arc_challenge", builtin_index) is None
    assert "'ai2_arc' is a tag, not a group" in evaluation._accuracy_problem("ai2_arc", builtin_index)
    assert "scores ['exact_match'], not 'acc'" in evaluation._accuracy_problem("gsm8k", builtin_index)


def test_the_task_index_is_built_once_per_folder_and_again_when_the_folder_changes(tmp_path, tiny_root):
    """A sweep's jobs share one index of a folder (validate and eval ask for it in every job); a task added to the
    folder in the meantime is known to the next job."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    task(folder, "qb_one", tiny_root / "tasks" / "tiny_arith.jsonl")
    first = evaluation.task_manager(str(folder))
    assert evaluation.task_manager(str(folder)) is first
    task(folder, "qb_two", tiny_root / "tasks" / "tiny_arith.jsonl")
    again = evaluation.task_manager(str(folder))
    assert again is not first and "qb_two" in again.all_tasks and "qb_two" not in first.all_tasks
