"""The memory-bandwidth roofline of decoding: the tokens/s a stream count could reach if every decode step only
had to stream its bytes from memory once, and what fraction of it a measurement reached. It bounds decoding, so it
is set against the decode-only tokens/s (prefill excluded), and against end-to-end tokens/s only where there is no
decode-only figure (tag `roofline_speed_basis`).

Bytes per decode step with n streams:
  weights: every tensor the backend reads (scales, zeros and codebooks included), except the input embedding
    table, of which only one row per stream is read; the LM head is read in full (a tied head is the embedding
    table, read in full once). Which tensors those are (tag `roofline_bytes_basis`, see `bytes_read`): for a backend
    that runs an in-memory model (transformers), the tensors that model holds after decoding, so a format it
    dequantizes counts at its dequantized size (compressed-tensors decompressed to bf16 on CPU, AQLM loaded in
    float32 on CPU); for vLLM, which serves the saved format with its own kernels, the stored tensors;
  KV cache: per stream, 2 (K and V) * layers * kv_heads * head_dim * dtype bytes per token, for the average
    context of a generation (prompt + output / 2).
  tokens/s = n / ((weight bytes + n * KV bytes per stream) / bandwidth).

Bandwidth: the hardware config's datasheet figure, or, where it is null, measured once per machine with a large
copy on the hardware's device (host memory for a CPU, the GPU's own memory for CUDA) and cached in the project cache
keyed by the CPU model or the GPU's name. A GPU preset with `hardware.memory_bandwidth_gbs=null` thus sets speeds
against what the card's memory really delivers (an H100 SXM copies at ~3.0 TB/s of its datasheet's 3.35).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from quantbench import measure
from quantbench.job.bench.speed import stream_label

log = logging.getLogger(__name__)

GB = measure.GB
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "fp8": 1}


@dataclass(frozen=True)
class DecodeBytes:
    """What one decode step reads, split by how it scales with the stream count."""

    fixed: int  # weights read once per step, whatever the stream count (LM head included)
    per_stream: int  # embedding row(s) read per stream per step
    kv_per_token: int  # KV cache bytes per token of context per stream


def decode_bytes(model_dir: str | Path, index: dict[str, tuple[str, list[int], int]] | None = None) -> DecodeBytes:
    """The bytes of `index` (name -> (dtype, shape, bytes); default: the saved safetensors, read from their headers)
    and the KV cache from the folder's config.json."""
    index = index or measure.safetensors_index(model_dir)
    if not index:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    total = sum(b for _, _, b in index.values())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    embedding = next((n for n in index if n.endswith(EMBEDDING_SUFFIXES)), None)
    has_head = any(n.startswith("lm_head.") or ".lm_head." in n for n in index)
    per_stream = 0
    fixed = total
    if embedding is not None and has_head:  # untied: only the rows of this step's tokens are read
        _, shape, nbytes = index[embedding]
        fixed -= nbytes
        per_stream = nbytes // shape[0]
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    dtype = str(text.get("dtype") or text.get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
    kv_per_token = 2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)
    return DecodeBytes(fixed=fixed, per_stream=per_stream, kv_per_token=kv_per_token)


def tensor_index(model) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) of what a loaded torch model holds (its state dict), each storage once: a tied
    LM head shares the embedding's storage and is left out, as it is from a saved folder."""
    out: dict[str, tuple[str, list[int], int]] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if nbytes == 0 or t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = (str(t.dtype).removeprefix("torch."), list(t.shape), nbytes)
    return out


# What transformers made of a saved format that it holds at another size than stored, and why (keyed by
# quantization_config.quant_method; None: unquantized).
LOADED_DIFFERENTLY = {
    "compressed-tensors": "dequantized to {dtype} by transformers: it decompresses compressed-tensors weights into "
    "plain Linear layers",
    "aqlm": "{dtype} by transformers on {device}: quantbench loads AQLM in float32 on CPU for aqlm's float32 CPU "
    "kernels, codebooks, scales, embeddings and head included",
    None: "cast to {dtype} by transformers: the saved weights are loaded in that dtype",
}
# Formats whose kernels may dequantize per call in ways the tensors held do not show: the stored bytes stay.
UNDETERMINED = {
    "bitsandbytes": "whether bitsandbytes' 4-bit kernels read the packed weights or dequantize them to 16-bit per "
    "call on {device} is not determined here",
}


def bytes_read(model_dir: str | Path, result, hardware) -> tuple[dict[str, tuple[str, list[int], int]], str]:
    """The tensors one decode step of the backend that produced `result` (a BenchResult) reads, and in words why
    (the `roofline_bytes_basis` tag). Where that cannot be determined, the stored tensors, and the words say so."""
    stored = measure.safetensors_index(model_dir)
    if not stored:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    method = measure.quant_method(model_dir)
    backend = result.tags.get("bench_backend", "unnamed")
    device = str(hardware.device)
    if method in UNDETERMINED:
        return stored, f"stored bytes: {UNDETERMINED[method].format(device=device)}"
    if backend == "vllm":
        emulated = result.tags.get("slow_kernel_reason", "")
        if "emulated" in emulated:
            return stored, (
                f"stored bytes, fewer than vLLM reads: {emulated}; the 16-bit weights it dequantizes to "
                f"on every call are not counted"
            )
        return stored, "stored bytes: vLLM serves the saved tensors with its own kernels"
    if result.loaded is None:
        return stored, f"stored bytes: what the {backend} backend reads is not determined here"
    held, kept = sum(b for _, _, b in result.loaded.values()), sum(b for _, _, b in stored.values())
    if held == kept:
        return result.loaded, "stored bytes: transformers holds the saved tensors at their stored size"
    floats = {}
    for dtype, _, nbytes in result.loaded.values():
        if dtype.startswith(("float", "bfloat")):
            floats[dtype] = floats.get(dtype, 0) + nbytes
    dtype = max(floats, key=floats.get) if floats else "?"
    why = LOADED_DIFFERENTLY.get(method, "as held by transformers ({dtype} mostly), not as stored")
    return result.loaded, f"{why.format(dtype=dtype, device=device)} ({_size(held)} held, {_size(kept)} stored)"


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e6 else f"{nbytes:,} B"


