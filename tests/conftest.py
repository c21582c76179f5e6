from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import VARIANTS, write_checkpoint  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the shared reference data is not at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_checkpoint(root / name, name) for name in VARIANTS}


@pytest.fixture(scope="session")
def bundled_model():
    from chatlm.auto import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(None)
