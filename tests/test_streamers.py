"""StreamingDetokenizer and the streamers: the streamed text must equal the decode of all the ids (cut before the
first stop string, for the server)."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from chatlm.generation.streamers import TextIteratorStreamer, TextStreamer
from chatlm.loading.resolve import bundled_model_path
from chatlm.tokenizer import AutoTokenizer, StreamingDetokenizer
from test_tokenizer import write_llama_gguf  # tests/ is on sys.path (conftest.py)

TRICKY = [
    "Hello world",
    "  two leading spaces and  double  gaps",
    "naïve café — 你好 世界 🙂",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end",
    "日本語のテキスト、中文和한국어",
    "\n\n\ttabs\r\nand newlines \n",
    "<|im_start|>user\nhi 🙂<|im_end|>\n<|im_start|>assistant\n",
    "a<think>b</think> c",
    "ends with emoji 🙂",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼",
]


@pytest.fixture(scope="module")
def byte_level():
    try:
        bundled_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "sp.gguf"
    write_llama_gguf(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def _stream(tokenizer, ids, **kwargs) -> list[str]:
    detokenizer = StreamingDetokenizer(tokenizer, **kwargs)
    pieces = [detokenizer.add(i) for i in ids]
    pieces.append(detokenizer.flush())
    assert detokenizer.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("skip", [False, True])
def test_pieces_join_to_the_decode(tokenizer, skip):
    for text in TRICKY:
        ids = tokenizer.encode(text)
        pieces = _stream(tokenizer, ids, skip_special_tokens=skip)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip), text
        # Valid text never shows a half character on the way.
        assert not any("\ufffd" in p for p in pieces), (text, pieces)


def test_every_prefix_of_a_stream(tokenizer):
    """After each id, all of the decode so far has been given out, unless it may still change."""
    ids = tokenizer.encode("Hi 🙂 你好  x👨‍👩‍👧")
    detokenizer = StreamingDetokenizer(tokenizer)
    for n, token in enumerate(ids, 1):
        detokenizer.add(token)
        decoded = tokenizer.decode(ids[:n])
        assert decoded.startswith(detokenizer.text)
        byte_token = tokenizer.convert_ids_to_tokens(token).startswith("<0x")  # see StreamingDetokenizer
        assert decoded == detokenizer.text or decoded.endswith("\ufffd") or byte_token


def test_sentencepiece_keeps_leading_spaces(sentencepiece):
    ids = sentencepiece.encode("hello world  the theory", add_special_tokens=False)
    pieces = _stream(sentencepiece, ids)
    assert "".join(pieces) == "hello world  the theory"
    assert any(p.startswith(" ") for p in pieces)


def test_split_utf8_waits(byte_level):
    ids = byte_level.encode("🙂")
    assert len(ids) > 1  # the emoji is split over byte tokens
    detokenizer = StreamingDetokenizer(byte_level)
    assert [detokenizer.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.add(ids[-1]) == "🙂"
    # An unfinished character at the very end comes out on flush, as decode shows it.
    detokenizer = StreamingDetokenizer(byte_level)
    detokenizer.add(ids[0])
    assert detokenizer.flush() == byte_level.decode(ids[:1])


def test_invalid_utf8_still_joins_to_the_decode(tokenizer):
    """A model can emit bytes that never make a character; the pieces must still join to the decode."""
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    half = tokenizer.encode("你", add_special_tokens=False)
    tail = tokenizer.encode(" and then 🙂 x", add_special_tokens=False)
    for ids in (emoji + emoji[:2] + tail, emoji[:1] + tail, tail + half[:1], emoji + half[:1] + emoji):
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_window_stays_small(byte_level):
    detokenizer = StreamingDetokenizer(byte_level)
    ids = byte_level.encode("word " * 500)
    for i in ids:
        detokenizer.add(i)
    assert len(detokenizer._window) <= 4
    assert detokenizer.text == byte_level.decode(ids)


# ------------------------------------------------------------------------------------------------ stop strings


def _server_stream(tokenizer, ids, stops) -> tuple[list[str], StreamingDetokenizer]:
    """What the server's engine does: the constructor it calls, then `add` per token and `finish` at the end."""
    stream = StreamingDetokenizer(tokenizer, stops, True)
    pieces = [stream.add(i) for i in ids]
    return [*pieces, stream.finish()], stream


