"""Speculative decoding (greedy): prompt lookup and a draft model give plain greedy decoding's output, token for
token, on tiny random models and on the bundled model; what it refuses in this version, it refuses clearly."""

from __future__ import annotations

import pytest
import torch

from chatlm import AutoModelForCausalLM, AutoTokenizer, QuantizationConfig
from chatlm.generation.speculative import PromptLookup
from checkpoints import write_checkpoint

VARIANTS = ["llama", "qwen2", "mistral", "gemma3_text", "qwen2_moe", "phi3_short_partial"]


def repetitive_prompt(vocab: int, seed: int) -> torch.Tensor:
    """A prompt that repeats a phrase, so that lookups find candidates (and the model may well repeat it)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, vocab, (6,), generator=g)
    noise = torch.randint(3, vocab, (5,), generator=g)
    return torch.cat([phrase, noise, phrase, noise[:2], phrase[:3]])[None]


def assert_same(got, expected):
    assert got.sequences.tolist() == expected.sequences.tolist()
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_lookup_is_plain_greedy(tiny_checkpoints, variant):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[variant])
    ids = repetitive_prompt(model.config.vocab_size, seed=1)
    options = dict(max_new_tokens=24, output_scores=True, return_dict_in_generate=True, eos_token_id=None)
    plain = model.generate(ids, **options)
    for n in (1, 3, 8):
        got = model.generate(ids, prompt_lookup_num_tokens=n, **options)
        assert_same(got, plain)
        stats = got.speculation
        assert 0 <= stats.accepted <= stats.proposed and stats.rounds <= 24
        assert (
            stats.rounds + stats.accepted == 24
        )  # each round settles its accepted guesses and one more token


def test_draft_model_is_plain_greedy(tmp_path, tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    other = AutoModelForCausalLM.from_pretrained(write_checkpoint(tmp_path / "draft", "llama", seed=7))
    ids = repetitive_prompt(model.config.vocab_size, seed=2)
    options = dict(max_new_tokens=20, output_scores=True, return_dict_in_generate=True, eos_token_id=None)
    plain = model.generate(ids, **options)
    for draft, schedule in ((other, "heuristic"), (other, "constant"), (model, "heuristic")):
        got = model.generate(
            ids,
            assistant_model=draft,
            num_assistant_tokens=3,
            num_assistant_tokens_schedule=schedule,
            **options,
        )
        assert_same(got, plain)
    # the model as its own draft: every guess it was asked for is right
    assert got.speculation.accepted == got.speculation.proposed > 0


def test_draft_applies_min_new_tokens(tiny_checkpoints):
    """The model as its own draft, with an eos it would emit early held off by min_new_tokens: the draft holds it
    off too, so every guess is still right."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    ids = repetitive_prompt(model.config.vocab_size, seed=3)
    eos = int(model.generate(ids, max_new_tokens=4, eos_token_id=None)[0, ids.shape[1] + 2])
    options = dict(max_new_tokens=12, eos_token_id=eos, min_new_tokens=8, return_dict_in_generate=True)
    plain = model.generate(ids, **options)
    got = model.generate(
        ids,
        assistant_model=model,
        num_assistant_tokens=3,
        num_assistant_tokens_schedule="constant",
        **options,
    )
    assert got.sequences.tolist() == plain.sequences.tolist()
    assert got.speculation.proposed > 0 and got.speculation.accepted == got.speculation.proposed


