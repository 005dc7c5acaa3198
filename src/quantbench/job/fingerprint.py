"""Save once, verify every artifact: the saved folder, reloaded in a fresh process, must behave like the model
that was evaluated in memory.

Why: some formats do not survive a save/load round trip (a re-saved GPTQModel checkpoint, a model saved after
a kernel rewrote its buffers in place), and a run that logs an artifact different from what it scored is
worse than a failed run. The fingerprint is next-token behaviour on fixed tokens: mean negative log-likelihood
and the greedy prediction at every position.

`python -m quantbench.job.fingerprint <model_dir> <input_ids.json>` prints the reloaded model's fingerprint as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantbench import children

log = logging.getLogger(__name__)

NLL_REL_TOLERANCE = 0.02  # kernels differ in rounding; a broken artifact is off by far more (3.1 -> 149 seen)
MIN_AGREEMENT = 0.95


@dataclass
class Fingerprint:
    nll: float
    predictions: list[int]

    def compare(self, other: "Fingerprint") -> tuple[float, float]:
        """(relative NLL difference, fraction of positions with the same greedy prediction)."""
        rel = abs(self.nll - other.nll) / max(abs(self.nll), 1e-6)
        same = sum(a == b for a, b in zip(self.predictions, other.predictions)) / max(len(self.predictions), 1)
        return rel, same


def input_ids(tokenizer, text: str, max_tokens: int = 128) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]


@torch.inference_mode()
def of_model(model, ids: list[int]) -> Fingerprint:
    x = torch.tensor([ids], device=model.device)
    logits = model(input_ids=x).logits.float()[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:]).item()
    return Fingerprint(nll=nll, predictions=logits.argmax(-1).tolist())


def of_saved(
    model_dir: Path,
    ids: list[int],
    device: str,
    dtype: str = "auto",
    timeout_s: float | None = 1800,
    loading_attributes: dict | None = None,
) -> Fingerprint:
    """Reload `model_dir` in a fresh Python process (no state shared with this one) and fingerprint it.

    `loading_attributes` override the saved quantization config's loading-time settings (transformers'
    `get_loading_attributes`, e.g. GPTQ's kernel `backend`), as a user passes them to `from_pretrained`."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"ids": ids, "device": device, "dtype": dtype, "loading_attributes": loading_attributes or {}}, f)
    started = time.perf_counter()
    try:
        out = children.run(
            [sys.executable, "-m", "quantbench.job.fingerprint", str(model_dir), f.name],
            timeout_s=timeout_s,
            what=f"The fresh-process reload of {model_dir}",
            setting="timeouts.artifact_check_s",
            env={**os.environ},
        )
    finally:
        os.unlink(f.name)
    # beside the folder, not in it (the folder is the artifact): what the reload did, e.g. kernels it compiled
    child_log = Path(model_dir).parent / "fingerprint_reload.log"
    child_log.write_text(out.stdout + out.stderr)
    log.info(
        "Reloaded %s in a fresh process in %.0f s (its output: %s)", model_dir, time.perf_counter() - started, child_log
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"The saved model in {model_dir} does not reload in a fresh process (it "
            f"{children.describe_exit(out.returncode)}):\n{out.stderr[-3000:]}"
        )
    last = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
    return Fingerprint(**json.loads(last))


def verify(
    model,
    model_dir: Path,
    ids: list[int],
    device: str,
    loading_attributes: dict | None = None,
    timeout_s: float | None = 1800,
) -> dict[str, float]:
    """Compare the in-memory model with its reloaded artifact; raise with a clear reason if they differ."""
    dtype = str(model.dtype).removeprefix("torch.")
    mine = of_model(model, ids)
    saved = of_saved(model_dir, ids, device, dtype=dtype, timeout_s=timeout_s, loading_attributes=loading_attributes)
    for which, fp in (("in memory", mine), ("reloaded", saved)):
        if not math.isfinite(fp.nll):  # NaN compares false with everything: it would pass the checks below
            raise RuntimeError(
                f"The model's loss on the probe text is {fp.nll} ({which}): the weights or the kernel "
                f"produce non-finite logits, so {model_dir} cannot be verified and is not logged."
            )
    rel, agreement = mine.compare(saved)
    if rel > NLL_REL_TOLERANCE or agreement < MIN_AGREEMENT:
        raise RuntimeError(
            f"The saved artifact does not match the evaluated model: NLL {mine.nll:.4f} in memory vs {saved.nll:.4f} "
            f"reloaded ({rel:.1%} apart, tolerance {NLL_REL_TOLERANCE:.0%}); greedy predictions agree at "
            f"{agreement:.1%} of positions (need {MIN_AGREEMENT:.0%}). The artifact in {model_dir} is not what was scored."
        )
    return {"fingerprint_nll": mine.nll, "fingerprint_reload_nll": saved.nll, "fingerprint_agreement": agreement}


def _main(model_dir: str, request: str) -> None:
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(request).read_text())
    kwargs = {}
    if spec.get("loading_attributes"):
        from transformers import AutoConfig
        from transformers.quantizers.auto import AutoQuantizationConfig

        saved = AutoConfig.from_pretrained(model_dir).quantization_config
        kwargs["quantization_config"] = AutoQuantizationConfig.from_dict({**saved, **spec["loading_attributes"]})
    # the evaluated model's dtype, not the saved config's: an AQLM folder saved from a float32 model must run in bf16
    # on CUDA (its kernels refuse float32), and a second dtype would compile a second kernel variant
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=spec.get("dtype", "auto"), device_map=spec["device"], **kwargs
    )
    model.eval()
    fp = of_model(model, spec["ids"])
    print(json.dumps({"nll": fp.nll, "predictions": fp.predictions}))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _main(sys.argv[1], sys.argv[2])
