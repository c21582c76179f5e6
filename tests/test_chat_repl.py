"""The interactive chat as people use it: in a real terminal (a pty, driven by pexpect) pasted text arrives whole,
however long and however many lines; and a chat that outgrows the context window keeps going, saying what it
dropped. The saved chat file (`/save`) is the oracle for what reached the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pexpect
import pytest
from safetensors import safe_open

from checkpoints import write_checkpoint

PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # bracketed paste, as terminals send a paste
# the line editor turns bracketed paste on as each prompt starts (redraws while typing do not): a fresh prompt
PROMPT = "\x1b[?2004h"


def saved_messages(path) -> list[dict]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["messages"])


@pytest.fixture
def terminal(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chatlm", "chat", "--max-new-tokens", "3", "--temperature", "0"],
        env=env,
        encoding="utf-8",
        timeout=240,
        dimensions=(40, 200),
    )
    child.expect_exact(PROMPT)
    yield child
    child.terminate(force=True)


def _say(child, text: str) -> None:
    child.send(text + "\r")
    child.expect_exact(PROMPT)


def test_a_long_paste_and_several_lines_arrive_whole(terminal, tmp_path):
    long = " ".join(
        f"word{i}" for i in range(1700)
    )  # over 10,000 characters: a terminal line's limit is 4,095
    assert len(long) > 10_000
    _say(terminal, PASTE_START + long + PASTE_END)
    _say(terminal, PASTE_START + "first line\nsecond line\nthird line" + PASTE_END)
    terminal.send("typed above")
    terminal.send("\x1b\r")  # Alt-Enter: a new line, not a new message
    _say(terminal, "and below")
    terminal.send("half a line that Ctrl-C clears")
    terminal.send("\x03")
    terminal.expect_exact(PROMPT)
    _say(terminal, f"/save {tmp_path / 'chat.safetensors'}")
    users = [m["content"] for m in saved_messages(tmp_path / "chat.safetensors") if m["role"] == "user"]
    assert users == [long, "first line\nsecond line\nthird line", "typed above\nand below"]
    terminal.sendcontrol("d")  # Ctrl-D quits
    terminal.expect(pexpect.EOF)
    assert (tmp_path / "state" / "chatlm" / "history").exists()  # the line editor's history, on disk


def test_a_chat_past_the_context_window_keeps_going(tmp_path):
    path = write_checkpoint(tmp_path / "tiny", "llama", max_position_embeddings=96)
    messages = [f"message number {i} " + "more words here " * 4 for i in range(8)]
    script = "/set max_tokens 4\n" + "\n".join(messages) + "\n" + "long " * 200 + "\nstill here\n"
    script += f"/save {tmp_path / 'chat.safetensors'}\n"
    result = subprocess.run(
        [sys.executable, "-m", "chatlm", "chat", str(path), "--system", "Be brief.", "--temperature", "0"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "(the chat outgrew the context window of 96 tokens: the " in result.stderr
    assert "oldest messages were dropped, the system prompt kept)" in result.stderr
    assert "leaves no room for a reply in the context window of 96 tokens; it was not sent" in result.stderr
    kept = saved_messages(tmp_path / "chat.safetensors")
    assert kept[0] == {"role": "system", "content": "Be brief."}
    users = [m["content"] for m in kept if m["role"] == "user"]
    assert users[-1] == "still here" and 0 < len(users) < len(messages)
    assert users == [m for m in [*messages, "still here"] if m in users]  # the newest kept, in order
