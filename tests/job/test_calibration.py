"""The user's own calibration data: `calibration.dataset` takes a local file (JSON lines, plain text, Parquet) or a
hub dataset id besides `embedded:tiny`; bad input is refused by `check()` before any model is loaded, with a message
that names the problem; and what the texts were read from (a file's path and sha256) is logged with the run."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from quantbench.job import calibration
from quantbench.errors import ConfigError

SEQ_LEN = 16  # a text qualifies with more than 8 words


def texts_of(n: int, words: int = 12) -> list[str]:
    """n distinct texts of `words` words, long enough to qualify at SEQ_LEN."""
    return [" ".join(f"text{i}-word{j}" for j in range(words)) for i in range(n)]


def write(path: Path, texts: list[str], column: str = "text") -> Path:
    """`texts` in the file format that the extension names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif path.suffix == ".json":
        path.write_text(json.dumps([{column: t} for t in texts]))
    elif path.suffix == ".txt":
        path.write_text("\n\n".join(texts) + "\n")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return path


def cfg(dataset, num_samples: int = 4, seed: int = 0, seq_len: int = SEQ_LEN, **extra):
    return OmegaConf.create(dict(dataset=str(dataset), num_samples=num_samples, seq_len=seq_len, seed=seed, **extra))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --- local files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".txt", ".parquet"])
def test_each_local_format_yields_its_texts_drawn_with_the_seed(tmp_path, ext):
    texts = texts_of(20)
    path = write(tmp_path / f"calib{ext}", texts)
    calibration.check(cfg(path))
    first = calibration.texts(cfg(path, seed=0), tmp_path)
    assert len(first) == 4 and len(set(first)) == 4 and set(first) <= set(texts)
    assert calibration.texts(cfg(path, seed=0), tmp_path) == first  # deterministic
    assert calibration.texts(cfg(path, seed=1), tmp_path) != first  # the seed draws another sample


def test_a_txt_file_holds_one_text_per_paragraph_and_a_paragraph_may_span_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(
        "one two three four five\nsix seven eight nine ten\n\n\nshort\n\nalpha beta gamma delta epsilon "
        "zeta eta theta iota\n"
    )
    chosen = calibration.texts(cfg(path, num_samples=2), tmp_path)
    assert sorted(chosen) == [
        "alpha beta gamma delta epsilon zeta eta theta iota",
        "one two three four five\nsix seven eight nine ten",
    ]


def test_the_text_column_is_configurable(tmp_path):
    path = write(tmp_path / "calib.parquet", texts_of(6), column="content")
    chosen = calibration.texts(cfg(path, text_column="content"), tmp_path)
    assert set(chosen) <= set(texts_of(6))


