#!/usr/bin/env bash
# make_ray_bundle.sh OUT_DIR — Ray and Hydra's Ray launcher for our GPU test machine (no network there), for
# `hydra/launcher=ray` sweeps (issue 10). Companion of make_vllm_bundle.sh and make_deps_bundle.sh.
# ray 2.60.0's wheel (76 MiB) is over what one command takes along (64 MiB), so, as make_vllm_bundle.sh does for
# vLLM, it is unpacked, stripped of ray/jars (Java workers, 33 MB, never used from Python) and packed as one
# xz tarball (~31 MiB). Beside it: hydra-ray-launcher 1.2.2 and cloudpickle 2.2.1 (the launcher needs cloudpickle < 3;
# the image has 3.x) as wheels. Ray runs as its minimal install: ray[default]'s dashboard extras are not carried, so
# Ray starts no dashboard (it says so in its log); the launcher does not need it.
# On the GPU machine (benchmarks/gpu/device.sh ray):
#   mkdir -p /tmp/ray && xz -d < DIR/p1/ray.tar.xz | tar -x -C /tmp/ray
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 DIR/p1/*.whl
set -euo pipefail
out=$(mkdir -p "$1/p1" && cd "$1" && pwd); work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
plat="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$@" \
         2> >(grep -v "is ignored: it is neither" >&2); }
dl "$work" ray==2.60.0
dl "$out/p1" hydra-ray-launcher==1.2.2 cloudpickle==2.2.1
mkdir -p "$work/x" && (cd "$work/x" && unzip -q "$work"/ray-2.60.0-*.whl && rm -rf ray/jars \
  && tar -cf - ray ray-2.60.0.dist-info | xz -6 -T0 > "$out/p1/ray.tar.xz")
du -sh "$out"/p1
