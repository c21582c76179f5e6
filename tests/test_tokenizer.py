"""Tokenizers: ours against transformers 5.24 loading the same files, and against its saved reference outputs."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, trainers

from chatlm.loading.gguf_tokenizer import load_gguf_tokenizer
from chatlm.loading.resolve import bundled_model_path
from chatlm.tokenizer import AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there",
    "naïve café — 你好 世界",
    "I don't think so. We'll see!",
    "numbers 12345 and 3.14159",
    "the theory of everything",
    "  spaced   out  \n\n\ttabs",
]
TEXTS = [
    "",
    " ",
    "Hello world",
    "  leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "naïve café — 你好 🙂",
    "Ünïcödé àçcèntš ñ ø ß",
    "日本語のテキストと中文和한국어",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "\n\n\ttabs and newlines\n",
    "windows\r\nline\rends",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|><|im_start|><|im_end|>",
    "a<|im_start|b <|im_end|>c",
    "<think>reasoning</think>",
    "numbers 12345 and 3.14159 and 1,000,000",
    "Don't you're we'll I'M THEY'VE",
    "def f(x):\n    return x ** 2  # comment\n",
    "https://example.com/path?q=1&r=two#frag",
    "the theory of everything, hello there",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "naïve café?"},
    ],
]


# ------------------------------------------------------------------------------------------- file builders


def write_llama_gguf(
    path: Path,
    *,
    arch: str = "llama",
    add_space_prefix: bool | None = None,
    chat_template: str | None = CHATML,
    named_templates: dict | None = None,
) -> list[str]:
    """A small SentencePiece-style GGUF: <unk>/<s>/</s>, 256 byte tokens, scored pieces, control and user tokens."""
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(
        CORPUS * 5, vocab_size=200, min_frequency=1, show_progress=False, special_tokens=[]
    )
    pieces = sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types_ = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [
        gguf.TokenType.BYTE
    ] * 256
    scores = [0.0] * len(tokens)
    for piece, index in pieces:
        tokens.append(piece)
        types_.append(gguf.TokenType.NORMAL)
        scores.append(-float(index))
    for token, kind in [
        ("<|im_start|>", gguf.TokenType.CONTROL),
        ("<|im_end|>", gguf.TokenType.CONTROL),
        ("<think>", gguf.TokenType.USER_DEFINED),
    ]:
        tokens.append(token)
        types_.append(kind)
        scores.append(0.0)
    writer = _writer(path, arch)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types_)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, template in (named_templates or {}).items():
        writer.add_string(f"tokenizer.chat_template.{name}", template)
    _finish(writer, len(tokens))
    return tokens


def write_gpt2_gguf(path: Path, *, pre: str = "default", add_bos: bool | None = None) -> list[str]:
    """A small byte-level BPE GGUF, with merges, control tokens and a user-defined token."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(
        CORPUS * 5,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    saved = json.loads(backend.to_str())["model"]
    tokens = [t for t, _ in sorted(saved["vocab"].items(), key=lambda kv: kv[1])] + ["<think>"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in saved["merges"]]
    types_ = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens[:-1]]
    types_.append(gguf.TokenType.USER_DEFINED)
    writer = _writer(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types_)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHATML)
    _finish(writer, len(tokens))
    return tokens


