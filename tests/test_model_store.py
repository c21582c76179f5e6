"""chatlm pull / list / rm on huggingface_hub's own cache, with no network.

The cache is laid out as hf_hub_download leaves it (blobs named by content hash, snapshot links, refs/main) and
checked with huggingface_hub's own API (scan_cache_dir, hf_hub_download with local_files_only) before anything
of ours reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir

from chatlm.info import model_info
from chatlm.loading.resolve import BUNDLED_NAME, bundled_model_path
from chatlm.model_store import Ambiguous, Unreachable, list_models, pull, remove, select_gguf, unlink_files
from checkpoints import write_checkpoint
from gguf_export import export_gguf

HF = "tiny-org/tiny-llama"
GGUF = "tiny-org/tiny-llama-GGUF"
UNREACHABLE = (
    "cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set): check the network, or use a local file"
)


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], repo_type: str = "model") -> Path:
    """Put ``files`` (name in the repo -> source) in the cache as a download of revision main would."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = _commit(repo_id)
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    checkpoint = write_checkpoint(root / "llama", "llama")
    readme = root / "README.md"
    readme.write_text("# tiny\n")
    return {
        "checkpoint": checkpoint,
        "readme": readme,
        "Q8_0": export_gguf(
            checkpoint, root / "tiny-llama-Q8_0.gguf", "llama", "Q8_0", tokenizer_dir=checkpoint
        ),
        "F32": export_gguf(
            checkpoint, root / "tiny-llama-F32.gguf", "llama", "F32", tokenizer_dir=checkpoint
        ),
    }


@pytest.fixture
def cache(tmp_path, sources) -> Path:
    """A Hub cache with a safetensors repo, a repo of two GGUF files and a dataset."""
    cache = tmp_path / "hub"
    checkpoint = sources["checkpoint"]
    files = {p.name: p for p in checkpoint.iterdir()}
    cache_repo(cache, HF, {**files, "README.md": sources["readme"]})
    ggufs = {"tiny-llama-Q8_0.gguf": sources["Q8_0"], "tiny-llama-F32.gguf": sources["F32"]}
    cache_repo(cache, GGUF, {**ggufs, "README.md": sources["readme"]})
    cache_repo(cache, "tiny-org/data", {"train.jsonl": sources["readme"]}, repo_type="dataset")
    return cache


class FakeHub:
    """A stand-in for the Hub's HTTP API on 127.0.0.1, serving ``repos`` (id -> name -> file): what model_info,
    snapshot_download and hf_hub_download ask of it, so that pull runs huggingface_hub's own download code."""

    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos, self.requests = repos, []
        answer = self._answer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                answer(self, body=False)

            def do_GET(self) -> None:
                answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        json_type = {"Content-Type": "application/json"}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/[^/]+|/tree/[^/]+(/.*)?)?", path):
            files = self.repos.get(m[1])
            if files is None:
                return self._send(
                    handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
                )
            if m[2] and m[2].startswith("/tree/"):
                tree = [
                    {"type": "file", "path": f, "size": p.stat().st_size, "oid": _sha1(p)}
                    for f, p in files.items()
                ]
                return self._send(handler, 200, json.dumps(tree).encode(), json_type, body)
            siblings = [{"rfilename": f} for f in sorted(files)]
            info = {"id": m[1], "sha": _commit(m[1]), "private": False, "siblings": siblings}
            return self._send(handler, 200, json.dumps(info).encode(), json_type, body)
        if (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)) and m[2] in self.repos.get(
            m[1], {}
        ):
            data = self.repos[m[1]][m[2]].read_bytes()
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._send(handler, 200, data, {"X-Repo-Commit": _commit(m[1]), "ETag": etag}, body)
        self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"})

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict, body: bool = True
    ) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)