def test_stops_as_plain_greedy_does(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    ids = repetitive_prompt(model.config.vocab_size, seed=3)
    plain = model.generate(ids, max_new_tokens=16, eos_token_id=None)
    eos = int(plain[0, ids.shape[1] + 5])  # a token the model emits: it must end the reply right there
    expected = model.generate(ids, max_new_tokens=16, eos_token_id=eos)
    got = model.generate(ids, max_new_tokens=16, eos_token_id=eos, prompt_lookup_num_tokens=4)
    assert got.tolist() == expected.tolist() and got.shape[1] <= ids.shape[1] + 6
    for limit in (1, 2, 7):  # max_new_tokens cuts a round short
        a = model.generate(ids, max_new_tokens=limit, eos_token_id=None, prompt_lookup_num_tokens=5)
        assert a.tolist() == plain[:, : ids.shape[1] + limit].tolist()
    penalty = dict(max_new_tokens=12, eos_token_id=None, repetition_penalty=1.3, min_new_tokens=3)
    assert (
        model.generate(ids, prompt_lookup_num_tokens=4, **penalty).tolist()
        == model.generate(ids, **penalty).tolist()
    )


def test_prompt_lookup_candidates():
    lookup = PromptLookup(num_tokens=3, max_ngram=2)
    ids = torch.tensor([5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6])
    assert lookup.lookup(ids) == [1, 2, 5]  # the latest earlier "5 6" is followed by 1 2 5
    assert lookup.lookup(torch.tensor([1, 2, 3, 4])) == []  # no earlier n-gram: no guess
    assert PromptLookup(2, 2).lookup(torch.tensor([4, 1, 9, 3, 1])) == [9, 3]  # falls back to a 1-gram


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_lookup_num_tokens=0), "positive integer"),
        (dict(num_assistant_tokens=0), "positive integer"),
        (dict(num_assistant_tokens_schedule="fast"), "heuristic"),
    ],
)
def test_refusals(tiny_checkpoints, kwargs, match):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    ids = repetitive_prompt(model.config.vocab_size, seed=4)
    kwargs.setdefault("prompt_lookup_num_tokens", 3)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, max_new_tokens=4, **kwargs)


def test_refuses_two_drafters(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    ids = repetitive_prompt(model.config.vocab_size, seed=5)
    with pytest.raises(ValueError, match="not several"):
        model.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=3, assistant_model=model)


EDIT_CHAT = [
    {
        "role": "user",
        "content": "Repeat this paragraph exactly, with 'river' changed to 'River':\n\nThe river Danube rises in the "
        "Black Forest of Germany and flows for about 2,850 kilometres through ten countries before it empties into "
        "the Black Sea. Along its course it passes four capital cities: Vienna, Bratislava, Budapest and Belgrade.",
    }
]


