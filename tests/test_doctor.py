"""`chatlm doctor`: real chat templates on tiny tokenizers, healthy and broken the ways real checkpoints are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, processors

from chatlm.cli import main
from chatlm.doctor import PROBLEM, WARNING, diagnose, load_for_doctor
from checkpoints import train_tokenizer

LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_IDS = dict(bos="<|begin_of_text|>", eos="<|eot_id|>")
GEMMA2 = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(scope="module")
def base_tokenizer() -> str:
    return train_tokenizer().to_str()  # trained once; each model directory starts from a copy


@pytest.fixture(scope="module")
def template(shared_dir):
    def read(name: str) -> str:
        with open(
            shared_dir / "chat_templates" / "templates_public" / name, encoding="utf-8", newline=""
        ) as f:
            return f.read()

    return read


@pytest.fixture
def make_model(tmp_path, base_tokenizer):
    """A tokenizer directory: the tiny BPE plus ``specials`` as special added tokens, the template, and
    generation_config.json with ``stop`` as eos_token_id (no file when None)."""

    def make(
        template: str | None,
        specials: list[str],
        bos: str,
        eos: str,
        stop: list[str] | None = None,
        add_bos: bool = False,
        name: str = "model",
    ) -> Path:
        path = tmp_path / name
        path.mkdir()
        tok = Tokenizer.from_str(base_tokenizer)
        tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
        if add_bos:  # a post-processor that prepends BOS, as Llama's tokenizer.json has
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
        if template is not None:
            (path / "chat_template.jinja").write_text(template, encoding="utf-8")
        if stop is not None:
            ids = [tok.token_to_id(t) for t in stop]
            assert None not in ids
            (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
        return path

    return make


def check(path: Path) -> list:
    findings = diagnose(*load_for_doctor(str(path)))
    for f in findings:
        assert "\n" not in f.message and f.severity in (PROBLEM, WARNING)
    return findings


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def test_healthy_models_pass(make_model, template, capsys):
    llama3 = make_model(
        template("llama-3.1-8b-instruct.jinja"), LLAMA3, **LLAMA3_IDS, stop=["<|end_of_text|>", "<|eot_id|>"]
    )
    smol = make_model(
        template("smollm2-instruct.jinja"), [], "<|im_start|>", "<|im_end|>", stop=["<|im_end|>"], name="smol"
    )
    # Llama 2 writes [INST] and <<SYS>> as plain text and ignores add_generation_prompt ([/INST] is the cue).
    llama2 = make_model(
        template("llama-2-7b-chat.jinja"), ["<s>", "</s>"], "<s>", "</s>", ["</s>"], name="l2"
    )
    for path in (llama3, smol, llama2):
        assert check(path) == []
        assert main(["doctor", str(path)]) == 0
        assert capsys.readouterr().out.strip().splitlines() == [f"{path}: ok, no problems found"]


def test_no_template(make_model, capsys):
    path = make_model(None, [], "<|im_start|>", "<|im_end|>", stop=["<|im_end|>"])
    findings = check(path)
    assert codes(findings) == ["no-template"] and findings[0].severity == PROBLEM
    assert "chat_template.jinja" in findings[0].message  # what to add
    assert main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("PROBLEM no-template: ") and out.strip().endswith("1 problem, 0 warnings")


def test_llama3_that_never_stops(make_model, template, tmp_path):
    # The first Llama 3 release: generation_config.json stopped at <|end_of_text|> only, turns end with <|eot_id|>.
    broken = make_model(
        template("llama-3.1-8b-instruct.jinja"), LLAMA3, **LLAMA3_IDS, stop=["<|end_of_text|>"]
    )
    findings = check(broken)
    assert codes(findings) == ["eot-not-stop"] and findings[0].severity == PROBLEM
    eot = json.loads((broken / "tokenizer.json").read_text())["added_tokens"][-1]
    assert eot["content"] == "<|eot_id|>" and f"<|eot_id|> (id {eot['id']})" in findings[0].message
    assert main(["doctor", str(broken)]) == 1

    # Without generation_config.json the model loader takes config.json's ids: same check there.
    from_config = make_model(template("llama-3.1-8b-instruct.jinja"), LLAMA3, **LLAMA3_IDS, name="cfg")
    end_of_text = Tokenizer.from_file(str(from_config / "tokenizer.json")).token_to_id("<|end_of_text|>")
    (from_config / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": end_of_text}))
    assert codes(check(from_config)) == ["eot-not-stop"]
    (from_config / "config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eot["id"]]}))
    assert check(from_config) == []


def test_no_stop_token(make_model, template):
    path = make_model(template("smollm2-instruct.jinja"), [], "<|im_start|>", "<|im_end|>", stop=[])
    assert codes(check(path)) == ["no-stop-token"]


def test_special_tokens_split_into_pieces(make_model, template):
    # A conversion that kept only BOS and EOS as added tokens: the header tokens become plain text.
    path = make_model(template("llama-3.1-8b-instruct.jinja"), [], **LLAMA3_IDS)
    findings = check(path)
    assert codes(findings) == ["split-special-token"] and findings[0].severity == PROBLEM
    message = findings[0].message
    assert "<|start_header_id|>" in message and "<|end_header_id|>" in message
    assert "<|eot_id|>" not in message and "<|begin_of_text|>" not in message  # registered, so whole


def test_template_failing_on_system_messages(make_model, template, capsys):
    # A bug only system messages reach: a variable that the template never sets.
    buggy = "{%- if messages[0]['role'] == 'system' %}{{ system_text.strip() }}{%- endif %}" + template(
        "smollm2-instruct.jinja"
    )
    path = make_model(buggy, [], "<|im_start|>", "<|im_end|>", stop=["<|im_end|>"])
    findings = check(path)
    assert codes(findings) == ["template-error"] and findings[0].severity == PROBLEM
    assert "system + user" in findings[0].message and "system_text" in findings[0].message
    assert main(["doctor", str(path)]) == 1
    capsys.readouterr()

    # Gemma 2 refuses system messages on purpose: reported, but only as a warning (exit 1 with --strict).
    gemma = make_model(
        template("gemma-2-2b-it.jinja"), GEMMA2, "<bos>", "<eos>", ["<eos>", "<end_of_turn>"], name="g"
    )
    findings = check(gemma)
    assert codes(findings) == ["system-role-refused"] and findings[0].severity == WARNING
    assert "System role not supported" in findings[0].message
    assert main(["doctor", str(gemma)]) == 0
    assert main(["doctor", "--strict", str(gemma)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("0 problems, 1 warning (ok)")


def test_template_that_cannot_render_at_all(make_model):
    path = make_model(
        "{% for m in messages %}{{ m.content }", [], "<|im_start|>", "<|im_end|>", ["<|im_end|>"]
    )
    findings = check(path)
    assert set(codes(findings)) == {"template-error"} and "TemplateSyntaxError" in findings[0].message


def test_missing_generation_prompt(make_model, template):
    text = template("smollm2-instruct.jinja")
    cue = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert cue in text
    path = make_model(text.replace(cue, ""), [], "<|im_start|>", "<|im_end|>", stop=["<|im_end|>"])
    findings = check(path)
    assert codes(findings) == ["no-generation-prompt"] and findings[0].severity == PROBLEM
    assert repr("<|im_start|>assistant\n") in findings[0].message


def test_double_bos(make_model, template):
    # Llama 3's tokenizer.json prepends <|begin_of_text|>, and so does its template.
    stop = ["<|end_of_text|>", "<|eot_id|>"]
    path = make_model(template("llama-3.1-8b-instruct.jinja"), LLAMA3, **LLAMA3_IDS, stop=stop, add_bos=True)
    tokenizer, generation_config = load_for_doctor(str(path))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert tokenizer(prompt)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the trap is real
    findings = diagnose(tokenizer, generation_config)
    assert codes(findings) == ["double-bos"] and findings[0].severity == WARNING
    assert main(["doctor", str(path)]) == 0 and main(["doctor", "--strict", str(path)]) == 1
    # A template that leaves BOS to the tokenizer is fine.
    smol = make_model(
        template("smollm2-instruct.jinja"), [], "<|endoftext|>", "<|im_end|>", ["<|im_end|>"], True, "s"
    )
    assert check(smol) == []


def test_bundled_model_passes(capsys):
    assert main(["doctor"]) == 0
    assert capsys.readouterr().out.strip() == "SmolLM2-135M-Instruct: ok, no problems found"


def test_bad_model_is_a_one_line_error(tmp_path, capsys):
    for ref in (tmp_path / "missing.gguf", tmp_path):
        assert main(["doctor", str(ref)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("chatlm: error:")
