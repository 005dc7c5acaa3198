"""The repositories the local hub (tests/helpers/hub.py) serves for the seed's study, written under its root.

* `meta-llama/Llama-3.1-8B-Instruct` and `meta-llama/Llama-3.1-8B`, gated: the files of a model folder (the embedded
  model here, the 8B-shape folder on the GPU machine), hard-linked (or symlinked across file systems), never copied;
* the repo id `conf/method/aqlm_2bit_pretrained.yaml` names, not gated: an AQLM checkpoint of that model made by
  quantbench's own AQLM quantizer (method aqlm_2bit, calibration=local), cached under the project cache by the model's
  content and the quantizer's settings, so it is quantized once;
* the seed's dataset repositories (cais/mmlu, allenai/ai2_arc, allenai/c4, Salesforce/wikitext), written from the
  embedded world by tests/helpers/hub_datasets.py.

Each repository is written into a temporary folder and renamed into place, and skipped when its content key (the files'
sha256s and the gated flag, in its `.hub.json`) is unchanged.

    python tests/helpers/hub_repos.py --root DIR [--model embedded:tiny] [--hardware cpu] [--no-aqlm]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `helpers` importable as under pytest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import hub_datasets  # noqa: E402
from helpers.hub import DIGEST_MEMO, HUB_META, DigestMemo  # noqa: E402

log = logging.getLogger("quantbench.tests.hub_repos")

SEED_MODELS = ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B")
TEST_DATASET = "quantbench-test/tiny-texts"  # two configs, parquet: tests/test_local_hub.py, tests/test_hub_path.py
# What an AQLM checkpoint holds beside the tokenizer: the rest of the source folder is the tokenizer, copied in.
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def aqlm_repo_id() -> str:
    """The published checkpoint's repo id, as the seed's method config names it."""
    from omegaconf import OmegaConf

    from quantbench.paths import ROOT

    return str(OmegaConf.load(ROOT / "conf" / "method" / "aqlm_2bit_pretrained.yaml").pretrained)


def build(
    root: Path,
    model_folder: Path,
    *,
    aqlm: bool = True,
    hardware: str = "cpu",
    cache_dir: Path | None = None,
    aqlm_overrides: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Write every repository under `root` (idempotent); returns repo id -> folder. `aqlm_overrides` are Hydra
    overrides of the AQLM quantization (e.g. the shortest search for an 8B-shape stand-in on a GPU)."""
    from quantbench.paths import cache_root

    root, model_folder = Path(root), Path(model_folder)
    if not (model_folder / "config.json").is_file():
        raise FileNotFoundError(f"{model_folder}: not a model folder (no config.json)")
    memo = DigestMemo(root / DIGEST_MEMO)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for repo_id in SEED_MODELS:
        out[repo_id] = publish(root / "models" / repo_id, _files(model_folder), gated=True, memo=memo)
    if aqlm:
        out[aqlm_repo_id()] = write_aqlm_repo(
            root, model_folder, hardware, Path(cache_dir or cache_root()), aqlm_overrides
        )
    out |= hub_datasets.write_dataset_repos(root)
    memo.save()
    return out


def write_aqlm_repo(
    root: Path,
    model_folder: Path,
    hardware: str = "cpu",
    cache_dir: Path | None = None,
    overrides: tuple[str, ...] = (),
) -> Path:
    """The repository of the repo id `aqlm_2bit_pretrained` names: quantbench's AQLM checkpoint of `model_folder`."""
    from quantbench.paths import cache_root

    checkpoint = aqlm_checkpoint(model_folder, Path(cache_dir or cache_root()), hardware, overrides)
    memo = DigestMemo(Path(root) / DIGEST_MEMO)
    folder = publish(Path(root) / "models" / aqlm_repo_id(), _files(checkpoint), gated=False, memo=memo)
    memo.save()
    return folder


def publish(folder: Path, files: dict[str, Path], gated: bool, memo: DigestMemo) -> Path:
    """`files` (path in the repo -> file) as the repository `folder`: linked into a temporary folder, renamed into place;
    left alone if it already holds this content (same sha256s, same gated flag)."""
    digests = {rel: memo.digests(f)[0] for rel, f in sorted(files.items())}
    key = hashlib.sha256(json.dumps([digests, gated], sort_keys=True).encode()).hexdigest()
    meta = folder / HUB_META
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, f in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link(f, target)
    (tmp / HUB_META).write_text(json.dumps({"gated": gated, "key": key}) + "\n")
    _replace(tmp, folder)
    log.info("Published %s (%d files, gated=%s)", folder, len(files), gated)
    return folder


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _link(source: Path, target: Path) -> None:
    """A hard link (a 16 GB shard is not copied); a symlink where the file systems differ."""
    try:
        os.link(source.resolve(), target)
    except OSError:
        target.symlink_to(source.resolve())


