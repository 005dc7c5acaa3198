"""What a saved model costs: bytes on disk, bytes of weights, bits per weight, and peak memory while running."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import torch

GB = 1e9


def disk_bytes(folder: str | Path) -> int:
    """Every file of the saved model, tokenizer and configs included: what a user downloads."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


MODEL_SHA256 = "model_sha256.json"  # logged beside a run's model/ folder: relative file path -> sha256


def sha256(path: str | Path) -> str:
    """The sha256 of one file, read in chunks."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_sha256(folder: str | Path) -> dict[str, str]:
    """relative path -> sha256 of every file of the folder: the artifact's identity, checked before registration."""
    return {
        f.relative_to(folder).as_posix(): sha256(f) for f in sorted(p for p in Path(folder).rglob("*") if p.is_file())
    }


def changed_files(folder: str | Path, expected: dict[str, str]) -> list[str]:
    """What differs between the folder and its recorded sha256s: changed, missing and unexpected files, by name."""
    found = file_sha256(folder)
    changed = [f"{name} (changed)" for name in expected if name in found and found[name] != expected[name]]
    return (
        changed
        + [f"{name} (missing)" for name in expected if name not in found]
        + [f"{name} (not in the record)" for name in found if name not in expected]
    )


def safetensors_index(folder: str | Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) for every tensor in the folder's safetensors files, read from headers only."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            out[name] = (meta["dtype"], meta["shape"], end - start)
    return out


def weight_bytes(folder: str | Path) -> int:
    """Bytes of all stored tensors: the weights a GPU holds after loading, without tokenizer and configs."""
    return sum(b for _, _, b in safetensors_index(folder).values())


def bits_per_weight(folder: str | Path, linear_shapes: dict[str, tuple[int, int]]) -> float:
    """Average stored bits per weight of the quantizable linear layers, scales, zeros and codebooks included.

    `linear_shapes` maps each linear layer of the *original* model (e.g. 'model.layers.0.mlp.up_proj') to its
    (out, in) shape; every stored tensor under that prefix (weight, qweight, scales, qzeros, codes, ...) counts.
    """
    index = safetensors_index(folder)
    stored = 0
    for prefix in linear_shapes:
        stored += sum(b for name, (_, _, b) in index.items() if name.startswith(prefix + "."))
    n_weights = sum(o * i for o, i in linear_shapes.values())
    return 8 * stored / n_weights


def lm_head_bits_per_weight(folder: str | Path, model_config) -> float | None:
    """Average stored bits per weight of the LM head (its scales included), or None where the folder stores no
    `lm_head.*` tensor (a head tied to the input embeddings)."""
    if not any(name.startswith("lm_head.") for name in safetensors_index(folder)):
        return None
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return bits_per_weight(folder, {"lm_head": (int(cfg.vocab_size), int(cfg.hidden_size))})


def linear_shapes(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of every nn.Linear of an unquantized model, except the output head."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith(skip)
    }


def skeleton_of_config(model_config) -> torch.nn.Module:
    """The model a config describes, built on the meta device: its shapes, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(model_config)


def linear_shapes_of_config(model_config) -> dict[str, tuple[int, int]]:
    """`linear_shapes` of the model a config describes: no weights are loaded."""
    return linear_shapes(skeleton_of_config(model_config))


def weights_bytes(skeleton: torch.nn.Module, dtype: torch.dtype) -> int:
    """Every weight of a model (a tied embedding once) at 16 bits, or at `dtype` where that is wider: the largest
    artifact a method here writes (fp16 saves that copy; the others store most weights in fewer bits and keep the
    rest in `dtype`; AQLM's codebooks, a fixed size per layer, can outgrow a tiny model's layers, which the disk
    check's headroom covers)."""
    return max(2, dtype.itemsize) * sum(p.numel() for p in skeleton.parameters())


def file_system(folder: Path) -> tuple[int, int]:
    """(device id, free bytes) of the file system a folder is on; a folder not made yet is measured at its nearest
    existing parent."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    return existing.stat().st_dev, shutil.disk_usage(existing).free


# The x86 features that decide CPU kernel paths (vLLM's kernel library, oneDNN's bf16 GEMMs), for tags and cache keys.
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(CPU model name, feature flags) of the first CPU listed; ("unknown", set()) where there is no such file."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown", set()
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", "unknown"), set(fields.get("flags", "").split())


# What a memory figure measured (the mem_basis.<metric> tags): figures of different bases do not compare. The job
# process's RSS counts every library it imported (3.4 GB for a 7 MB model); CUDA's allocator peak counts this
# process's tensors only; the device's used memory counts every process on the GPU (vLLM's engine, its KV cache).
MEM_BASES = {
    "job_process_rss": "peak RSS of the job's process (sampled every 20 ms)",
    "engine_process_rss": "peak RSS of the vLLM engine's process",
    "server_process_rss": "peak RSS of vLLM's server and every process it started, summed (bench=serving)",
    "cuda_allocator": "peak of CUDA's caching allocator in the job's process (torch.cuda.max_memory_allocated)",
    "cuda_device_used": "the GPU's used memory, device-wide, read while the vLLM engine ran",
}


class PeakMemory:
    """Peak process memory (RSS, sampled every 20 ms) and peak CUDA memory over a `with` block.

    RSS is sampled rather than read from ru_maxrss because that one never goes down between the jobs of a
    multirun, which all run in one process.
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_cuda = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        proc = psutil.Process()
        self.peak_rss = proc.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)
        if torch.cuda.is_available():
            self.peak_cuda = torch.cuda.max_memory_allocated()

    @property
    def gb(self) -> float:
        """The block's peak: CUDA's allocator where the block used the GPU, else the process's RSS (see `basis`)."""
        return (self.peak_cuda if self.peak_cuda else self.peak_rss) / GB

    @property
    def basis(self) -> str:
        """Which of MEM_BASES `gb` is."""
        return "cuda_allocator" if self.peak_cuda else "job_process_rss"


class Stopwatch:
    """`with Stopwatch() as t: ...; t.seconds`"""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def quant_method(model_dir: str | Path) -> str | None:
    """The saved config's quantization_config.quant_method (lower case), None for an unquantized model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    qc = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    return str(qc.get("quant_method", "unknown")).lower() if qc else None