def tokens_per_s(b: DecodeBytes, n_streams: int, prompt_tokens: int, output_tokens: int, bandwidth_gbs: float) -> float:
    """Bandwidth-bound decode tokens/s of n streams at the average context of the generation."""
    context = prompt_tokens + output_tokens / 2
    step_bytes = b.fixed + n_streams * (b.per_stream + b.kv_per_token * context)
    return n_streams * bandwidth_gbs * GB / step_bytes


def cpu_model() -> str:
    """The CPU's model name and logical CPU count: the key of the measured-bandwidth cache."""
    name, _ = measure.cpu_info()
    if name == "unknown":  # no /proc/cpuinfo, or no "model name" line in it (some ARM kernels)
        import platform

        name = platform.processor() or "unknown CPU"
    return f"{name} x{os.cpu_count()}"


def device_model(device: str) -> str:
    """The key of the measured-bandwidth cache: the GPU's name for a CUDA device, else the CPU's (`cpu_model`)."""
    if str(device).startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (GPU)"
    return cpu_model()


def measure_bandwidth_gbs(size_bytes: int = 2**30, repeats: int = 5, device: str = "cpu") -> float:
    """Best of `repeats` copies of a `size_bytes` buffer on `device`, counting bytes read plus bytes written. On a
    GPU the copy is timed by CUDA events: a 1 GiB copy takes well under a millisecond there, so a host clock's
    launch and synchronisation overhead would understate the bandwidth (and flatter every fraction of it)."""
    import torch

    src = torch.ones(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first

    def seconds() -> float:
        if src.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    best = min(seconds() for _ in range(repeats))
    return 2 * size_bytes / best / GB


def _bandwidth_cache() -> Path:
    from quantbench.embedded.tiny import default_cache_dir

    return default_cache_dir().parent / "hardware" / "memory_bandwidth.json"


def memory_bandwidth(hardware, cache_file: Path | None = None) -> tuple[float, str]:
    """(GB/s, 'datasheet' | 'measured'). A measurement is cached per CPU model or GPU name, so a machine measures
    once."""
    datasheet = hardware.get("memory_bandwidth_gbs") if hasattr(hardware, "get") else None
    if datasheet:
        return float(datasheet), "datasheet"
    device = str(hardware.get("device", "cpu")) if hasattr(hardware, "get") else "cpu"
    cache_file = Path(cache_file or _bandwidth_cache())
    key = device_model(device)
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key]["gbs"]), "measured"
    log.info("Measuring memory bandwidth of %s (once; cached in %s)", key, cache_file)
    gbs = measure_bandwidth_gbs(device=device)
    cached[key] = {
        "gbs": gbs,
        "method": f"torch uint8 copy of 1 GiB on {device.split(':')[0]}, best of 5, read+write bytes",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(cache_file)  # atomic: concurrent jobs never read half a file
    return gbs, "measured"


SPEED_BASES = (("decode_tokens_per_s", "decode-only"), ("tokens_per_s", "end-to-end"))


def metrics(
    b: DecodeBytes, prompt_tokens: int, output_tokens: int, streams: list[int], measured: dict[str, float], hardware
) -> tuple[dict[str, float], dict[str, str]]:
    """roofline_tokens_per_s_<n>_stream(s) and roofline_fraction_<n>_stream(s): the measured median decode-only
    tokens/s over the roofline (a decode bound), or the end-to-end median where there is no decode-only figure;
    the tag `roofline_speed_basis` says which ("decode-only", "end-to-end", or per stream count where they differ)."""

    bandwidth, source = memory_bandwidth(hardware)
    out: dict[str, float] = {"memory_bandwidth_gbs": bandwidth}
    basis: dict[str, str] = {}
    for n in streams:
        label = stream_label(n)
        roof = tokens_per_s(b, n, prompt_tokens, output_tokens, bandwidth)
        out[f"roofline_tokens_per_s_{label}"] = roof
        for prefix, name in SPEED_BASES:
            if f"{prefix}_{label}" in measured:
                out[f"roofline_fraction_{label}"] = measured[f"{prefix}_{label}"] / roof
                basis[label] = name
                break
    tags = {"memory_bandwidth_source": source}
    if basis:
        same = set(basis.values())
        tags["roofline_speed_basis"] = (
            same.pop() if len(same) == 1 else ", ".join(f"{label}: {name}" for label, name in basis.items())
        )
    return out, tags
