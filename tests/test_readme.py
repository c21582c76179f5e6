"""The README's commands, run as written, in the README's order: `make chat` in a terminal, every `chatlm` line
(interactive chats answered in a pty, the others run to completion), `chatlm serve` with the Python client blocks
against it, and the guide's Python blocks. Only what the README leaves to the reader is filled in: its
`path/to/model.gguf` is the bundled model's GGUF file, `path/to/folder` a tiny checkpoint the test writes, and
the Hub is a local stand-in serving the repository the README pulls (huggingface_hub's own download code runs)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pexpect
import pytest

from chatlm.loading.resolve import bundled_model_path
from checkpoints import write_checkpoint
from test_chat_repl import PROMPT
from test_model_store import FakeHub

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
HUB_REPO = "bartowski/Llama-3.2-1B-Instruct-GGUF"


def commands(language: str) -> list[list[str]]:
    """The command lines of the README's blocks in ``language``, split as the shell splits them."""
    lines = [line for kind, body in BLOCKS if kind == language for line in body.splitlines()]
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment the commands run in: a Hub cache of their own, the stand-in Hub, a fresh state folder."""
    root = tmp_path_factory.mktemp("readme")
    hub = FakeHub({HUB_REPO: {"Llama-3.2-1B-Instruct-Q4_K_M.gguf": bundled_model_path()}})
    folder = write_checkpoint(root / "folder", "llama")
    environment = {
        **os.environ,
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.url,
        "XDG_STATE_HOME": str(root / "state"),
        "TERM": "xterm",
        "PYTHONUNBUFFERED": "1",
    }
    substitutions = {"path/to/model.gguf": str(bundled_model_path()), "path/to/folder": str(folder)}
    yield environment, substitutions
    hub.close()


def filled(words: list[str], substitutions: dict[str, str]) -> list[str]:
    out = []
    for word in words:
        for placeholder, value in substitutions.items():
            word = word.replace(placeholder, value)
        out.append(word)
    return out


def chat_in_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """Start an interactive chat, say hello, wait for the reply and the next prompt, quit; what it printed."""
    child = pexpect.spawn(
        argv[0], argv[1:], env=env, cwd=ROOT, encoding="utf-8", timeout=300, dimensions=(40, 200)
    )
    try:
        child.expect_exact(PROMPT)
        child.send("Hi! Who are you?\r")
        child.expect_exact(PROMPT)
        reply = child.before
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, reply
    return reply


def run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(argv)}: {result.stderr[-2000:]}"
    return result.stdout


def in_the_projects_venv() -> bool:
    return Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def test_the_shell_commands_run_as_written(env):
    environment, substitutions = env
    ran = []
    for words in commands("sh"):
        words = filled(words, substitutions)
        line = shlex.join(words)
        if words[:2] == ["make", "test"]:
            assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs it; this test is part of it
        elif words[:2] == ["make", "chat"]:
            if not in_the_projects_venv():  # make chat runs .venv/bin/chatlm: only meaningful from that venv
                continue
            reply = chat_in_a_terminal(["make", "--no-print-directory", *words[1:]], environment)
            assert reply.strip(), line
        elif words[0] == "chatlm":
            argv = [sys.executable, "-m", "chatlm", *words[1:]]
            if words[1] == "chat":
                assert chat_in_a_terminal(argv, environment).strip(), line
            elif words[1] == "serve":
                continue  # test_serve_and_its_clients
            else:
                out = run(argv, environment)
                if words[1] == "pull":
                    assert "pulled" in out and HUB_REPO in out
                if words[1] == "list":
                    assert HUB_REPO in out and "SmolLM2-135M-Instruct" in out
                if words[1] == "rm":
                    assert HUB_REPO not in run([sys.executable, "-m", "chatlm", "list"], environment)
                if words[1] in ("run", "info"):
                    assert out.strip(), line
        else:
            pytest.fail(f"the README has a command this test does not know how to run: {line}")
        ran.append(line)
    assert any("chatlm pull" in line for line in ran) and any("chatlm rm" in line for line in ran)


def test_serve_and_its_clients(env):
    environment, _ = env
    serve = next(words for words in commands("sh") if words[:2] == ["chatlm", "serve"])
    server = subprocess.Popen(
        [sys.executable, "-m", "chatlm", *serve[1:]],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(1200):  # the model loads; generous for a loaded machine
            assert server.poll() is None, f"chatlm serve exited: {server.stdout.read()[-2000:]}"
            try:
                if httpx.get("http://127.0.0.1:8000/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        page = httpx.get("http://127.0.0.1:8000/")
        assert page.status_code == 200 and "<title>chatlm</title>" in page.text  # the README's chat page
        clients = [body for kind, body in BLOCKS if kind == "python" and "127.0.0.1:8000" in body]
        assert len(clients) == 2  # openai and anthropic
        for body in clients:
            out = run([sys.executable, "-c", body], environment)
            assert out.strip(), body
    finally:
        server.terminate()
        server.wait(60)


@pytest.mark.parametrize(
    "index", [i for i, (kind, body) in enumerate(BLOCKS) if kind == "python" and "8000" not in body]
)
def test_the_guides_python_runs_as_written(env, index):
    environment, _ = env
    assert run([sys.executable, "-c", BLOCKS[index][1]], environment).strip()
