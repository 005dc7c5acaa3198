"""Hub-shaped dataset repositories written from the embedded model's world, for the local hub.

The seed study reads four hub datasets: lm-eval's `mmlu` group (cais/mmlu, one config per subject) and
`arc_challenge` (allenai/ai2_arc), and calibration and held-out text (allenai/c4, Salesforce/wikitext). Each repo
is laid out as the real one is: its data files (Parquet; c4's JSON lines, gzipped, under the shard name that
quantbench.job.calibration.HUB_DATASETS reads) and a README.md whose front matter holds `configs` (data files per split)
and `dataset_info` (features, splits), written by `datasets`' and huggingface_hub's own card code, so that
`datasets.load_dataset` resolves configs, splits and features as it does for the hub repo.

What they hold, and why there is no leak:
- the MMLU and ARC test splits ask the facts the embedded model learned in plain and question-and-answer form only
  (`World.mmlu_docs`, `World.arc_docs`); their dev/validation/train splits, like the model's training text in these
  formats, are about the people and sums that no evaluation asks;
- c4's validation shard and wikitext's train and validation splits (the calibration presets) are paragraphs of
  `World.calibration_facts()`: the unasked people and sums, never an evaluated question or its answer;
- wikitext's test split (what quality=wikitext2 scores the next-token KL on, never calibrated on) is, as
  quality=heldout's text, the declarative sentences about the evaluated people.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from pathlib import Path

from quantbench.embedded import tiny

WRITER_VERSION = 1  # bump when what is written changes: a folder written by another version is replaced
C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"  # quantbench.job.calibration.HUB_DATASETS["allenai/c4"]
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
LONG_TEXT_SENTENCES = (45, 90)  # > 256 words (seq_len 512 / 2) at 5 to 8 words a sentence
SHORT_TEXT_SENTENCES = (2, 20)


def write_dataset_repos(root: Path) -> dict[str, Path]:
    """Write the four repos under `<root>/datasets/<org>/<name>/`; returns repo id -> folder. Idempotent (a repo
    already written from the same recipe and writer version is kept) and atomic (each repo is written into a
    temporary folder beside it and renamed into place)."""
    recipe = tiny.TinyRecipe()
    world = tiny.World.generate(recipe)
    writers = {
        "cais/mmlu": lambda out: _write_mmlu(out, world, recipe.seed),
        "allenai/ai2_arc": lambda out: _write_arc(out, world, recipe.seed),
        "allenai/c4": lambda out: _write_c4(out, world, recipe.seed),
        "Salesforce/wikitext": lambda out: _write_wikitext(out, world, recipe.seed),
    }
    stamp = json.dumps({"recipe": recipe.key(), "writer_version": WRITER_VERSION}, sort_keys=True)
    folders = {}
    for repo_id, write in writers.items():
        folder = Path(root) / "datasets" / repo_id
        marker = folder.with_name(f".{folder.name}.source.json")
        if not (folder.is_dir() and marker.is_file() and marker.read_text() == stamp):
            _write_atomically(folder, write)
            marker.write_text(stamp)
        folders[repo_id] = folder
    return folders


def _write_atomically(folder: Path, write) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def _write_card(out: Path, configs: dict[str, dict[str, str]], infos: dict, pretty_name: str) -> None:
    """README.md with `configs` (config -> split -> data file pattern) and `dataset_info`, as push_to_hub writes."""
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    card_data = DatasetCardData(pretty_name=pretty_name, language=["en"])
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    MetadataConfigs(
        {
            name: {"data_files": [{"split": split, "path": path} for split, path in splits.items()]}
            for name, splits in configs.items()
        }
    ).to_dataset_card_data(card_data)
    text = (
        f"---\n{card_data.to_yaml()}\n---\n\n# {pretty_name}\n\nWritten by quantbench's tests/helpers/hub_datasets.py "
        f"from the embedded model's generated world, in the schema of the hub repository of the same name.\n"
    )
    (out / "README.md").write_text(text)


def _write_parquet_configs(out: Path, tables: dict[str, dict[str, list[dict]]], features, pretty_name: str) -> None:
    """config -> split -> rows, as `<config>/<split>-00000-of-00001.parquet` (the hub's layout for these repos)."""
    import datasets
    import pyarrow.parquet

    configs, infos = {}, {}
    for config, splits in tables.items():
        split_dict = datasets.SplitDict()
        configs[config] = {}
        for split, rows in splits.items():
            table = datasets.Dataset.from_list(rows, features=features).data.table  # features in its schema metadata
            path = out / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pyarrow.parquet.write_table(table, path)
            split_dict.add(datasets.SplitInfo(name=split, num_bytes=table.nbytes, num_examples=len(table)))
            configs[config][split] = f"{config}/{split}-*"
        infos[config] = datasets.DatasetInfo(features=features, splits=split_dict)
    _write_card(out, configs, infos, pretty_name)


def _write_mmlu(out: Path, world: tiny.World, seed: int) -> None:
    import datasets

    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=list(tiny.LETTERS)),
        }
    )
    _write_parquet_configs(out, world.mmlu_docs(seed), features, "MMLU")


