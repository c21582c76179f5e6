"""``chatlm doctor``: check that a model's chat template, tokenizer and stop tokens fit together.

`diagnose` renders a small battery of chats with the template (as ``apply_chat_template`` does for chat, run and
the pipeline), looks at the text with the tokenizer and at the generation's stop tokens, and returns `Finding`s.
No weights are loaded: `load_for_doctor` reads only the tokenizer and the stop tokens (generation_config.json,
config.json, or a GGUF's metadata).

Severity: a PROBLEM breaks chatting with chatlm (or any transformers-style loop); a WARNING is a trap or a limit
worth knowing about that leaves a correct setup working:

- ``no-template`` (PROBLEM): there is no chat template, so a chat cannot be formatted.
- ``template-error`` (PROBLEM): the template fails on a plain chat (user; system + user; user/assistant/user).
- ``system-role-refused`` (WARNING): the template rejects system messages *on purpose* (it calls
  ``raise_exception``, as Gemma's does). The model works, but ``--system`` and system prompts cannot be used.
- ``no-generation-prompt`` (PROBLEM): ``add_generation_prompt`` changes nothing and the assistant header that
  precedes replies is missing, so the model continues the user's turn instead of answering.
- ``split-special-token`` (PROBLEM): a special token the template writes is split into pieces by the tokenizer,
  so the model never sees the token it was trained with.
- ``eot-not-stop`` (PROBLEM): the token that ends an assistant turn is not a stop token of the generation, so
  the reply runs on (the Llama 3 model that never stops). ``no-stop-token`` (PROBLEM): there is no stop token.
- ``double-bos`` (WARNING): the template writes BOS and the tokenizer adds one too. chatlm and
  ``apply_chat_template(tokenize=True)`` tokenize without special tokens and are fine; a script that calls
  ``tokenizer(prompt)`` on the rendered text feeds the model two. It is a WARNING because official checkpoints
  (Llama 2 and 3, Mistral, ...) are shipped this way and work with the usual APIs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jinja2.exceptions import TemplateError

PROBLEM: Literal["PROBLEM"] = "PROBLEM"
WARNING: Literal["WARNING"] = "WARNING"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Literal["PROBLEM", "WARNING"]
    message: str

    def __str__(self) -> str:
        return f"{self.severity} {self.code}: {self.message}"


# The battery. The reply is a marker no template changes (no spaces to trim, no think tags to strip), so that we
# can find where an assistant turn's content ends in the rendered text.
_USER = {"role": "user", "content": "Hello there"}
_REPLY = "Zqxreply"
_USER_CHAT, _SYSTEM_CHAT = "a single user message", "a system + user chat"
_CHATS = {
    _USER_CHAT: [_USER],
    _SYSTEM_CHAT: [{"role": "system", "content": "You are terse."}, _USER],
    "a user/assistant/user chat": [
        _USER,
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ],
}
# Text that can only be meant as a special token: <|im_start|>, <|eot_id|>, DeepSeek's <｜end▁of▁sentence｜>.
_SPECIAL_SYNTAX = re.compile(r"<\|[^|\s<>]+\|>|<｜[^｜\s]+｜>")
# Also <s>, </s>, <start_of_turn>, [INST], [/INST]: special tokens in some vocabularies, plain text in others
# (Llama 2 reads [INST] and <<SYS>> as ordinary words), so these count only when the vocabulary has them.
_MARKER = re.compile(_SPECIAL_SYNTAX.pattern + r"|</?[A-Za-z][\w:.-]*>|\[/?[A-Z][A-Z_]*\]")


def diagnose(tokenizer: Any, generation_config: Any = None) -> list[Finding]:
    """Check a tokenizer's chat template against the tokenizer and the stop tokens.

    Args:
        tokenizer: a `PreTrainedTokenizerFast` (or anything with its API).
        generation_config: a `GenerationConfig` whose ``eos_token_id`` lists the stop tokens; None when the model
            has none, and then the tokenizer's ``eos_token`` is taken as the stop token.
    """
    if not tokenizer.chat_template:
        return [
            Finding(
                "no-template",
                PROBLEM,
                "the tokenizer has no chat template, so chats cannot be formatted for this model "
                "(add chat_template.jinja, or use plain-text prompts)",
            )
        ]
    try:
        tokenizer.get_chat_template()
    except ValueError as e:  # several named templates and no default
        return [Finding("no-template", PROBLEM, str(e))]

    findings: list[Finding] = []
    rendered: dict[tuple[str, bool], str] = {}
    for name, chat in _CHATS.items():
        for prompt_flag in (True, False):
            # A template is arbitrary code: whatever it raises is a finding, not a crash.
            try:
                rendered[name, prompt_flag] = _render(tokenizer, chat, prompt_flag)
            except Exception as e:
                findings.append(_render_failure(name, prompt_flag, e))
                break  # one finding per chat
    prompt = rendered.get((_USER_CHAT, True))
    if prompt is None:
        return findings  # not even a single user message renders: nothing else can be checked
    try:
        with_reply = _render(tokenizer, [_USER, {"role": "assistant", "content": _REPLY}], False)
    except Exception:  # templates that cannot end on an assistant turn: the checks that need it are skipped
        with_reply = None
    at = with_reply.find(_REPLY) if with_reply is not None else -1
    head, tail = (with_reply[:at], with_reply[at + len(_REPLY) :]) if at >= 0 else (None, None)

    findings += _check_generation_prompt(prompt, rendered.get((_USER_CHAT, False)), head, tail)
    findings += _check_double_bos(tokenizer, prompt)
    findings += _check_split_tokens(tokenizer, list(rendered.values()) + ([with_reply] if with_reply else []))
    findings += _check_stop_tokens(tokenizer, generation_config, tail)
    return findings


def _render(tokenizer: Any, chat: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_failure(name: str, prompt_flag: bool, error: Exception) -> Finding:
    # raise_exception() raises a bare TemplateError: the template's author chose to refuse. Jinja's own errors
    # (undefined names, syntax) are subclasses, and Python errors (TypeError, ...) are bugs.
    if name == _SYSTEM_CHAT and type(error) is TemplateError:
        return Finding(
            "system-role-refused",
            WARNING,
            f"the template refuses system messages ({error}): --system and system prompts cannot be used; "
            "put instructions in the first user message",
        )
    flag = "with" if prompt_flag else "without"
    detail = " ".join(str(error).split()) or "(no message)"
    return Finding(
        "template-error",
        PROBLEM,
        f"the template fails on {name} ({flag} add_generation_prompt): {type(error).__name__}: {detail}",
    )


def _check_generation_prompt(
    prompt: str, no_prompt: str | None, head: str | None, tail: str | None
) -> list[Finding]:
    """A missing generation prompt: add_generation_prompt changes nothing and the user's message is followed by
    nothing but what closes a turn (``tail``: the text after an assistant reply). Templates that ignore the flag on
    purpose put a cue there: Llama 2's [/INST], the assistant header Command R always writes."""
    if no_prompt is None or prompt != no_prompt:
        return []
    at = prompt.rfind(_USER["content"])
    after = prompt[at + len(_USER["content"]) :].strip() if at >= 0 else None
    if after is None or (after and after != (tail or "").strip()):
        return []
    missing = head[len(prompt) :] if head is not None and head.startswith(prompt) else ""
    detail = f" (a reply in a chat follows {missing!r})" if missing.strip() else ""
    return [
        Finding(
            "no-generation-prompt",
            PROBLEM,
            f"add_generation_prompt=True adds no assistant header{detail}: the model continues the user's turn "
            "instead of answering",
        )
    ]


