"""lm-eval's own `mmlu` group and `arc_challenge` on the committed embedded model, over the hub-shaped dataset repos
of tests/helpers/hub_datasets.py, in formats the model learned only on questions that no evaluation asks: ARC well
above chance (0.25); MMLU not yet (a strict xfail, so that it turns into a failure to update once it does).

Here lm-eval reads the whole repos as local folders (its own task YAMLs copied with only `dataset_path` changed, so
the prompts, choices, metrics and the group's size-weighted average are lm-eval's), in-process: this measures the
model. tests/e2e/test_seed_study.py reads them through the local hub, as a user's job does."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from helpers.hub_datasets import write_dataset_repos
from quantbench.embedded import tiny

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
CHANCE = 0.25


def lm_eval_tasks_over(repos: dict[str, Path], folder: Path) -> Path:
    """lm-eval's mmlu (default) and ARC task YAMLs, with `dataset_path` pointing at the local repos."""
    shutil.copytree(LM_EVAL_TASKS / "mmlu/default", folder / "mmlu")
    (folder / "arc").mkdir()
    for name in ("arc_easy.yaml", "arc_challenge.yaml"):
        shutil.copy(LM_EVAL_TASKS / "arc" / name, folder / "arc" / name)
    for path in folder.rglob("*yaml"):
        text = path.read_text()
        for repo_id, local in repos.items():
            text = text.replace(f"dataset_path: {repo_id}\n", f"dataset_path: {local}\n")
        path.write_text(text)
    return folder


@pytest.fixture(scope="module")
def accuracy(tiny_root, tmp_path_factory) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbench.job import evaluation

    root = tmp_path_factory.mktemp("hub")
    include = lm_eval_tasks_over(write_dataset_repos(root), root / "tasks")
    plan = evaluation.EvalPlan(
        tasks=["mmlu", "arc_challenge"], include_path=str(include), num_fewshot=0, batch_size=16, limit=None
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model", dtype=torch.bfloat16)
    result = evaluation.evaluate(model, AutoTokenizer.from_pretrained(tiny_root / "model"), plan)
    log.info("lm-eval on the embedded model: %s", result.metrics)
    subjects = [s for s in tiny.MMLU_SUBJECTS if f"mmlu_{s}" in result.results["results"]]
    return result.metrics | {"subjects": len(subjects)}


def test_arc_challenge_scores_clearly_above_chance(accuracy):
    """Measured on the committed recipe-v3 model (CPU, bfloat16): acc 1.000, acc_norm 1.000."""
    assert accuracy["arc_challenge_acc"] >= 0.9, accuracy
    assert accuracy["arc_challenge_acc_norm"] >= 0.9, accuracy


@pytest.mark.xfail(
    strict=True,
    reason="recipe v3 learns the MMLU letter format on the unasked questions only partly (about 0.37 there) and not "
    "on the asked ones: lm-eval's mmlu measured 0.272 (chance 0.25); docs/embedded.md says what was tried",
)
def test_mmlu_scores_clearly_above_chance(accuracy):
    assert accuracy["mmlu_acc"] >= CHANCE + 0.15, accuracy


def test_the_mmlu_group_averages_every_subject(accuracy):
    assert accuracy["subjects"] == len(tiny.MMLU_SUBJECTS) == 57
