#!/usr/bin/env bash
# make_deps_bundle.sh OUT_DIR — build the bundle of quantbench's own Python dependencies for our GPU test machine
# (no network there). Companion of make_vllm_bundle.sh: that one carries vLLM and its dependencies; this one carries
# what quantbench needs beyond that image and the vLLM bundle (hydra/omegaconf, mlflow with its server/SQLite-store
# deps, lm-eval, bitsandbytes, auto-round, llmcompressor, compressed-tensors 0.19.0, gptqmodel, aqlm, datasets,
# optimum, ...), at the versions of requirements-lock.txt, as Python 3.12 x86-64 wheels.
# The image already has torch 2.11.0+cu130, transformers, accelerate, numpy, huggingface_hub, scipy, pandas, ... so
# none of those are carried (gptqmodel's pin numpy==2.2.6 is therefore not met there; it imports with the image's).
#  * gptqmodel 7.6.0, Defuser, Device-SMI, LogBar, TokeNicer, antlr4-python3-runtime, rouge_score, sqlitedict and
#    word2number have only sdists: built here as py3-none-any wheels. gptqmodel's setup.py builds no extension at all
#    (its gptqmodel_ext/ kernel sources ship as data, JIT-compiled at run time if ever), so no CUDA is compiled.
#  * PyPcre (C extension) is built for cp312 with libpcre2-8 linked statically (Debian's libpcre2-dev .a), so the
#    .so needs only libc (glibc >= 2.34).
#  * bitsandbytes' wheel (43 MB, a native library per CUDA/ROCm/XPU version) is repacked keeping only
#    libbitsandbytes_cuda130.so and libbitsandbytes_cpu.so (RECORD rewritten); same file name as the original.
# The wheels are split into OUT_DIR/p1, p2, ... of at most 55 MiB each (one chunk per upload). On the GPU machine
# each chunk is installed with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 DIR/pN/*.whl
# Needs here: python3 with pip, network to PyPI and Debian's apt, Python 3.12 at $PY312 (default below), gcc.
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd); work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3}
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform any"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$@" \
         2> >(grep -v "is ignored: it is neither" >&2); }
whl="$work/whl"; mkdir -p "$whl"

# 1. Binary wheels, exact versions of requirements-lock.txt (not on the image, not in the vLLM bundle).
dl "$whl" alembic==1.20.1 aqlm==1.1.7 auto-round==0.15.1 bitsandbytes==0.50.2 blinker==1.9.0 chardet==6.0.0.post1 \
  compressed-tensors==0.19.0 databricks-sdk==0.162.0 DataProperty==1.1.1 datasets==5.2.0 defusedxml==0.7.1 \
  docker==7.2.0 evaluate==0.4.6 Flask==3.1.3 flask-cors==6.0.5 gitdb==4.0.12 GitPython==3.2.1 google-auth==2.63.0 \
  graphene==3.4.3 graphql-core==3.2.14 graphql-relay==3.2.0 gunicorn==26.2.0 huey==3.5.4 hydra-core==1.3.8 \
  importlib_metadata==9.1.0 itsdangerous==2.2.0 llmcompressor==0.14.0.1 lm_eval==0.4.13 Mako==1.4.3 maturin==1.16.0 \
  mbstrdecoder==1.1.5 mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 more-itertools==11.2.1 \
  multiprocess==0.70.19 nltk==3.10.4 nvidia-ml-py==13.615.71 omegaconf==2.3.1 optimum==2.3.0 pathvalidate==3.3.1 \
  prettytable==3.18.0 pyasn1==0.6.5 pyasn1_modules==0.4.2 pytablewriter==1.2.1 python-dotenv==1.2.4 pytz==2026.6 \
  skops==0.16.0 smmap==5.0.3 SQLAlchemy==2.1.9 sqlparse==0.6.1 tabledata==1.3.5 tcolorpy==0.1.7 torchao==0.18.0 \
  typepy==1.3.5 wcwidth==0.9.4