def _check_double_bos(tokenizer: Any, prompt: str) -> list[Finding]:
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos is None or bos_id is None:
        return []
    plain = tokenizer.encode(prompt, add_special_tokens=False)
    full = tokenizer.encode(prompt, add_special_tokens=True)
    if plain[:1] != [bos_id] or full[:2] != [bos_id, bos_id]:
        return []
    return [
        Finding(
            "double-bos",
            WARNING,
            f"the template writes {bos} and the tokenizer adds it too: tokenizer(prompt) on the rendered text "
            "gives two BOS tokens; tokenize with add_special_tokens=False (apply_chat_template and chatlm do)",
        )
    ]


def _check_split_tokens(tokenizer: Any, texts: list[str]) -> list[Finding]:
    vocab = tokenizer.get_vocab()
    split: list[str] = []
    for marker in dict.fromkeys(m.group() for text in texts for m in _MARKER.finditer(text)):
        pieces = tokenizer.encode(marker, add_special_tokens=False)
        if len(pieces) == 1:
            continue
        if marker in vocab:
            # A token of the vocabulary that is not registered as an added token: text never produces its id.
            split.append(f"{marker} (token {vocab[marker]} of the vocabulary, read as {len(pieces)} pieces)")
        elif _SPECIAL_SYNTAX.fullmatch(marker):
            split.append(f"{marker} (not in the vocabulary, read as {len(pieces)} pieces)")
    if not split:
        return []
    return [
        Finding(
            "split-special-token",
            PROBLEM,
            f"the tokenizer splits special tokens the template writes: {', '.join(split)}; the model reads them as "
            "plain text (register them as special added tokens of the tokenizer)",
        )
    ]


