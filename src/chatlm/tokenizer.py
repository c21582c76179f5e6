"""Tokenizers with the transformers API, on the Hugging Face `tokenizers` library.

`AutoTokenizer.from_pretrained` reads a Hugging Face directory (tokenizer.json and tokenizer_config.json) or a
GGUF file, and gives a `PreTrainedTokenizerFast` that encodes, decodes, pads and applies chat templates as
transformers 5 does. `StreamingDetokenizer` (in `chatlm.detokenize`) turns ids into text one token at a time.

Where we differ from transformers on purpose:

- Truncation only happens with ``truncation=True``: transformers also truncates when only ``max_length`` is given.
- A directory's tokenizer.json is used as it is; transformers 5 rebuilds the pipeline of some model-specific
  tokenizer classes (``tokenizer_class`` in tokenizer_config.json) from their Python definition instead.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors

from chatlm.detokenize import StreamingDetokenizer  # noqa: F401  (public here since before it had a module)
from chatlm.loading.gguf_tokenizer import load_gguf_tokenizer
from chatlm.loading.resolve import resolve_model

# transformers' "no limit" for model_max_length, and the bound above which a limit counts as none.
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

SPECIAL_TOKENS_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")
# A template with one of these can give assistant token masks.
_GENERATION_TAG = re.compile(r"{%[-+]?\s*generation\s*[-+]?%}")


class BatchEncoding(dict):
    """The output of a tokenizer: a dict (``input_ids``, ``attention_mask``) whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        """Move the tensors to ``device`` (in place, returning self, as transformers does)."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self

    def convert_to_tensors(self, tensor_type: str | None) -> BatchEncoding:
        if tensor_type is None:
            return self
        for key, value in self.items():
            self[key] = _as_tensor(value, tensor_type, key)
        return self


def _as_tensor(value, tensor_type: str, key: str):
    rows = value if value and isinstance(value[0], list) else [value]
    if len({len(row) for row in rows}) > 1:
        raise ValueError(
            f"cannot make one tensor of {key} with rows of different lengths {sorted({len(r) for r in rows})}: "
            "pass padding=True (or padding='max_length') to pad them, or leave return_tensors=None"
        )
    if tensor_type == "pt":
        import torch

        return torch.tensor(value, dtype=torch.long)
    if tensor_type == "np":
        import numpy as np

        return np.asarray(value, dtype=np.int64)
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, not {tensor_type!r}")


def _assistant_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token that overlaps a ``{% generation %}`` span, else 0, as transformers computes it.

    A token partly in a span counts, so a span that truncation cut keeps its remaining tokens. Tokens and spans
    are walked together once, in text order; padding's (0, 0) offsets overlap nothing.
    """
    mask = [0] * len(offsets)
    current = 0  # the first span that does not end at or before the token
    for i, (start, end) in enumerate(offsets):
        while current < len(spans) and spans[current][1] <= start:
            current += 1
        if current == len(spans):
            break
        if end > spans[current][0]:
            mask[i] = 1
    return mask


def _to_ids(token_ids) -> int | list:
    """Python ints (or nested lists of them) from ints, lists, numpy arrays or tensors."""
    if hasattr(token_ids, "tolist"):
        return token_ids.tolist()
    if isinstance(token_ids, Mapping):
        return _to_ids(token_ids["input_ids"])
    if isinstance(token_ids, (list, tuple)):
        return [_to_ids(t) for t in token_ids]
    return int(token_ids)


def _token_content(token) -> str | None:
    """The text of a special token given as a string, an AddedToken, or an AddedToken dict from a JSON file."""
    if token is None:
        return None
    if isinstance(token, AddedToken):
        return token.content
    if isinstance(token, dict):
        return token["content"]
    return str(token)


def _added_token(token, *, special: bool) -> AddedToken:
    if isinstance(token, AddedToken):
        return AddedToken(
            token.content,
            single_word=token.single_word,
            lstrip=token.lstrip,
            rstrip=token.rstrip,
            normalized=token.normalized,
            special=special or token.special,
        )
    if isinstance(token, dict):
        fields = {
            k: v
            for k, v in token.items()
            if k in ("single_word", "lstrip", "rstrip", "normalized", "special")
        }
        fields["special"] = special or fields.get("special", False)
        return AddedToken(token["content"], **fields)
    return AddedToken(str(token), special=special)