def _commit(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def chatlm(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "chatlm", *args], capture_output=True, text=True, timeout=120, env=environment
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatlm: error: "), result.stderr
    return lines[0].removeprefix("chatlm: error: ")


def test_the_cache_is_huggingface_hubs(cache):
    scan = scan_cache_dir(cache)
    assert not scan.warnings
    assert {(r.repo_type, r.repo_id) for r in scan.repos} == {
        ("model", HF),
        ("model", GGUF),
        ("dataset", "tiny-org/data"),
    }
    config = hf_hub_download(HF, "config.json", cache_dir=cache, local_files_only=True)
    assert json.loads(Path(config).read_text())["model_type"] == "llama"
    gguf = hf_hub_download(GGUF, "tiny-llama-Q8_0.gguf", cache_dir=cache, local_files_only=True)
    assert Path(gguf).read_bytes()[:4] == b"GGUF"


def test_list_shows_each_model_with_its_facts(cache, sources):
    rows = {row.name: row for row in list_models(cache, bundled=False)}
    assert set(rows) == {HF, f"{GGUF}:Q8_0", f"{GGUF}:F32"}  # the dataset is no model

    hf = rows[HF]
    files = [*sources["checkpoint"].iterdir(), sources["readme"]]
    assert hf.format == "safetensors" and hf.repo_id == HF and hf.file is None
    assert hf.size_bytes == sum(f.stat().st_size for f in files)
    assert (hf.quantization, hf.architecture) == ("F32", "llama")
    assert hf.parameters == model_info(sources["checkpoint"], measure=False).total_parameters
    assert Path(hf.path, "config.json").is_file()

    for quant in ("Q8_0", "F32"):
        row = rows[f"{GGUF}:{quant}"]
        assert row.format == "gguf" and row.file == f"tiny-llama-{quant}.gguf"
        assert (row.quantization, row.architecture) == (quant, "llama")
        assert row.size_bytes == sources[quant].stat().st_size
        assert row.parameters == hf.parameters
    assert rows[f"{GGUF}:Q8_0"].size_bytes < rows[f"{GGUF}:F32"].size_bytes / 2


def test_list_starts_with_the_bundled_model(cache):
    first = list_models(cache)[0]
    assert first.bundled and first.name == BUNDLED_NAME and first.path == str(bundled_model_path())
    assert (first.quantization, first.architecture) == ("Q4_1", "llama")
    assert first.size_bytes == bundled_model_path().stat().st_size
    assert list_models(cache / "no-cache-yet", bundled=False) == []


def test_cli_list_json_and_table(cache):
    result = chatlm("list", "--json", cache=cache)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {BUNDLED_NAME, HF, f"{GGUF}:Q8_0", f"{GGUF}:F32"}
    assert rows[f"{GGUF}:Q8_0"]["quantization"] == "Q8_0" and rows[HF]["architecture"] == "llama"

    table = chatlm("list", cache=cache)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "QUANT", "ARCH", "PARAMS"]
    q8 = next(line for line in lines if line.startswith(f"{GGUF}:Q8_0 "))
    assert q8.split()[-3:-1] == ["Q8_0", "llama"]
    assert lines[0].startswith(f"{BUNDLED_NAME} (bundled)")


def test_select_gguf_by_tag():
    files = [
        "README.md",
        "m-Q4_0.gguf",
        "m-Q4_0_4_4.gguf",
        "m-Q4_K_M.gguf",
        "m-Q4_K_S.gguf",
        "m.q8_0.gguf",
        "m-F16.gguf",
        "mmproj-F16.gguf",
    ]
    assert select_gguf(files, "Q4_0") == "m-Q4_0.gguf"  # a whole word beats a prefix of one
    assert select_gguf(files, "q4_k_m") == "m-Q4_K_M.gguf"
    assert select_gguf(files, "Q8_0") == "m.q8_0.gguf"
    assert select_gguf(files, "F16") == "m-F16.gguf"  # the vision projector is never picked
    with pytest.raises(Ambiguous, match="m-Q4_K_M.gguf, m-Q4_K_S.gguf"):
        select_gguf(files, "Q4_K")
    with pytest.raises(ValueError, match="no GGUF file .* matches 'Q5_K_M'.*m-Q4_0.gguf"):
        select_gguf(files, "Q5_K_M")