@pytest.mark.parametrize("text", TRICKY)
def test_stops_end_the_text_before_the_first_stop_string(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    middle = decoded[len(decoded) // 2 : len(decoded) // 2 + 2]
    stops = (middle, "never there") if middle.strip() else ("never there",)
    pieces, stream = _server_stream(tokenizer, ids, stops)
    at = min((i for i in (decoded.find(s) for s in stops) if i >= 0), default=len(decoded))
    assert "".join(pieces) == decoded[:at]
    assert stream.stopped == (at < len(decoded))


def test_text_that_may_start_a_stop_string_is_held_back(byte_level):
    stream = StreamingDetokenizer(byte_level, ["ENDING"], True)
    given = "".join(stream.add(i) for i in byte_level.encode("so END", add_special_tokens=False))
    assert given == "so " and stream.text == "so END"  # "END" may begin "ENDING"
    given += "".join(stream.add(i) for i in byte_level.encode("ED", add_special_tokens=False))
    assert given + stream.finish() == "so ENDED" and not stream.stopped


def _byte_tokens(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode()]


def test_server_stream_reads_byte_fallback_runs_whole(sentencepiece):
    """SentencePiece byte fallback decodes a run of byte tokens together: a run that goes wrong later turns into
    U+FFFD from its start, so the characters it made before cannot be given out early."""
    x = sentencepiece.encode("x", add_special_tokens=False)
    half = _byte_tokens(sentencepiece, "你")[:1]
    for ids in (
        _byte_tokens(sentencepiece, "🙂") + half + _byte_tokens(sentencepiece, "🙂") + x,
        _byte_tokens(sentencepiece, "é🙂") + half + x + _byte_tokens(sentencepiece, "🙂"),
    ):
        decoded = sentencepiece.decode(ids, skip_special_tokens=True)
        assert decoded.startswith("\ufffd")  # the oracle: the whole run is invalid
        pieces, _ = _server_stream(sentencepiece, ids, ("never there",))
        assert "".join(pieces) == decoded, pieces


def test_peek_is_what_the_next_token_adds(tokenizer):
    ids = tokenizer.encode('Hi 🙂 你好  x👨‍👩‍👧 {"a": 1}', add_special_tokens=False)
    stream = StreamingDetokenizer(tokenizer, (), True)
    for n, token in enumerate(ids):
        decoded = tokenizer.decode(ids[: n + 1], skip_special_tokens=True)
        if "\ufffd" not in decoded:
            assert stream.text + stream.peek(token) == decoded
        stream.add(token)


# ------------------------------------------------------------------------------------------------ streamers


def _generate(streamer, prompt_ids, new_ids, shape=(1,)) -> None:
    """What generate does: the prompt as a (1, T) tensor, then each token, then end()."""
    streamer.put(torch.tensor([prompt_ids]))
    for token in new_ids:
        streamer.put(torch.tensor(token).reshape(shape))
    streamer.end()


@pytest.mark.parametrize("skip_prompt", [False, True])
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_text_streamer_prints_the_decode(tokenizer, capsys, skip_prompt, shape):
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    new = tokenizer.encode("Sure 🙂 naïve 你好!<|im_end|>", add_special_tokens=False)
    _generate(TextStreamer(tokenizer, skip_prompt=skip_prompt), prompt, new, shape)
    expected = tokenizer.decode(new if skip_prompt else prompt + new)
    assert capsys.readouterr().out == expected + "\n"

    _generate(TextStreamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True), prompt, new, shape)
    expected = tokenizer.decode(new if skip_prompt else prompt + new, skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


def test_text_streamer_prints_what_transformers_prints(byte_level, capsys):
    transformers = pytest.importorskip("transformers")
    prompt = byte_level.encode("<|im_start|>user\nhi<|im_end|>\n")
    new = byte_level.encode("Well, 你好 🙂 there.\nNew line<|im_end|>")
    for kwargs in ({}, {"skip_prompt": True}, {"skip_prompt": True, "skip_special_tokens": True}):
        _generate(transformers.TextStreamer(byte_level, **kwargs), prompt, new)
        theirs = capsys.readouterr().out
        _generate(TextStreamer(byte_level, **kwargs), prompt, new)
        assert capsys.readouterr().out == theirs, kwargs


def test_text_streamer_can_be_reused(byte_level, capsys):
    streamer = TextStreamer(byte_level, skip_prompt=True)
    for text in ("first answer", "second 🙂"):
        _generate(streamer, byte_level.encode("prompt"), byte_level.encode(text))
        assert capsys.readouterr().out == text + "\n"


def test_text_streamer_rejects_batches(byte_level):
    with pytest.raises(ValueError, match="batch size 1"):
        TextStreamer(byte_level).put(torch.tensor([[1, 2], [3, 4]]))


def test_text_iterator_streamer_from_a_thread(tokenizer):
    prompt = tokenizer.encode("question?")
    new = tokenizer.encode(" An answer with 🙂 and 你好.")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    worker = threading.Thread(target=_generate, args=(streamer, prompt, new))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == tokenizer.decode(new)


def test_text_iterator_streamer_timeout(byte_level):
    streamer = TextIteratorStreamer(byte_level, timeout=0.05)
    with pytest.raises(queue.Empty):
        next(streamer)