def _replace(tmp: Path, folder: Path) -> None:
    """`tmp` becomes `folder`; an older version is moved aside first and removed after."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


# -- the AQLM checkpoint, by quantbench's own quantizer ------------------------------------------------------------------


def aqlm_checkpoint(
    model_folder: Path, cache_dir: Path, hardware: str = "cpu", overrides: tuple[str, ...] = ()
) -> Path:
    """An AQLM checkpoint of `model_folder` (plus its tokenizer), made by `method=aqlm_2bit calibration=local` on
    `hardware`; stored under <cache>/quantbench/hub-aqlm/<key>, the key made of the model's file sha256s, the method's
    and calibration's resolved configs, the hardware's device and dtype and the library versions."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from quantbench import schema
    from quantbench.job import calibration
    from quantbench.versions import library_version
    from quantbench.job.models import SourceModel
    from quantbench.paths import ROOT

    schema.register()
    composed = ["method=aqlm_2bit", "calibration=local", f"hardware={hardware}", f"paths.cache={cache_dir}", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=composed)
    memo = DigestMemo(cache_dir / "quantbench" / "hub-aqlm" / DIGEST_MEMO)
    memo.path.parent.mkdir(parents=True, exist_ok=True)
    method_cfg = {
        k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in ("work_dir", "keep_work")
    }
    inputs = {
        "model": {rel: memo.digests(f)[0] for rel, f in _files(model_folder).items()},
        "method": method_cfg,
        "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),
        "hardware": {"device": str(cfg.hardware.device), "dtype": str(cfg.hardware.dtype)},
        "libraries": {d: library_version(d) for d in ("torch", "transformers", "aqlm")},
    }
    memo.save()
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    entry = cache_dir / "quantbench" / "hub-aqlm" / key
    if (entry / "inputs.json").is_file():
        return entry / "model"
    log.info("Quantizing %s with quantbench's AQLM (%s) for the local hub's %s", model_folder, hardware, aqlm_repo_id())
    tmp = entry.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    work = entry.with_name(f".{key}.work")  # finished layers: an interrupted build resumes after the last one
    method = instantiate(cfg.method, work_dir=str(work))
    source = SourceModel(name="hub-source", reference=str(model_folder), path_or_id=str(model_folder))
    method.validate(source.config(), cfg.hardware)
    texts = calibration.load(cfg.calibration, cache_dir).texts
    model = method.quantize(source, tmp / "model", cfg.hardware, texts)
    del model
    for rel, f in _files(model_folder).items():  # the tokenizer, as published checkpoints carry it
        if not rel.endswith(".safetensors") and rel not in WEIGHT_FILES:
            shutil.copyfile(f, tmp / "model" / rel)
    (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
    if entry.exists():  # another process finished first: keep theirs
        shutil.rmtree(tmp)
    else:
        tmp.rename(entry)
    return entry / "model"


# -- the small dataset the hub's own tests read ----------------------------------------------------------------------


def write_test_dataset(root: Path) -> Path:
    """`quantbench-test/tiny-texts`: two configs (`short`, `long`) of parquet train/test splits, declared in README.md's
    `configs:` as hub datasets declare them; the `long` texts are long enough to calibrate on (seq_len 128)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "datasets" / TEST_DATASET
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
    configs = {
        "short": {split: [f"{split} text {i}: {words[i % 16]}" for i in range(n)] for split, n in (("train", 6), ("test", 3))},
        "long": {split: [" ".join(words[(i + j) % 16] for j in range(80)) for i in range(n)] for split, n in (("train", 8), ("test", 2))},
    }  # fmt: skip
    card = ["---", "configs:"]
    for name, splits in configs.items():
        card += [f"- config_name: {name}", "  data_files:"]
        for split, texts in splits.items():
            path = f"{name}/{split}-00000-of-00001.parquet"
            (tmp / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": texts, "idx": list(range(len(texts)))}), tmp / path)
            card += [f"  - split: {split}", f"    path: {path}"]
    card += ["---", "", "Texts for the tests of quantbench's local hub.", ""]
    (tmp / "README.md").write_text("\n".join(card))
    if folder.exists() and _same_tree(folder, tmp):
        shutil.rmtree(tmp)
    else:
        _replace(tmp, folder)
    return folder


def _same_tree(a: Path, b: Path) -> bool:
    files_a, files_b = _files(a), _files(b)
    return files_a.keys() == files_b.keys() and all(files_a[k].read_bytes() == files_b[k].read_bytes() for k in files_a)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the local hub's repositories (see tests/helpers/hub.py).")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument(
        "--model", default="embedded:tiny", help="embedded:tiny, embedded:llama-3.1-8b-shape or a folder"
    )
    parser.add_argument(
        "--hardware", default="cpu", help="where the AQLM checkpoint is quantized (a conf/hardware name)"
    )
    parser.add_argument("--no-aqlm", action="store_true", help="leave out the AQLM checkpoint")
    parser.add_argument(
        "--aqlm-override",
        action="append",
        default=[],
        help="a Hydra override of the AQLM quantization, e.g. method.codebooks=2x8 (repeatable; part of its cache key)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from quantbench.job import models
    from quantbench.paths import cache_root

    folder = (
        models.embedded_root(args.model, cache_root()) / "model"
        if args.model.startswith("embedded:")
        else Path(args.model)
    )
    built = build(
        args.root, folder, aqlm=not args.no_aqlm, hardware=args.hardware, aqlm_overrides=tuple(args.aqlm_override)
    )
    for repo_id, path in built.items():
        print(f"{repo_id}\t{path}")


if __name__ == "__main__":
    main()