def test_pull_offline_finds_what_is_cached(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pulled = pull(HF, cache_dir=cache)
    assert pulled.was_cached and "HF_HUB_OFFLINE" in pulled.note
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(pulled.files)
    assert "README.md" not in pulled.files and (pulled.path / "config.json").is_file()

    q8 = pull(f"{GGUF}:q8_0", cache_dir=cache)  # the tag, against the cached repo's files
    assert q8.files == ("tiny-llama-Q8_0.gguf",) and q8.path.read_bytes()[:4] == b"GGUF"
    assert q8.size_bytes == q8.path.stat().st_size
    assert pull(GGUF, gguf_file="tiny-llama-F32.gguf", cache_dir=cache).files == ("tiny-llama-F32.gguf",)
    assert pull(f"{GGUF}:tiny-llama-F32.gguf", cache_dir=cache).files == ("tiny-llama-F32.gguf",)
    with pytest.raises(Ambiguous, match="several GGUF files.*tiny-llama-F32.gguf, tiny-llama-Q8_0.gguf"):
        pull(GGUF, cache_dir=cache)
    for missing in (
        "tiny-org/not-pulled",
        f"{GGUF}:Q4_K_M",
    ):  # the Hub might have them: say it is out of reach
        with pytest.raises(Unreachable) as error:
            pull(missing, cache_dir=cache)
        assert str(error.value) == UNREACHABLE
    with pytest.raises(ValueError, match="not a Hub model id"):
        pull("not-an-id", cache_dir=cache)
    bundled = pull(BUNDLED_NAME, cache_dir=cache)  # nothing to download: it came with its package
    assert bundled.was_cached and bundled.path == bundled_model_path()


def test_cli_pull_without_the_hub(cache):
    assert one_line_error(chatlm("pull", "tiny-org/not-pulled", cache=cache)) == UNREACHABLE
    # No offline mode, but a Hub that refuses connections: the same message, with the cause.
    refused = chatlm(
        "pull", "tiny-org/not-pulled", cache=cache, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9"
    )
    message = one_line_error(refused)
    assert message.startswith("cannot reach the Hugging Face Hub (") and "Traceback" not in refused.stderr
    assert message.endswith("): check the network, or use a local file")

    there = chatlm("pull", f"{GGUF}:Q8_0", cache=cache, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert there.returncode == 0, there.stderr
    assert there.stdout.startswith(f"{GGUF}:Q8_0 is already here")
    assert "the Hub was not asked for a newer version" in there.stdout


def test_pull_downloads_through_huggingface_hub(tmp_path, sources):
    """Against a Hub on 127.0.0.1: only the files loading needs (no pickles), then a second pull finds them."""
    checkpoint = sources["checkpoint"]
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"never downloaded")
    hub = FakeHub(
        {
            HF: {**{p.name: p for p in checkpoint.iterdir()}, "pytorch_model.bin": pickle},
            GGUF: {"tiny-llama-Q8_0.gguf": sources["Q8_0"], "tiny-llama-F32.gguf": sources["F32"]},
        }
    )
    cache = tmp_path / "hub"
    try:
        first = chatlm("pull", HF, cache=cache, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        again = chatlm("pull", HF, cache=cache, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        q8 = chatlm("pull", f"{GGUF}:Q8_0", cache=cache, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        several = chatlm("pull", GGUF, cache=cache, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
        missing = chatlm("pull", "tiny-org/missing", cache=cache, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
    finally:
        hub.close()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"pulled {HF} (")
    assert again.returncode == 0 and again.stdout.startswith(f"{HF} is already here"), again.stderr
    assert q8.returncode == 0 and q8.stdout.startswith(f"pulled {GGUF}:Q8_0 ("), q8.stderr
    assert "several GGUF files" in one_line_error(several)
    assert one_line_error(missing).startswith("no model 'tiny-org/missing' on the Hugging Face Hub")
    assert not any("pytorch_model.bin" in r or "F32.gguf" in r for r in hub.requests if r.startswith("GET"))

    scan = scan_cache_dir(cache)
    files = {r.repo_id: {f.file_name for rev in r.revisions for f in rev.files} for r in scan.repos}
    assert files == {HF: {p.name for p in checkpoint.iterdir()}, GGUF: {"tiny-llama-Q8_0.gguf"}}
    rows = {row.name: row for row in list_models(cache, bundled=False)}
    assert set(rows) == {HF, f"{GGUF}:Q8_0"} and rows[f"{GGUF}:Q8_0"].quantization == "Q8_0"


def test_rm_one_gguf_file_then_the_repo(cache):
    scan = scan_cache_dir(cache)
    (repo,) = [r for r in scan.repos if r.repo_id == GGUF]
    blobs = {f.file_name: f.blob_path for revision in repo.revisions for f in revision.files}
    q8_bytes = blobs["tiny-llama-Q8_0.gguf"].stat().st_size

    removed = remove(f"{GGUF}:Q8_0", cache_dir=cache)
    assert not removed.whole_repo and removed.freed_bytes == q8_bytes
    (repo,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == GGUF]
    assert {f.file_name for revision in repo.revisions for f in revision.files} == {
        "tiny-llama-F32.gguf",
        "README.md",
    }
    assert not blobs["tiny-llama-Q8_0.gguf"].exists() and blobs["tiny-llama-F32.gguf"].exists()

    with pytest.raises(ValueError, match="no GGUF file .* matches 'Q8_0'.*tiny-llama-F32.gguf"):
        remove(f"{GGUF}:Q8_0", cache_dir=cache)
    assert remove(f"{GGUF}:F32", cache_dir=cache).whole_repo  # its last weights: the README goes too
    assert GGUF not in {r.repo_id for r in scan_cache_dir(cache).repos}
    assert not any(path.exists() for path in blobs.values())


def test_unlink_files_keeps_blobs_in_use(cache):
    """What rm does by hand where huggingface_hub has no delete_files: links first, then unused blobs."""
    (repo,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == GGUF]
    entries = {f.file_name: f for rev in repo.revisions for f in rev.files}
    q8, f32 = entries["tiny-llama-Q8_0.gguf"], entries["tiny-llama-F32.gguf"]
    assert unlink_files([q8, f32], kept_blobs={f32.blob_path}) == q8.size_on_disk
    assert not q8.file_path.exists() and not q8.blob_path.exists()
    assert not f32.file_path.exists() and f32.blob_path.exists()


def test_rm_a_repo_and_what_it_refuses(cache):
    with pytest.raises(ValueError, match="bundled model"):
        remove(BUNDLED_NAME, cache_dir=cache)
    with pytest.raises(ValueError, match=f"tiny-org/unknown is not in the Hugging Face cache .*{HF}"):
        remove("tiny-org/unknown", cache_dir=cache)
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        remove("tiny-org/data", cache_dir=cache)  # a dataset, not a model

    removed = remove(HF, cache_dir=cache)
    assert removed.whole_repo and removed.freed_bytes > 0
    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {GGUF, "tiny-org/data"}
    assert not (cache / "models--tiny-org--tiny-llama").exists()


def test_cli_rm(cache):
    assert "bundled model" in one_line_error(chatlm("rm", BUNDLED_NAME, cache=cache))
    result = chatlm("rm", HF, cache=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"deleted {HF} (")
    assert HF not in {r.repo_id for r in scan_cache_dir(cache).repos}


def test_run_a_cached_model_by_its_hub_id_offline(cache, tmp_path):
    result = chatlm("run", HF, "hi", "--max-new-tokens", "3", cache=cache)
    assert result.returncode == 0, result.stderr
    # the model works from the cache alone: no copy of it anywhere else
    shutil.rmtree(cache / f"models--{HF.replace('/', '--')}")
    assert "not in the local cache" in one_line_error(chatlm("run", HF, "hi", cache=cache))


def test_run_a_cached_gguf_by_its_tag_offline(cache):
    """`chatlm run ORG/REPO:Q8_0` (the name `chatlm list` shows) runs the cached file the tag picks."""
    from chatlm.loading.resolve import resolve_model

    result = chatlm("run", f"{GGUF}:Q8_0", "hi", "--max-new-tokens", "3", cache=cache)
    assert result.returncode == 0, result.stderr
    resolved = resolve_model(f"{GGUF}:F32", cache_dir=cache, local_files_only=True)
    assert resolved.path.name == "tiny-llama-F32.gguf"
    assert "no GGUF file of" in one_line_error(chatlm("run", f"{GGUF}:Q5_K", "hi", cache=cache))
