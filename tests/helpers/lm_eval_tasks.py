"""lm-eval task folders of our own, over the embedded model's facts, shaped like lm-eval's own definitions: tasks built
like the embedded tiny_* tasks (embedded/tiny.py), groups with an aggregate_metric_list like lm-eval's `mmlu`, a tag
gathering a subgroup's tasks like `mmlu_stem_tasks`, a task scoring acc and acc_norm like `arc_challenge`."""

from __future__ import annotations

from pathlib import Path


def task(folder: Path, name: str, data: Path, metrics=("acc",), tag: str | None = None, output_type="multiple_choice"):
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        + (f"tag:\n  - {tag}\n" if tag else "")
        + f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"output_type: {output_type}\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        f'target_delimiter: " "\nmetric_list:\n{metric_list}metadata:\n  version: 1\n'
    )


def group(folder: Path, name: str, tasks: list[str], metric: str | None = "acc", weight_by_size: bool = True):
    aggregate = (
        f"aggregate_metric_list:\n  - metric: {metric}\n    weight_by_size: {weight_by_size}\n" if metric else ""
    )
    (folder / f"_{name}.yaml").write_text(
        f"group: {name}\ntask:\n" + "".join(f"  - {t}\n" for t in tasks) + aggregate + "metadata:\n  version: 1\n"
    )


def seed_like(folder: Path, tiny_root: Path) -> Path:
    """`qb_all`, a group like lm-eval's mmlu: the subgroup `qb_knowledge` (its tasks gathered by the tag
    `qb_knowledge_tasks`, as mmlu_stem gathers its subjects) and the task `qb_arith`, `acc` weighted by size at both
    levels; `qb_norm`, a task scoring acc and acc_norm like arc_challenge."""
    facts, arith = tiny_root / "tasks" / "tiny_facts.jsonl", tiny_root / "tasks" / "tiny_arith.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    task(folder, "qb_facts", facts, tag="qb_knowledge_tasks")
    task(folder, "qb_facts2", facts, tag="qb_knowledge_tasks")  # the same doc_ids again: pairs must tell them apart
    task(folder, "qb_arith", arith)
    task(folder, "qb_norm", arith, metrics=("acc", "acc_norm"))
    group(folder, "qb_knowledge", ["qb_knowledge_tasks"])
    group(folder, "qb_all", ["qb_knowledge", "qb_arith"])
    return folder
