"""A Hugging Face hub of our own on 127.0.0.1: the hub HTTP calls that huggingface_hub, transformers, datasets, lm-eval
and vLLM make (through `HF_ENDPOINT`), over repositories kept as plain files.

Why written here rather than taken from a maintained mirror: olah 0.5.4 (the one on PyPI with a local-mirror mode) serves
only git repositories (a 16 GB model would be copied into git objects), knows no gated repositories (it hard-codes
`gated: false` and checks no token), answers an unknown revision or file as RepoNotFound (401) instead of
RevisionNotFound / EntryNotFound (404), and in offline mode refuses `/api/models/<id>` without a revision. Each of those
is a behaviour quantbench's hub path must be tested against.

Layout of `root` (the builder is tests/helpers/hub_repos.py):

    <root>/models/<org>/<name>/...      a model repository's files (plain files, symlinks or hard links)
    <root>/datasets/<org>/<name>/...    a dataset repository's files
    <repo folder>/.hub.json             optional, not served: {"gated": true|false}

A repository has one revision, "main", whose commit sha is a digest of its content (paths, sizes and sha256s; the
digests are remembered in <root>/.hub-digests.json by path, size and mtime, so a 16 GB repo is hashed once). The sha
and "main" resolve; any other revision is RevisionNotFound.

Access, as the real hub answers it: an Authorization token the server was not given is refused everywhere (401,
"Invalid credentials in Authorization header"); an unknown repository is 401 RepoNotFound without a token (404 with
one); a gated repository's metadata (info, tree, paths-info) is public while its files and `auth-check` answer 401
GatedRepo without a token; an unknown file is 404 EntryNotFound.

    python tests/helpers/hub.py --root DIR --port N [--token T]...    # prints its URL; SIGTERM stops it

As pytest fixtures (registered in tests/conftest.py): `local_hub` (session-scoped, on a free port, over
`hub_root`), `stopped_hub` (an endpoint on 127.0.0.1 where nothing listens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

log = logging.getLogger("quantbench.tests.hub")

REPO_TYPES = {"models": "model", "datasets": "dataset"}
HUB_META = ".hub.json"
DIGEST_MEMO = ".hub-digests.json"
# Stored in LFS on the real hub (its default .gitattributes), or large: their ETag is the sha256 of the content.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".gz", ".model", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 * 1024 * 1024
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
COMMIT = re.compile(r"[0-9a-f]{40}")
CHUNK = 1024 * 1024


# -- content: files, their digests, the commit sha ---------------------------------------------------------------------


class DigestMemo:
    """A file's sha256 and git blob id, remembered by resolved path, size and mtime in one JSON file (thread-safe)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.memo: dict[str, list[str]] = json.loads(path.read_text()) if path.is_file() else {}
        self.dirty = False

    def digests(self, file: Path) -> tuple[str, str]:
        """(sha256, git blob id) of the content, read once per version of the file."""
        real = file.resolve()
        stat = real.stat()
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        with self.lock:
            known = self.memo.get(key)
        if known:
            return known[0], known[1]
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\x00" % stat.st_size)
        with real.open("rb") as f:
            while block := f.read(CHUNK):
                sha256.update(block)
                sha1.update(block)
        with self.lock:
            self.memo[key] = [sha256.hexdigest(), sha1.hexdigest()]
            self.dirty = True
        return sha256.hexdigest(), sha1.hexdigest()

    def save(self) -> None:
        with self.lock:
            if not self.dirty:
                return
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.memo))
            tmp.replace(self.path)
            self.dirty = False


@dataclass(frozen=True)
class RepoFile:
    path: str  # relative, with "/"
    local: Path
    size: int
    sha256: str
    git_oid: str  # the git blob id: of the content, or of the LFS pointer for an LFS file
    lfs: bool

    def entry(self, commit: dict | None = None) -> dict:
        """The file as the hub's tree and paths-info endpoints list it."""
        out = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self))}
        if commit:
            out["lastCommit"] = commit
            out["securityFileStatus"] = {"status": "safe"}
        return out

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


