"""Throughput through Hugging Face transformers' generate(): for methods and machines vLLM cannot serve.

Greedy decoding of exactly `output_tokens` new tokens per stream (EOS cannot end a stream early because
min_new_tokens == max_new_tokens), prompts of `prompt_tokens` random non-special tokens, warm-up first.
"""

from __future__ import annotations

import logging
import time

import torch

from quantbench.bench import BenchPlan, BenchResult, summarize

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random ids drawn from the ordinary (non-special) vocabulary."""
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (n, length), generator=g)]


def run(plan: BenchPlan, model, tokenizer, model_dir, hardware) -> BenchResult:
    if model is None:  # the pipeline freed it for a backend that serves from disk, which then fell back to us
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map=hardware.device)
    device = model.device
    metrics: dict[str, float] = {}
    detail: dict = {"backend": "hf", "runs": []}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(ids: torch.Tensor, new_tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        _sync(device)
        elapsed = time.perf_counter() - start
        produced = out.shape[1] - ids.shape[1]
        if produced != new_tokens:
            raise RuntimeError(f"generate() produced {produced} tokens, expected exactly {new_tokens}")
        return elapsed

    for n in plan.streams:
        ids = random_prompts(tokenizer, n, plan.prompt_tokens).to(device)
        for _ in range(plan.warmup):
            generate(ids, plan.output_tokens)
        seconds = [generate(ids, plan.output_tokens) for _ in range(plan.repeats)]
        ttft = [generate(ids, 1) for _ in range(plan.repeats)]
        tps = [n * plan.output_tokens / s for s in seconds]
        metrics.update(summarize("tokens_per_s", n, tps))
        metrics.update(summarize("ttft_s", n, ttft))
        detail["runs"].append({"streams": n, "seconds": seconds, "tokens_per_s": tps, "ttft_s": ttft})
        log.info("hf backend, %d stream(s): %.1f output tokens/s (median of %d)", n, metrics[f"tokens_per_s_{n}_stream" + ("" if n == 1 else "s")], plan.repeats)
    return BenchResult(metrics=metrics, tags={"bench_backend": "hf", "bench_path": "transformers.generate, dynamic KV cache"},
                       detail=detail)