class PreTrainedTokenizerFast:
    """A tokenizer with the transformers API around a `tokenizers.Tokenizer` (the "backend")."""

    def __init__(
        self,
        tokenizer_object: Tokenizer | None = None,
        *,
        tokenizer_file: str | os.PathLike | None = None,
        chat_template: str | dict[str, str] | list | None = None,
        model_max_length: int | None = None,
        padding_side: str | None = None,
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
        added_tokens_decoder: Mapping[int | str, Any] | None = None,
        extra_special_tokens: Sequence | Mapping | None = None,
        additional_special_tokens: Sequence | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        **special_tokens,
    ):
        if tokenizer_object is None:
            if tokenizer_file is None:
                raise ValueError("PreTrainedTokenizerFast needs a tokenizer_object or a tokenizer_file")
            tokenizer_object = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer = tokenizer_object
        # Padding saved in tokenizer.json only gives defaults (pad token, side): we pad per call, as asked.
        saved_padding = self._tokenizer.padding or {}
        if saved_padding:
            special_tokens.setdefault("pad_token", saved_padding.get("pad_token"))
            padding_side = padding_side or saved_padding.get("direction")
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        # Truncation is set on the backend for the calls that ask for it; the lock keeps other calls out.
        self._lock = threading.Lock()

        self.name_or_path = str(name_or_path)
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.padding_side = padding_side or "right"
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        if isinstance(chat_template, (list, tuple)):
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template: str | dict[str, str] | None = chat_template

        # Named special tokens: the standard ones, then any model-specific *_token (e.g. image_token).
        unknown = [k for k in special_tokens if not k.endswith("_token")]
        if unknown:
            raise TypeError(f"unexpected arguments to PreTrainedTokenizerFast: {', '.join(unknown)}")
        if isinstance(extra_special_tokens, Mapping):
            special_tokens = {**special_tokens, **extra_special_tokens}
            extra_special_tokens = None
        raw = {name: special_tokens.pop(name, None) for name in SPECIAL_TOKENS_ATTRIBUTES}
        raw.update(special_tokens)
        extras = list(extra_special_tokens or additional_special_tokens or [])
        self._special: dict[str, str | None] = {name: _token_content(tok) for name, tok in raw.items()}
        self._extra_special: list[str] = [_token_content(tok) for tok in extras]
        self._register_added_tokens(
            added_tokens_decoder or {}, [t for t in raw.values() if t is not None] + extras
        )
        if add_bos_token is not None or add_eos_token is not None:
            self._set_bos_eos(bool(add_bos_token), bool(add_eos_token))

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, ref: str | os.PathLike | None = None, *, gguf_file: str | None = None, **kwargs
    ) -> PreTrainedTokenizerFast:
        """Load the tokenizer of a model: a local directory, a ``.gguf`` file, a Hub id, or None (bundled model).

        Other keyword arguments override the saved configuration (``padding_side="left"``, ``pad_token=...``,
        ``chat_template=...``); arguments about loading the model itself are ignored.
        """
        if "use_auth_token" in kwargs:  # the old name of token=
            kwargs.setdefault("token", kwargs.pop("use_auth_token"))
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        overrides = {k: v for k, v in kwargs.items() if k in _OVERRIDES or k.endswith("_token")}
        local = Path(ref).expanduser() if ref is not None else None
        if local is not None and gguf_file is None and local.is_dir() and _is_tokenizer_dir(local):
            return cls._from_directory(local, str(ref), overrides)
        resolved = resolve_model(ref, gguf_file=gguf_file, **hub_kwargs)
        name = str(ref) if ref is not None else resolved.name
        if resolved.kind == "gguf":
            return cls._from_gguf(resolved.path, name, overrides)
        return cls._from_directory(resolved.path, name, overrides)

    @classmethod
    def _from_gguf(cls, path: Path, name: str, overrides: dict) -> PreTrainedTokenizerFast:
        backend, info = load_gguf_tokenizer(path)
        settings = {
            "bos_token": info.bos_token,
            "eos_token": info.eos_token,
            "unk_token": info.unk_token,
            "pad_token": info.pad_token,
            "mask_token": info.mask_token,
            "chat_template": info.chat_template,
            **overrides,
        }
        return cls(backend, name_or_path=name, **settings)

    @classmethod
    def _from_directory(cls, directory: Path, name: str, overrides: dict) -> PreTrainedTokenizerFast:
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {directory}: chatlm reads tokenizers in the `tokenizers` format only "
                "(save one with transformers' tokenizer.save_pretrained, or use a GGUF file)"
            )
        config = _read_json(directory / "tokenizer_config.json")
        # tokenizer.json's post-processor decides about BOS/EOS (transformers drops these flags too).
        config.pop("add_bos_token", None)
        config.pop("add_eos_token", None)
        if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
            config["extra_special_tokens"] = config.pop("additional_special_tokens")
        if "added_tokens_decoder" not in config:
            # Older saves keep the special tokens in special_tokens_map.json, which then wins over the config.
            for key, value in _read_json(directory / "special_tokens_map.json").items():
                if key == "additional_special_tokens":
                    key = "extra_special_tokens"
                config[key] = value
        templates = _chat_template_files(directory)
        if templates:
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
        settings = {
            k: v for k, v in config.items() if k in _OVERRIDES or (k.endswith("_token") and _is_token(v))
        }
        settings.update(overrides)
        return cls(Tokenizer.from_file(str(tokenizer_file)), name_or_path=name, **settings)

    def _register_added_tokens(self, added_tokens_decoder: Mapping, special_tokens: list) -> None:
        """Add to the backend the added tokens and special tokens that the configuration names and it lacks."""
        present = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        new: list[AddedToken] = []
        for _, token in sorted(((int(i), t) for i, t in added_tokens_decoder.items()), key=lambda it: it[0]):
            token = _added_token(token, special=False)
            if token.content not in present:
                new.append(token)
                present.add(token.content)
        for token in special_tokens:
            content = _token_content(token)
            if content not in present:
                new.append(_added_token(token, special=True))
                present.add(content)
        if new:
            self._tokenizer.add_tokens(new)

    def _set_bos_eos(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.bos_token, self.eos_token
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
        pair = " ".join(
            [single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])]
        )
        specials = [(t, self.convert_tokens_to_ids(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    # ------------------------------------------------------------------------------ special tokens

    def __getattr__(self, name: str) -> Any:
        # Named special tokens (bos_token, eos_token, ..., model-specific ones) and their *_id twins.
        special = self.__dict__.get("_special")
        if special is not None:
            if name in special:
                return special[name]
            if name.endswith("_id") and name[:-3] in special:
                token = special[name[:-3]]
                return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        special = self.__dict__.get("_special")
        if special is not None and (name in special or name in SPECIAL_TOKENS_ATTRIBUTES):
            special[name] = _token_content(value)
        elif special is not None and name.endswith("_id") and (name[:-3] in special):
            special[name[:-3]] = None if value is None else self.convert_ids_to_tokens(int(value))
        elif name == "padding_side" or name == "truncation_side":
            if value not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', not {value!r}")
            object.__setattr__(self, name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, by attribute name."""
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra_special)

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens, then the extra ones, each once."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self._extra_special]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._tokenizer.get_added_tokens_decoder().items()))

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (``len(tokenizer)`` counts them)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Ids of tokens; a token not in the vocabulary gives the unknown token's id (None if there is none)."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            if index is None:
                unk = self._special.get("unk_token")
                return None if unk is None else self._tokenizer.token_to_id(unk)
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False) -> str | None | list[str | None]:
        ids = _to_ids(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in skip]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )

    # ------------------------------------------------------------------------------------ encoding

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_token_type_ids: bool | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Token ids (and attention mask) of one text or a batch of texts, padded and truncated as asked."""
        batched = not isinstance(text, str)
        if batched and not (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
            raise TypeError("text must be a string or a list of strings")
        texts = list(text) if batched else [text]
        pad_to, truncate_to = self._lengths(padding, truncation, max_length)

        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")
        with self._lock:
            if truncate_to is not None:
                self._tokenizer.enable_truncation(truncate_to, direction=self.truncation_side)
            try:
                encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            finally:
                self._tokenizer.no_truncation()

        rows = [list(e.ids) for e in encodings]
        masks = [[1] * len(r) for r in rows]
        types = [list(e.type_ids) for e in encodings]
        offsets = [list(e.offsets) for e in encodings]
        if pad_to is not None:
            target = max((len(r) for r in rows), default=0) if pad_to == "longest" else pad_to
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            pad_id = self.pad_token_id
            for row, mask, type_ids, row_offsets in zip(rows, masks, types, offsets):
                extra = target - len(row)
                if extra > 0:
                    at = 0 if side == "left" else len(row)
                    row[at:at] = [pad_id] * extra
                    mask[at:at] = [0] * extra
                    type_ids[at:at] = [0] * extra
                    row_offsets[at:at] = [(0, 0)] * extra  # what `tokenizers` gives padding

        out = BatchEncoding(input_ids=rows if batched else rows[0])
        out._offsets = offsets  # an attribute, not an entry: for apply_chat_template's assistant masks
        if return_token_type_ids:
            out["token_type_ids"] = types if batched else types[0]
        if return_attention_mask:
            out["attention_mask"] = masks if batched else masks[0]
        if return_tensors is not None:
            if not batched:
                for key in out:
                    out[key] = [out[key]]
            out.convert_to_tensors(return_tensors)
        return out

    def _lengths(self, padding, truncation, max_length: int | None) -> tuple[int | str | None, int | None]:
        """(pad to: None, "longest" or a length; truncate to: None or a length) -- transformers' rules, except
        that max_length alone never truncates."""
        if padding in (False, None, "do_not_pad"):
            pad_to = None
        elif padding is True or padding == "longest":
            pad_to = "longest"
        elif padding == "max_length":
            limit = max_length if max_length is not None else self.model_max_length
            pad_to = None if limit > LARGE_INTEGER else limit
        else:
            raise ValueError(
                f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', not {padding!r}"
            )
        if truncation in (False, None, "do_not_truncate"):
            truncate_to = None
        elif truncation is True or truncation in ("longest_first", "only_first"):
            limit = max_length if max_length is not None else self.model_max_length
            truncate_to = None if limit > LARGE_INTEGER else limit
        else:
            raise ValueError(
                f"truncation must be True, False, 'longest_first' or 'only_first', not {truncation!r}"
            )
        if pad_to is not None and self.pad_token_id is None:
            raise ValueError(
                "asked to pad but the tokenizer has no padding token: set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`"
            )
        return pad_to, truncate_to

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ):
        """The ids of one text: a list, or a (1, T) tensor with ``return_tensors="pt"``."""
        return self(
            text,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            return_attention_mask=False,
        )["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    # ------------------------------------------------------------------------------------ decoding

    def decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str | list[str]:
        """Text of a sequence of ids (list, int, array or tensor); a batch of sequences gives a list of texts."""
        ids = _to_ids(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in ids]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        # Like transformers, never clean up after BPE, where it would eat real spaces before punctuation.
        if clean and type(self._tokenizer.model).__name__ != "BPE":
            text = clean_up_tokenization(text)
        return text

    def batch_decode(
        self,
        sequences,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> list[str]:
        return [
            self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in _to_ids(sequences)
        ]

    # ------------------------------------------------------------------------------ chat templates

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template text to use: the tokenizer's, one of its named templates, or the one given."""
        # Imported here: jinja2 is needed only for chat templates.
        from chatlm.chat_template import select_chat_template

        return select_chat_template(self.chat_template, chat_template, tools)

    def apply_chat_template(
        self,
        conversation: Sequence | Sequence[Sequence],
        tools: list | None = None,
        documents: list | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        tokenizer_kwargs: dict | None = None,
        return_assistant_tokens_mask: bool = False,
        sanitize_control_tokens: bool = False,
        **kwargs,
    ):
        """Render a conversation (or a batch of them) with the chat template, and tokenize it unless told not to.

        As in transformers 5: with ``tokenize=True`` the result is a `BatchEncoding` (``return_dict=True``, the
        default) or just the ids; with ``tokenize=False`` the text. The special tokens (``bos_token``,
        ``eos_token``, ...) are template variables, and ``kwargs`` add or override variables.
        ``return_assistant_tokens_mask=True`` adds ``assistant_masks``, shaped as ``input_ids``: 1 for the tokens
        that overlap the template's ``{% generation %}`` blocks, 0 for the others.
        """
        from chatlm.chat_template import _render_with_generation_spans, validate_chat

        # The same refusals as transformers, with ValueError.
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError(
                "return_assistant_tokens_mask=True needs tokenize=True and return_dict=True: the mask comes as the "
                "'assistant_masks' entry of the returned dict"
            )
        if return_assistant_tokens_mask and continue_final_message:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask")
        if sanitize_control_tokens:
            if not tokenize or return_assistant_tokens_mask:
                raise ValueError(
                    "sanitize_control_tokens=True needs tokenize=True and is not compatible with "
                    "return_assistant_tokens_mask=True"
                )
            raise NotImplementedError("chatlm does not support sanitize_control_tokens")
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible: continue_final_message "
                "continues the last message, add_generation_prompt starts a new assistant message"
            )
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("cannot apply a chat template to an empty conversation")
        template = self.get_chat_template(chat_template, tools)
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        )
        conversations = conversation if batched else [conversation]
        if return_assistant_tokens_mask and not _GENERATION_TAG.search(template):
            warnings.warn(
                "return_assistant_tokens_mask=True but the chat template has no {% generation %} block: "
                "the assistant masks will be all zeros",
                stacklevel=2,
            )
        variables = {**self.special_tokens_map, **kwargs}
        rendered, spans = [], []
        for messages in conversations:
            chat, chat_spans = _render_with_generation_spans(
                template,
                validate_chat(getattr(messages, "messages", messages)),
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **variables,
            )
            rendered.append(chat)
            spans.append(chat_spans)
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        out = self(
            text,
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        if return_assistant_tokens_mask:
            masks = [_assistant_mask(o, s) for o, s in zip(out._offsets, spans)]
            # shaped as input_ids: one row unless batched, or a (1, T) tensor
            if return_tensors is not None:
                out["assistant_masks"] = _as_tensor(masks, return_tensors, "assistant_masks")
            else:
                out["assistant_masks"] = masks if batched else masks[0]
        return out if return_dict else out["input_ids"]

    def parse_response(
        self,
        response,
        schema: dict | None = None,
        *,
        prefix=None,
        tools: list | None = None,
        chat_template: str | None = None,
    ) -> dict | list[dict]:
        """The assistant message in a generated reply: ``content``, and ``tool_calls`` / ``reasoning_content``
        when the model wrote any (see `chatlm.reply_parsing`).

        As in transformers, `response` is the generated text or ids (one, or a batch) and `prefix` the prompt
        before it (a template may pre-fill ``<think>``; pass ``""`` if there is none). The format comes from the
        chat template (the one `tools` selects, or `chat_template`); ids are read up to the end-of-sequence
        token, special tokens included, since some markers are special tokens.
        """
        from chatlm.reply_parsing import detect_reply_format, parse_reply

        if schema is not None:
            raise ValueError(
                "chatlm reads the reply format from the chat template: response_template schemas are not supported"
            )
        if prefix is None:
            raise ValueError(
                "parse_response needs prefix=, the prompt the model continued: templates often pre-fill part of "
                "the reply (an opening <think>). Pass prefix='' if the reply holds the whole message."
            )
        reply_format = detect_reply_format(self.get_chat_template(chat_template, tools))
        reply_format = reply_format.for_request(tools_given=bool(tools))
        responses, batched = self._texts(response)
        prefixes, _ = self._texts(prefix)
        if len(prefixes) == 1:
            prefixes = prefixes * len(responses)
        elif len(prefixes) != len(responses):
            raise ValueError(f"got {len(responses)} responses but {len(prefixes)} prefixes")
        messages = [parse_reply(text, reply_format, prefix=p) for text, p in zip(responses, prefixes)]
        return messages if batched else messages[0]

    def _texts(self, value) -> tuple[list[str], bool]:
        """Text(s) from a string, ids, or a batch of either; ids up to the end-of-sequence token."""
        if isinstance(value, str):
            return [value], False
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return list(value), True
        ids = _to_ids(value)
        if not isinstance(ids, list):
            raise TypeError(f"expected text or token ids, not {type(value).__name__}")
        batched = bool(ids) and isinstance(ids[0], list)
        rows = ids if batched else [ids]
        eos = self.eos_token_id
        rows = [row[: row.index(eos)] if eos in row else row for row in rows]
        return [self.decode(row, skip_special_tokens=False) for row in rows], batched


class AutoTokenizer:
    """Loads the tokenizer of a model: ``AutoTokenizer.from_pretrained(ref)`` (see
    `PreTrainedTokenizerFast.from_pretrained`)."""

    def __init__(self):
        raise OSError("AutoTokenizer is not meant to be instantiated: use AutoTokenizer.from_pretrained(...)")

    @staticmethod
    def from_pretrained(
        ref: str | os.PathLike | None = None, *, gguf_file: str | None = None, **kwargs
    ) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(ref, gguf_file=gguf_file, **kwargs)


# tokenizer_config.json keys (and from_pretrained keywords) that become constructor arguments.
_OVERRIDES = {
    "chat_template",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "clean_up_tokenization_spaces",
    "added_tokens_decoder",
    "extra_special_tokens",
    "additional_special_tokens",
    "add_bos_token",
    "add_eos_token",
}


def _is_tokenizer_dir(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def _is_token(value) -> bool:
    return (
        value is None
        or isinstance(value, (str, AddedToken))
        or (isinstance(value, dict) and "content" in value)
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object")
    return data


def _chat_template_files(directory: Path) -> dict[str, str]:
    """chat_template.jinja (as "default") and additional_chat_templates/*.jinja; these win over the config."""
    templates = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    return templates


def clean_up_tokenization(text: str) -> str:
    """Undo the spaces WordPiece-style decoding puts before punctuation and English contractions."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text
