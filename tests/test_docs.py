"""The README and docs/ say only what exists: every `make` target, `quantbench` command, config option and config key
they write in code, and every relative link, is checked against the Makefile, the CLI, conf/ (through Hydra's compose)
and the files; the site builds with `mkdocs build --strict`, from the exact pins of requirements-docs.txt."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT

CONF = ROOT / "conf"
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# Written on purpose as what Hydra refuses (docs/configuration.md: typos and wrong types); checked to be refused below.
REFUSED_ON_PURPOSE = {"bench.nonexistent=1", "method=awqq"}


# --- what the pages write in code ------------------------------------------------------------------------------------


def code_of(text: str) -> tuple[list[str], list[str]]:
    """(command lines of the fenced code blocks, with `\\` continuations joined; inline code spans outside them)."""
    lines, prose, block = [], [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
            else:
                lines += re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines()
                block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    # a span may wrap onto the next line of its paragraph
    paragraphs = re.split(r"\n\s*\n", "\n".join(prose))
    spans = [s.replace("\n", " ") for para in paragraphs for s in re.findall(r"`([^`]+)`", para)]
    return lines, spans


def commands(text: str) -> list[list[str]]:
    """The overrides of every `run.py` / `quantbench run` command the text writes in code (comments dropped)."""
    lines, spans = code_of(text)
    out = []
    for line in [*lines, *spans]:
        line = line.split(" #", 1)[0]
        m = re.search(r"(?:\brun\.py|\bquantbench run)((?:\s+\S+)*)", line)
        if m:
            out.append(m.group(1).split())
    return out


def _placeholder(value: str) -> bool:
    return not value or any(s in value for s in ("<", "...", "$", "*"))


@functools.cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([a-z][a-z-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))


@functools.cache
def cli_commands() -> frozenset[str]:
    from quantbench.ops.cli import COMMANDS

    return frozenset(COMMANDS)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def is_group(name: str) -> bool:
    return (CONF / name).is_dir()


@functools.cache
def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def has_key(cfg, key: str) -> bool:
    """`key` (dotted) is in `cfg`, whatever its value (null and ??? included)."""
    node = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def key_in_some_option(key: str) -> bool:
    """A `group.key` written in prose: it exists under the defaults or under some option of its group (a method's
    knobs are its own: `method.iters` is auto-round's)."""
    root = key.split(".", 1)[0]
    group = "hydra/launcher" if root == "hydra" else root
    candidates = [()] + [(f"{group}={o}",) for o in group_options(group)]
    return any(has_key(composed(*c), key) for c in candidates)


def problems(text: str) -> list[str]:
    """Everything `text` writes in code that does not exist; [] when all of it does."""
    found: list[str] = []
    lines, spans = code_of(text)
    code = "\n".join([*lines, *spans])
    for target in re.findall(r"(?<![\w.-])make ([a-z][a-z-]*)", code):
        if target not in make_targets():
            found.append(f"make {target}: no such target in the Makefile")
    for command in re.findall(r"(?<![\w./-])quantbench ([a-z][a-z-]*)", code):
        if command not in cli_commands():
            found.append(f"quantbench {command}: no such command (quantbench/ops/cli.py COMMANDS)")
    # a command's overrides: its group choices compose together, and every dotted key is in that composition
    for overrides in commands(text):
        choices, keys = [], []
        for token in overrides:
            name, eq, value = token.partition("=")
            if not eq or token in REFUSED_ON_PURPOSE or name.startswith(("+", "-", "~")) or not name[:1].islower():
                continue
            if is_group(name):
                for option in value.split(","):
                    if not _placeholder(option) and not (CONF / name / f"{option}.yaml").is_file():
                        found.append(f"{token}: no conf/{name}/{option}.yaml")
                if not _placeholder(value):
                    choices.append(f"{name}={value.split(',')[0]}")
            elif "." in name or not _placeholder(name):
                keys.append(name)
        try:
            cfg = composed(*choices)
        except Exception as e:  # noqa: BLE001 - any composition error is what the page got wrong
            found.append(f"{' '.join(choices)}: does not compose ({type(e).__name__}: {str(e).splitlines()[0]})")
            continue
        found += [f"{k}=: no such key in the config composed with {choices}" for k in keys if not has_key(cfg, k)]
    # prose: `group=option` and `group.key=value` written in inline code
    for span in spans:
        for token in span.split():
            name, eq, value = token.strip(",;()").partition("=")
            if not eq or token in REFUSED_ON_PURPOSE or not re.fullmatch(r"[a-z_][\w./]*", name):
                continue
            root = name.split(".", 1)[0]
            if "." not in name and is_group(name):
                for option in value.split(","):
                    if not _placeholder(option) and not (CONF / name / f"{option}.yaml").is_file():
                        found.append(f"{token}: no conf/{name}/{option}.yaml")
            elif "." in name and (is_group(root) or root == "hydra") and root != "policy":
                if not key_in_some_option(name):
                    found.append(f"{name}=: no such key in the composed config (nor under any option of {root})")
    return found


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (MkDocs) gives a heading."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def broken_links(page: Path, text: str | None = None) -> list[str]:
    text = page.read_text() if text is None else text
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            found.append(f"{page.name}: {target}: no such file")
            continue
        if page.parent == DOCS and DOCS not in dest.parents and dest != DOCS:
            found.append(f"{page.name}: {target}: leaves docs/ (mkdocs --strict refuses it: name it in code instead)")
        if anchor and dest.suffix == ".md":
            heads = [slug(h) for h in re.findall(r"^#+\s+(.+)$", dest.read_text(), re.M)]
            if anchor not in heads:
                found.append(f"{page.name}: {target}: no heading with that anchor in {dest.name}")
    return found


# --- the checks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_make_target_command_option_and_key_the_page_names_exists(page):
    assert problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_checks_catch_a_typo():
    fake = """
```bash
make nosuchtarget
python run.py -m method=awq,gptqq bench.vllm.no_such_knob=1
quantbench nosuchcommand
```
Then `experiment=seeed`, `bench.nosuch=3` and `method.no_such_knob=2`; but `make docs`, `method.iters=50`,
`hydra.launcher.partition=gpu` and `python run.py -m experiment=seed hardware=h100` are fine.
"""
    assert problems(fake) == [
        "make nosuchtarget: no such target in the Makefile",
        "quantbench nosuchcommand: no such command (quantbench/ops/cli.py COMMANDS)",
        "method=awq,gptqq: no conf/method/gptqq.yaml",
        "bench.vllm.no_such_knob=: no such key in the config composed with ['method=awq']",
        "experiment=seeed: no conf/experiment/seeed.yaml",
        "bench.nosuch=: no such key in the composed config (nor under any option of bench)",
        "method.no_such_knob=: no such key in the composed config (nor under any option of method)",
    ]
    page = DOCS / "fake.md"
    text = "[a](resume.md) [b](nosuch.md) [c](resume.md#no-such-heading) [d](../Makefile) [e](runs.md#what-a-run-is)"
    assert broken_links(page, text) == [
        "fake.md: nosuch.md: no such file",
        "fake.md: resume.md#no-such-heading: no heading with that anchor in resume.md",
        "fake.md: ../Makefile: leaves docs/ (mkdocs --strict refuses it: name it in code instead)",
    ]


def test_what_the_docs_show_hydra_refusing_is_refused():
    assert not has_key(composed(), "bench.nonexistent")
    assert not (CONF / "method" / "awqq.yaml").exists()


def test_the_readme_fits_on_one_screen_and_keeps_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    lines, _ = code_of(readme)
    assert lines[:2] == [
        "make run     # installs what is missing, then runs the default sweep on the embedded model (offline, CPU)",
        "make test    # installs what is missing, then runs the tests",
    ]
    for needed in ("run.py -m method=awq,gptq", "make ui", "run.py -m experiment=seed hardware=h100", "hf auth login"):
        assert needed in readme, needed


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert {p.name for p in DOCS.glob("*.md")} == set(re.findall(r":\s*([\w.-]+\.md)\s*$", nav, re.M))


# --- the docs build ---------------------------------------------------------------------------------------------------


def _pins(path: Path) -> dict[str, str]:
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    return {norm(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", path.read_text(), re.M)}


def test_the_docs_pins_are_exact_and_move_no_locked_package():
    """requirements-docs.txt pins only what the locks lack; what the docs build shares with quantbench stays the lock's,
    because `make docs-deps` installs with the stack's lock as a constraint."""
    text = (ROOT / "requirements-docs.txt").read_text()
    entries = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    docs = _pins(ROOT / "requirements-docs.txt")
    assert len(docs) == len(entries) and {"mkdocs", "mkdocs-material"} <= set(docs)
    for lock in ("requirements-lock.txt", "requirements-cuda-lock.txt"):
        assert set(docs) & set(_pins(ROOT / lock)) == set(), lock
    assert "pip install -q -r requirements-docs.txt -c $(LOCK)" in (ROOT / "Makefile").read_text()


def _mkdocs_installed() -> bool:
    try:
        metadata.version("mkdocs-material")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_mkdocs = pytest.mark.skipif(not _mkdocs_installed(), reason="mkdocs is not installed (make docs-deps)")


@needs_mkdocs
def test_the_installed_docs_build_is_the_pinned_one_and_its_requirements_are_pinned():
    from packaging.requirements import Requirement

    docs = _pins(ROOT / "requirements-docs.txt")
    lock = _pins(ROOT / "requirements-lock.txt")
    installed = {name: metadata.version(name) for name in docs}
    assert installed == docs
    missing = set()
    for name in docs:
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                norm = re.sub(r"[-_.]+", "-", req.name).lower()
                if norm not in docs and norm not in lock:
                    missing.add(f"{name} needs {req.name}")
    assert missing == set()


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@needs_mkdocs
def test_the_site_builds_in_strict_mode(tmp_path):
    out = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "gpu-results.html").exists()
    assert "fonts.googleapis.com" not in (tmp_path / "site" / "index.html").read_text()  # offline: no web fonts


@needs_mkdocs
def test_a_broken_link_fails_the_strict_build(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "runs.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md)\n")
    out = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert out.returncode != 0 and "no-such-page.md" in out.stderr
