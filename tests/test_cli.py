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
    bad = chatlm("run", "hi", "--max-new-tokens", "-3")
    assert bad.returncode == 2 and "positive" in bad.stderr and "Traceback" not in bad.stderr


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
