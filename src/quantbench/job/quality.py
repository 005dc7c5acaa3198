"""Distribution-level quality against the unquantized baseline: how far a quantized model's next-token distribution
moved, on held-out text of fixed length.

Why: multiple-choice accuracy over a thousand questions moves in steps of a tenth of a point and ties methods that
differ; the KL divergence of the next-token distribution from the baseline's, its 99th percentile (the tokens where
a method breaks) and top-1 agreement move long before accuracy does (the measures llama.cpp's quantization tables
and the quantization literature use). Perplexity on the same text is logged beside them.

The baseline's log-probabilities are computed once per (source model's content, dtype, device type, windows) and
cached: from the in-memory model when the job is the baseline itself (fp16), else by loading the unquantized source
model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantbench.names import PER_WINDOW  # noqa: F401  (quality.PER_WINDOW)
from quantbench.errors import ConfigError
from quantbench.job.models import EMBEDDED_PREFIX, SourceModel

log = logging.getLogger(__name__)

# wikitext-2's test split: the text perplexity is usually reported on for hub models
HUB_TEXTS = {"Salesforce/wikitext": dict(name="wikitext-2-raw-v1", split="test")}


@dataclass
class QualityPlan:
    dataset: str
    num_tokens: int
    seq_len: int
    batch_size: int
    seed: int


def plan(cfg: DictConfig) -> QualityPlan | None:
    """Check `quality` cheaply; None for quality=none."""
    if cfg.get("dataset") is None:
        return None
    ds = str(cfg.dataset)
    if not ds.startswith(EMBEDDED_PREFIX) and ds not in HUB_TEXTS:
        raise ConfigError(f"quality.dataset={ds!r} is unknown; choose 'embedded:tiny' or one of {sorted(HUB_TEXTS)}.")
    p = QualityPlan(ds, int(cfg.num_tokens), int(cfg.seq_len), int(cfg.batch_size), int(cfg.seed))
    if p.seq_len < 8 or p.num_tokens < p.seq_len or p.batch_size < 1:
        raise ConfigError(
            f"quality: seq_len={p.seq_len} must be >= 8, num_tokens={p.num_tokens} at least one "
            f"window of seq_len, batch_size={p.batch_size} >= 1."
        )
    return p


def texts(p: QualityPlan) -> list[str]:
    """The held-out text. Embedded model: declarative sentences about the people the tasks ask about (the tasks ask
    the question-and-answer forms; calibration text is about other people), in a seeded order; hub models:
    wikitext-2's test split."""
    rng = random.Random(p.seed)
    if p.dataset.startswith(EMBEDDED_PREFIX):
        from quantbench.embedded import tiny

        world = tiny.World.generate(tiny.TinyRecipe())
        sentences = [s for s in world.person_facts(world.people) if not s.startswith("Q:")]
        rng.shuffle(sentences)
        return sentences
    import datasets

    return [t for t in datasets.load_dataset(p.dataset, **HUB_TEXTS[p.dataset])["text"] if t.strip()]


