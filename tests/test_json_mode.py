"""The JSON-prefix reader behind ``response_format: json_object`` and forced tool calls, against ``json.loads``."""

from __future__ import annotations

import json
import random

from chatlm.serving.json_mode import JsonPrefix

ALPHABET = list('{}[]",: -.0123456789eE+truefalsnl\\abu\n\t')


def reads(text: str, arrays: bool = False) -> JsonPrefix | None:
    state = JsonPrefix(arrays)
    return state if state.feed(text) else None


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randint(0, 6 if depth < 3 else 3)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.uniform(-1e6, 1e6) if rng.random() < 0.5 else rng.randint(-1000, 1000)
    if kind in (2, 3):
        return "".join(rng.choice('ab"\\\n\u00e9 x/\u2603') for _ in range(rng.randint(0, 5)))
    if kind == 4:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(rng.randint(0, 99)): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def test_every_prefix_of_an_object_is_read_and_only_the_whole_is_complete():
    rng = random.Random(0)
    for _ in range(300):
        doc = json.dumps(
            {str(i): random_value(rng) for i in range(rng.randint(0, 3))},
            indent=rng.choice([None, 1]),
            ensure_ascii=rng.random() < 0.5,
        )
        for end in range(len(doc)):
            state = reads(doc[:end])
            assert state is not None and not state.complete, doc[:end]
        assert reads(doc).complete and reads(doc + " \n").complete
        assert reads(doc + "x") is None and reads(doc + "{}") is None  # one object, then only whitespace


def test_agrees_with_json_loads_on_mutated_and_random_text():
    """Whatever the reader takes as a complete object, json.loads reads as an object, and the other way round."""
    rng = random.Random(1)
    texts = []
    for _ in range(3000):
        doc = json.dumps({str(i): random_value(rng) for i in range(rng.randint(1, 3))})
        i = rng.randrange(len(doc))
        texts.append(doc[:i] + rng.choice(ALPHABET) + doc[i + 1 :])
        texts.append("{" + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))))
    valid = 0
    for text in texts:
        try:
            expected = isinstance(json.loads(text), dict)
        except ValueError:
            expected = False
        state = reads(text)
        assert (state is not None and state.complete) == expected, text
        valid += expected
    assert valid > 300  # both kinds of case occur


def test_what_it_refuses():
    for bad in [
        "[1]",
        '"x"',
        "1",
        '{"a" 1}',
        "{,}",
        '{"a":01}',
        '{"a":tru}',
        '{"a":1,}',
        '{"a":"\x01"}',
        '{"a":"\\q"}',
        '{"a":-}',
        '{"a":1.}',
        '{"a":[1,]}',
        '{"a":1]',
    ]:
        assert reads(bad) is None or not reads(bad).complete, bad
    assert reads('[{"name": "f"}]', arrays=True).complete  # a list of tool calls, when asked for