def lfs_pointer(f: RepoFile) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {f.size}\n".encode()


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class Repo:
    kind: str  # "model" | "dataset"
    repo_id: str
    folder: Path
    gated: bool
    files: dict[str, RepoFile]
    sha: str
    modified: str  # ISO time of the newest file

    def folders(self) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}

    def folder_entry(self, path: str) -> dict:
        inner = sorted(f"{p}:{f.git_oid}" for p, f in self.files.items() if p.startswith(path + "/"))
        return {
            "type": "directory",
            "oid": hashlib.sha1("\n".join(inner).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }

    def last_commit(self) -> dict:
        return {"id": self.sha, "title": "Served by quantbench's local hub", "date": self.modified}

    def info(self, blobs: bool) -> dict:
        org, name = self.repo_id.split("/", 1)
        siblings = []
        for p, f in sorted(self.files.items()):
            sibling = {"rfilename": p}
            if blobs:
                sibling |= {"size": f.size, "blobId": f.git_oid}
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(lfs_pointer(f))}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(f"{self.kind}/{self.repo_id}".encode()).hexdigest()[:24],
            "id": self.repo_id,
            "author": org,
            "sha": self.sha,
            "lastModified": self.modified,
            "createdAt": self.modified,
            "private": False,
            "gated": "manual" if self.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in self.files.values()),
        }
        if self.kind == "model":
            info["modelId"] = self.repo_id
            config = self.folder / "config.json"
            if config.is_file():
                try:
                    data = json.loads(config.read_text())
                    info["config"] = {k: data[k] for k in ("architectures", "model_type") if k in data}
                except ValueError:
                    pass
        return info