# Not quantbench's dependencies: two kernel packages vLLM 0.26 serves W4A16 layers with when they are installed
# (ConchLinearKernel, HummingLinearKernel; the image has the nvcc, cuda-bindings, jinja2 and tabulate Humming's JIT
# needs), carried so that `bench.vllm.linear_backend` (or `disabled_kernels`) sweeps can measure every kernel vLLM
# offers on Hopper.
dl "$whl" conch-triton-kernels==1.3 humming-kernels==0.1.19

# 2. sdist-only packages, built with Python 3.12 in a throwaway venv (no build isolation, no CUDA).
"$PY312" -m venv "$work/bv"
"$work/bv/bin/pip" install -q "setuptools>=79,<83" wheel 2> >(grep -v "is ignored: it is neither" >&2)
bw() { "$work/bv/bin/pip" wheel -q --no-deps --no-build-isolation --no-binary=:all: -w "$whl" "$@" \
         2> >(grep -v "is ignored: it is neither\|DEPRECATION" >&2); }
bw GPTQModel==7.6.0 Defuser==0.0.28 Device-SMI==0.5.7 LogBar==0.4.15 TokeNicer==0.0.14 \
   antlr4-python3-runtime==4.9.3 rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
(cd "$work" && apt-get download libpcre2-dev >/dev/null 2>&1 && dpkg-deb -x libpcre2-dev_*.deb pcre2)
PYPCRE_LIBRARY_PATH="$work/pcre2/usr/lib/x86_64-linux-gnu/libpcre2-8.a" PYPCRE_INCLUDE_DIR="$work/pcre2/usr/include" \
  PYPCRE_LDFLAGS="-Wl,--as-needed" bw PyPcre==0.6.4
if unzip -l "$whl"/gptqmodel-*.whl | grep -q '\.so$'; then echo "gptqmodel wheel holds compiled code" >&2; exit 1; fi

# 3. bitsandbytes: keep only the CUDA 13.0 and CPU native libraries.
bnb=$(ls "$whl"/bitsandbytes-0.50.2-*.whl)
zip -q -d "$bnb" $(unzip -Z1 "$bnb" | grep -E '^bitsandbytes/libbitsandbytes_.*\.so$' \
                    | grep -vE 'libbitsandbytes_(cuda130|cpu)\.so$')
python3 - "$bnb" <<'EOF'
import sys, zipfile, shutil, os
src = sys.argv[1]; tmp = src + ".tmp"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
    names = set(zi.namelist())
    for info in zi.infolist():
        data = zi.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if l.split(",")[0] in names) + "\n").encode()
        zo.writestr(info, data)
os.replace(tmp, src)
EOF

# 5. Split into chunks of at most 55 MiB each. Wheels that install files into the same package folder (mlflow,
#    mlflow-skinny and mlflow-tracing all write mlflow/) must share a chunk: `pip install --target` merges them within
#    one call but skips a folder that an earlier call already created (seen on the GPU machine, 2026-11-28).
python3 - "$whl" "$out" <<'EOF'
import os, sys, shutil
src, out = sys.argv[1:]; cap = 55 * 2**20
group = lambda f: "mlflow" if f.startswith("mlflow") else f
units: dict[str, list] = {}
for f in os.listdir(src):
    u = units.setdefault(group(f), [0, []]); u[0] += os.path.getsize(os.path.join(src, f)); u[1].append(f)
units = sorted(units.values(), reverse=True)
n = -(-sum(s for s, _ in units) // cap)
while True:  # as few chunks as fit, filled evenly (largest unit into the emptiest chunk)
    bins = [[0, []] for _ in range(n)]
    for size, fs in units:
        if size > cap: sys.exit(f"{fs} are {size} bytes together, over 55 MiB")
        b = min(bins, key=lambda b: b[0]); b[0] += size; b[1].extend(fs)
    if max(b[0] for b in bins) <= cap: break
    n += 1
for i, (_, fs) in enumerate(bins, 1):
    d = os.path.join(out, f"p{i}"); os.makedirs(d, exist_ok=True)
    for f in fs: shutil.move(os.path.join(src, f), os.path.join(d, f))
EOF
du -sh "$out"/p*