def _writer(path: Path, arch: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(str(path), arch)
    # transformers reads the model config from the file before it builds the tokenizer.
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    return writer


def _finish(writer: gguf.GGUFWriter, vocab: int) -> None:
    writer.add_tensor("token_embd.weight", np.zeros((vocab, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_hf_dir(directory: Path, **config) -> Path:
    """A tokenizer directory: a small trained byte-level BPE tokenizer.json and a tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        CORPUS * 5,
        trainers.BpeTrainer(
            vocab_size=350,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    backend.save(str(directory / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 2048,
        "chat_template": CHATML,
        **config,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


def load_theirs(path: Path):
    if path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundled() -> Path:
    try:
        return bundled_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(bundled):
    return AutoTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def theirs(bundled):
    return load_theirs(bundled)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    files = {
        "llama": root / "llama.gguf",
        "llama_no_prefix": root / "llama_no_prefix.gguf",
        "phi3": root / "phi3.gguf",
        "gemma2": root / "gemma2.gguf",
        "gpt2": root / "gpt2.gguf",
        "gpt2_llama_bpe": root / "gpt2_llama_bpe.gguf",
    }
    write_llama_gguf(files["llama"])
    write_llama_gguf(files["llama_no_prefix"], add_space_prefix=False)
    write_llama_gguf(files["phi3"], arch="phi3")
    write_llama_gguf(files["gemma2"], arch="gemma2")
    write_gpt2_gguf(files["gpt2"])
    write_gpt2_gguf(files["gpt2_llama_bpe"], pre="llama-bpe", add_bos=True)
    return files


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "tok")


# -------------------------------------------------------------------------------------- the bundled GGUF


def test_bundled_ids_match_transformers(ours, theirs):
    for text in TEXTS:
        for special in (True, False):
            assert (
                ours(text, add_special_tokens=special)["input_ids"]
                == theirs(text, add_special_tokens=special)["input_ids"]
            ), text
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]


def test_bundled_ids_match_reference(ours):
    path = REFERENCE / "smollm2_tokens.json"
    if not path.is_file():
        pytest.skip(f"no reference data at {path}")
    for text, ids in json.loads(path.read_text())["tokens"].items():
        assert ours(text, add_special_tokens=False)["input_ids"] == ids, text


def test_bundled_vocabulary_and_special_tokens(ours, theirs):
    assert ours.vocab_size == theirs.vocab_size and len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template
    assert ours.model_max_length == theirs.model_max_length and ours.padding_side == theirs.padding_side
    ids = ours.encode("Hello world<|im_end|>")
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[0]) == theirs.convert_ids_to_tokens(ids[0])
    tokens = ["Hello", "Ġworld", "<|im_end|>", "not-a-token-xyz"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("Ġworld") == theirs.convert_tokens_to_ids("Ġworld")


def test_bundled_backend_pipeline_matches_transformers(ours, theirs):
    # Vocabulary, merges, added tokens, pre-tokenizer, post-processor, decoder: all of it.
    assert _pipeline(ours.backend_tokenizer) == _pipeline(theirs.backend_tokenizer)


def test_bundled_decode_matches_transformers(ours, theirs):
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), text
    ids = theirs("<|im_start|>user\nhi 🙂<|im_end|>")["input_ids"]
    assert ours.decode(torch.tensor(ids)) == theirs.decode(ids)
    assert ours.decode(torch.tensor(ids[1])) == theirs.decode(ids[1]) == ours.decode(ids[1])
    assert ours.decode(np.array(ids)) == theirs.decode(ids)
    batch = [ids, ids[:3]]
    assert ours.batch_decode(batch, skip_special_tokens=True) == theirs.batch_decode(
        batch, skip_special_tokens=True
    )
    assert ours.batch_decode(torch.tensor([ids, ids])) == theirs.batch_decode(torch.tensor([ids, ids]))
    assert ours.decode(batch) == theirs.decode(batch)
    assert ours.decode([]) == theirs.decode([]) == ""


def test_bundled_chat_template_matches_reference_and_transformers(ours, theirs):
    path = REFERENCE / "smollm2_greedy.json"
    chats = json.loads(path.read_text())["chats"] if path.is_file() else {}
    for name, chat in chats.items():
        text = ours.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
        assert text == chat["formatted_prompt"], name
        ids = ours.apply_chat_template(chat["messages"], add_generation_prompt=True, return_dict=False)
        assert ids == chat["prompt_ids"], name
        assert ours.decode(chat["generated_ids"], skip_special_tokens=True) == chat["text"], name
    for messages in CHATS + [c["messages"] for c in chats.values()]:
        for prompt in (True, False):
            assert ours.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            ) == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        out, ref = ours.apply_chat_template(messages), theirs.apply_chat_template(messages)
        assert isinstance(out, BatchEncoding) and dict(out) == dict(ref)


def test_bundled_batched_chat_matches_transformers(ours, theirs):
    for side in ("left", "right"):
        ours.padding_side = theirs.padding_side = side
        try:
            out = ours.apply_chat_template(
                CHATS, add_generation_prompt=True, padding=True, return_tensors="pt"
            )
            ref = theirs.apply_chat_template(
                CHATS, add_generation_prompt=True, padding=True, return_tensors="pt"
            )
        finally:
            ours.padding_side = theirs.padding_side = "right"
        assert set(out) == set(ref)
        for key in ref:
            assert torch.equal(out[key], ref[key]), (side, key)
    ids = ours.apply_chat_template(CHATS[0], return_tensors="pt", return_dict=False)
    assert torch.equal(ids, theirs.apply_chat_template(CHATS[0], return_tensors="pt", return_dict=False))


def test_from_pretrained_none_is_the_bundled_model(ours):
    assert ours.name_or_path == "SmolLM2-135M-Instruct"
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2


# ---------------------------------------------------------------------------------------- small GGUF files


@pytest.mark.parametrize("name", ["llama", "llama_no_prefix", "phi3", "gemma2", "gpt2", "gpt2_llama_bpe"])
def test_small_gguf_matches_transformers(small_files, name):
    path = small_files[name]
    ours = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    theirs = load_theirs(path)
    texts = [t for t in TEXTS if name != "gemma2" or "<" not in t]  # see test_gguf_defaults_we_do_not_add
    for text in texts:
        for special in (True, False):
            assert (
                ours(text, add_special_tokens=special)["input_ids"]
                == theirs(text, add_special_tokens=special)["input_ids"]
            ), (name, text, special)
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), text
    in_vocab = {
        k: v
        for k, v in theirs.special_tokens_map.items()
        if theirs.convert_tokens_to_ids(v) < ours.vocab_size
    }
    assert ours.special_tokens_map == in_vocab
    assert ours.chat_template == theirs.chat_template
    assert _pipeline(ours.backend_tokenizer, below=ours.vocab_size) == _pipeline(
        theirs.backend_tokenizer, below=ours.vocab_size
    )


def test_gguf_defaults_we_do_not_add(small_files):
    """transformers appends the Gemma class's default <bos>/<eos>/<pad>/<mask> past the vocabulary; we don't."""
    path = small_files["gemma2"]
    ours, theirs = AutoTokenizer.from_pretrained(path), load_theirs(path)
    extra = {i: t.content for i, t in theirs.added_tokens_decoder.items() if i >= ours.vocab_size}
    assert sorted(extra.values()) == ["<bos>", "<eos>", "<mask>", "<pad>"]
    assert len(ours) == ours.vocab_size


def test_gguf_flags_and_templates(small_files, tmp_path):
    _, info = load_gguf_tokenizer(small_files["llama"])
    assert (info.model, info.bos_token, info.eos_token, info.unk_token, info.pad_token) == (
        "llama",
        "<s>",
        "</s>",
        "<unk>",
        None,
    )
    assert info.add_bos_token and not info.add_eos_token
    _, info = load_gguf_tokenizer(small_files["llama_no_prefix"])
    assert info.add_space_prefix is False  # reported, but ignored like transformers does
    _, info = load_gguf_tokenizer(small_files["gpt2_llama_bpe"])
    assert (info.model, info.pre, info.add_bos_token, info.add_eos_token) == (
        "gpt2",
        "llama-bpe",
        True,
        False,
    )
    assert info.pad_token == "<|endoftext|>" and info.token_ids == {"bos": 1, "eos": 2, "padding": 0}
    ours = AutoTokenizer.from_pretrained(small_files["gpt2_llama_bpe"])
    assert ours("hi")["input_ids"][0] == ours.bos_token_id == 1

    path = tmp_path / "named.gguf"
    write_llama_gguf(path, named_templates={"tool_use": "{{ 'tools' }}", "rag": "{{ 'rag' }}"})
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == {"default": CHATML, "tool_use": "{{ 'tools' }}", "rag": "{{ 'rag' }}"}
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, chat_template="rag", tokenize=False) == "rag"
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_bad_gguf_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        AutoTokenizer.from_pretrained(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf_tokenizer(empty)
    truncated = tmp_path / "truncated.gguf"
    write_llama_gguf(tmp_path / "whole.gguf")
    truncated.write_bytes((tmp_path / "whole.gguf").read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gguf_tokenizer(truncated)
    with pytest.raises(FileNotFoundError):
        AutoTokenizer.from_pretrained(tmp_path / "missing.gguf")


def test_unsupported_gguf_tokenizer_kind(tmp_path):
    path = tmp_path / "t5.gguf"
    writer = _writer(path, "llama")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "</s>", "<unk>"])
    _finish(writer, 3)
    with pytest.raises(ValueError, match="'t5'"):
        load_gguf_tokenizer(path)


# ---------------------------------------------------------------------------------- a Hugging Face directory


def test_hf_dir_matches_transformers(hf_dir):
    ours, theirs = AutoTokenizer.from_pretrained(hf_dir), load_theirs(hf_dir)
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    assert ours.all_special_ids == theirs.all_special_ids
    assert (
        (ours.model_max_length, ours.pad_token_id)
        == (theirs.model_max_length, theirs.pad_token_id)
        == (2048, 0)
    )
    batch = ["hello", "hello world there", ""]
    for side in ("right", "left"):
        ours.padding_side = theirs.padding_side = side
        for kwargs in (
            {"padding": True},
            {"padding": "max_length", "max_length": 6},
            {"padding": "longest", "return_tensors": "pt"},
            {"truncation": True, "max_length": 2},
            {"padding": True, "truncation": True, "max_length": 3, "return_tensors": "pt"},
            {"padding": True, "pad_to_multiple_of": 4},
            {"return_attention_mask": False},
        ):
            out, ref = ours(batch, **kwargs), theirs(batch, **kwargs)
            assert _plain(out) == _plain(ref), (side, kwargs)
            out, ref = ours(batch[1], **kwargs), theirs(batch[1], **kwargs)
            assert _plain(out) == _plain(ref), (side, kwargs)
    assert torch.equal(ours.encode("hello", return_tensors="pt"), theirs.encode("hello", return_tensors="pt"))


def test_hf_dir_chat_template_matches_transformers(hf_dir):
    ours, theirs = AutoTokenizer.from_pretrained(hf_dir), load_theirs(hf_dir)
    ours.padding_side = theirs.padding_side = "left"
    for messages in CHATS:
        for kwargs in (
            {"tokenize": False},
            {},
            {"return_dict": False},
            {"return_tensors": "pt"},
            {"add_generation_prompt": True, "return_dict": False, "return_tensors": "pt"},
        ):
            assert _plain(ours.apply_chat_template(messages, **kwargs)) == _plain(
                theirs.apply_chat_template(messages, **kwargs)
            ), kwargs
    for kwargs in (
        {"padding": True},
        {"padding": True, "return_tensors": "pt"},
        {"tokenize": False},
        {"padding": True, "return_dict": False},
    ):
        assert _plain(ours.apply_chat_template(CHATS, **kwargs)) == _plain(
            theirs.apply_chat_template(CHATS, **kwargs)
        ), kwargs
    # Special tokens are template variables, and keyword arguments override them.
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ extra }}"
    for kwargs in ({"extra": 1}, {"extra": 2, "eos_token": "EOS"}):
        assert ours.apply_chat_template(
            CHATS[0], chat_template=template, tokenize=False, **kwargs
        ) == theirs.apply_chat_template(CHATS[0], chat_template=template, tokenize=False, **kwargs)


def test_hf_dir_settings(tmp_path, hf_dir):
    directory = write_hf_dir(
        tmp_path / "tok",
        padding_side="left",
        chat_template=None,
        pad_token=None,
        added_tokens_decoder={"350": {"content": "<tool>", "special": True}},
        extra_special_tokens=["<extra_1>"],
    )
    (directory / "chat_template.jinja").write_text("{{ 'from the jinja file' }}")
    ours, theirs = AutoTokenizer.from_pretrained(directory), load_theirs(directory)
    assert ours.padding_side == theirs.padding_side == "left"
    assert ours.chat_template == theirs.chat_template == "{{ 'from the jinja file' }}"
    assert ours.pad_token is None and theirs.pad_token is None
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids
    assert len(ours) == len(theirs)
    text = "hello <tool> and <extra_1><|im_end|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
        theirs.encode(text), skip_special_tokens=True
    )
    with pytest.raises(ValueError, match="padding token"):
        ours(["a", "b c"], padding=True)
    ours.pad_token = ours.eos_token
    assert ours.pad_token_id == ours.eos_token_id == 2
    assert ours(["a", "b c"], padding=True)["input_ids"][0][0] == 2

    # Settings given to from_pretrained win over the saved ones; BOS can be switched on.
    tokenizer = AutoTokenizer.from_pretrained(
        hf_dir, padding_side="left", add_bos_token=True, model_max_length=8
    )
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == 8
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    with pytest.raises(ValueError):
        tokenizer.padding_side = "middle"


def test_truncation_is_never_silent(hf_dir):
    ours = AutoTokenizer.from_pretrained(hf_dir)
    long = "the quick brown fox jumps over the lazy dog"
    full = ours(long)["input_ids"]
    assert len(full) > 3
    assert ours(long, max_length=3)["input_ids"] == full  # transformers would truncate here
    assert ours(long, truncation=True, max_length=3)["input_ids"] == full[:3]
    ours.truncation_side = "left"
    assert ours(long, truncation=True, max_length=3)["input_ids"] == full[-3:]


def test_batch_encoding(hf_dir):
    ours = AutoTokenizer.from_pretrained(hf_dir)
    out = ours(["hello", "hello world"], padding=True, return_tensors="pt")
    assert out.input_ids is out["input_ids"] and out.attention_mask.shape == (2, 3)
    assert out.to("cpu") is out and out["input_ids"].device.type == "cpu"
    assert ours("hello", return_tensors="pt")["input_ids"].shape == (1, 1)
    assert ours("", return_tensors="pt")["input_ids"].shape == (1, 0)
    with pytest.raises(ValueError, match="different lengths"):
        ours(["hello", "hello world"], return_tensors="pt")
    with pytest.raises(AttributeError):
        _ = out.nothing_here


# ------------------------------------------------------------------------------------------------ errors


def test_missing_tokenizer_json(tmp_path):
    directory = tmp_path / "no_tokenizer"
    directory.mkdir()
    (directory / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*no_tokenizer"):
        AutoTokenizer.from_pretrained(directory)
    (directory / "tokenizer_config.json").unlink()
    (directory / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*no_tokenizer"):
        AutoTokenizer.from_pretrained(directory)


def test_no_chat_template(hf_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(write_hf_dir(tmp_path / "plain", chat_template=None))
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError):
        tokenizer.apply_chat_template(CHATS[0])
    ours = AutoTokenizer.from_pretrained(hf_dir)
    with pytest.raises(ValueError):
        ours.apply_chat_template([])
    with pytest.raises(ValueError):
        ours.apply_chat_template(CHATS[0], add_generation_prompt=True, continue_final_message=True)


def test_constructor():
    with pytest.raises(OSError):
        AutoTokenizer()
    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tokenizer = PreTrainedTokenizerFast(backend, eos_token="ab")
    assert tokenizer.encode("abab") == [2, 2] and tokenizer.eos_token_id == 2
    with pytest.raises(TypeError):
        PreTrainedTokenizerFast(backend, not_a_setting=1)


# ------------------------------------------------------------------------------------------------ helpers


def _pipeline(backend: Tokenizer, below: int | None = None) -> dict:
    """A tokenizer's full definition, with added tokens in id order (only those below ``below`` if given)."""
    data = json.loads(backend.to_str())
    data["added_tokens"] = sorted(
        (t for t in data["added_tokens"] if below is None or t["id"] < below), key=lambda t: t["id"]
    )
    return data


def _plain(value):
    """Tensors and BatchEncodings as plain lists and dicts, for comparison."""
    if hasattr(value, "tolist"):
        return ("tensor", value.tolist())
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    return value
