"""Build a `tokenizers.Tokenizer` from the tokenizer a GGUF file describes in its metadata.

A GGUF has no tokenizer.json: it stores the vocabulary, merges, token types and special token ids under
llama.cpp's key names. We rebuild from those the same pipeline transformers builds when it loads the file
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), so both give the same token ids:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges; the split regex depends on
  ``tokenizer.ggml.pre``.
- ``"llama"``: SentencePiece-style BPE with byte fallback; merges come from the file or are derived from the
  token scores. Gemma and Phi-3 files get their own variants, as in transformers.
- ``"gemma4"``: the Gemma variant with score-ordered merges.

Where transformers adds a default special token that the vocabulary lacks (``<|endoftext|>`` for gpt2 files,
``<s>``/``</s>``/``<unk>`` for llama files), it appends a new id past the model's vocabulary; we only mark such a
token special when the vocabulary has it, and never add ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .gguf_file import GGUFFile, open_gguf_file

# llama.cpp's token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

_SPECIAL_ID_KEYS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}

# Split regexes for byte-level vocabularies whose merges were learned on a split other than GPT-2's.
# These strings are data: they must equal the ones the models were trained with, character for character.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ],
        _LLAMA3,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}

# The special tokens the transformers tokenizer class for each kind of file names by default: they end up marked
# special (so kept whole and dropped by skip_special_tokens) whenever the vocabulary has them.
_CLASS_DEFAULT_SPECIALS = {
    "gpt2": ("<|endoftext|>",),
    "llama": ("<unk>", "<s>", "</s>"),
    "gemma": ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>"),
}
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}


@dataclass(frozen=True)
class GGUFTokenizerInfo:
    """What a GGUF says about its tokenizer beyond the pipeline itself."""

    model: str
    pre: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    # Gemma's tokenizer class has a mask token the file does not name.
    mask_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    # As the file states it. transformers ignores it (SentencePiece files always get a prefix space), and so do we.
    add_space_prefix: bool | None = None
    # One template, or {"default": ..., name: ...} when the file also has named templates.
    chat_template: str | dict[str, str] | None = None
    # Every ``tokenizer.ggml.*_token_id`` in the file (bos, eos, eot, ...), keyed by the name without suffix.
    token_ids: dict[str, int] = field(default_factory=dict)


def load_gguf_tokenizer(source: str | os.PathLike | GGUFFile | Any) -> tuple[Tokenizer, GGUFTokenizerInfo]:
    """The tokenizer of a GGUF file: a path (parsed once and shared with the weights through
    `open_gguf_file`'s cache), an open `GGUFFile`, or a ``gguf.GGUFReader``."""
    meta = read_tokenizer_metadata(source)
    architecture = meta.get("general.architecture", "")
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{_name(source)} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")

    if kind == "gpt2":
        tokenizer, vocab = _byte_level(tokens, merges, meta.get("tokenizer.ggml.pre"))
        defaults = _CLASS_DEFAULT_SPECIALS["gpt2"]
    elif kind == "llama" and architecture in _GEMMA_ARCHS:
        tokenizer, vocab = _gemma(tokens, merges, by_position=True)
        defaults = _CLASS_DEFAULT_SPECIALS["gemma"]
    elif kind == "llama":
        tokenizer, vocab = _sentencepiece(tokens, merges, meta.get("tokenizer.ggml.scores"))
        if architecture == "phi3":
            # Phi-3 puts the prefix space in with a normalizer rather than with Metaspace.
            tokenizer.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
            )
            tokenizer.pre_tokenizer = None
        defaults = _CLASS_DEFAULT_SPECIALS["llama"]
    elif kind == "gemma4":
        tokenizer, vocab = _gemma(tokens, merges, by_position=False, scores=meta.get("tokenizer.ggml.scores"))
        defaults = _CLASS_DEFAULT_SPECIALS["gemma"]
    else:
        raise ValueError(
            f"{_name(source)} describes a tokenizer of kind {kind!r} (tokenizer.ggml.model), which chatlm cannot "
            "build; supported: 'gpt2', 'llama', 'gemma4'"
        )

    specials = {
        name: _token_at(tokens, meta.get(f"tokenizer.ggml.{key}")) for name, key in _SPECIAL_ID_KEYS.items()
    }
    _add_special_tokens(tokenizer, vocab, tokens, types, defaults, specials, byte_level=kind == "gpt2")

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos = kind == "llama"
    if kind == "gemma4":
        # Gemma 4 templates write <bos> themselves; transformers follows the reference tokenizer and adds none.
        add_bos = False
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    add_bos, add_eos = _set_post_processor(
        tokenizer, specials["bos_token"], specials["eos_token"], bool(add_bos), add_eos
    )

    gemma = kind == "gemma4" or (kind == "llama" and architecture in _GEMMA_ARCHS)
    info = GGUFTokenizerInfo(
        model=kind,
        pre=meta.get("tokenizer.ggml.pre"),
        **specials,
        mask_token="<mask>" if gemma and "<mask>" in vocab else None,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix"),
        chat_template=_chat_templates(meta),
        token_ids={
            key.removeprefix("tokenizer.ggml.").removesuffix("_token_id"): int(value)
            for key, value in meta.items()
            if key.startswith("tokenizer.ggml.") and key.endswith("_token_id")
        },
    )
    return tokenizer, info


