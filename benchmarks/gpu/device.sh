#!/usr/bin/env bash
# benchmarks/gpu/device.sh STEP [ARGS] — run on the lent GPU test machine (no network; /tmp survives ~30 s between
# commands; at most 64 MiB travels with each command). Here, once: `python benchmarks/gpu/make_bundle.py .gpu/bundle`
# (every entry of requirements-cuda-lock.txt the image lacks, in chunks .gpu/bundle/c1, c2, ...). There, one command
# per chunk, back to back, each carrying its chunk (device `carry`: .gpu/bundle/cN):
#   stage N        copy chunk N to /tmp
#   install        unpack the wheels and run `make install` into the image's own environment (/opt/torch/.venv, which
#                  holds torch 2.11.0+cu130): pip takes every lock entry the image has at the locked version as it is
#                  and installs the rest from the bundle (--no-index), exactly as on a user's NVIDIA machine; then
#                  `cuda_lock.py check` writes the environment that runs to $OUT/environment.txt and fails on any
#                  difference from the lock.
#   ext 1, ext 2   optional: GPTQModel's compiled CUDA extensions from an earlier machine of the same image
#                  (`extsave` writes them to $OUT in four 15 MB chunks: carry the first two as .gpu/ext/c1, the rest as
#                  .gpu/ext/c2), so that a fresh machine need not spend ~6 minutes compiling them
#   run CMD...     CMD in the installed environment, e.g. `bash benchmarks/gpu/device.sh run python3 -m pytest -m gpu tests/gpu`
# If /tmp is empty (a fresh machine), start over at `stage 1`.
set -euo pipefail
step=${1:?step}; shift
VENV=${QB_VENV:-/opt/torch/.venv}  # QB_VENV: another environment, e.g. a dry run of a script here
case "$step" in
  stage)   mkdir -p /tmp/bundle && cp .gpu/bundle/c"$1"/* /tmp/bundle/ ;;
  install) mkdir -p /tmp/wheels  # each wheel arrives as xz pieces <wheel>.xz.p00, .p01, ...
           for whl in $(ls /tmp/bundle | sed 's/\.xz\.p[0-9]*$//' | sort -u); do
             cat /tmp/bundle/"$whl".xz.p* | xz -d > /tmp/wheels/"$whl" & done; wait; rm -rf /tmp/bundle
           PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels PIP_DISABLE_PIP_VERSION_CHECK=1 make install VENV="$VENV" STACK=cuda
           "$VENV/bin/python" benchmarks/gpu/cuda_lock.py check > "${OUT:?}/environment.txt" ;;
  ext)     cp .gpu/ext/c"$1"/ext.tar.xz.* /tmp/
           if [ "$1" = 2 ]; then mkdir -p ~/.cache && cat /tmp/ext.tar.xz.* | xz -d | tar -x -C ~/.cache gptqmodel
                                 rm -f /tmp/ext.tar.xz.*; ls ~/.cache/gptqmodel/torch_extensions; fi ;;
  extsave) (cd ~/.cache && find gptqmodel -name '*.so' -o -name '*.lock' -o -name '.ninja_*' -o -name build.ninja \
            | tar -c -T - | xz -T0 -9 | split -b 15M -d -a 1 - "${OUT:?}/ext.tar.xz.") ;;
  run)
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multi-GPU kinds: keep off
    export PYTHONUNBUFFERED=1 QUANTBENCH_CACHE="${QUANTBENCH_CACHE:-$PWD/.cache}" PATH="$VENV/bin:$PATH"
    "$@" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