def windows(tokenizer, p: QualityPlan) -> torch.Tensor:
    """[num_tokens // seq_len, seq_len] token ids: the text as one stream, cut into equal windows."""
    need = (p.num_tokens // p.seq_len) * p.seq_len
    ids: list[int] = []
    for text in texts(p):
        ids += tokenizer(text + " ", add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ConfigError(f"quality.num_tokens={p.num_tokens}: the held-out text has only {len(ids)} tokens.")
    return torch.tensor(ids[:need]).view(-1, p.seq_len)


@torch.inference_mode()
def log_probs(model, ids: torch.Tensor, batch_size: int):
    """Per batch of windows: next-token log-probabilities at positions 0..L-2 (float32, on the model's device)."""
    for i in range(0, len(ids), batch_size):
        x = ids[i : i + batch_size].to(model.device)
        yield x, torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)


def windows_id(ids: torch.Tensor) -> str:
    """The held-out windows' identity: their shape and token ids (the same tokens cut at another seq_len are other
    windows). Per-window figures of two runs pair only when this is equal."""
    return hashlib.sha256(f"{list(ids.shape)}|{ids.dtype}|".encode() + ids.numpy().tobytes()).hexdigest()[:16]


def baseline_path(cache_dir: str | Path, source: SourceModel, dtype: str, device: str, ids: torch.Tensor) -> Path:
    """Where the baseline's distributions on these windows are cached: keyed by the source model's content (file
    hashes or hub commit, so a folder retrained in place is another baseline), dtype, device type and the windows
    (shape included)."""
    from quantbench.job import identity as identities

    identity = json.dumps(identities.model(source, Path(cache_dir)), sort_keys=True)
    key = hashlib.sha256(f"{identity}|{dtype}|{device.split(':')[0]}|{windows_id(ids)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "quantbench" / "baselines" / f"{source.name}-{key}.pt"


FLOAT32_LIMIT = 2**30  # bytes: below this the baseline is kept exactly (float32), above it as float16


def baseline(model, ids: torch.Tensor, p: QualityPlan, path: Path) -> torch.Tensor:
    """The baseline's log-probabilities on CPU, computed with `model` and cached at `path`: float32 where that fits
    in FLOAT32_LIMIT (the baseline's own KL is then exactly 0), else float16 (Llama 3.1's 128k vocabulary:
    4 bytes x 4096 tokens x 128256 = 2.1 GB; float16 rounding adds about 1e-4 to each KL)."""
    if path.exists():
        return torch.load(path)
    vocab = model.config.get_text_config().vocab_size if hasattr(model, "config") else None
    exact = vocab is None or 4 * ids.shape[0] * (ids.shape[1] - 1) * vocab <= FLOAT32_LIMIT
    out = torch.cat([(lp if exact else lp.half()).cpu() for _, lp in log_probs(model, ids, p.batch_size)])
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of its own, then an atomic replace: jobs sharing the cache (a Ray sweep, pytest-xdist) may
    # compute the same baseline at once, and one must never move or read the other's half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    torch.save(out, tmp)
    os.replace(tmp, path)
    log.info("Stored the baseline's next-token distributions (%d tokens) at %s", out.shape[0] * out.shape[1], path)
    return out


@dataclass
class Comparison:
    metrics: dict[str, float]
    # per window of seq_len tokens: mean KL, top-1 agreement, mean NLL. Windows are the unit the report resamples
    # for paired intervals between two runs (tokens within a window are not independent).
    per_window: dict[str, list[float]]


def compare(model, ids: torch.Tensor, base: torch.Tensor, batch_size: int) -> Comparison:
    """KL(baseline || model) per position (mean and 99th percentile), top-1 agreement, and the model's perplexity."""
    kls, agree, nll = [], [], []
    for i, (x, lq) in enumerate(log_probs(model, ids, batch_size)):
        lp = base[i * batch_size : i * batch_size + len(x)].to(lq.device).float()
        kls.append((lp.exp() * (lp - lq)).sum(-1).cpu())
        agree.append((lp.argmax(-1) == lq.argmax(-1)).cpu())
        nll.append(-lq.gather(-1, x[:, 1:, None]).squeeze(-1).cpu())
    kl = torch.cat(kls).clamp_min(0)  # [windows, positions]; float rounding can leave -1e-7 where equal
    agree_all, nll_all = torch.cat(agree).float(), torch.cat(nll)
    metrics = {
        "quality_kl_mean": kl.mean().item(),
        "quality_kl_p99": torch.quantile(kl.flatten(), 0.99).item(),
        "quality_top1_agreement": agree_all.mean().item(),
        "quality_ppl": nll_all.mean().exp().item(),
        "quality_tokens": float(kl.numel()),
    }
    per_window = {
        "kl_mean": kl.mean(1).tolist(),
        "top1_agreement": agree_all.mean(1).tolist(),
        "nll_mean": nll_all.mean(1).tolist(),
    }
    return Comparison(metrics, per_window)
