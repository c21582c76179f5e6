"""The guide's code, as scripts in examples/, run against the bundled model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_quickstart():
    out = run("quickstart.py")
    assert out.strip(), "the assistant said nothing"


def test_low_level():
    out = run("low_level.py")
    assert "<|im_start|>assistant\n" in out  # the formatted chat
    assert "Decoded output:" in out
    reply = out.split("Decoded output:\n", 1)[1].strip()
    assert reply


@pytest.mark.parametrize("name", ["model_kwargs.py"])
def test_model_kwargs(name):
    out = run(name)
    lines = out.splitlines()
    assert lines[0].startswith("The capital of France is")
    megabytes = float(next(line for line in lines if line.startswith("4-bit weights:")).split()[2])
    assert 50 < megabytes < 135  # 4-bit layers and an int8 embedding, not the 538 MB of float32
    assert out.count("The capital of France is") == 2
