"""Build the GPU bundle: every entry of requirements-cuda-lock.txt that the GPU image lacks, as wheels, in chunks that
fit beside the repository in one device command (the GPU machine has no network).

    python benchmarks/gpu/make_bundle.py .gpu/bundle [--chunk-mb N]       # here, with network to PyPI
    bash benchmarks/gpu/device.sh stage 1 .. stage N; bash benchmarks/gpu/device.sh install    # there

What is carried is `python benchmarks/gpu/cuda_lock.py carried`: nothing here names a version. Binary wheels for
CPython 3.12 on manylinux x86-64 where PyPI has them; the sdist-only packages are built here as wheels with Python 3.12
(no CUDA is compiled: GPTQModel JIT-builds its kernels at run time); PyPcre links libpcre2-8 statically (Debian's
libpcre2-dev), so its extension needs only glibc. Three wheels are stripped of what a Hopper GPU run never loads, to
fit the 64 MiB a command carries: vLLM (FlashAttention 2 kernels, DeepGEMM, SM100 FMHA headers, vllm-rs), bitsandbytes
(native libraries other than CUDA 13.0 and CPU) and Ray (its Java workers); their RECORD files are rewritten, so pip
installs them as any wheel. Each wheel is repacked uncompressed and compressed with xz
(kept under .gpu/xz/, so a changed lock compresses only its new wheels), then cut into pieces that fill the chunks.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_lock  # noqa: E402

log = logging.getLogger("make_bundle")
PY312 = Path("/root/.pyenv/versions/3.12.1/bin/python3")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64", "any"]  # fmt: skip
# What a Hopper GPU run never loads, by wheel: removed (path prefixes inside the wheel).
STRIP = {
    "vllm": ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/",
             "vllm/vllm-rs/"),
    "ray": ("ray/jars/",),
}  # fmt: skip
BNB_KEEP = re.compile(r"libbitsandbytes_(cuda130|cpu)\.so$")


def wheel_for(name: str, version: str, where: Path) -> Path | None:
    pattern = re.compile(rf"^{re.sub('-', '[-_.]', name)}-{re.escape(version)}-.*\.whl$", re.I)
    return next((p for p in where.iterdir() if pattern.match(p.name)), None)


def download(name: str, version: str, where: Path) -> Path | None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(where),
           f"{name}=={version}"]  # fmt: skip
    subprocess.run(cmd, capture_output=True)
    return wheel_for(name, version, where)


def build_sdist(name: str, version: str, where: Path, venv: Path) -> Path:
    """A py3-none-any (or cp312) wheel built from the sdist with Python 3.12, without build isolation."""
    if not (venv / "bin" / "pip").exists():
        subprocess.run([str(PY312), "-m", "venv", str(venv)], check=True)
        subprocess.run([venv / "bin" / "pip", "install", "-q", "setuptools>=79,<83", "wheel"], check=True)
    env = None
    if name == "pypcre":  # link libpcre2-8 statically, so the extension needs only glibc there
        pcre = venv.parent / "pcre2"
        if not pcre.exists():
            subprocess.run(["apt-get", "download", "libpcre2-dev"], cwd=venv.parent, check=True, capture_output=True)
            deb = next(venv.parent.glob("libpcre2-dev_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(pcre)], check=True)
        env = {"PATH": "/usr/bin:/bin", "PYPCRE_LIBRARY_PATH": str(pcre / "usr/lib/x86_64-linux-gnu/libpcre2-8.a"),
               "PYPCRE_INCLUDE_DIR": str(pcre / "usr/include"), "PYPCRE_LDFLAGS": "-Wl,--as-needed"}  # fmt: skip
    subprocess.run([venv / "bin" / "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-binary=:all:",
                    "-w", str(where), f"{name}=={version}"], check=True, env=env)  # fmt: skip
    built = wheel_for(name, version, where)
    if built is None:
        raise SystemExit(f"building {name}=={version} from its sdist made no wheel")
    return built


def repack(src: Path, dest: Path, name: str) -> None:
    """Copy the wheel uncompressed (xz compresses the bundle once), without the files STRIP names for it, and with a
    RECORD that lists only what remains."""
    drop = STRIP.get(name, ())
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        kept = {
            i.filename
            for i in zin.infolist()
            if not i.filename.startswith(drop)
            and not (name == "bitsandbytes" and i.filename.endswith(".so") and not BNB_KEEP.search(i.filename))
        }
        for info in zin.infolist():
            if info.filename not in kept:
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD") and len(kept) < len(zin.infolist()):
                rows = data.decode().splitlines()
                data = ("\n".join(r for r in rows if r.split(",")[0] in kept) + "\n").encode()
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)


def compressed(wheel: Path, cache: Path) -> Path:
    """The wheel compressed with xz, kept under `cache` by file name, so a rebuild compresses only new wheels."""
    out = cache / f"{wheel.name}.xz"
    if not out.exists():
        tmp = out.with_suffix(".xz.tmp")
        with wheel.open("rb") as src, tmp.open("wb") as dst:
            subprocess.run(["xz", "-6", "-T0", "-c"], stdin=src, stdout=dst, check=True)
        tmp.rename(out)
    return out


def pack(files: list[Path], out: Path, chunk: int) -> int:
    """Cut each file into pieces of at most `chunk` bytes (`<name>.p00`, `.p01`, ...) and fill as few chunk folders
    `out/c1`, `out/c2`, ... as hold them, largest piece first into the first folder with room."""
    pieces = []
    for f in files:
        data = f.read_bytes()
        pieces += [(f"{f.name}.p{i // chunk:02d}", data[i : i + chunk]) for i in range(0, len(data), chunk)]
    folders: list[list] = []
    for name, data in sorted(pieces, key=lambda p: -len(p[1])):
        room = next((f for f in folders if f[0] + len(data) <= chunk), None)
        if room is None:
            room = [0, []]
            folders.append(room)
        room[0] += len(data)
        room[1].append((name, data))
    shutil.rmtree(out, ignore_errors=True)
    for i, (_, held) in enumerate(folders, 1):
        (out / f"c{i}").mkdir(parents=True)
        for name, data in held:
            (out / f"c{i}" / name).write_bytes(data)
    return len(folders)


CARRIED_MB = 64  # what one device command carries: the repository's tracked files and one chunk
MARGIN_MB = 8  # for files committed after the bundle is made: one GPU stretch's store and logs added 4.7 MB


def room_beside_repository() -> int:
    """MiB left for a chunk beside the repository's tracked files, which grow with every committed GPU stretch."""
    root = Path(__file__).resolve().parents[2]
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    tracked = sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())
    return int(CARRIED_MB - tracked / 2**20 - MARGIN_MB)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new folder (git-ignored, e.g. .gpu/bundle); replaced if it exists")
    parser.add_argument("--chunk-mb", type=int, default=None,
                        help=f"largest chunk (default: {CARRIED_MB} MiB less the tracked files, less {MARGIN_MB})")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.chunk_mb is None:
        args.chunk_mb = room_beside_repository()
        log.info("chunks of at most %d MiB, to travel beside the repository's tracked files", args.chunk_mb)
    carried = cuda_lock.carried()
    cuda_lock.META.mkdir(parents=True, exist_ok=True)
    cache = cuda_lock.META.parent / "xz"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        built = work / "built"
        built.mkdir()
        parts = []
        for name, version in carried.items():
            found = wheel_for(name, version, cuda_lock.META) or download(name, version, cuda_lock.META)
            if found is None:
                log.info("building %s==%s from its sdist", name, version)
                found = build_sdist(name, version, built, work / "venv")
                shutil.copy2(found, cuda_lock.META / found.name)  # built once
                found = cuda_lock.META / found.name
            if name == "gptqmodel" and any(n.endswith(".so") for n in zipfile.ZipFile(found).namelist()):
                raise SystemExit("the gptqmodel wheel holds compiled code; it should JIT-build on the GPU machine")
            if not (cache / f"{found.name}.xz").exists():
                repack(found, work / found.name, name)
                parts.append(compressed(work / found.name, cache))
                (work / found.name).unlink()
            else:
                parts.append(cache / f"{found.name}.xz")
    chunks = pack(parts, args.out, args.chunk_mb * 2**20)
    total = sum(p.stat().st_size for p in parts)
    log.info("%d wheels, %.1f MB in %d chunks under %s", len(parts), total / 1e6, chunks, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
