"""The command line: one-shot runs, the interactive chat on piped input, and one-line errors."""

from __future__ import annotations

import subprocess
import sys


def chatlm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatlm", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def _greedy_reply(model, prompt: str, max_new_tokens: int) -> str:
    from chatlm import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(None)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    out = model.generate(**ids, max_new_tokens=max_new_tokens)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_run_one_prompt_greedy_matches_the_api(bundled_model):
    """--quantization none: the float32 model, as from_pretrained loads it."""
    prompt = "What is the capital of France?"
    result = chatlm("run", prompt, "--max-new-tokens", "20", "--quantization", "none")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _greedy_reply(bundled_model, prompt, 20)
    assert result.stderr == ""  # quiet when not on a terminal


def test_a_gguf_runs_as_stored_by_default():
    """The bundled model is a GGUF file: by default the CLI keeps its blocks (Q4_1, Q8_0) as llama.cpp does."""
    from chatlm import AutoModelForCausalLM, QuantizationConfig

    prompt = "Name a river in Europe."
    result = chatlm("run", prompt, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    stored = AutoModelForCausalLM.from_pretrained(
        None, quantization_config=QuantizationConfig(keep_gguf_blocks=True)
    )
    assert result.stdout.strip() == _greedy_reply(stored, prompt, 12)


def test_chat_with_reset_and_exit():
    script = "Hi there\n/reset\nWhat is 2+2?\n/exit\nnever read\n"
    result = chatlm("chat", "--max-new-tokens", "8", "--system", "Be brief.", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "(chat reset)" in result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) >= 2


def test_errors_are_one_line(tmp_path):
    for args in (
        ("run", str(tmp_path / "missing.gguf"), "hi"),
        ("run", str(tmp_path), "hi"),
        ("chat", "not/a-model-anywhere"),
    ):
        result = chatlm(*args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chatlm: error:"), result.stderr
    # option errors come before anything loads, in words (not argparse's names for our converters)
    for option, said in (
        (
            ("--max-new-tokens", "-3"),
            "argument --max-new-tokens: must be a whole number of at least 1, not -3",
        ),
        (("--top-p", "5"), "argument --top-p: must be over 0 and at most 1, not 5"),
        (("--temperature", "warm"), "argument --temperature: must be a number, 0 or more, not 'warm'"),
    ):
        bad = chatlm("run", "hi", *option)
        assert bad.returncode == 2 and bad.stderr.strip().endswith(said), bad.stderr
        assert "Traceback" not in bad.stderr and "_non_negative" not in bad.stderr
    version = chatlm("--version")
    assert version.returncode == 0 and version.stdout.startswith("chatlm ")


def test_run_with_only_a_model_opens_a_chat_and_raw_takes_plain_text():
    """`chatlm run MODEL` (no prompt) chats, as `ollama run` does; --raw sends the prompt without the template."""
    from chatlm import AutoModelForCausalLM, AutoTokenizer, QuantizationConfig
    from chatlm.loading.resolve import BUNDLED_NAME

    chat = chatlm("run", BUNDLED_NAME, "--max-new-tokens", "4", stdin="/model\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.startswith(f"{BUNDLED_NAME}: llama")  # the chat's /model answered
    raw = chatlm("run", "--raw", "The capital of France is", "--max-new-tokens", "6")
    assert raw.returncode == 0, raw.stderr
    tok = AutoTokenizer.from_pretrained(None)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    stored = AutoModelForCausalLM.from_pretrained(
        None, quantization_config=QuantizationConfig(keep_gguf_blocks=True)
    )
    out = stored.generate(ids, max_new_tokens=6)[0, ids.shape[1] :]
    assert raw.stdout.strip() == tok.decode(out, skip_special_tokens=True).strip()


def test_run_with_4bit_weights_matches_the_api():
    from chatlm import AutoModelForCausalLM, QuantizationConfig

    prompt = "Name a river in Europe."
    result = chatlm("run", prompt, "--max-new-tokens", "12", "--quantization", "int4")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(
        None, quantization_config=QuantizationConfig(load_in_4bit=True)
    )
    assert result.stdout.strip() == _greedy_reply(model, prompt, 12)


def test_run_with_prompt_lookup_gives_the_plain_reply():
    prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog, and the lazy dog sleeps."
    plain = chatlm("run", prompt, "--max-new-tokens", "24")
    fast = chatlm("run", prompt, "--max-new-tokens", "24", "--prompt-lookup", "8")
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    both = chatlm("run", prompt, "--prompt-lookup", "8", "--draft", "SmolLM2-135M-Instruct")
    assert both.returncode != 0 and "choose one" in both.stderr and "Traceback" not in both.stderr


def test_run_holds_the_answer_to_a_json_schema(tmp_path):
    """chatlm run --json-schema FILE: the answer is a document valid for the schema; a file that is not a schema,
    or a schema the engine cannot compile, is a one-line error."""
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"river": {"type": "string", "maxLength": 30}, "length_km": {"type": "integer"}},
        "required": ["river", "length_km"],
        "additionalProperties": False,
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    result = chatlm("run", "Name a river in Europe.", "--json-schema", str(path), "--max-new-tokens", "60")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)
    (tmp_path / "bad.json").write_text('{"$ref": "#/$defs/none"}')
    (tmp_path / "text.json").write_text("not json")
    for bad, says in (
        ("bad.json", "does not exist"),
        ("text.json", "is not JSON"),
        ("missing.json", "cannot read"),
    ):
        result = chatlm("run", "Hi", "--json-schema", str(tmp_path / bad))
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and says in lines[0], result.stderr


def test_thinking_options_need_a_reasoning_model():
    """--think / --reasoning-budget / /think on a model whose template has no thinking section: said, not
    ignored."""
    for option in (("--think", "off"), ("--reasoning-budget", "64")):
        result = chatlm("run", "Hi", *option)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].endswith("this chat template has no thinking section")
    result = chatlm("chat", "--max-new-tokens", "4", stdin="/think on\n/think maybe\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "/think: this model's chat template has no thinking section" in result.stderr
    assert "/think needs on or off" in result.stderr


def test_serve_says_at_once_that_its_port_is_taken():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = chatlm("serve", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"chatlm: error: cannot serve on 127.0.0.1:{port}: Address already in use (choose another --port)"
    ]
