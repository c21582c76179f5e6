"""Reusing keys and values across turns, calls and requests: replies with a reused prefix are token for token the
replies computed whole (greedy), for every architecture of the parity suite, quantized too; the prefix cache
stays within its budget; and the library, pipeline, CLI and server report what they reused."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from chatlm import AutoModelForCausalLM, DynamicCache, PrefixCache, QuantizationConfig, pipeline
from chatlm.models.cache import KVCache
from checkpoints import VARIANTS


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(model, prompt: list[int], new: int = 8, cache=None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, eos_token_id=None, past_key_values=cache)
    return out[0, len(prompt) :].tolist()


def continue_twice(model, first: list[int]) -> None:
    """Two turns through one `DynamicCache` (transformers' prompt-reuse pattern), each against a fresh run."""
    cache = DynamicCache()
    reply = greedy(model, first, cache=cache)
    assert reply == greedy(model, first)
    # the cache holds the prompt and reply but the last token, whose keys were never computed
    assert cache.tokens() == (first + reply)[: cache.get_seq_length()]
    assert cache.get_seq_length() >= len(first) + len(reply) - 1
    second = first + reply + tokens(7, seed=len(first))
    assert greedy(model, second, cache=cache) == greedy(model, second)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reused_prefix_gives_the_same_reply(tiny_checkpoints, variant):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[variant])
    # longer than the sliding windows of the tiny Mistral, Gemma 2 and Gemma 3 (8 and 16 tokens)
    continue_twice(model, tokens(30, seed=1))


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mixtral", "gemma3_text"])
@pytest.mark.parametrize("bits", [8, 4])
def test_reused_prefix_gives_the_same_reply_quantized(tiny_checkpoints, variant, bits):
    # float32 compute: in bfloat16, a prompt computed in two pieces rounds differently from one computed whole
    # (as it does in chunked prefill, or in any engine), and a random tiny model's near-ties flip on that
    config = QuantizationConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4, compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[variant], quantization_config=config)
    continue_twice(model, tokens(25, seed=2))


def test_a_cache_used_by_speculative_decoding_holds_only_the_sequence(bundled_model):
    model, tok = bundled_model, bundled_tokenizer()
    text = (
        "Repeat exactly: the quick brown fox jumps over the lazy dog, and the lazy dog sleeps all day long."
    )
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)[
        "input_ids"
    ]
    cache = DynamicCache()
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=24, prompt_lookup_num_tokens=6, past_key_values=cache
    )[0].tolist()
    assert (
        out[len(prompt) :]
        == model.generate(torch.tensor([prompt]), max_new_tokens=24)[0, len(prompt) :].tolist()
    )
    stats = model.last_speculation
    assert stats.proposed > stats.accepted > 0
    # rejected guesses were rolled back: slot k holds the sequence's k-th token
    assert cache.tokens() == out[: cache.get_seq_length()] and cache.get_seq_length() >= len(out) - 1
    second = out + tok("And once more, please.")["input_ids"]
    assert greedy(model, second, cache=cache) == greedy(model, second)


