"""Throughput through Hugging Face transformers' generate(): for methods and machines vLLM cannot serve.

Greedy decoding of exactly `output_tokens` new tokens per stream (EOS cannot end a stream early because
min_new_tokens == max_new_tokens), prompts of `prompt_tokens` random non-special tokens, warm-up first.

As fast as transformers allows (`bench.hf`): a static KV cache, with which transformers itself compiles the decode
step (torch.compile, mode "reduce-overhead": CUDA graphs) where its own rule allows it: CUDA/XPU, and a quantizer
it marks compileable (compressed-tensors yes; bitsandbytes, GPTQ, AQLM no). We use that path rather than wrapping
`model.forward` in torch.compile ourselves, which was reported to fail with transformers 5.17 / torch 2.11 on
CUDA ("accessing tensor output of CUDAGraphs that has been overwritten"; docs/throughput.md). The `bench_path` tag
says which path really ran, read back from the model after the warm-up; a static cache that fails falls back to
the dynamic one, with the reason in the `bench_hf_fallback_reason` tag.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from quantbench.job.bench import roofline
from quantbench.job.bench.backends.base import Backend
from quantbench.job.bench.speed import BenchPlan, BenchResult, speed_metrics, stream_label

log = logging.getLogger(__name__)


@dataclass
class HfKnobs:
    """`bench.hf` (all optional): how the transformers backend decodes. The first warm-up run decides the path (and
    compiles); the bench_path tag says which path ran."""

    cache: str = "static"  # "static": KV cache allocated once (what transformers compiles); "dynamic": grown per token
    compile: str = "auto"  # "auto": transformers' own rule (CUDA/XPU, static cache, compileable quantizer); "never"

    CACHES = ("static", "dynamic")
    COMPILES = ("auto", "never")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random ids drawn from the ordinary (non-special) vocabulary."""
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (n, length), generator=g)]


def generate_options(knobs: HfKnobs) -> dict:
    """generate() keyword arguments for the planned cache and compile choice."""
    options: dict = {}
    if knobs.cache == "static":
        options["cache_implementation"] = "static"
    if knobs.compile == "never":
        options["disable_compile"] = True
    return options


def why_not_compiled(model, knobs: HfKnobs) -> str:
    """transformers' auto-compile rule (GenerationMixin._valid_auto_compile_criteria), in words."""
    if knobs.cache != "static":
        return "transformers compiles decoding only with a static cache"
    if knobs.compile == "never":
        return "bench.hf.compile=never"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        return f"transformers marks {type(quantizer).__name__} as not compileable"
    if model.device.type not in ("cuda", "xpu"):
        return f"transformers compiles decoding only on CUDA/XPU, not {model.device.type}"
    return "transformers did not compile"


def describe_path(model, knobs: HfKnobs, compiled: bool) -> str:
    decode = (
        "decode compiled by transformers (torch.compile, reduce-overhead)"
        if compiled
        else f"eager decode ({why_not_compiled(model, knobs)})"
    )
    return f"transformers.generate, {knobs.cache} KV cache, {decode}"


def reload_dtype(hardware) -> str | torch.dtype:
    """The dtype to reload a saved artifact in when the pipeline had freed the evaluated model (a backend that serves
    from disk fell back to us): the hardware's on an accelerator, as the evaluated model ran (an AQLM folder declares
    float32, for aqlm's CPU kernel, and aqlm's CUDA kernels refuse float32); the saved
    one on CPU, where that float32 is what aqlm needs."""
    from quantbench.dtypes import torch_dtype

    return "auto" if str(hardware.device) == "cpu" else torch_dtype(hardware.dtype)


class Hf(Backend):
    name = "hf"
    Knobs = HfKnobs

    def knob_problems(self, knobs: HfKnobs, plan: BenchPlan) -> list[str]:
        problems = []
        if knobs.cache not in HfKnobs.CACHES:
            problems.append(f"bench.hf.cache={knobs.cache!r} (one of {list(HfKnobs.CACHES)})")
        if knobs.compile not in HfKnobs.COMPILES:
            problems.append(f"bench.hf.compile={knobs.compile!r} (one of {list(HfKnobs.COMPILES)})")
        return problems

    def run(self, plan: BenchPlan, model, tokenizer, model_dir, hardware) -> BenchResult:
        knobs = self.knobs(plan)
        if model is None:  # the pipeline freed it for a backend that serves from disk, which then fell back to us
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=reload_dtype(hardware), device_map=hardware.device
            )
        device = model.device
        detail: dict = {"backend": "hf", "runs": []}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        options = generate_options(knobs)
        # the threads torch computed on: on a CPU they decide the speed as much as the model (runs.RunRow.speed_basis)
        tags: dict[str, str] = {"bench_backend": "hf", "bench_threads": str(torch.get_num_threads())}

        def generate(ids: torch.Tensor, new_tokens: int) -> float:
            _sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=pad,
                    **options,
                )
            _sync(device)
            elapsed = time.perf_counter() - start
            produced = out.shape[1] - ids.shape[1]
            if produced != new_tokens:
                raise RuntimeError(f"generate() produced {produced} tokens, expected exactly {new_tokens}")
            return elapsed

        # transformers keeps its compiled decode step on the model; a fresh one tells whether this benchmark compiled
        vars(model).pop("_compiled_call", None)
        for n in plan.streams:
            ids = random_prompts(tokenizer, n, plan.prompt_tokens).to(device)
            try:
                generate(ids, plan.output_tokens)  # the first warm-up (always one here): it compiles, or fails over
            except Exception as exc:  # noqa: BLE001 - not silent: the reason becomes a tag and a warning
                if knobs.cache != "static":
                    raise
                reason = (
                    f"static KV cache failed ({type(exc).__name__}: {str(exc)[:200]}); fell back to the dynamic cache"
                )
                log.warning("hf backend: %s", reason)
                tags["bench_hf_fallback_reason"] = reason
                knobs = HfKnobs(cache="dynamic", compile=knobs.compile)
                options = generate_options(knobs)
                generate(ids, plan.output_tokens)
            for _ in range(plan.warmup - 1):  # the rest of the planned warm-ups
                generate(ids, plan.output_tokens)
            seconds = [generate(ids, plan.output_tokens) for _ in range(plan.repeats)]
            ttft = [generate(ids, 1) for _ in range(plan.repeats)]
            detail["runs"].append({"streams": n, "seconds": seconds, "ttft_s": ttft})
        metrics, speed_tags = speed_metrics(detail["runs"], plan.output_tokens)
        tags.update(speed_tags)
        for n in plan.streams:
            label = stream_label(n)
            decode = metrics.get(f"decode_tokens_per_s_{label}")
            log.info(
                "hf backend, %s: %.1f output tokens/s end to end, %s decode-only (medians of %d)",
                label,
                metrics[f"tokens_per_s_{label}"],
                "no" if decode is None else f"{decode:.1f}",
                plan.repeats,
            )
        tags["bench_path"] = describe_path(model, knobs, compiled=getattr(model, "_compiled_call", None) is not None)
        detail["path"] = tags["bench_path"]
        log.info("hf backend path: %s", tags["bench_path"])
        # what the model holds now, after decoding: transformers may have decompressed a format at load or first use
        return BenchResult(metrics=metrics, tags=tags, detail=detail, loaded=roofline.tensor_index(model))


BACKEND = Hf()
