"""The local hub (tests/helpers/hub.py) against the real clients: huggingface_hub, transformers and datasets, each in a
fresh process whose environment is a user's with HF_ENDPOINT set (caches in a temporary folder, not offline)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

from helpers import hub as hub_server
from helpers.hub_repos import SEED_MODELS, TEST_DATASET

INSTRUCT, BASE = SEED_MODELS


def served_sha(url: str, repo_id: str, kind: str = "models") -> str:
    with urllib.request.urlopen(f"{url}/api/{kind}/{repo_id}/revision/main", timeout=10) as answer:
        return json.load(answer)["sha"]


def sha256s(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".hub.json"
    }


HUB_CALLS = """
    import json, os
    from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    api = HfApi()
    M = "{model}"
    out = {{"hf_home": os.environ["HF_HOME"]}}
    info = api.repo_info(M)
    out["sha"], out["gated"] = info.sha, info.gated
    out["snapshots"] = [snapshot_download(M, revision=r) for r in (None, "main", info.sha)]
    def error(call):
        try:
            call()
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            return [type(exc).__name__, status, str(exc)]
        return None
    out["no_token_file"] = error(lambda: hf_hub_download(M, "config.json", token=False, cache_dir="fresh"))
    out["no_token_auth_check"] = error(lambda: api.auth_check(M, token=False))
    out["no_token_info"] = api.repo_info(M, token=False).sha
    out["bad_token"] = error(lambda: api.repo_info(M, token="hf_not_a_token_of_this_hub"))
    out["unknown_repo"] = error(lambda: api.repo_info("meta-llama/No-Such-Model"))
    out["unknown_repo_no_token"] = error(lambda: api.repo_info("meta-llama/No-Such-Model", token=False))
    out["unknown_revision"] = error(lambda: snapshot_download(M, revision="no-such-branch"))
    out["unknown_file"] = error(lambda: hf_hub_download(M, "no-such-file.json"))
    fs = HfFileSystem()
    out["ls"] = sorted(fs.ls(M, detail=False))
    out["glob"] = sorted(fs.glob("datasets/{dataset}/**/*.parquet"))
    with fs.open(f"{{M}}/model.safetensors", "rb") as f:  # a ranged read, as HfFileSystem reads
        f.seek(1000)
        out["range"] = f.read(64).hex()
    out["paths_info"] = [p.path for p in api.get_paths_info(M, ["config.json", "no-such-file"])]
    print(json.dumps(out))
"""


def test_huggingface_hub_resolves_downloads_and_refuses_as_the_real_hub(local_hub, tiny_root, tmp_path):
    out = local_hub.run_python(HUB_CALLS.format(model=INSTRUCT, dataset=TEST_DATASET), tmp_path)
    source = tiny_root / "model"
    sha = served_sha(local_hub.url, INSTRUCT)
    assert out["sha"] == sha and len(sha) == 40 and int(sha, 16) >= 0
    assert out["hf_home"].startswith(str(tmp_path))  # never the user's ~/.cache
    # None, "main" and the sha are one snapshot: the model's own files, byte for byte, in the hub cache under tmp_path
    snapshots = {Path(p) for p in out["snapshots"]}
    assert snapshots == {tmp_path / "hf_home" / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / sha}
    assert sha256s(snapshots.pop()) == sha256s(source)
    # gated like the real hub: metadata is public, files and auth-check need a token
    assert out["gated"] == "manual" and out["no_token_info"] == sha
    for key in ("no_token_file", "no_token_auth_check"):
        name, status, message = out[key]
        assert (name, status) == ("GatedRepoError", 401), out[key]
        assert f"Access to model {INSTRUCT} is restricted. You must have access to it and be authenticated" in message
    name, status, message = out["bad_token"]
    assert (name, status) == ("HfHubHTTPError", 401) and "Invalid credentials in Authorization header" in message
    assert out["unknown_repo"][:2] == ["RepositoryNotFoundError", 404]
    assert out["unknown_repo_no_token"][:2] == ["RepositoryNotFoundError", 401]  # as the real hub: 401 unauthenticated
    assert out["unknown_revision"][:2] == ["RevisionNotFoundError", 404]
    assert out["unknown_revision"][2].endswith("Invalid rev id: no-such-branch")
    assert out["unknown_file"][:2] == ["RemoteEntryNotFoundError", 404]
    assert out["ls"] == sorted(f"{INSTRUCT}/{name}" for name in sha256s(source))
    assert out["glob"] == sorted(
        f"datasets/{TEST_DATASET}/{c}/{s}-00000-of-00001.parquet" for c in ("long", "short") for s in ("test", "train")
    )
    assert bytes.fromhex(out["range"]) == (source / "model.safetensors").read_bytes()[1000:1064]
    assert out["paths_info"] == ["config.json"]


def test_transformers_loads_config_tokenizer_and_model_by_repo_id(local_hub, tiny_root, tmp_path):
    out = local_hub.run_python(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        config = AutoConfig.from_pretrained("{INSTRUCT}")
        tokenizer = AutoTokenizer.from_pretrained("{INSTRUCT}")
        model = AutoModelForCausalLM.from_pretrained("{INSTRUCT}", dtype=torch.float32)
        local = AutoModelForCausalLM.from_pretrained("{tiny_root / "model"}", dtype=torch.float32)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
        print(json.dumps({{"type": config.model_type, "vocab": len(tokenizer), "class": type(model).__name__,
                          "same_weights": same, "n": len(model.state_dict())}}))
        """,
        tmp_path,
    )
    assert out == {
        "type": "llama",
        "vocab": out["vocab"],
        "class": "LlamaForCausalLM",
        "same_weights": True,
        "n": out["n"],
    }
    assert out["vocab"] > 100 and out["n"] > 10