@pytest.mark.parametrize("quantized", [False, True])
def test_bundled_model_edit_chat(bundled_model, quantized):
    """On the bundled model, a reply that quotes its prompt: the same greedy reply, most guesses accepted. The
    4-bit model checks its guesses through the fused native layer (several tokens of one row at once)."""
    tok = AutoTokenizer.from_pretrained(None)
    model = (
        AutoModelForCausalLM.from_pretrained(None, quantization_config=QuantizationConfig(load_in_4bit=True))
        if quantized
        else bundled_model
    )
    ids = tok.apply_chat_template(EDIT_CHAT, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    plain = model.generate(ids, max_new_tokens=60)
    got = model.generate(ids, max_new_tokens=60, prompt_lookup_num_tokens=10, return_dict_in_generate=True)
    assert got.sequences.tolist() == plain.tolist()
    assert got.speculation.acceptance_rate > 0.5
    assert model.last_speculation is got.speculation


def test_governor_stops_guessing_while_it_loses_and_tries_again():
    from chatlm.generation.speculative import Governor

    governor = Governor(backoff=4, weight=1.0)  # weight 1: each round's cost replaces the last
    assert not governor.should_guess()  # the first round is plain, to measure plain
    governor.record(False, 0.010, 1)
    assert governor.should_guess()
    governor.record(True, 0.030, 2)  # 15 ms per token against 10: a loss
    assert [governor.should_guess() for _ in range(5)] == [False] * 4 + [True]
    governor.record(True, 0.030, 1)  # a loss again: twice as long off
    assert [governor.should_guess() for _ in range(9)] == [False] * 8 + [True]
    governor.record(True, 0.030, 6)  # 5 ms per token: a win, keep guessing
    assert all(governor.should_guess() for _ in range(10))
    governor.record(True, 0.030, 1)  # a loss after a win: the short pause again
    assert [governor.should_guess() for _ in range(5)] == [False] * 4 + [True]


def test_speculation_with_a_losing_governor_is_still_plain_greedy(tiny_checkpoints):
    from chatlm.generation.generate import generate_steps
    from chatlm.generation.speculative import Governor, PromptLookup, SpeculationStats

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    ids = repetitive_prompt(model.config.vocab_size, seed=6)
    plain = model.generate(ids, max_new_tokens=20, eos_token_id=None)

    class AlwaysLoses(Governor):
        def record(self, guessed, seconds, settled):
            super().record(guessed, 1.0 if guessed else 0.001, settled)

    stats = SpeculationStats()
    config = model.generation_config.update(eos_token_id=None)
    with torch.inference_mode():
        steps = list(
            generate_steps(
                model, ids, None, config, 20, proposer=PromptLookup(4), stats=stats, governor=AlwaysLoses(8)
            )
        )
    assert [int(s.tokens[0]) for s in steps] == plain[0, ids.shape[1] :].tolist()
    assert stats.rounds > 20 - stats.accepted - 1 and stats.proposed <= 3 * 4  # few rounds guessed at all


def test_pipeline_speculates_with_the_same_replies(bundled_model):
    from chatlm import pipeline

    chats = [EDIT_CHAT, [{"role": "user", "content": "Say hello in French, then repeat it."}]]
    plain = pipeline("text-generation", bundled_model, max_new_tokens=24)(chats, do_sample=False)
    lookup = pipeline("text-generation", bundled_model, max_new_tokens=24)(
        chats, do_sample=False, prompt_lookup_num_tokens=6
    )
    drafted = pipeline("text-generation", bundled_model, max_new_tokens=24, assistant_model=bundled_model)(
        chats, do_sample=False
    )
    assert lookup == plain and drafted == plain
    # its own draft: every guess up to the end of the reply is right (guesses past the end count as proposed)
    assert bundled_model.last_speculation.acceptance_rate > 0.5


def chi_square_z(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square of counts against probabilities, as a z-score (Wilson-Hilferty), over cells expected
    at least 5 times (the rest merged into one)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / (2 / (9 * dof)) ** 0.5


def two_token_distribution(model, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(t1, t2 | prompt) of plain sampling at this temperature, flattened to vocab * vocab."""
    with torch.no_grad():
        first = (model(ids).logits[0, -1].double() / temperature).softmax(-1)
        vocab = first.shape[0]
        pairs = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        second = (model(pairs).logits[:, -1].double() / temperature).softmax(-1)
    return (first[:, None] * second).flatten()


def test_speculative_sampling_draws_from_the_models_distribution(tmp_path):
    """Many two-token samples (rows of batches) through prompt lookup and through a draft model, against the chat model's own
    distribution of the next two tokens (a chi-square test; the same test rejects the draft's distribution).
    Every round guesses (no governor pauses), so both tokens come out of the rejection rule's round."""
    from chatlm.generation.generate import generate_steps
    from chatlm.generation.speculative import (
        DraftModel,
        Governor,
        PromptLookup,
        SpeculationStats,
    )

    class AlwaysGuess(Governor):
        def should_guess(self) -> bool:
            return True

    vocab, temperature, samples = 12, 1.3, 1000
    model = AutoModelForCausalLM.from_pretrained(write_checkpoint(tmp_path / "m", "llama", vocab_size=vocab))
    draft = AutoModelForCausalLM.from_pretrained(
        write_checkpoint(tmp_path / "d", "llama", seed=5, vocab_size=vocab)
    )
    ids = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6, 3, 4]])
    batch = 50
    rows = ids.repeat(batch, 1)
    truth = two_token_distribution(model, ids, temperature)
    config = model.generation_config.update(
        do_sample=True, temperature=temperature, top_k=0, eos_token_id=None
    )
    for name in ("lookup", "draft"):
        generator = torch.Generator().manual_seed(0)
        counts = torch.zeros(vocab * vocab, dtype=torch.float64)
        stats = SpeculationStats()
        with torch.inference_mode():
            for _ in range(samples // batch):  # rows of a batch are independent samples
                proposer = PromptLookup(2) if name == "lookup" else DraftModel(draft, config, generator)
                steps = generate_steps(
                    model,
                    rows,
                    None,
                    config,
                    2,
                    generator,
                    proposer=proposer,
                    stats=stats,
                    governor=AlwaysGuess(),
                )
                t1, t2 = (step.tokens for step in steps)
                counts.index_add_(0, t1 * vocab + t2, torch.ones(batch, dtype=torch.float64))
        assert stats.proposed == samples and 0 < stats.accepted < stats.proposed, (
            name
        )  # kept and rejected guesses
        assert chi_square_z(counts, truth) < 3.7, name  # p > 1e-4
    wrong = two_token_distribution(draft, ids, temperature)
    assert chi_square_z(counts, wrong) > 10  # the test can tell distributions apart


@pytest.mark.parametrize("variant", ["llama", "gemma3_text", "qwen2_moe"])
def test_self_speculation_is_plain_greedy(tiny_checkpoints, variant):
    """The model's first layer drafts on the model's own cache; the output is plain greedy decoding's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[variant])
    ids = repetitive_prompt(model.config.vocab_size, seed=8)
    options = dict(max_new_tokens=20, output_scores=True, return_dict_in_generate=True, eos_token_id=None)
    plain = model.generate(ids, **options)
    for layers in (1, model.config.num_hidden_layers):
        got = model.generate(ids, assistant_early_exit=layers, num_assistant_tokens=3, **options)
        assert_same(got, plain)
        assert got.speculation.proposed > 0
    # all layers: the draft is the model itself, so every guess is right
    assert got.speculation.accepted == got.speculation.proposed
    with pytest.raises(ValueError, match="early exit needs"):
        model.generate(ids, assistant_early_exit=99, max_new_tokens=4)


def ragged_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three repetitive prompts of different lengths, left-padded."""
    rows = [repetitive_prompt(vocab, seed)[0] for seed in (10, 11, 12)]
    rows[1] = rows[1][5:]
    rows[2] = torch.cat([rows[2], rows[2][:9]])  # repeats itself more: its guesses are right more often
    width = max(r.shape[0] for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[0] :], mask[i, width - r.shape[0] :] = r, 1
    return ids, mask


def assert_same_batch(got, expected, prompt_length: int, eos: int | None):
    """The same sequences, and the same scores for every row that is not done yet (a done row's scores are
    whatever plain decoding computed on its padding)."""
    assert got.sequences.tolist() == expected.sequences.tolist()
    done = torch.zeros(got.sequences.shape[0], dtype=torch.bool)
    for column, (a, b) in enumerate(zip(got.scores, expected.scores)):
        torch.testing.assert_close(a[~done], b[~done], atol=1e-4, rtol=1e-4)
        if eos is not None:
            done |= got.sequences[:, prompt_length + column] == eos


PROPOSERS = {
    "lookup": dict(prompt_lookup_num_tokens=4),
    "early exit": dict(assistant_early_exit=1, num_assistant_tokens=3),
    "draft": dict(num_assistant_tokens=3),  # the assistant model is added in the test
}


@pytest.mark.parametrize("proposer", list(PROPOSERS))
@pytest.mark.parametrize("variant", ["llama", "mistral", "gemma3_text", "qwen2_moe"])
def test_batched_speculation_is_plain_batched_greedy(tmp_path, tiny_checkpoints, variant, proposer):
    """Rows of different lengths (left padding), each keeping all of its own accepted guesses: the batch comes
    out as plain batched greedy decoding's, scores included, eos rows padded alike."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[variant])
    ids, mask = ragged_batch(model.config.vocab_size)
    options = dict(max_new_tokens=18, output_scores=True, return_dict_in_generate=True, attention_mask=mask)
    speculate = dict(PROPOSERS[proposer])
    if proposer == "draft":  # another random model, with its own cache rows
        speculate["assistant_model"] = AutoModelForCausalLM.from_pretrained(
            write_checkpoint(tmp_path / "draft", variant, seed=7)
        )
    plain = model.generate(ids, eos_token_id=None, **options)
    got = model.generate(ids, eos_token_id=None, **options, **speculate)
    assert_same_batch(got, plain, ids.shape[1], None)
    assert got.speculation.proposed > 0 or proposer == "lookup"  # a random model may never repeat itself
    eos = int(plain.sequences[1, ids.shape[1] + 4])  # row 1 stops early, the others go on
    plain = model.generate(ids, eos_token_id=eos, **options)
    got = model.generate(ids, eos_token_id=eos, **options, **speculate)
    assert_same_batch(got, plain, ids.shape[1], eos)


def test_batch_rows_keep_their_own_accepted_guesses(tiny_checkpoints):
    """Row 0 is always guessed right, rows 1 and 2 always wrong: row 0 keeps every guess (3 a round, done in 5
    rounds) while the others settle one token a round; nobody is held back to the least lucky row."""
    from chatlm.generation.generate import generate_steps
    from chatlm.generation.speculative import Governor, SpeculationStats

    class AlwaysGuess(Governor):
        def should_guess(self) -> bool:
            return True

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    ids, mask = ragged_batch(model.config.vocab_size)
    plain = model.generate(ids, max_new_tokens=20, eos_token_id=None, attention_mask=mask)
    replies = plain[:, ids.shape[1] :]
    prompt_lengths = mask.sum(-1)

    class Oracle:  # guesses the plain reply's next tokens for row 0, wrong ones for the others
        distributions: dict = {}

        def start(self, main):
            pass

        def propose(self, seqs, limits, eos_banned):
            guesses = {}
            for row, seq in seqs.items():
                at = seq.shape[0] - int(prompt_lengths[row])  # reply tokens so far, the pending one included
                right = replies[row, at : at + min(3, limits[row])].tolist()
                guesses[row] = right if row == 0 else [(t + 1) % model.config.vocab_size for t in right]
            return guesses

        def settled(self, lengths, all_accepted):
            pass

    stats = SpeculationStats()
    config = model.generation_config.update(eos_token_id=None)
    with torch.inference_mode():
        steps = generate_steps(
            model, ids, mask, config, 20, proposer=Oracle(), stats=stats, governor=AlwaysGuess()
        )
        got = torch.stack([step.tokens for step in steps], dim=1)
    assert got.tolist() == replies.tolist()
    assert stats.accepted == 15 and stats.rounds == 20  # row 0: 5 rounds of 3 kept guesses and one more token


@pytest.mark.parametrize("variant", ["mistral", "gemma3_text"])
def test_ragged_cache_rows_read_their_own_tokens(tiny_checkpoints, variant, monkeypatch):
    """Rows fed different numbers of tokens, cut back at random, compacted: each real token's logits are those of
    the row's own sequence run alone without a cache (sliding windows count tokens, not slots)."""
    from chatlm.generation import ragged_cache
    from chatlm.generation.ragged_cache import RaggedCache

    monkeypatch.setattr(ragged_cache, "COMPACT_MIN_SLOTS", 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[variant])
    g = torch.Generator().manual_seed(0)
    batch, vocab = 3, model.config.vocab_size
    cache = RaggedCache(model, batch, 4)
    rows: list[list[int]] = [[] for _ in range(batch)]
    compactions = 0
    with torch.inference_mode():
        for _ in range(14):
            counts = torch.randint(0, 5, (batch,), generator=g)
            counts[0] = max(1, int(counts[0]))
            width = int(counts.max())
            tokens = torch.randint(3, vocab, (batch, width), generator=g)
            real = torch.arange(width)[None] < counts[:, None]
            logits = cache.forward(tokens, real)
            for r in range(batch):
                rows[r] += tokens[r, : counts[r]].tolist()
                if counts[r]:
                    alone = model(torch.tensor([rows[r]])).logits[0, -int(counts[r]) :]
                    torch.testing.assert_close(logits[r, : counts[r]], alone, atol=1e-4, rtol=1e-4)
            keep = torch.tensor([len(row) - int(torch.randint(0, 3, (), generator=g)) for row in rows])
            keep = keep.clamp(min=1)
            offset = cache.offset
            cache.truncate(keep)
            compactions += cache.offset < offset - int(counts.max())
            rows = [row[: int(k)] for row, k in zip(rows, keep)]
            assert cache.lengths.tolist() == [len(row) for row in rows]
    assert compactions > 0


def test_batched_prompt_lookup_on_the_bundled_model(bundled_model):
    tok = AutoTokenizer.from_pretrained(None)
    chats = [
        EDIT_CHAT,
        [{"role": "user", "content": "Repeat after me: one two three four, one two three four."}],
    ]
    batch = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="left padding"):  # the tokenizer pads on the right by default
        bundled_model.generate(**batch, max_new_tokens=4, prompt_lookup_num_tokens=8)
    tok.padding_side = "left"
    batch = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt")
    plain = bundled_model.generate(**batch, max_new_tokens=40)
    got = bundled_model.generate(
        **batch, max_new_tokens=40, prompt_lookup_num_tokens=8, return_dict_in_generate=True
    )
    assert got.sequences.tolist() == plain.tolist()
    assert got.speculation.accepted > 0
