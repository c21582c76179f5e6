"""The interactive chat of ``chatlm chat``: reading messages (a line editor on a terminal), the slash commands,
and the loop that hands each message to the session (`chatlm.cli.Session`) and keeps the chat alive.

On a terminal the prompt is prompt_toolkit's: history kept on disk, arrow keys and line editing, no length limit,
a paste of several lines is one message, Alt-Enter (or Esc then Enter) starts a new line, and a message that
opens with ``\"\"\"`` goes on until a line that closes it. Ctrl-C clears the line (or stops a reply), Ctrl-D
quits. Piped input is read a line per message, with the same ``\"\"\"`` blocks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

HELP = """\
/help                 this text
/system TEXT          set the system prompt (the chat goes on)
/set temperature T    0 decodes greedily          /set top_p P        nucleus sampling threshold
/set max_tokens N     reply length limit          /set verbose on|off token counts and speed after replies
/think on|off         a reasoning model's thinking
/model                the model, its size, weights and context window
/reset                start over (the system prompt stays)
/save FILE, /load FILE  keep the chat in a file, or go on with one
/exit (or Ctrl-D)     quit
A message that starts with \"\"\" goes on until a line with \"\"\"; Alt-Enter starts a new line."""

BLOCK = '"""'


def history_path() -> Path:
    """Where the line editor keeps its history (XDG's state directory)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "chatlm" / "history"


class MessageReader:
    """The user's messages, one per `read` (None at the end: Ctrl-D or the end of the input; "" for a line
    cleared with Ctrl-C)."""

    def __init__(self, interactive: bool):
        self.prompt = None
        if interactive:
            self.prompt = _line_editor()

    def read(self) -> str | None:
        if self.prompt is not None:
            try:
                text = self.prompt.prompt(">>> ")
            except KeyboardInterrupt:
                return ""
            except EOFError:
                return None
            if text.lstrip().startswith(BLOCK) and not _closed(text):
                return self._rest_of_block(text, lambda: self.prompt.prompt("... "))
            return text
        line = sys.stdin.readline()
        if not line:
            return None
        text = line.rstrip("\n")
        if text.lstrip().startswith(BLOCK) and not _closed(text):
            return self._rest_of_block(text, _next_line)
        return text

    @staticmethod
    def _rest_of_block(first: str, next_line: Callable[[], str]) -> str:
        lines = [first.lstrip()[len(BLOCK) :]]
        while True:
            try:
                line = next_line()
            except (EOFError, KeyboardInterrupt):
                break
            if line.rstrip().endswith(BLOCK):
                lines.append(line.rstrip()[: -len(BLOCK)])
                break
            lines.append(line)
        return "\n".join(lines).strip("\n")


def _closed(text: str) -> bool:
    body = text.lstrip()[len(BLOCK) :]
    return body.rstrip().endswith(BLOCK) and len(body.rstrip()) >= len(BLOCK)


def _next_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _line_editor():
    """prompt_toolkit's prompt with the history on disk and Alt-Enter for a new line."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _(event) -> None:
        event.current_buffer.insert_text("\n")

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(path))
    except OSError:  # a read-only home: history for this session only
        history = InMemoryHistory()
    return PromptSession(history=history, key_bindings=keys, enable_open_in_editor=False)


# ----------------------------------------------------------------------------------------------- commands


def set_option(session, name: str, value: str) -> str:
    """``/set NAME VALUE``: what it says back (ValueError for a bad name or value)."""
    args = session.args
    if name == "temperature":
        number = _number(value, name)
        if number < 0:
            raise ValueError("temperature must be 0 or more")
        args.temperature = number
    elif name == "top_p":
        number = _number(value, name)
        if not 0 < number <= 1:
            raise ValueError("top_p must be over 0 and at most 1")
        args.top_p = number
    elif name == "max_tokens":
        if not value.isdigit() or int(value) < 1:
            raise ValueError("max_tokens must be a whole number of at least 1")
        args.max_new_tokens = int(value)
    elif name == "verbose":
        if value not in ("on", "off"):
            raise ValueError("verbose is on or off")
        args.verbose = value == "on"
    else:
        raise ValueError(f"no option {name!r}: temperature, top_p, max_tokens or verbose")
    return f"({name} set to {value})"