def scan_repo(kind: str, repo_id: str, folder: Path, memo: DigestMemo) -> Repo:
    """The repository's files (symlinked folders followed, `.hub.json` left out), their digests and its commit sha."""
    files: dict[str, RepoFile] = {}
    newest = 0.0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            local = Path(dirpath) / name
            rel = local.relative_to(folder).as_posix()
            if rel == HUB_META or not local.is_file():
                continue
            stat = local.stat()
            newest = max(newest, stat.st_mtime)
            sha256, oid = memo.digests(local)
            lfs = local.suffix in LFS_SUFFIXES or stat.st_size >= LFS_MIN_SIZE
            if lfs:  # the git blob is the LFS pointer
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {stat.st_size}\n"
                oid = git_blob_oid(pointer.encode())
            files[rel] = RepoFile(rel, local, stat.st_size, sha256, oid, lfs)
    memo.save()
    content = "".join(f"{p}\x00{f.size}\x00{f.sha256}\n" for p, f in sorted(files.items()))
    meta_file = folder / HUB_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return Repo(
        kind=kind,
        repo_id=repo_id,
        folder=folder,
        gated=bool(meta.get("gated", False)),
        files=files,
        sha=hashlib.sha1(f"{kind}/{repo_id}\n{content}".encode()).hexdigest(),
        modified=datetime.fromtimestamp(newest, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    )


def repo_folders(root: Path) -> dict[tuple[str, str], Path]:
    """(kind, repo_id) -> folder for every <root>/<models|datasets>/<org>/<name>/ (names starting with '.' skipped)."""
    out = {}
    for plural, kind in REPO_TYPES.items():
        for org in sorted((root / plural).glob("*")):
            for repo in sorted(org.glob("*")):
                if repo.is_dir() and not org.name.startswith(".") and not repo.name.startswith("."):
                    out[(kind, f"{org.name}/{repo.name}")] = repo
    return out


# -- HTTP ----------------------------------------------------------------------------------------------------------------


class HubError(Exception):
    """An answer other than 200: status, X-Error-Code (None for none) and X-Error-Message."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, port: int, tokens: list[str], host: str = "127.0.0.1"):
        self.root = Path(root).resolve()
        self.tokens = set(tokens)
        self.memo = DigestMemo(self.root / DIGEST_MEMO)
        self.scan_lock = threading.Lock()
        self.repos = self.scan_all()  # before listening: a large repo is hashed now, not inside a client's timeout
        super().__init__((host, port), HubHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def scan_all(self) -> dict[tuple[str, str], Repo]:
        return {key: scan_repo(key[0], key[1], folder, self.memo) for key, folder in repo_folders(self.root).items()}

    def repo(self, kind: str, repo_id: str) -> Repo | None:
        """The repository as its files are now (rescanned per request: a digest is recomputed only for a changed file)."""
        folder = self.root / f"{kind}s" / repo_id
        if repo_id.count("/") != 1 or repo_id.startswith(".") or "/." in repo_id or not folder.is_dir():
            return None
        with self.scan_lock:
            self.repos[(kind, repo_id)] = scan_repo(kind, repo_id, folder, self.memo)
            return self.repos[(kind, repo_id)]


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx client expects; every answer has a length

    # -- entry points --

    def do_HEAD(self):
        self._dispatch(head=True)

    def do_GET(self):
        self._dispatch(head=False)

    def do_POST(self):
        self._dispatch(head=False)

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        try:
            self._route(parts, query, head)
        except HubError as exc:
            self._send_json({"error": exc.message}, exc.status, head, exc.code, exc.message, exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, parts: list[str], query: dict, head: bool) -> None:
        token = self._token()
        if parts[:2] == ["api", "telemetry"]:  # huggingface_hub's usage pings (HF_HUB_DISABLE_TELEMETRY turns them off)
            return self._send_json({}, 200, head)
        if parts[:2] == ["api", "agent-harnesses"]:  # huggingface_hub's best-effort agent detection: none known here
            return self._send_json({"standardEnvVars": [], "harnesses": {}}, 200, head)
        if parts[:2] == ["api", "whoami-v2"]:
            if token is None:
                raise HubError(401, None, INVALID_CREDENTIALS)
            user = {"type": "user", "id": "0" * 24, "name": "quantbench-test", "fullname": "quantbench test", "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "read"}}}  # fmt: skip
            return self._send_json(user, 200, head)  # `hf auth login --token` and `hf auth whoami` ask this
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            kind, repo_id, rest = REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            return self._api(kind, repo_id, rest, query, token, head)
        if len(parts) >= 5 and parts[0] == "datasets" and parts[3] == "resolve":
            return self._resolve("dataset", f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]), token, head)
        if len(parts) >= 4 and parts[2] == "resolve":
            return self._resolve("model", f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), token, head)
        log.warning("Not served by the local hub: %s %s", self.command, self.path)
        raise HubError(404, None, f"Not served by quantbench's local hub: {self.command} {self.path}")

    # -- access, as the real hub decides it --

    def _token(self) -> str | None:
        """The request's token if the server accepts it; None without one; HubError for one it does not accept."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        if token not in self.server.tokens:
            raise HubError(401, None, INVALID_CREDENTIALS)
        return token

    def _repo(self, kind: str, repo_id: str, token: str | None, content: bool) -> Repo:
        repo = self.server.repo(kind, repo_id)
        if repo is None:
            raise HubError(404 if token else 401, "RepoNotFound", "Repository not found")
        if content and repo.gated and token is None:
            raise HubError(
                401,
                "GatedRepo",
                f"Access to {kind} {repo_id} is restricted. You must have access to it and be authenticated to "
                f"access it. Please log in.",
            )
        return repo

    @staticmethod
    def _revision(repo: Repo, revision: str) -> None:
        if revision not in ("main", repo.sha):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    # -- /api/{models|datasets}/{org}/{name}/... --

    def _api(self, kind: str, repo_id: str, rest: list[str], query: dict, token: str | None, head: bool) -> None:
        if rest == ["auth-check"]:
            self._repo(kind, repo_id, token, content=True)
            return self._send_json({}, 200, head)
        repo = self._repo(kind, repo_id, token, content=False)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        if not rest:
            return self._send_json(repo.info(blobs), 200, head)
        if rest[0] == "revision" and len(rest) == 2:
            self._revision(repo, rest[1])
            return self._send_json(repo.info(blobs), 200, head)
        if rest[0] == "tree" and len(rest) >= 2:
            self._revision(repo, rest[1])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            expand = query.get("expand", ["false"])[0].lower() == "true"
            return self._send_json(self._tree(repo, "/".join(rest[2:]).strip("/"), recursive, expand), 200, head)
        if rest[0] == "paths-info" and len(rest) == 2:
            self._revision(repo, rest[1])
            return self._send_json(self._paths_info(repo), 200, head)
        if rest == ["refs"]:
            main = {"name": "main", "ref": "refs/heads/main", "targetCommit": repo.sha}
            return self._send_json({"branches": [main], "tags": [], "converts": []}, 200, head)
        if rest[0] == "commits" and len(rest) == 2:
            self._revision(repo, rest[1])
            commit = {"id": repo.sha, "title": repo.last_commit()["title"], "message": "", "authors": [],
                      "date": repo.modified}  # fmt: skip
            return self._send_json([commit], 200, head)
        log.warning("Not served by the local hub: %s %s", self.command, self.path)
        raise HubError(404, None, f"Not served by quantbench's local hub: {self.command} {self.path}")

    def _tree(self, repo: Repo, path: str, recursive: bool, expand: bool) -> list[dict]:
        folders = repo.folders()
        if path and path not in folders:
            raise HubError(404, "EntryNotFound", f'{path} does not exist on "main"', {"X-Repo-Commit": repo.sha})
        prefix = f"{path}/" if path else ""
        commit = repo.last_commit() if expand else None

        def listed(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        entries = [repo.folder_entry(d) for d in sorted(folders) if listed(d)]
        entries += [f.entry(commit) for p, f in sorted(repo.files.items()) if listed(p)]
        return entries

    def _paths_info(self, repo: Repo) -> list[dict]:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(body or "{}")
            paths, expand = form.get("paths", []), bool(form.get("expand", False))
        else:
            form = parse_qs(body)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() == "true"
        folders = repo.folders()
        commit = repo.last_commit() if expand else None
        out = []
        for p in paths:
            p = p.strip("/")
            if p in repo.files:
                out.append(repo.files[p].entry(commit))
            elif p in folders or p == "":
                out.append(repo.folder_entry(p))
        return out

    # -- /{org}/{name}/resolve/{revision}/{path} and /datasets/... --

    def _resolve(self, kind: str, repo_id: str, revision: str, path: str, token: str | None, head: bool) -> None:
        repo = self._repo(kind, repo_id, token, content=True)
        self._revision(repo, revision)
        f = repo.files.get(path)
        if f is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.sha})
        start, end = 0, f.size - 1
        status = 200
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{Path(path).name}"',
        }
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if wanted and f.size:
            first, last = wanted.groups()
            if first:
                start, end = int(first), min(int(last), f.size - 1) if last else f.size - 1
            elif last:  # the last N bytes
                start = max(f.size - int(last), 0)
            if start > end or start >= f.size:
                raise HubError(416, None, "Requested range not satisfiable", {"Content-Range": f"bytes */{f.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = end - start + 1 if f.size else 0
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head or not length:
            return
        self.wfile.flush()
        with f.local.open("rb") as data:
            self.connection.sendfile(data, offset=start, count=length)

    # -- answers --

    def _send_json(
        self,
        payload,
        status: int,
        head: bool,
        code: str | None = None,
        message: str | None = None,
        headers: dict | None = None,
    ) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


# -- as a command ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A Hugging Face hub on 127.0.0.1 over a folder of repositories.")
    parser.add_argument("--root", required=True, type=Path, help="the folder with models/<org>/<name>, datasets/...")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", action="append", default=[], help="a token that may read gated repositories")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: no such folder")

    def on_sigterm(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    server = HubServer(args.root, args.port, args.token, args.host)
    log.info("Serving %d repositories from %s", len(server.repos), server.root)
    print(server.url, flush=True)  # the one line on stdout: HF_ENDPOINT
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        log.info("Stopped")


# -- as pytest fixtures ------------------------------------------------------------------------------------------------


@dataclass
class LocalHub:
    """A running hub: its URL, the token it accepts for gated repositories, the folder it serves."""

    url: str
    token: str
    root: Path
    log: Path

    def env(self, tmp: Path, token: bool = True) -> dict[str, str]:
        """The environment a user's process has with this hub: HF_ENDPOINT, caches under `tmp`, not offline."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}  # fmt: skip
        env |= {
            **dict.fromkeys(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"), "0"),
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(tmp / "hf_home"),
            "HF_HUB_CACHE": str(tmp / "hf_home" / "hub"),
            "HF_DATASETS_CACHE": str(tmp / "hf_home" / "datasets"),
        }
        if token:
            env["HF_TOKEN"] = self.token
        return env

    def run_python(self, code: str, tmp: Path, token: bool = True, env: dict | None = None) -> dict:
        """`code` (its last stdout line JSON) in a fresh process with this hub's environment (see `env`; `env`
        changes it): the clients read HF_ENDPOINT and the offline flags once, at import, as in a user's process."""
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=self.env(tmp, token=token) | (env or {}),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


def start(root: Path, log_file: Path, tokens: list[str], timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """`python tests/helpers/hub.py` over `root` on a free port; returns the process and its URL once it listens."""
    cmd = [sys.executable, __file__, "--root", str(root)] + [a for t in tokens for a in ("--token", t)]
    with log_file.open("w") as err:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    # the URL is printed once every repository is hashed and the socket listens
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline().strip() if ready else ""
    if not line.startswith("http://"):
        process.kill()
        process.wait()
        raise RuntimeError(f"the local hub did not start in {timeout_s} s: {line!r}\n{log_file.read_text()[-3000:]}")
    return process, line


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def unused_endpoint() -> str:
    """http://127.0.0.1:<port> where nothing listens (connection refused at once): a hub that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


TEST_TOKEN = "hf_quantbench_local_hub_test_token"


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory, tiny_root) -> Path:
    """The seed's repositories over the embedded model (tests/helpers/hub_repos.py), but its AQLM checkpoint (see
    `hub_aqlm_repo`); the seed's datasets (cais/mmlu, allenai/ai2_arc, allenai/c4, Salesforce/wikitext:
    tests/helpers/hub_datasets.py) and a small two-config parquet dataset for the tests."""
    from helpers import hub_repos

    root = tmp_path_factory.mktemp("hub")
    hub_repos.build(root, tiny_root / "model", aqlm=False)
    hub_repos.write_test_dataset(root)
    return root


@pytest.fixture(scope="session")
def hub_aqlm_repo(hub_root, tiny_root) -> Path:
    """The AQLM checkpoint `aqlm_2bit_pretrained` names, added to `hub_root` (a running hub serves it at once):
    quantized once per project cache, minutes on a busy 2-core machine."""
    from helpers import hub_repos

    return hub_repos.write_aqlm_repo(hub_root, tiny_root / "model")


@pytest.fixture(scope="session")
def local_hub(hub_root, tmp_path_factory) -> LocalHub:
    """The hub over `hub_root`, on a free port of 127.0.0.1, for the session; stopped (and checked gone) after."""
    log_file = tmp_path_factory.mktemp("hub-log") / "hub.log"
    process, url = start(hub_root, log_file, [TEST_TOKEN])
    try:
        yield LocalHub(url, TEST_TOKEN, hub_root, log_file)
    finally:
        stop(process)


@pytest.fixture
def stopped_hub(hub_root, tmp_path) -> LocalHub:
    """A hub that is down: an endpoint on 127.0.0.1 with no listener (never a black-holed address)."""
    return LocalHub(unused_endpoint(), TEST_TOKEN, hub_root, tmp_path / "no-hub.log")


if __name__ == "__main__":
    main()
