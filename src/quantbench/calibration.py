"""Calibration texts for methods that need them (GPTQ, AWQ, AutoRound, AQLM)."""

from __future__ import annotations

import random
from pathlib import Path

from omegaconf import DictConfig

from quantbench.errors import ConfigError
from quantbench.models import EMBEDDED_PREFIX, hub_offline

HUB_DATASETS = {
    "allenai/c4": dict(name="en", split="validation", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}),
    "Salesforce/wikitext": dict(name="wikitext-2-raw-v1", split="train"),
}

# For fingerprinting artifacts of real models when no calibration text was loaded (fp16, bitsandbytes).
ENGLISH_PROBE = (
    "The quick brown fox jumps over the lazy dog. Quantization stores the weights of a neural network with fewer "
    "bits, trading a little accuracy for memory and speed. Large language models read text as tokens and predict "
    "the next token from the ones before it, one step at a time."
)


def check(cfg: DictConfig) -> None:
    """Fail fast: sizes make sense, and a hub dataset is only asked for when the hub can be reached."""
    if int(cfg.num_samples) < 1 or int(cfg.seq_len) < 8:
        raise ConfigError(f"calibration: num_samples={cfg.num_samples} and seq_len={cfg.seq_len} must be >= 1 and >= 8.")
    ds = str(cfg.dataset)
    if ds.startswith(EMBEDDED_PREFIX):
        return
    if ds not in HUB_DATASETS:
        raise ConfigError(f"calibration.dataset={ds!r} is unknown; choose 'embedded:tiny' or one of {sorted(HUB_DATASETS)}.")
    if hub_offline() and not _cached(ds):
        raise ConfigError(f"calibration.dataset={ds!r} is a hub dataset and the hub cannot be reached (offline); "
                          f"use calibration=local, or download it into the Hugging Face cache first.")


def _cached(dataset: str) -> bool:
    from huggingface_hub import scan_cache_dir

    try:
        return any(r.repo_id == dataset for r in scan_cache_dir().repos)
    except Exception:
        return False


def texts(cfg: DictConfig, cache_dir: str | Path) -> list[str]:
    """`num_samples` texts, drawn with `seed`. Embedded: about seq_len/8 sentences each (~8 tokens a sentence);
    hub datasets: rows of more than seq_len/2 words (usually, not always, seq_len tokens; methods truncate)."""
    rng = random.Random(int(cfg.seed))
    ds = str(cfg.dataset)
    if ds.startswith(EMBEDDED_PREFIX):
        from quantbench.fixtures import tiny

        facts = tiny.World.generate(tiny.TinyRecipe()).calibration_facts()
        # The model's own language, about people and sums that it learned and no task asks about (no leak of the
        # evaluated questions or their answers into calibration): sentences in a fresh random order per sample.
        return [" ".join(rng.sample(facts, k=max(4, int(cfg.seq_len) // 8))) for _ in range(int(cfg.num_samples))]
    import datasets

    kwargs = HUB_DATASETS[ds]
    data = datasets.load_dataset(ds, **kwargs)
    rows = [t for t in data["text"] if len(t.split()) > int(cfg.seq_len) // 2]
    return rng.sample(rows, k=min(int(cfg.num_samples), len(rows)))