def test_datasets_loads_each_config_of_a_parquet_dataset_and_names_a_missing_one(local_hub, tmp_path):
    out = local_hub.run_python(
        f"""
        import json, datasets
        out = {{"configs": datasets.get_dataset_config_names("{TEST_DATASET}")}}
        for name in out["configs"]:
            data = datasets.load_dataset("{TEST_DATASET}", name)
            out[name] = {{split: list(data[split]["text"]) for split in data}}
        builder = datasets.load_dataset_builder("{TEST_DATASET}", "long")
        out["hash"], out["features"] = builder.hash, sorted(builder.info.features)
        try:
            datasets.load_dataset_builder("{TEST_DATASET}", "no_such_config")
        except ValueError as exc:
            out["missing"] = str(exc)
        print(json.dumps(out))
        """,
        tmp_path,
        token=False,  # a public dataset needs no token
    )
    assert out["configs"] == ["short", "long"]
    assert out["short"]["train"][0] == "train text 0: alpha" and len(out["short"]["test"]) == 3
    assert len(out["long"]["train"]) == 8 and len(out["long"]["train"][0].split()) == 80
    assert out["hash"] == served_sha(local_hub.url, TEST_DATASET, "datasets")  # datasets pinned the served commit
    assert out["features"] == ["idx", "text"]
    assert "no_such_config" in out["missing"] and "['short', 'long']" in out["missing"]


def test_the_command_serves_a_stable_sha_that_follows_the_content_and_stops_on_sigterm(local_hub, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(local_hub.root / "models" / "meta-llama", root / "models" / "meta-llama", symlinks=True)
    first, url = hub_server.start(root, tmp_path / "first.log", ["t"])
    sha = served_sha(url, BASE)
    hub_server.stop(first)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-2000:]
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0
    second, url = hub_server.start(root, tmp_path / "second.log", ["t"])
    try:
        assert served_sha(url, BASE) == sha  # the same content is the same commit after a restart
        assert sha == served_sha(local_hub.url, BASE)  # and in another root
        (root / "models" / "meta-llama" / "Llama-3.1-8B" / "config.json").unlink()  # a link: the source stays
        (root / "models" / "meta-llama" / "Llama-3.1-8B" / "config.json").write_text("{}\n")
        new_sha = served_sha(url, BASE)
        assert new_sha != sha
        try:
            urllib.request.urlopen(f"{url}/api/models/{BASE}/revision/{sha}", timeout=10)
            raise AssertionError("the old commit still resolves")
        except urllib.error.HTTPError as exc:
            assert (exc.code, exc.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    finally:
        hub_server.stop(second)
    assert second.returncode == 0
