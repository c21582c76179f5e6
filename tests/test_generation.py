"""generate(): stopping rules, option checks, sampling, against transformers where it is the oracle."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import generation as hf_generation

from chatlm import set_seed
from chatlm.auto import AutoModelForCausalLM
from chatlm.generation import sampling


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], dtype=torch.float32
    ).eval()


def ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def test_max_new_tokens_and_default_max_length(model):
    assert model.generate(ids(), max_new_tokens=9, eos_token_id=None).shape == (1, 6 + 9)
    # transformers' default: max_length=20 counts the prompt
    assert model.generate(ids(), eos_token_id=None).shape == (1, 20)


def test_stops_at_any_eos_and_pads_finished_rows(model):
    prompt = ids()
    free = model.generate(prompt, max_new_tokens=12, eos_token_id=None)[0, 6:].tolist()
    stop_a, stop_b = free[3], free[6]
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=[999, stop_b, stop_a])[0, 6:].tolist()
    first = min(i for i, t in enumerate(free) if t in (stop_a, stop_b))
    assert out == free[: first + 1]
    batch = torch.cat([prompt, ids(seed=1)])
    out = model.generate(batch, max_new_tokens=12, eos_token_id=stop_a, pad_token_id=0)
    row = out[0, 6:].tolist()
    end = row.index(stop_a)
    assert all(t == 0 for t in row[end + 1 :])


def test_min_new_tokens_suppresses_eos(model):
    prompt = ids()
    free = model.generate(prompt, max_new_tokens=8, eos_token_id=None)[0, 6:].tolist()
    out = model.generate(prompt, max_new_tokens=8, min_new_tokens=5, eos_token_id=free[0])[0, 6:].tolist()
    assert len(out) >= 5 and free[0] not in out[:5]


def test_greedy_ignores_temperature_without_do_sample_like_transformers(model, hf_model):
    prompt = ids(seed=3)
    with pytest.warns(UserWarning, match="greedy"):
        ours = model.generate(prompt, max_new_tokens=10, temperature=0.1)
    theirs = hf_model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, temperature=0.1
    )
    assert ours.tolist() == theirs.tolist()


def test_repetition_penalty_greedy_matches_transformers(model, hf_model):
    prompt = ids(seed=4)
    ours = model.generate(prompt, max_new_tokens=12, repetition_penalty=1.3)
    theirs = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        repetition_penalty=1.3,
        do_sample=False,
    )
    assert ours.tolist() == theirs.tolist()


def test_seeded_sampling_is_reproducible(model):
    prompt = ids(seed=5)
    runs = []
    for _ in range(2):
        set_seed(1234)
        runs.append(
            model.generate(prompt, do_sample=True, max_new_tokens=16, top_k=0, eos_token_id=None).tolist()
        )
    assert runs[0] == runs[1]
    set_seed(1)
    other = [
        model.generate(prompt, do_sample=True, max_new_tokens=16, top_k=0, eos_token_id=None).tolist()
        for _ in range(3)
    ]
    assert any(o != runs[0] for o in other)


def test_sampling_with_top_k_1_is_greedy(model):
    prompt = ids(seed=6)
    greedy = model.generate(prompt, max_new_tokens=10)
    sampled = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.5)
    assert sampled.tolist() == greedy.tolist()


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (sampling.temperature(0.7), hf_generation.TemperatureLogitsWarper(0.7)),
        (sampling.top_k(5), hf_generation.TopKLogitsWarper(5)),
        (sampling.top_p(0.8), hf_generation.TopPLogitsWarper(0.8)),
        (sampling.min_p(0.1), hf_generation.MinPLogitsWarper(0.1)),
        (sampling.repetition_penalty(1.5), hf_generation.RepetitionPenaltyLogitsProcessor(1.5)),
    ],
)
def test_logits_processors_match_transformers(ours, theirs):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=g) * 3
    seen = torch.randint(0, 50, (3, 7), generator=g)
    torch.testing.assert_close(ours(seen, scores.clone()), theirs(seen, scores.clone()))


def test_batched_sampling_rows_differ_and_num_return_sequences(model):
    set_seed(0)
    out = model.generate(
        ids(seed=7), do_sample=True, max_new_tokens=12, num_return_sequences=3, top_k=0, eos_token_id=None
    )
    assert out.shape == (3, 6 + 12)
    assert len({tuple(r) for r in out[:, 6:].tolist()}) > 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_tokens": 4, "not_an_option": 1}, TypeError, "not_an_option"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 4, "do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
        ({"max_new_tokens": 4, "do_sample": True, "top_p": 1.5}, ValueError, "top_p"),
        ({"max_new_tokens": 4, "num_beams": 4}, ValueError, "beam"),
        ({"max_new_tokens": 4, "stop_strings": ["x"]}, ValueError, "tokenizer"),
    ],
)
def test_bad_generate_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(ids(), **kwargs)


def test_tokenizer_output_passed_whole_is_an_error(model):
    """apply_chat_template returns a dict since transformers 5: passing it as input_ids names the fix."""
    inputs = {"input_ids": ids(), "attention_mask": torch.ones_like(ids())}
    with pytest.raises(TypeError, match=r"generate\(\*\*inputs"):
        model.generate(inputs, max_new_tokens=2)
    assert model.generate(**inputs, max_new_tokens=2).shape[1] == ids().shape[1] + 2


def test_prompt_longer_than_context_is_an_error(model):
    too_long = torch.randint(3, 300, (1, model.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="context window"):
        model.generate(too_long, max_new_tokens=2)


def test_generation_stops_at_context_with_a_warning(model):
    context = model.config.max_position_embeddings
    prompt = torch.randint(3, 300, (1, context - 3))
    with pytest.warns(UserWarning, match="context window"):
        out = model.generate(prompt, max_new_tokens=10, eos_token_id=None)
    assert out.shape[1] == context


def test_generation_config_json_is_read(tmp_path, tiny_checkpoints):
    import json
    import shutil

    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoints["llama"], path)
    (path / "generation_config.json").write_text(
        json.dumps(
            {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7], "max_new_tokens": 5}
        )
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.generation_config
    assert (config.do_sample, config.temperature, config.top_p, config.eos_token_ids) == (
        True,
        0.6,
        0.9,
        [2, 7],
    )
    assert model.generate(ids(), eos_token_id=None).shape == (1, 6 + 5)


def test_return_dict_with_scores_matches_transformers(model, hf_model):
    prompt = ids(seed=8)
    ours = model.generate(
        prompt, max_new_tokens=5, return_dict_in_generate=True, output_scores=True, eos_token_id=None
    )
    theirs = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=5,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        eos_token_id=None,
    )
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    assert len(ours.scores) == len(theirs.scores) == 5
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_stop_strings_end_the_row_at_the_first_hit(model, tiny_checkpoints):
    from chatlm import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    prompt = ids(seed=9)
    free = model.generate(prompt, max_new_tokens=20, eos_token_id=None)[0, 6:].tolist()
    text = tok.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    out = model.generate(prompt, max_new_tokens=20, eos_token_id=None, stop_strings=[stop], tokenizer=tok)
    got = out[0, 6:].tolist()
    assert got == free[: len(got)]
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])


@pytest.mark.parametrize("variant", ["llama", "mistral", "gemma3_text", "qwen2_moe"])
def test_chunked_prefill_matches_transformers(monkeypatch, tiny_checkpoints, variant):
    """Prompts longer than the prefill chunk (7 tokens here) go through the model in pieces; the scores and the
    greedy tokens are transformers' (which takes the prompt at once), with left padding and sliding windows."""
    from chatlm.generation import generate as generate_module

    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 7)
    path = tiny_checkpoints[variant]
    ours = AutoModelForCausalLM.from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = torch.randint(3, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0  # row 1 is left-padded
    options = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    got = ours.generate(prompts, attention_mask=mask, **options)
    expected = theirs.generate(prompts, attention_mask=mask, **options)
    assert got.sequences.tolist() == expected.sequences.tolist()
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_output_logits_and_logprobs_match_transformers(model, hf_model):
    """output_logits (raw) and output_scores (processed: the repetition penalty here), and the log-probabilities
    of the chosen tokens that compute_transition_scores derives from them: log_softmax of the scores."""
    prompt = ids(seed=10)
    options = dict(
        max_new_tokens=6,
        do_sample=False,
        repetition_penalty=1.3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        eos_token_id=None,
    )
    ours = model.generate(prompt, **options)
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    for kind in ("logits", "scores"):
        for a, b in zip(getattr(ours, kind), getattr(theirs, kind), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert any(not torch.allclose(a, b) for a, b in zip(ours.logits, ours.scores))  # the penalty acted
    logprobs = model.compute_transition_scores(ours.sequences, ours.scores, normalize_logits=True)
    expected = hf_model.compute_transition_scores(theirs.sequences, theirs.scores, normalize_logits=True)
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=0)
    new = ours.sequences[0, prompt.shape[1] :]
    by_hand = [float(s[0].log_softmax(-1)[t]) for s, t in zip(ours.scores, new.tolist())]
    assert logprobs[0].tolist() == pytest.approx(by_hand, abs=1e-6)


def test_generate_holds_replies_to_a_json_schema(bundled_model):
    """generate(..., response_format=json_schema, tokenizer=tok): every row's reply is a valid document (checked by
    the jsonschema package), greedy, sampled in a batch, and speculative (prompt lookup: the greedy reply itself);
    a schema the engine cannot compile is a GrammarError before anything is generated."""
    import json

    import jsonschema

    from chatlm import AutoTokenizer
    from chatlm.generation.grammar import GrammarError

    tok = AutoTokenizer.from_pretrained(None)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "population": {"type": "integer", "minimum": 0},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    chat = [{"role": "user", "content": "Give me a city and its population as JSON."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]

    def replies(out: torch.Tensor) -> list[str]:
        return [tok.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]

    greedy = bundled_model.generate(ids, max_new_tokens=60, response_format=fmt, tokenizer=tok)
    sampled = bundled_model.generate(
        ids.repeat(3, 1),
        max_new_tokens=60,
        do_sample=True,
        temperature=1.3,
        response_format=fmt,
        tokenizer=tok,
        generator=torch.Generator().manual_seed(5),
    )
    for text in replies(greedy) + replies(sampled):
        jsonschema.validate(json.loads(text), schema)
    speculative = bundled_model.generate(
        ids, max_new_tokens=60, response_format=fmt, tokenizer=tok, prompt_lookup_num_tokens=3
    )
    assert replies(speculative) == replies(greedy)
    # a draft model guesses through the grammar (its forks masked too) and the checks keep the same reply
    drafted = bundled_model.generate(
        ids, max_new_tokens=60, response_format=fmt, tokenizer=tok, assistant_model=bundled_model
    )
    assert replies(drafted) == replies(greedy)
    stats = bundled_model.last_speculation
    assert stats.accepted > 0  # guesses were made inside the grammar and kept
    sampled_drafts = bundled_model.generate(
        ids.repeat(2, 1),
        max_new_tokens=60,
        do_sample=True,
        temperature=1.3,
        response_format=fmt,
        tokenizer=tok,
        assistant_model=bundled_model,
        generator=torch.Generator().manual_seed(6),
    )
    for text in replies(sampled_drafts):
        jsonschema.validate(json.loads(text), schema)
    with pytest.raises(GrammarError, match="does not exist"):
        bad = {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/none"}}}
        bundled_model.generate(ids, max_new_tokens=4, response_format=bad, tokenizer=tok)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        bundled_model.generate(ids, max_new_tokens=4, response_format=fmt)