def _number(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}") from None


def apply_command(session, text: str) -> str | None:
    """A slash command that changes the chat (the same on every rank under tensor parallelism): what to say back,
    or None when ``text`` is no such command. Bad arguments raise ValueError."""
    command, _, rest = text.partition(" ")
    rest = rest.strip()
    if command == "/reset":
        session.reset()
        return "(chat reset)"
    if command == "/system":
        if not rest:
            raise ValueError("/system needs the text of the system prompt")
        session.set_system(rest)
        return "(system prompt set)"
    if command == "/set":
        name, _, value = rest.partition(" ")
        if not value.strip():
            raise ValueError("/set needs an option and a value: /set temperature 0.7")
        return set_option(session, name, value.strip())
    if command == "/think":
        if rest not in ("on", "off"):
            raise ValueError("/think needs on or off")
        session.set_thinking(rest == "on")
        return f"(thinking {rest})"
    return None


# ----------------------------------------------------------------------------------------------- the loop


def run_chat(
    session, share: Callable, write: Callable[[str], None], write_reasoning: Callable[[str], None]
) -> int:
    """The chat until /exit or the end of the input. ``share`` hands rank 0's messages and commands to the other
    ranks (tensor parallelism; the identity otherwise)."""
    interactive = sys.stdin.isatty()
    keep = session.args.save
    if keep and os.path.exists(keep):
        _load(session, keep, share)
    if interactive:
        say("chatlm: type a message; /help for the commands, /exit (or Ctrl-D) to quit.")
    reader = MessageReader(interactive)
    while True:
        text = reader.read()
        if text is None:
            break
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text.startswith("/"):
            _command(session, text, share)
            if keep and text.split()[0] in ("/reset", "/system"):
                _save(session, keep)
            continue
        try:
            share(text)
            session.reply(text, write, write_reasoning)
        except KeyboardInterrupt:
            say("\n(interrupted)")
            session.messages.pop()
            continue
        except ValueError as e:  # a message that cannot fit the context window even alone
            say(f"({e})")
            continue
        print(flush=True)
        if keep:
            _save(session, keep)
    return 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _command(session, text: str, share: Callable) -> None:
    command, _, path = text.partition(" ")
    if command == "/help":
        say(HELP)
    elif command == "/model":
        say(session.describe())
    elif command in ("/save", "/load"):
        if not path.strip():
            say(f"{command} needs a file name")
        elif command == "/save":
            _save(session, path.strip(), announce=True)
        else:
            _load(session, path.strip(), share)
    else:
        try:
            said = apply_command(session, text)
        except ValueError as e:
            say(str(e))
            return
        if said is None:
            say(f"unknown command {command}: /help lists them")
            return
        share(text)
        say(said)


def follow(session, share: Callable) -> int:
    """A rank other than 0: the same replies to the same messages and commands, its output unseen."""
    while True:
        text = share(None)
        if text is None:
            return 0
        if isinstance(text, list):  # a chat rank 0 loaded
            session.messages, session.ids = text, []
        elif text.startswith("/"):
            apply_command(session, text)
        else:
            try:
                session.reply(text, lambda _: None, lambda _: None)
            except ValueError:
                pass  # rank 0 said why


def _save(session, path: str, announce: bool = False) -> None:
    try:
        saved = session.save(path)
    except OSError as error:
        say(f"(could not save the chat to {path}: {error.strerror or error})")
        return
    if announce:
        say(f"(chat saved to {path}, with {saved} tokens of cache)")


def _load(session, path: str, share: Callable) -> None:
    try:
        loaded = session.load(path)
    except FileNotFoundError:
        say(f"(no saved chat at {path})")
        return
    except (OSError, ValueError) as error:
        say(f"(could not load {path}: {error})")
        return
    share(loaded.messages)
    turns = sum(m["role"] == "user" for m in loaded.messages)
    if loaded.refused:
        how = f"its cache is not used: {loaded.refused}; the chat will be computed anew"
    else:
        how = f"{loaded.restored_tokens} tokens of cache restored"
    say(f"(loaded a chat of {turns} turns from {path}; {how})")
