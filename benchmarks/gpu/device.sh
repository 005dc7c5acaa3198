#!/usr/bin/env bash
# benchmarks/gpu/device.sh STEP [ARGS] — run on the lent GPU test machine (no network; /tmp survives ~30 s between
# commands; at most 64 MiB travels with each command). Stage the bundles with one command per chunk, back to back:
#   vllm1, vllm2, vllm3, vllm4
#                         vLLM 0.26.0 for the image's torch 2.11.0+cu130 (../shared/gpu/make_vllm_bundle.sh .gpu/vllm, then
#                         `bash benchmarks/gpu/device.sh recut`: the bundle's two 57 MB archive parts no longer fit beside
#                         the repository's own 12 MB under the 64 MiB a command carries, so they travel in three chunks)
#   deps N                chunk N of quantbench's own dependencies (benchmarks/gpu/make_deps_bundle.sh .gpu/deps)
#   ray                   Ray and Hydra's Ray launcher, for hydra/launcher=ray (benchmarks/gpu/make_ray_bundle.sh .gpu/ray)
#   ext 1, ext 2          optional: GPTQModel's compiled CUDA extensions (Marlin fp16 and bf16, the GPTQ block and the
#                         packer) from an earlier machine of the same image, so that a fresh machine loads them instead of
#                         spending ~7 minutes compiling them (228 + 119 + 33 s measured on an H100) before its first GPTQ or
#                         AutoRound folder loads. GPTQModel loads a cached library it finds and compiles only what is
#                         missing. Made on a machine that compiled them: `bash benchmarks/gpu/device.sh extsave` (into
#                         $OUT, four 15 MB chunks: carry the first two as .gpu/ext/c1, the rest as .gpu/ext/c2).
# then any other step runs `ARGS` with the staged packages on PYTHONPATH, e.g.
#   bash benchmarks/gpu/device.sh run python3 -m pytest -m gpu tests/gpu
# Each staging step carries its chunk (device `carry`: .gpu/vllm/c1, c2, c3, then .gpu/vllm/p3; .gpu/deps/pN). If /tmp
# is empty, start over at vllm1.
set -euo pipefail
step=${1:?step}; shift
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$@"; }
# pip --target skips, with a mere warning, every top-level folder the target already has (`bin/` from an earlier
# chunk, or a namespace package such as hydra_plugins/): each chunk goes to a fresh folder, then merges in.
pipi_merge() { local dest=$1 tmp; shift; tmp=$(mktemp -d /tmp/chunk.XXXXXX); mkdir -p "$dest"
               pipi "$tmp" "$@" && cp -a "$tmp/." "$dest/" && rm -rf "$tmp"; }
case "$step" in
  recut) cat .gpu/vllm/p1/vllm.tar.xz.part0 .gpu/vllm/p2/vllm.tar.xz.part1 | split -b 38M -d -a 1 - .gpu/vllm/archive.
         for i in 0 1 2; do mkdir -p .gpu/vllm/c$((i + 1)) && mv .gpu/vllm/archive.$i .gpu/vllm/c$((i + 1))/; done ;;
  vllm1|vllm2|vllm3) cp .gpu/vllm/c"${step#vllm}"/archive.* /tmp/ ;;
  vllm4) mkdir -p /tmp/vllm && cat /tmp/archive.0 /tmp/archive.1 /tmp/archive.2 | xz -d | tar -x -C /tmp/vllm
         rm -f /tmp/archive.[012] && pipi /tmp/site .gpu/vllm/p3/*.whl ;;
  deps)  pipi_merge /tmp/site2 .gpu/deps/p"$1"/*.whl ;;
  ext)   cp .gpu/ext/c"$1"/ext.tar.xz.* /tmp/
         if [ "$1" = 2 ]; then mkdir -p ~/.cache && cat /tmp/ext.tar.xz.* | xz -d | tar -x -C ~/.cache gptqmodel
                               rm -f /tmp/ext.tar.xz.*; ls ~/.cache/gptqmodel/torch_extensions; fi ;;
  extsave) (cd ~/.cache && find gptqmodel -name '*.so' -o -name '*.lock' -o -name '.ninja_*' -o -name build.ninja \
            | tar -c -T - | xz -T0 -9 | split -b 15M -d -a 1 - "${OUT:?}/ext.tar.xz.") ;;
  ray)   mkdir -p /tmp/ray && xz -d < .gpu/ray/p1/ray.tar.xz | tar -x -C /tmp/ray && pipi_merge /tmp/site2 .gpu/ray/p1/*.whl ;;
  run)
    # Our pins first (compressed-tensors 0.19 for llm-compressor, cloudpickle 2.2.1 for the Ray launcher), then Ray,
    # vLLM and vLLM's bundle; quantbench from src/. Ray's workers inherit this environment.
    export PYTHONPATH="$PWD/src:/tmp/site2:/tmp/ray:/tmp/vllm:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multi-GPU kinds: keep off
    export PYTHONUNBUFFERED=1 QUANTBENCH_CACHE="${QUANTBENCH_CACHE:-$PWD/.cache}"
    export PATH="/tmp/site2/bin:$PATH"
    "$@" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
