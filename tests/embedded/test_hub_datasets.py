"""The hub-shaped dataset repos (tests/helpers/hub_datasets.py): `datasets` resolves their configs, splits and
features as for the real repos, the texts suit calibration and quality, and nothing evaluated leaks into
calibration text."""

from __future__ import annotations

import pytest

from helpers.hub_datasets import C4_SHARD, WIKITEXT_CONFIG, write_dataset_repos
from quantbench.embedded import tiny


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return write_dataset_repos(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def world():
    return tiny.World.generate(tiny.TinyRecipe())


def test_the_repos_are_laid_out_as_the_hub_lays_them_out(repos, tmp_path_factory):
    assert sorted(repos) == ["Salesforce/wikitext", "allenai/ai2_arc", "allenai/c4", "cais/mmlu"]
    root = next(iter(repos.values())).parents[2]
    for repo_id, folder in repos.items():
        assert folder == root / "datasets" / repo_id and (folder / "README.md").read_text().startswith("---\n")
    assert (repos["cais/mmlu"] / "abstract_algebra/test-00000-of-00001.parquet").is_file()
    assert (repos["allenai/ai2_arc"] / "ARC-Challenge/test-00000-of-00001.parquet").is_file()
    assert (repos["allenai/c4"] / C4_SHARD).is_file()
    assert (repos["Salesforce/wikitext"] / f"{WIKITEXT_CONFIG}/test-00000-of-00001.parquet").is_file()


def test_writing_again_keeps_what_is_there(repos):
    """Idempotent: a second call (same recipe, same writer) rewrites nothing."""
    stamps = {f: f.stat().st_mtime_ns for folder in repos.values() for f in folder.rglob("*") if f.is_file()}
    again = write_dataset_repos(next(iter(repos.values())).parents[2])
    assert again == repos
    assert stamps == {f: f.stat().st_mtime_ns for folder in repos.values() for f in folder.rglob("*") if f.is_file()}


def test_mmlu_has_every_subject_config_of_lm_evals_group_in_the_real_schema(repos, world):
    import datasets

    builder = datasets.load_dataset_builder(str(repos["cais/mmlu"]), "abstract_algebra")
    assert sorted(datasets.get_dataset_config_names(str(repos["cais/mmlu"]))) == sorted(tiny.MMLU_SUBJECTS)
    assert builder.info.features == datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
        }
    )
    data = datasets.load_dataset(str(repos["cais/mmlu"]), "virology")
    assert sorted(data) == ["dev", "test", "validation"] and len(data["dev"]) == 5
    assert list(data["test"]) == world.mmlu_docs(0)["virology"]["test"]


def test_ai2_arc_has_both_configs_in_the_real_schema(repos, world):
    import datasets

    assert sorted(datasets.get_dataset_config_names(str(repos["allenai/ai2_arc"]))) == ["ARC-Challenge", "ARC-Easy"]
    data = datasets.load_dataset(str(repos["allenai/ai2_arc"]), "ARC-Challenge")
    assert sorted(data) == ["test", "train", "validation"]
    assert data["test"].features == datasets.Features(
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
    assert list(data["test"]) == world.arc_docs(0)["ARC-Challenge"]["test"]


def test_calibration_texts_are_long_enough_and_never_evaluated(repos, world):
    """As quantbench.job.calibration reads them (c4's one shard, wikitext's train split): at the seed's seq_len 512,
    more than 128 texts of more than 256 words, and shorter ones; no evaluated person or question in any."""
    import datasets

    from quantbench.job.calibration import HUB_DATASETS

    c4 = HUB_DATASETS["allenai/c4"]
    texts = {
        "c4": datasets.load_dataset(str(repos["allenai/c4"]), c4["subset"], data_files=c4["data_files"])[c4["split"]][
            "text"
        ],
        "wikitext": datasets.load_dataset(str(repos["Salesforce/wikitext"]), WIKITEXT_CONFIG, split="train")["text"],
    }
    asked = [q.text for q in world.questions(asked=True)]
    for name, rows in texts.items():
        words = [len(t.split()) for t in rows if t]
        assert sum(w > 256 for w in words) >= 128 and min(words) <= 256, name
        corpus = "\n".join(rows)
        assert not [p for p in world.people if p in corpus], name
        assert not [q for q in asked if q in corpus], name
        sentences = {s if s.endswith(".") else s + "." for t in rows if t for s in t.split(". ")}
        assert sentences <= set(world.calibration_facts()), name  # what the model learned, nothing else


def test_wikitexts_test_split_holds_enough_held_out_tokens_for_quality_wikitext2(repos):
    """quality=wikitext2 scores num_tokens=4096 tokens of the test split; it is the evaluated people's declarative
    sentences (as quality=heldout), never a calibration split."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    tokenizer: PreTrainedTokenizerFast = tiny.build_tokenizer(tiny.World.generate(tiny.TinyRecipe()))
    rows = [t for t in datasets.load_dataset(str(repos["Salesforce/wikitext"]), WIKITEXT_CONFIG, split="test")["text"]]
    assert "" in rows  # blank lines between paragraphs, as in the real split
    ids = [i for t in rows if t.strip() for i in tokenizer(t + " ", add_special_tokens=False)["input_ids"]]
    assert len(ids) >= 4096 and tokenizer.unk_token_id not in ids