def _turn_end(tokenizer: Any, tail: str) -> tuple[str, int] | None:
    """The special token that closes an assistant turn, from the text that follows the reply's content."""
    tail = tail.lstrip()
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    if ids and ids[0] in tokenizer.added_tokens_decoder:
        return tokenizer.added_tokens_decoder[ids[0]].content, ids[0]
    return None  # a plain-text ending, or a split special token (which _check_split_tokens reports)


def _check_stop_tokens(tokenizer: Any, generation_config: Any, tail: str | None) -> list[Finding]:
    if generation_config is not None:
        stops, source = generation_config.eos_token_ids, "the generation config's eos_token_id"
    else:
        stops, source = [i for i in [tokenizer.eos_token_id] if i is not None], "the tokenizer's eos_token"
    if not stops:
        return [
            Finding(
                "no-stop-token",
                PROBLEM,
                f"generation has no stop token ({source} is unset): every reply runs to max_new_tokens",
            )
        ]
    end = _turn_end(tokenizer, tail) if tail is not None else None
    if end is None or end[1] in stops:
        return []
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in stops)
    return [
        Finding(
            "eot-not-stop",
            PROBLEM,
            f"the template ends assistant turns with {end[0]} (id {end[1]}) but generation stops only at {names} "
            f"({source}): replies run past the end of the turn; add {end[1]} to eos_token_id",
        )
    ]


def format_report(findings: list[Finding], name: str) -> str:
    """One line per finding, then a summary line."""
    problems = sum(f.severity == PROBLEM for f in findings)
    warnings = len(findings) - problems
    if not findings:
        summary = f"{name}: ok, no problems found"
    else:
        counts = [f"{problems} problem{'s' * (problems != 1)}", f"{warnings} warning{'s' * (warnings != 1)}"]
        summary = f"{name}: {', '.join(counts)}" + ("" if problems else " (ok)")
    return "\n".join([*map(str, findings), summary])


def exit_code(findings: list[Finding], strict: bool = False) -> int:
    """1 when a problem was found (or, with ``strict``, any finding), else 0."""
    return int(any(strict or f.severity == PROBLEM for f in findings))


def load_for_doctor(ref: str | None) -> tuple[Any, Any]:
    """The tokenizer and the `GenerationConfig` (None if the model has none) of a model, without its weights:
    a local directory, a .gguf file, a Hub id, or None for the bundled model."""
    from chatlm.generation.config import GenerationConfig
    from chatlm.loading.gguf_tokenizer import read_tokenizer_metadata
    from chatlm.loading.resolve import resolve_model
    from chatlm.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref)
    local = Path(ref).expanduser() if ref is not None else None
    # The directory the tokenizer came from; a tokenizer-only directory needs no config.json.
    if local is not None and local.is_dir() and any((local / f).is_file() for f in _HF_FILES):
        directory = local
    else:
        resolved = resolve_model(ref)
        if resolved.kind == "gguf":
            # The ids chatlm's GGUF loading stops at (tokenizer.ggml.eos_token_id, as transformers).
            meta = read_tokenizer_metadata(resolved.path)
            return tokenizer, GenerationConfig.from_dict(
                {f"{k}_token_id": meta.get(f"tokenizer.ggml.{g}_token_id") for k, g in _GGUF_IDS.items()}
            )
        directory = resolved.path
    if (directory / "generation_config.json").is_file():
        return tokenizer, GenerationConfig.from_pretrained(directory)
    if (directory / "config.json").is_file():
        # As the model loader: without generation_config.json, the ids of config.json apply.
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"{directory / 'config.json'} does not hold a JSON object")
        return tokenizer, GenerationConfig.from_dict({k: raw.get(k) for k in _CONFIG_IDS})
    return tokenizer, None


_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
_GGUF_IDS = {"bos": "bos", "eos": "eos", "pad": "padding"}
_CONFIG_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