def test_a_cache_that_disagrees_is_cut_back_and_a_new_first_token_reuses_nothing(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma2"])
    base = tokens(30, seed=3)
    cache = DynamicCache()
    greedy(model, base, cache=cache)
    # shares 12 tokens, then differs: only those 12 may be kept
    other = base[:12] + [t + 1 for t in base[12:]]
    assert greedy(model, other, cache=cache) == greedy(model, other)
    assert cache.tokens()[: len(other)] == other
    fresh = [base[0] + 1] + base[1:]
    assert greedy(model, fresh, cache=cache) == greedy(model, fresh)
    assert cache.tokens()[: len(fresh)] == fresh

    store = PrefixCache()
    store.insert_cache(model_cache(model, base))
    assert store.match(fresh) == 0
    kept = store.fetch(model, fresh, limit=len(fresh) - 1)
    assert kept.get_seq_length() == 0 and store.stats.hits == 0 and store.stats.lookups == 1
    assert greedy(model, fresh, cache=kept) == greedy(model, fresh)


def model_cache(model, prompt: list[int]) -> KVCache:
    cache = DynamicCache()
    greedy(model, prompt, new=1, cache=cache)
    return cache


def test_prefix_cache_finds_the_longest_prefix_and_counts(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    a = tokens(20, seed=4)
    b = a[:9] + tokens(11, seed=5)
    store = PrefixCache()
    assert store.insert_cache(model_cache(model, a)) == 20
    assert store.insert_cache(model_cache(model, b)) == 11  # the 9 shared tokens are stored once
    assert store.tokens == 31 and store.nbytes == 31 * store.bytes_per_token
    question = b + tokens(5, seed=6)
    assert store.match(question) == 20
    cache = store.fetch(model, question, limit=len(question) - 1)
    assert cache.get_seq_length() == 20 and cache.tokens() == question[:20]
    assert store.stats.reused_tokens == 20 and store.stats.prompt_tokens == len(question)
    assert greedy(model, question, cache=cache) == greedy(model, question)
    # the stored keys are those a whole computation gives
    whole = model_cache(model, question)
    for layer in range(len(whole.keys)):
        torch.testing.assert_close(cache.keys[layer][0, :, :20], whole.keys[layer][0, :, :20])
        torch.testing.assert_close(cache.values[layer][0, :, :20], whole.values[layer][0, :, :20])


def test_eviction_keeps_the_budget_and_replies_exact(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"])
    probe = PrefixCache()
    probe.insert_cache(model_cache(model, tokens(4, seed=7)))
    budget = 50 * probe.bytes_per_token  # room for 50 tokens
    store = PrefixCache(max_bytes=budget)
    prompts = [tokens(24, seed=10 + i) for i in range(6)]
    for prompt in prompts:
        cache = store.fetch(model, prompt, limit=len(prompt) - 1)
        assert greedy(model, prompt, cache=cache) == greedy(model, prompt)
        store.insert_cache(cache)
        assert store.nbytes <= budget
    assert store.stats.evicted_tokens > 0
    assert store.match(prompts[-1]) == 24  # the newest stays; the oldest went first
    assert store.match(prompts[0]) == 0
    huge = tokens(80, seed=30)  # longer than the whole budget: its beginning is kept
    store.insert_cache(model_cache(model, huge))
    assert store.nbytes <= budget and store.match(huge) == 50
    assert PrefixCache(max_bytes=0).insert_cache(model_cache(model, huge)) == 0


def test_bad_caches_are_refused(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    other = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2_moe"])  # 3 layers, not 2
    prompt = torch.tensor([tokens(6, seed=8)])
    with pytest.raises(TypeError, match="past_key_values"):
        model.generate(prompt, max_new_tokens=2, past_key_values={"keys": []})
    with pytest.raises(ValueError, match="another model"):
        model.generate(prompt, max_new_tokens=2, past_key_values=other.new_cache(1, 16))
    used = model_cache(model, tokens(6, seed=9))
    with pytest.raises(ValueError, match="one sequence at a time"):
        model.generate(torch.cat([prompt, prompt]), max_new_tokens=2, past_key_values=used)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(max_bytes=-1)
    with pytest.raises(TypeError, match="prefix_cache"):
        pipeline("text-generation", model=str(tiny_checkpoints["llama"]), prefix_cache="yes")


def test_generate_without_a_cache_stays_stateless(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    prompt = tokens(12, seed=11)
    first = model.generate(
        torch.tensor([prompt]), max_new_tokens=6, eos_token_id=None, return_dict_in_generate=True
    )
    assert first.past_key_values is None
    assert greedy(model, prompt, new=6) == first.sequences[0, 12:].tolist()


def chat(pipe, turns: list[str]) -> tuple[list[dict], list[int]]:
    """The guide's loop: append the user's message, call again, keep the returned chat."""
    messages, reused = [{"role": "system", "content": "You are a helpful assistant."}], []
    for text in turns:
        before = pipe.prefix_cache.stats.reused_tokens if pipe.prefix_cache is not None else 0
        messages = pipe(messages + [{"role": "user", "content": text}], max_new_tokens=12, do_sample=False)[
            0
        ]["generated_text"]
        reused.append(
            (pipe.prefix_cache.stats.reused_tokens if pipe.prefix_cache is not None else 0) - before
        )
    return messages, reused


TURNS = ["Hello! Who are you?", "Tell me about tea.", "And coffee?", "Thanks, bye."]


def test_pipeline_continuing_a_chat_reuses_the_previous_turn(bundled_model):
    from chatlm import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(None)
    cached = pipeline("text-generation", model=bundled_model, tokenizer=tok)
    plain = pipeline("text-generation", model=bundled_model, tokenizer=tok, prefix_cache=False)
    messages, reused = chat(cached, TURNS)
    assert chat(plain, TURNS)[0] == messages
    assert reused[0] == 0
    for turn in range(1, len(TURNS)):  # at least the whole chat before the previous reply
        earlier = tok.apply_chat_template(messages[: 2 * turn], add_generation_prompt=True)["input_ids"]
        assert reused[turn] >= len(earlier), (turn, reused)


def chatlm(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatlm", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_cli_chat_reuses_and_says_so():
    """Float32 weights: the same replies with and without the cache. (The CLI's default for the bundled GGUF, its
    blocks as stored, rounds activations to int8 while decoding: a turn's new tokens then take another path than
    a whole prompt would, and a reply may differ in a close call, as with llama.cpp's prompt cache.)"""
    script = "\n".join(TURNS[:3]) + "\n"
    weights = ("--quantization", "none", "--temperature", "0")
    cached = chatlm("chat", "--max-new-tokens", "12", "--verbose", *weights, stdin=script)
    plain = chatlm("chat", "--max-new-tokens", "12", "--cache-ram", "0", *weights, stdin=script)
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr + plain.stderr
    assert cached.stdout == plain.stdout
    reports = [line for line in cached.stderr.splitlines() if "reused from the cache" in line]
    assert len(reports) == 3
    counts = [int(line.split("tokens, ")[1].split()[0]) for line in reports]
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > counts[1], reports
    bad = chatlm("chat", "--cache-ram", "-1", stdin="")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "-1" in bad.stderr


SYSTEM = (
    "You are the assistant of a tea shop. Answer in one short sentence. We sell green, black, white and oolong "
    "tea, in bags and loose, and ship to every country of Europe within five days. Prices start at four euros. "
    "Never promise a discount, and always be polite, even when the customer is not."
)


def metric_values(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_server_clients_sharing_a_system_prompt_share_its_prefill(bundled_model):
    from test_server import greedy_reply, running_server

    questions = ["Do you sell green tea?", "How long is shipping?", "Any discounts?", "What is oolong?"]
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions
    ]
    with running_server(bundled_model) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(messages):
            return client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=16, temperature=0
            )

        first = ask(conversations[0])
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        with ThreadPoolExecutor(3) as pool:  # the others together: one batch shares the cached system prompt
            rest = list(pool.map(ask, conversations[1:]))
        shared = len(bundled_tokenizer().apply_chat_template(conversations[0][:1])["input_ids"])
        for messages, response in zip(conversations, [first, *rest]):
            text, prompt_tokens, _ = greedy_reply(bundled_model, messages, 16)
            assert response.choices[0].message.content == text
            assert response.usage.prompt_tokens == prompt_tokens
        for response in rest:
            assert shared <= response.usage.prompt_tokens_details.cached_tokens < response.usage.prompt_tokens
        # the next turn of a finished chat reuses its prompt and reply
        follow = conversations[0] + [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And black tea?"},
        ]
        again = ask(follow)
        assert again.choices[0].message.content == greedy_reply(bundled_model, follow, 16)[0]
        assert again.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
        values = metric_values(url)
        cached = sum(r.usage.prompt_tokens_details.cached_tokens for r in [first, *rest, again])
        assert values["chatlm_prompt_tokens_cached_total"] == cached
        total = sum(r.usage.prompt_tokens for r in [first, *rest, again])
        assert values["chatlm_prompt_tokens_computed_total"] == total - cached
        assert values["chatlm_prefix_cache_hits_total"] >= 4
        assert values["chatlm_prefix_cache_bytes"] <= values["chatlm_prefix_cache_max_bytes"]


def bundled_tokenizer():
    from chatlm import AutoTokenizer

    return AutoTokenizer.from_pretrained(None)


def test_server_under_a_tiny_budget_evicts_and_never_fails(bundled_model):
    from test_server import greedy_reply, running_server

    budget = 1 << 20  # 22 tokens of SmolLM2's keys and values (float32): less than one prompt
    conversations = [
        [{"role": "system", "content": f"Shop {k}. {SYSTEM}"}, {"role": "user", "content": q}]
        for k, q in enumerate(TURNS)
    ]
    with running_server(bundled_model, cache_ram=budget) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(
                    lambda m: client.chat.completions.create(
                        model="smollm2", messages=m, max_tokens=8, temperature=0
                    ),
                    conversations * 2,
                )
            )
        for messages, response in zip(conversations * 2, responses):
            assert response.choices[0].message.content == greedy_reply(bundled_model, messages, 8)[0]
        values = metric_values(url)
        assert values["chatlm_prefix_cache_bytes"] <= budget == values["chatlm_prefix_cache_max_bytes"]
        assert values["chatlm_prefix_cache_evicted_tokens_total"] > 0
    with running_server(bundled_model, cache_ram=0) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            response = client.chat.completions.create(
                model="smollm2", messages=conversations[0], max_tokens=4, temperature=0
            )
            assert response.usage.prompt_tokens_details.cached_tokens == 0
        assert "chatlm_prefix_cache_bytes" not in metric_values(url)


def test_a_saved_chat_restores_its_cache_only_for_the_same_model(tiny_checkpoints, tmp_path, monkeypatch):
    from chatlm.generation import chat_file
    from checkpoints import write_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    prompt = tokens(20, seed=12)
    store = PrefixCache()
    cache = store.fetch(model, prompt, limit=19)
    reply = greedy(model, prompt, cache=cache)
    store.insert_cache(cache)
    messages = [{"role": "user", "content": "Hi, café?"}, {"role": "assistant", "content": "Oui."}]
    path = tmp_path / "chat.safetensors"
    assert chat_file.save_chat(path, messages, model, store, cache.tokens()) == cache.get_seq_length()

    fresh = PrefixCache()
    loaded = chat_file.load_chat(path, model, fresh)
    assert loaded.messages == messages and loaded.refused is None
    assert loaded.restored_tokens == cache.get_seq_length() and loaded.ids == cache.tokens()
    follow = prompt + reply + tokens(5, seed=13)
    resumed = fresh.fetch(model, follow, limit=len(follow) - 1)
    assert resumed.get_seq_length() == loaded.restored_tokens
    assert greedy(model, follow, cache=resumed) == greedy(model, follow)

    # the same architecture with other weights, or the same weights quantized: refused, the chat kept
    twin = AutoModelForCausalLM.from_pretrained(write_checkpoint(tmp_path / "twin", "llama", seed=1))
    int8 = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], quantization_config=QuantizationConfig(load_in_8bit=True)
    )
    for other in (twin, int8):
        elsewhere = PrefixCache()
        refused = chat_file.load_chat(path, other, elsewhere)
        assert refused.messages == messages and refused.restored_tokens == 0 and elsewhere.tokens == 0
        assert "another model" in refused.refused
    monkeypatch.setattr(chat_file, "VERSION", "0.0.1")
    later = chat_file.load_chat(path, model, PrefixCache())
    assert later.restored_tokens == 0 and "chatlm 0.1" in later.refused and "0.0.1" in later.refused

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a chat at all")
    with pytest.raises(ValueError, match="not a saved chat"):
        chat_file.load_chat(junk, model, PrefixCache())


def test_cli_chat_saves_and_resumes_with_its_cache(tmp_path):
    kept = tmp_path / "chat.safetensors"
    # float32 weights: see test_cli_chat_reuses_and_says_so
    args = ("chat", "--max-new-tokens", "12", "--quantization", "none", "--temperature", "0")
    whole = chatlm(*args, "--cache-ram", "0", stdin="\n".join(TURNS[:3]) + "\n")
    first = chatlm(*args, "--save", str(kept), stdin="\n".join(TURNS[:2]) + "\n")
    assert first.returncode == 0 and kept.exists(), first.stderr
    then = chatlm(*args, "--save", str(kept), "--verbose", stdin=TURNS[2] + "\n")
    assert then.returncode == 0, then.stderr
    assert "(loaded a chat of 2 turns" in then.stderr and "tokens of cache restored" in then.stderr
    report = next(line for line in then.stderr.splitlines() if "reused from the cache" in line)
    assert int(report.split("tokens, ")[1].split()[0]) > 0
    assert first.stdout + then.stdout == whole.stdout
    # another model (the same one quantized) refuses the cache and still continues the chat right
    other = chatlm("chat", "--max-new-tokens", "12", "--quantization", "int8", stdin=f"/load {kept}\n/save\n")
    assert other.returncode == 0, other.stderr
    assert "its cache is not used" in other.stderr and "another model" in other.stderr
    assert "/save needs a file name" in other.stderr
    missing = chatlm("chat", stdin=f"/load {tmp_path / 'nothing'}\n")
    assert missing.returncode == 0 and "no saved chat" in missing.stderr