def test_the_identity_is_the_files_absolute_path_and_sha256(tmp_path):
    path = write(tmp_path / "calib.jsonl", texts_of(10))
    identity = calibration.load(cfg(path), tmp_path).identity
    assert identity["calibration.sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity["calibration.path"] == str(path.resolve())
    assert identity["calibration.source"] == "file" and identity["calibration.qualifying_texts"] == "10"


def test_a_relative_path_starts_from_the_directory_run_py_was_started_in(tmp_path, monkeypatch):
    write(tmp_path / "calib.jsonl", texts_of(10))
    monkeypatch.chdir(tmp_path)
    identity = calibration.load(cfg("calib.jsonl"), tmp_path).identity
    assert identity["calibration.path"] == str((tmp_path / "calib.jsonl").resolve())


def test_an_edited_file_is_read_afresh(tmp_path):
    path = write(tmp_path / "calib.jsonl", texts_of(10))
    before = calibration.load(cfg(path), tmp_path)
    edited = [t.replace("word", "term") for t in texts_of(10)]
    write(path, edited)
    after = calibration.load(cfg(path), tmp_path)
    assert set(after.texts) <= set(edited)
    assert after.identity["calibration.sha256"] != before.identity["calibration.sha256"]


def test_fewer_long_enough_texts_than_num_samples_are_used_with_a_warning_that_counts_them(tmp_path, caplog):
    path = write(tmp_path / "calib.jsonl", texts_of(3) + texts_of(5, words=3))  # 3 long enough, 5 too short
    with caplog.at_level(logging.WARNING, logger="quantbench.job.calibration"):
        chosen = calibration.texts(cfg(path, num_samples=8), tmp_path)
    assert sorted(chosen) == sorted(texts_of(3))
    assert "only 3 texts" in caplog.text and "num_samples=8" in caplog.text


# --- bad input: refused by check(), naming the problem ------------------------------------------------------------


def _bad(tmp_path: Path, case: str):
    """(dataset, extra config keys) for one kind of bad input."""
    if case == "missing file":
        return tmp_path / "no_such.jsonl", {}
    if case == "unknown extension":
        (tmp_path / "calib.csv").write_text("text\nsome words\n")
        return tmp_path / "calib.csv", {}
    if case == "missing text column":
        return write(tmp_path / "calib.jsonl", texts_of(10), column="content"), {}
    if case == "column not text":
        (tmp_path / "calib.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
        return tmp_path / "calib.jsonl", {}
    if case == "empty file":
        (tmp_path / "calib.txt").write_text("")
        return tmp_path / "calib.txt", {}
    if case == "texts too short":
        return write(tmp_path / "calib.txt", texts_of(10, words=3)), {}
    if case == "broken json":
        (tmp_path / "calib.jsonl").write_text('{"text": "fine"}\n{broken\n')
        return tmp_path / "calib.jsonl", {}
    if case == "folder":
        return tmp_path, {}
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case,needles",
    [
        ("missing file", ["no such file", "no_such.jsonl", ".jsonl", ".txt", ".parquet"]),
        ("unknown extension", ["'.csv'", "calib.csv", ".jsonl", ".parquet"]),
        ("missing text column", ["no column 'text'", "calibration.text_column", "content", "calib.jsonl"]),
        ("column not text", ["'text'", "not text", "calib.jsonl"]),
        ("empty file", ["empty", "calib.txt", "blank line"]),
        ("texts too short", ["none of the 10 texts", "more than 8 words", "calibration.seq_len", "calib.txt"]),
        ("broken json", ["cannot be read", "calib.jsonl", "JSON"]),
        ("folder", ["is a folder", ".jsonl"]),
    ],
)
def test_bad_calibration_data_is_refused_by_check_with_a_message_naming_it(tmp_path, case, needles):
    dataset, extra = _bad(tmp_path, case)
    with pytest.raises(ConfigError) as err:
        calibration.check(cfg(dataset, **extra))
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in: {err.value}"
    assert "\n" not in str(err.value)  # one paragraph


def test_calibration_file_without_a_dataset_says_what_to_give():
    c = compose_with("calibration=file")
    with pytest.raises(ConfigError, match=r"calibration.dataset is not set.*\.jsonl"):
        calibration.check(c.calibration)


def test_a_hub_dataset_while_offline_and_not_cached_is_refused_by_check(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing is cached
    with pytest.raises(ConfigError) as err:
        calibration.check(cfg("someone/own-calibration-set", split="train", text_column="body"))
    assert "someone/own-calibration-set" in str(err.value) and "offline" in str(err.value)


# --- hub datasets: any id; the two built-in presets unchanged -------------------------------------------------------


def test_any_hub_id_is_read_from_its_split_text_column_subset_and_revision():
    src = calibration.source(
        cfg("someone/own-set", split="test[:200]", text_column="body", subset="legal", revision="v1.0")
    )
    assert src == calibration.HubDataset("someone/own-set", "legal", "test[:200]", "body", "v1.0", None)
    assert calibration.source(cfg("someone/own-set")).split == "train"  # the default split


def test_the_c4_and_wikitext_configs_read_what_they_always_read():
    c4 = calibration.source(compose_with("calibration=c4").calibration)
    assert (c4.repo_id, c4.subset, c4.split, c4.text_column) == ("allenai/c4", "en", "validation", "text")
    assert c4.data_files == {"validation": "en/c4-validation.00000-of-00008.json.gz"}  # one shard, not all of c4
    wiki = calibration.source(compose_with("calibration=wikitext2").calibration)
    assert (wiki.repo_id, wiki.subset, wiki.split, wiki.data_files) == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "train",
        None,
    )
    # naming the id from another calibration config keeps the preset; another split drops the one-shard files
    assert calibration.source(compose_with("calibration.dataset=allenai/c4").calibration) == c4
    assert calibration.source(compose_with("calibration=c4", "calibration.split=train").calibration).data_files is None


def test_a_hub_dataset_logs_its_id_split_column_and_the_commit_datasets_resolved(local_hub, tmp_path):
    """Read by `datasets` from the local hub (tests/helpers/hub.py), in a process whose HF_ENDPOINT is that hub; a
    wrong split, column or subset is refused by check() with the ones the dataset has."""
    import urllib.request

    from helpers.hub_repos import TEST_DATASET

    out = local_hub.run_python(
        f"""
        import json
        from omegaconf import OmegaConf
        from quantbench.job import calibration
        from quantbench.errors import ConfigError

        def cfg(**kw):
            return OmegaConf.create(dict(dataset="{TEST_DATASET}", num_samples=4, seq_len=64, seed=0) | kw)

        good = cfg(subset="long", text_column="text", revision="main")
        calibration.check(good)
        loaded = calibration.load(good, "{tmp_path}")
        out = {{"identity": loaded.identity, "texts": loaded.texts}}
        bad = {{"split": cfg(subset="long", split="test2"), "column": cfg(subset="long", text_column="body"),
                "subset": cfg(subset="legal")}}
        for name, c in bad.items():
            try:
                calibration.check(c)
            except ConfigError as exc:
                out[name] = str(exc)
        print(json.dumps(out))
        """,
        tmp_path,
        token=False,
    )
    with urllib.request.urlopen(f"{local_hub.url}/api/datasets/{TEST_DATASET}/revision/main", timeout=10) as answer:
        commit = json.load(answer)["sha"]
    assert out["identity"] == {
        "calibration.source": "hub",
        "calibration.hub_id": TEST_DATASET,
        "calibration.hub_subset": "long",
        "calibration.hub_split": "train",
        "calibration.hub_text_column": "text",
        "calibration.hub_revision": commit,
        "calibration.qualifying_texts": "8",
    }
    assert len(out["texts"]) == 4 and all(len(t.split()) == 80 for t in out["texts"])
    assert "no split 'test2'" in out["split"] and "['test', 'train']" in out["split"]
    assert "no column 'body'" in out["column"] and "'text'" in out["column"]
    assert "no subset 'legal'" in out["subset"] and "['short', 'long']" in out["subset"]


def test_calibration_file_reads_well_on_the_command_line(tmp_path):
    path = write(tmp_path / "mine.jsonl", texts_of(10, words=300))
    c = compose_with("calibration=file", f"calibration.dataset={path}")
    calibration.check(c.calibration)
    assert len(calibration.texts(c.calibration, tmp_path)) == 10  # fewer than num_samples=128: all, with a warning


# --- end to end: the real CLI --------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_gptq_calibrates_on_the_users_file_logs_its_sha256_and_a_bad_file_fails_its_run(tmp_path, tiny_root):
    from quantbench.embedded import tiny

    facts = tiny.World.generate(tiny.TinyRecipe()).calibration_facts()  # the embedded model's language
    good = write(tmp_path / "good.jsonl", [" ".join(facts[i : i + 16]) for i in range(0, 16 * 12, 16)])
    write(tmp_path / "bad.jsonl", texts_of(10, words=100), column="content")
    # relative paths: run_cli starts run.py in tmp_path
    store = run_cli(
        "-m",
        "method=gptq",
        "calibration.dataset=good.jsonl,bad.jsonl",
        "calibration.num_samples=8",
        "eval=none",
        "bench=none",
        "quality=none",
        mlruns=tmp_path / "mlruns",
        workdir=tmp_path,
        check=False,
    )
    assert store.result.returncode != 0
    finished, failed = store.runs()
    assert finished.info.status == "FINISHED", store.result.stdout[-3000:]
    params = finished.data.params
    assert params["calibration.sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert params["calibration.path"] == str(good.resolve())
    assert params["calibration.dataset"] == "good.jsonl"
    assert failed.info.status == "FAILED"
    reason = failed.data.tags["failure_reason"]
    assert "bad.jsonl" in reason and "no column 'text'" in reason and "content" in reason
    assert "disk_gb" not in failed.data.metrics  # refused before any model was loaded