def read_tokenizer_metadata(source: str | os.PathLike | GGUFFile | Any) -> dict[str, Any]:
    """The ``general.architecture`` and ``tokenizer.*`` entries of a GGUF, as Python values."""
    if isinstance(source, GGUFFile):
        items = source.metadata.items()
    elif hasattr(source, "fields"):  # a gguf.GGUFReader
        items = ((key, field.contents()) for key, field in source.fields.items())
    else:
        # Missing file: FileNotFoundError; not GGUF, truncated or corrupt: ValueError (GGUFFormatError).
        items = open_gguf_file(Path(source)).metadata.items()
    return {
        key: value for key, value in items if key == "general.architecture" or key.startswith("tokenizer.")
    }


def _name(source) -> str:
    return str(getattr(source, "path", source))


def _token_at(tokens: list[str], token_id: int | None) -> str | None:
    if token_id is None or not 0 <= int(token_id) < len(tokens):
        return None
    return tokens[int(token_id)]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: printable Latin-1 as itself, the rest shifted past 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {b: chr(b) for b in printable}
    shifted = 256
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(shifted)
            shifted += 1
    return spelling


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    return [(left, right) for left, _, right in (merge.partition(" ") for merge in merges)]


def _byte_level(
    tokens: list[str], merges: list[str] | None, pre: str | None
) -> tuple[Tokenizer, dict[str, int]]:
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    # Some converters store a token as raw text rather than in the byte alphabet: respell those.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    model = BPE(
        vocab=vocab,
        merges=_split_merges(merges or []),
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, vocab


def _sentencepiece(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None
) -> tuple[Tokenizer, dict[str, int]]:
    vocab = {token: index for index, token in enumerate(tokens)}
    if merges:
        pairs = _split_merges(merges)
    else:
        ranking = dict(zip(tokens, scores if scores is not None else [-float(i) for i in range(len(tokens))]))
        pairs = merges_from_ranking(vocab, ranking)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    # Prefix a space to the first word only ("first"), as transformers' non-legacy Llama tokenizer does.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer, vocab


def _gemma(
    tokens: list[str], merges: list[str] | None, *, by_position: bool, scores: list[float] | None = None
) -> tuple[Tokenizer, dict[str, int]]:
    if by_position:
        # Gemma files store whitespace-only tokens as real spaces; the pipeline looks them up spelled with "▁".
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    if merges:
        pairs = _split_merges(merges)
    else:
        # Gemma's scores do not follow its merge order but its token order does; Gemma 4's scores do.
        if by_position or scores is None:
            ranking = {token: -float(index) for index, token in enumerate(tokens)}
        else:
            ranking = dict(zip(tokens, scores))
        pairs = merges_from_ranking(vocab, ranking)
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=pairs, fuse_unk=True, unk_token="<unk>", byte_fallback=True, dropout=None)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer, vocab


def merges_from_ranking(vocab: dict[str, int], ranking: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary with scores, in the order transformers derives them.

    Every way of cutting a token into two tokens of the vocabulary is a merge; merges are ordered best score
    first, then longer left piece, then longer right piece, ties kept in vocabulary order (within a token,
    by the ids of its pieces).
    """
    candidates: list[tuple[str, str, float]] = []
    for piece, score in ranking.items():
        cuts = [
            (piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        cuts.sort(key=lambda cut: (vocab[cut[0]], vocab[cut[1]]))
        candidates.extend((left, right, score) for left, right in cuts)
    # sorted() is stable under reverse=True, which keeps ties in the order they were found.
    candidates = sorted(candidates, key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _add_special_tokens(
    tokenizer: Tokenizer,
    vocab: dict[str, int],
    tokens: list[str],
    types: list[int],
    defaults: tuple[str, ...],
    specials: dict[str, str | None],
    *,
    byte_level: bool,
) -> None:
    """Mark the tokens that must be matched whole in text, in the order transformers adds them."""
    # The tokenizer class's own default special tokens (only those the vocabulary has; see the module docstring).
    special = [t for t in defaults if t in vocab]
    # CONTROL tokens. In a byte-level vocabulary a control token spelled outside the byte alphabet is a mislabel.
    alphabet = set(byte_to_unicode().values()) if byte_level else None
    special += [
        token
        for token, kind in zip(tokens, types)
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(special)]
    )
    # USER_DEFINED tokens (like <think>): matched whole too, but not special.
    user = [token for token, kind in zip(tokens, types) if kind == _USER_DEFINED and token in vocab]
    if user:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in dict.fromkeys(user)])
    # The file's named special tokens (bos, eos, unk, pad) are special whatever their type.
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    named = [t for t in specials.values() if t is not None and t not in added and t in vocab]
    if named:
        tokenizer.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(named)])


def _set_post_processor(
    tokenizer: Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> tuple[bool, bool]:
    """Add BOS/EOS around every encoded text as the file asks; returns the flags that could be honoured."""
    add_bos = add_bos and bos is not None and tokenizer.token_to_id(bos) is not None
    add_eos = add_eos and eos is not None and tokenizer.token_to_id(eos) is not None
    single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
    special_tokens = [(t, tokenizer.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special_tokens
    )
    return add_bos, add_eos


def _chat_templates(meta: dict[str, Any]) -> str | dict[str, str] | None:
    default = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {key[len(prefix) :]: value for key, value in meta.items() if key.startswith(prefix)}
    if not named:
        return default
    return {**({"default": default} if default is not None else {}), **named}