def _write_arc(out: Path, world: tiny.World, seed: int) -> None:
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": {
                "text": datasets.List(datasets.Value("string")),
                "label": datasets.List(datasets.Value("string")),
            },
            "answerKey": datasets.Value("string"),
        }
    )
    _write_parquet_configs(out, world.arc_docs(seed), features, "AI2 Reasoning Challenge")


def _paragraphs(sentences: list[str], rng: random.Random, n_long: int, n_short: int) -> list[str]:
    """`n_long` texts of more than 256 words and `n_short` shorter ones, each a seeded sample of `sentences`."""
    texts = [" ".join(rng.sample(sentences, rng.randint(*LONG_TEXT_SENTENCES))) for _ in range(n_long)]
    texts += [" ".join(rng.sample(sentences, rng.randint(*SHORT_TEXT_SENTENCES))) for _ in range(n_short)]
    rng.shuffle(texts)
    return texts


def _write_c4(out: Path, world: tiny.World, seed: int) -> None:
    """The one validation shard that calibration=c4 reads: JSON lines {text, timestamp, url}, gzipped."""
    import datasets

    rng = random.Random(seed + 4)
    texts = _paragraphs(world.calibration_facts(), rng, n_long=200, n_short=56)
    path = out / C4_SHARD
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            row = {
                "text": text,
                "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z",
                "url": f"https://example.com/c4/{i}",
            }
            fh.write(json.dumps(row) + "\n")
    features = datasets.Features({k: datasets.Value("string") for k in ("text", "timestamp", "url")})
    splits = datasets.SplitDict()
    splits.add(datasets.SplitInfo(name="validation", num_examples=len(texts)))
    _write_card(
        out,
        {"en": {"validation": "en/c4-validation.*.json.gz"}},
        {"en": datasets.DatasetInfo(features=features, splits=splits)},
        "C4",
    )


def _write_wikitext(out: Path, world: tiny.World, seed: int) -> None:
    """wikitext-2-raw-v1: train and validation from the calibration facts, test from the held-out sentences about
    the evaluated people (see the module's docstring); empty lines between paragraphs, as in the real one."""
    import datasets

    rng = random.Random(seed + 5)
    calibration = world.calibration_facts()
    held_out = [s for s in world.person_facts(world.people) if not s.startswith("Q:")]
    rng.shuffle(held_out)
    test = [" ".join(held_out[i : i + 40]) for i in range(0, len(held_out), 40)]
    splits = {
        "train": _paragraphs(calibration, rng, n_long=200, n_short=56),
        "validation": _paragraphs(calibration, rng, n_long=20, n_short=10),
        "test": test,
    }
    tables = {WIKITEXT_CONFIG: {k: [{"text": t} for v in texts for t in ("", v)] for k, texts in splits.items()}}
    _write_parquet_configs(out, tables, datasets.Features({"text": datasets.Value("string")}), "WikiText")
