"""Calibration texts for methods that need them (GPTQ, AWQ, AutoRound, AQLM).

`calibration.dataset` names one of three sources:

* `embedded:tiny`: sentences in the embedded model's own language (offline, generated from the seed);
* a local file: `.jsonl`/`.json` (JSON lines, or one JSON array of objects; the text is in `text_column`),
  `.txt` (one text per paragraph: paragraphs are separated by a blank line; a paragraph may span lines),
  `.parquet` (the text is in `text_column`). A relative path resolves against the directory `run.py` was started in;
* a Hugging Face hub dataset id (`namespace/name`), read with `datasets` from `split`, `text_column`, optionally a
  `subset` (the dataset's config name) and a `revision`. allenai/c4 and Salesforce/wikitext keep their presets.

Whatever the source, a text qualifies when it has more than seq_len/2 words, and `num_samples` qualifying texts are
drawn with `seed`. What was read is logged with the run (`identity`): a file's absolute path and sha256, a hub
dataset's id, subset, split, text column and resolved revision.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantbench import measure
from quantbench.errors import ConfigError
from quantbench.hub import OFFLINE_MODE, hub_access_problem, hub_endpoint, hub_unreachable
from quantbench.paths import EMBEDDED_PREFIX

log = logging.getLogger(__name__)

# Presets of the two hub datasets the built-in configs name: used where `subset`/`split` are left null. The c4 preset
# reads one validation shard (40 MB), never the whole English split.
HUB_DATASETS = {
    "allenai/c4": dict(
        subset="en", split="validation", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}
    ),
    "Salesforce/wikitext": dict(subset="wikitext-2-raw-v1", split="train"),
}
DEFAULT_SPLIT = "train"
DEFAULT_TEXT_COLUMN = "text"
# extension -> the `datasets` packaged builder that reads it
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
VALID_SOURCES = (
    "'embedded:tiny'; a local file ending in .jsonl or .json (JSON lines or a JSON array of objects, "
    "text in calibration.text_column), .txt (one text per blank-line-separated paragraph) or .parquet "
    "(text in calibration.text_column); or a hub dataset id 'namespace/name' (with calibration.split, "
    "calibration.text_column and optionally calibration.subset and calibration.revision)"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")  # `.csv`, `.tsv`, `.gz`: meant as a file, not a hub id

# For fingerprinting artifacts of real models when no calibration text was loaded (fp16, bitsandbytes).
ENGLISH_PROBE = (
    "The quick brown fox jumps over the lazy dog. Quantization stores the weights of a neural network with fewer "
    "bits, trading a little accuracy for memory and speed. Large language models read text as tokens and predict "
    "the next token from the ones before it, one step at a time."
)


@dataclass(frozen=True)
class LocalFile:
    path: Path  # absolute
    builder: str  # the `datasets` builder that reads it: json, text or parquet
    text_column: str

    @property
    def column(self) -> str:
        return "text" if self.builder == "text" else self.text_column  # a .txt file has one column, "text"


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    subset: str | None
    split: str
    text_column: str
    revision: str | None
    data_files: dict | None = None


@dataclass
class Calibration:
    """The texts a method calibrates on, and the identity of what they were read from (MLflow params; none of their
    keys is a config key, whose params are already logged and cannot change)."""

    texts: list[str]
    identity: dict[str, str] = field(default_factory=dict)


def source(cfg: DictConfig) -> LocalFile | HubDataset | None:
    """What `calibration.dataset` names: None for the embedded text, a local file, or a hub dataset."""
    if OmegaConf.is_missing(cfg, "dataset"):
        raise ConfigError(
            f"calibration.dataset is not set; give calibration.dataset=<source>, where a source is {VALID_SOURCES}."
        )
    ds = str(cfg.dataset).strip()
    if ds.startswith(EMBEDDED_PREFIX):
        return None
    path = _absolute(ds)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ConfigError(
            f"calibration.dataset={ds!r} is a folder ({path}); give one file in it, or another source: {VALID_SOURCES}."
        )
    if suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise ConfigError(
                f"calibration.dataset={ds!r}: no such file: {path} (relative paths start from the "
                f"directory run.py was started in). Valid sources: {VALID_SOURCES}."
            )
        return LocalFile(path, LOCAL_FORMATS[suffix], str(cfg.get("text_column") or DEFAULT_TEXT_COLUMN))
    if path.is_file():
        raise ConfigError(
            f"calibration.dataset={ds!r} is a file with extension {suffix or '(none)'!r}, which "
            f"quantbench does not read; convert it to .jsonl, .json, .txt or .parquet. "
            f"Valid sources: {VALID_SOURCES}."
        )
    if ds.startswith(("/", ".", "~")) or ds.count("/") > 1 or "\\" in ds or _FILE_SUFFIX.search(ds):
        ext = f", and {suffix!r} is not a format quantbench reads" if suffix else ""
        raise ConfigError(
            f"calibration.dataset={ds!r} looks like a file, but there is no file {path}{ext}. "
            f"Valid sources: {VALID_SOURCES}."
        )
    if not _HUB_ID.fullmatch(ds):
        raise ConfigError(
            f"calibration.dataset={ds!r} is neither a file nor a hub dataset id. Valid sources: {VALID_SOURCES}."
        )
    preset = HUB_DATASETS.get(ds, {})
    subset = cfg.get("subset") or preset.get("subset")
    split = str(cfg.get("split") or preset.get("split") or DEFAULT_SPLIT)
    data_files = preset.get("data_files") if (subset, split) == (preset.get("subset"), preset.get("split")) else None
    revision = cfg.get("revision")
    return HubDataset(
        ds,
        None if subset is None else str(subset),
        split,
        str(cfg.get("text_column") or DEFAULT_TEXT_COLUMN),
        None if revision is None else str(revision),
        data_files,
    )


def check(cfg: DictConfig) -> None:
    """Fail fast, before any model is loaded: sizes make sense, a file is there and readable with its text column
    and enough long texts, a hub dataset is only asked for when the hub can be reached or it is cached."""
    if int(cfg.num_samples) < 1 or int(cfg.seq_len) < 8:
        raise ConfigError(
            f"calibration: num_samples={cfg.num_samples} and seq_len={cfg.seq_len} must be >= 1 and >= 8."
        )
    src = source(cfg)
    if isinstance(src, LocalFile):
        _qualifying(_read_file(src), cfg, f"file {src.path}", _layout(src))
    elif isinstance(src, HubDataset):
        why = hub_unreachable()  # up to a 3 s connection attempt to the endpoint: once
        if why is not None and not _cached(src.repo_id):
            how = (
                "unset HF_HUB_OFFLINE to read it from the hub"
                if why == OFFLINE_MODE
                else f"check HF_ENDPOINT ({hub_endpoint()}) and the network, or load it once where the hub is "
                f"reachable into this machine's `datasets` cache (HF_HOME) and run with HF_HUB_OFFLINE=1"
            )
            raise ConfigError(
                f"calibration.dataset={src.repo_id!r} is a hub dataset, the hub cannot be used ({why}), and "
                f"`datasets` has no cached copy of it (nor is there a file {_absolute(src.repo_id)}). Use a local "
                f"copy: calibration.dataset=<a .jsonl/.json/.txt/.parquet file> or calibration=local; or {how}."
            )
        if why is None:
            problem = hub_access_problem(src.repo_id, src.revision, "dataset")
            if problem:
                raise ConfigError(f"calibration.dataset={src.repo_id!r}: {problem}.")
        _check_hub(src)


def texts(cfg: DictConfig, cache_dir: str | Path) -> list[str]:
    """`num_samples` texts, drawn with `seed` (see `load`)."""
    return load(cfg, cache_dir).texts


def load(cfg: DictConfig, cache_dir: str | Path) -> Calibration:
    """`num_samples` texts, drawn with `seed`, and where they came from. Embedded: about seq_len/8 sentences each
    (~8 tokens a sentence); files and hub datasets: texts of more than seq_len/2 words (usually, not always,
    seq_len tokens; methods truncate), fewer (with a warning) when fewer qualify."""
    rng = random.Random(int(cfg.seed))
    src = source(cfg)
    if src is None:
        from quantbench.embedded import tiny

        facts = tiny.World.generate(tiny.TinyRecipe()).calibration_facts()
        # The model's own language, about people and sums that it learned and no task asks about (no leak of the
        # evaluated questions or their answers into calibration): sentences in a fresh random order per sample.
        chosen = [" ".join(rng.sample(facts, k=max(4, int(cfg.seq_len) // 8))) for _ in range(int(cfg.num_samples))]
        return Calibration(chosen, {"calibration.source": str(cfg.dataset)})
    if isinstance(src, LocalFile):
        where = f"file {src.path}"
        rows = _qualifying(_read_file(src), cfg, where, _layout(src))
        identity = {
            "calibration.source": "file",
            "calibration.path": str(src.path),
            "calibration.sha256": measure.sha256(src.path),
            "calibration.format": src.builder,
        }
    else:
        where = f"hub dataset {src.repo_id} (split {src.split!r}, column {src.text_column!r})"
        rows, revision = _read_hub(src)
        rows = _qualifying(rows, cfg, where, None)
        identity = {
            "calibration.source": "hub",
            "calibration.hub_id": src.repo_id,
            "calibration.hub_subset": src.subset or "default",
            "calibration.hub_split": src.split,
            "calibration.hub_text_column": src.text_column,
            "calibration.hub_revision": revision,
        }
    n = int(cfg.num_samples)
    if len(rows) < n:
        log.warning(
            "Calibration: only %d texts of %s have more than %d words (seq_len/2): calibrating on %d "
            "texts, not num_samples=%d",
            len(rows),
            where,
            int(cfg.seq_len) // 2,
            len(rows),
            n,
        )
    identity["calibration.qualifying_texts"] = str(len(rows))
    return Calibration(rng.sample(rows, k=min(n, len(rows))), identity)


def _absolute(ds: str) -> Path:
    """Hydra may run a job in another directory: relative paths mean the directory the user started run.py in."""
    from hydra.utils import to_absolute_path

    return Path(to_absolute_path(os.path.expanduser(ds))).resolve()


def _read_file(src: LocalFile) -> list[str]:
    """The file's texts in file order, read by `datasets` (JSON lines or array, paragraphs of text, Parquet)."""
    import datasets

    if src.path.stat().st_size == 0:
        raise ConfigError(f"calibration.dataset={str(src.path)!r} is empty; it needs texts: {_layout(src)}.")
    kwargs = {"sample_by": "paragraph"} if src.builder == "text" else {}
    try:
        data = datasets.load_dataset(src.builder, data_files=str(src.path), split="train", **kwargs)
    except Exception as exc:
        raise ConfigError(
            f"calibration.dataset={str(src.path)!r} cannot be read as {src.path.suffix} "
            f"({_layout(src)}): {_reason(exc.__cause__ or exc)}"
        ) from exc
    if src.column not in data.column_names:
        raise ConfigError(
            f"calibration.dataset={str(src.path)!r} has no column {src.column!r} "
            f"(calibration.text_column); its columns are {data.column_names}. Set "
            f"calibration.text_column to the one that holds the text."
        )
    dtype = getattr(data.features[src.column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ConfigError(
            f"calibration.dataset={str(src.path)!r}: column {src.column!r} (calibration.text_column) "
            f"holds {data.features[src.column]}, not text; set calibration.text_column to the column "
            f"of strings, one of {data.column_names}."
        )
    values = list(data[src.column])
    if src.builder == "text":
        values = [v.strip() for v in values]
    return [v for v in values if v]


def _layout(src: LocalFile) -> str:
    if src.builder == "text":
        return "a .txt file holds one text per paragraph, paragraphs separated by a blank line"
    if src.builder == "json":
        return (
            f"JSON lines (one object a line) or one JSON array of objects, each with the text under {src.text_column!r}"
        )
    return f"a Parquet table with the text in column {src.text_column!r}"


def _qualifying(rows: list[str], cfg: DictConfig, where: str, layout: str | None) -> list[str]:
    """The texts long enough to calibrate on; none is a ConfigError (the rule and the longest text say why)."""
    min_words = int(cfg.seq_len) // 2
    words = [len(t.split()) for t in rows]
    kept = [t for t, w in zip(rows, words) if w > min_words]
    if not kept:
        hint = f" ({layout})" if layout else ""
        raise ConfigError(
            f"calibration.dataset: none of the {len(rows)} texts of {where}{hint} has more than "
            f"{min_words} words (seq_len/2 with calibration.seq_len={cfg.seq_len}); the longest has "
            f"{max(words, default=0)}. Give longer texts or lower calibration.seq_len."
        )
    return kept


def _hub_builder(src: HubDataset):
    import datasets

    try:
        return datasets.load_dataset_builder(
            src.repo_id, name=src.subset, revision=src.revision, data_files=src.data_files
        )
    except Exception as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(f"BuilderConfig '{src.subset}' not found"):
            subsets = datasets.get_dataset_config_names(src.repo_id, revision=src.revision)
            raise ConfigError(
                f"calibration.dataset={src.repo_id!r} has no subset {src.subset!r} (calibration.subset, the "
                f"dataset's config name); its subsets are {subsets}."
            ) from exc
        raise ConfigError(
            f"calibration.dataset={src.repo_id!r} (subset {src.subset!r}, revision "
            f"{src.revision!r}) cannot be opened with `datasets`: {_reason(exc)}. Check the id, "
            f"calibration.subset and calibration.revision."
        ) from exc


def _check_hub(src: HubDataset) -> None:
    """Split and text column, where the dataset's metadata says which there are (no data is downloaded)."""
    info = _hub_builder(src).info
    base_split = src.split.split("[")[0]  # `train[:10%]` slices the train split
    if info.splits and base_split not in info.splits:
        raise ConfigError(
            f"calibration.dataset={src.repo_id!r} has no split {base_split!r} (calibration.split); "
            f"its splits are {sorted(info.splits)}."
        )
    if info.features and src.text_column not in info.features:
        raise ConfigError(
            f"calibration.dataset={src.repo_id!r} has no column {src.text_column!r} "
            f"(calibration.text_column); its columns are {sorted(info.features)}."
        )


def _read_hub(src: HubDataset) -> tuple[list[str], str]:
    """The split's texts and the revision read: the commit `datasets` resolved, else the one asked for."""
    builder = _hub_builder(src)
    try:
        builder.download_and_prepare()
        data = builder.as_dataset(split=src.split)
    except Exception as exc:
        raise ConfigError(
            f"calibration.dataset={src.repo_id!r}: cannot read split {src.split!r} (calibration.split): {_reason(exc)}"
        ) from exc
    if src.text_column not in data.column_names:
        raise ConfigError(
            f"calibration.dataset={src.repo_id!r} has no column {src.text_column!r} "
            f"(calibration.text_column); its columns are {data.column_names}."
        )
    commit = str(getattr(builder, "hash", "") or "")
    revision = commit if re.fullmatch(r"[0-9a-f]{40}", commit) else (src.revision or "unresolved")
    return [t for t in data[src.text_column] if isinstance(t, str) and t], revision


def _reason(exc: BaseException) -> str:
    """A library's error as one short line, for a one-paragraph ConfigError."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _cached(repo_id: str) -> bool:
    """Whether `datasets` can load this hub dataset offline: it has a prepared copy in its cache."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    *namespace, name = repo_id.split("/")
    folder = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(
        [*namespace, camelcase_to_snakecase(name)]
    )
    return any(p.is_dir() for p in folder.glob("*/*/*"))
