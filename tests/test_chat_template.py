"""chatlm.chat_template: the shared corpus of real templates, validate_chat, select_chat_template, and the sandbox
with its limits."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError

from chatlm import chat_template
from chatlm.chat_template import (
    TemplateLimitError,
    render_chat_template,
    select_chat_template,
    validate_chat,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "chat_templates"
PINNED_NOW = datetime(2025, 3, 14, 15, 9, 26)  # the clock the corpus was rendered with


def _load_cases() -> list[dict]:
    path = CORPUS / "cases_public.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


CASES = _load_cases()
NO_CORPUS = pytest.mark.skip(reason=f"the shared chat template corpus is not at {CORPUS}")


def _corpus_params(cases: list[dict]) -> list:
    if not cases:
        return [pytest.param(None, marks=NO_CORPUS)]
    return [pytest.param(case, id=case["case_id"]) for case in cases]


@functools.cache
def _template(name: str) -> str:
    with open(CORPUS / "templates_public" / name, encoding="utf-8", newline="") as f:
        return f.read()


def _render_case(case: dict) -> str:
    return render_chat_template(
        _template(case["template"]),
        case["messages"],
        tools=case["tools"],
        documents=case["documents"],
        add_generation_prompt=case["add_generation_prompt"],
        continue_final_message=case["continue_final_message"],
        now=PINNED_NOW,
        **case["special_tokens"],
        **case["extra_kwargs"],
    )


# ------------------------------------------------------------------------------------------------ the corpus


@pytest.mark.parametrize("case", _corpus_params(CASES))
def test_corpus_case(case):
    expected_error = case.get("expected_error")
    if expected_error is None:
        assert _render_case(case) == case["expected"]
        return
    with pytest.raises(Exception) as info:
        _render_case(case)
    error = info.value
    assert (type(error).__module__, type(error).__name__) == (
        expected_error["module"],
        expected_error["class"],
    )
    assert str(error) == expected_error["message"]


@pytest.mark.parametrize("case", _corpus_params([case for case in CASES if not case.get("expected_error")]))
def test_corpus_renders_twice_the_same_and_leaves_inputs_alone(case):
    before = json.dumps(case["messages"], sort_keys=True)
    assert _render_case(case) == _render_case(case)
    assert json.dumps(case["messages"], sort_keys=True) == before


def test_corpus_conversations_are_valid_chats():
    if not CASES:
        pytest.skip(NO_CORPUS.kwargs["reason"])
    for case in CASES:
        assert validate_chat(case["messages"]) == case["messages"], case["case_id"]


# ------------------------------------------------------------------------------------------------ rendering

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
SIMPLE = (
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_variables_and_generation_prompt():
    out = render_chat_template(SIMPLE, CHAT[:1], add_generation_prompt=True, bos_token="<s>")
    assert out == "<s><user>Hi</user>\n<assistant>"


def test_extra_template_kwargs_are_variables():
    template = "{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}"
    assert render_chat_template(template, CHAT, enable_thinking=False) == "no-think"
    assert render_chat_template(template, CHAT) == ""


def test_continue_final_message_cuts_after_the_content():
    out = render_chat_template(SIMPLE, CHAT, continue_final_message=True, bos_token="")
    assert out == "<user>Hi</user>\n<assistant>Hello there"


def test_continue_final_message_with_content_parts():
    template = "{% for m in messages %}[{% for p in m.content %}{{ p.text }}{% endfor %}]{% endfor %}"
    messages = [{"role": "assistant", "content": [{"type": "text", "text": "Once upon"}, {"type": "image"}]}]
    assert render_chat_template(template, messages, continue_final_message=True) == "[Once upon"
    assert messages[0]["content"][0]["text"] == "Once upon"  # the caller's chat is untouched


def test_continue_final_message_trims_as_the_template_does():
    template = "{% for m in messages %}{{ m.content | trim }}<end>{% endfor %}"
    messages = [{"role": "assistant", "content": "Waves fold into foam, "}]
    assert render_chat_template(template, messages, continue_final_message=True) == "Waves fold into foam,"


def test_continue_final_message_errors():
    with pytest.raises(ValueError, match="not compatible"):
        render_chat_template(SIMPLE, CHAT, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="does not appear in the chat"):
        render_chat_template(
            "{% for m in messages %}{{ m.role }}{% endfor %}{# content #}", CHAT, continue_final_message=True
        )
    with pytest.raises(ValueError, match="not an accepted field"):
        render_chat_template("{{ messages|length }}", CHAT, continue_final_message=True)
    with pytest.raises(ValueError, match='no "content" to continue'):
        render_chat_template(SIMPLE, [{"role": "assistant", "tool_calls": [{}]}], continue_final_message=True)


def test_none_keys_are_dropped_and_reasoning_is_aliased():
    template = (
        "{% for m in messages %}{{ m|length }}:{{ m.content is defined }}:{{ m.thinking }}:{{ m.reasoning_content }}"
        "{% endfor %}"
    )
    messages = [{"role": "assistant", "content": None, "tool_calls": None, "reasoning": "hmm"}]
    assert render_chat_template(template, messages) == "4:False:hmm:hmm"
    assert messages[0] == {"role": "assistant", "content": None, "tool_calls": None, "reasoning": "hmm"}


def test_rich_objects_become_plain_data():
    @dataclasses.dataclass
    class Message:
        role: str
        content: str

    class Blob:
        def write_file(self):
            raise AssertionError("a template must not reach this")

    out = render_chat_template(
        "{% for m in messages %}{{ m.role }}={{ m.content }}{% endfor %}|{{ blob }}",
        [Message("user", "hi")],
        blob=Blob(),
    )
    assert out == "user=hi|<Blob>"


def test_strftime_now_uses_the_pinned_clock_or_the_current_time():
    template = "{{ strftime_now('%d %b %Y %H:%M:%S') }}"
    assert render_chat_template(template, CHAT, now=PINNED_NOW) == "14 Mar 2025 15:09:26"
    assert render_chat_template("{{ strftime_now('%Y') }}", CHAT) == str(datetime.now().year)


def test_tojson_is_json_dumps_without_ascii_escapes():
    data = {"b": [1, 2.5, None, True], "a": "é<>&'\"", "n": {"x": []}}
    template = (
        "{{ d|tojson }}\n{{ d|tojson(indent=2) }}\n{{ d|tojson(sort_keys=true, separators=(',', ':')) }}"
    )
    expected = "\n".join(
        [
            json.dumps(data, ensure_ascii=False),
            json.dumps(data, ensure_ascii=False, indent=2),
            json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":")),
        ]
    )
    assert render_chat_template(template, CHAT, d=data) == expected


def test_generation_block_renders_its_body():
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}|{% endfor %}"
    assert render_chat_template(template, CHAT) == "Hi|Hello there|"


def test_template_errors_pass_through():
    with pytest.raises(TemplateError, match="nope"):
        render_chat_template("{{ raise_exception('nope') }}", CHAT)
    with pytest.raises(UndefinedError):
        render_chat_template("{{ messages[0].missing + 'x' }}", CHAT)
    with pytest.raises(TemplateSyntaxError):
        render_chat_template("{% for m in messages %}", CHAT)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat_template(SIMPLE, [])
    with pytest.raises(TypeError, match="must be dicts"):
        render_chat_template(SIMPLE, ["hello"])
    with pytest.raises(ValueError, match="JSON schemas"):
        render_chat_template(SIMPLE, CHAT, tools=["not a schema"])
    with pytest.raises(TypeError, match="documents"):
        render_chat_template(SIMPLE, CHAT, documents=["not a document"])


def test_templates_are_compiled_once():
    chat_template._compile.cache_clear()
    render_chat_template(SIMPLE, CHAT)
    render_chat_template(SIMPLE, CHAT)
    assert chat_template._compile.cache_info().hits >= 1


def test_long_real_chat_stays_within_the_limits():
    template = _template("llama-3.1-8b-instruct.jinja") if CASES else SIMPLE
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "lorem ipsum " * 200}
        for i in range(2000)
    ]
    start = time.perf_counter()
    out = render_chat_template(template, messages, bos_token="<s>", now=PINNED_NOW)
    assert len(out) > 2000 * 2400
    assert time.perf_counter() - start < 0.5


# Behaviours to compare with transformers itself, on features the corpus uses little or not at all.
FEATURES = {
    "loop_controls": "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
    "{% if loop.index > 3 %}{% break %}{% endif %}{{ m.role }}{{ loop.length }}{{ loop.last }}|{% endfor %}",
    "macro_call": "{% macro box(x) %}[{{ x }}{{ caller() if caller is defined else '' }}]{% endmacro %}"
    "{% call box(1) %}inner{% endcall %}{{ box(2) }}",
    "filter_and_set_blocks": "{% filter upper %}{% for m in messages %}{{ m.content }}{% endfor %}{% endfilter %}"
    "{% set x %}{% for m in messages %}{{ m.role ~ '/' }}{% endfor %}{% endset %}{{ x|trim('/') }}",
    "formatting": "{{ '%s-%05d-%.2f' % ('a', 42, 3.14159) }}{{ '%(x)s!' % {'x': 1} }}{{ '%s'|format(messages[0]) }}"
    "{{ '{}-{:>5}-{x}'.format('a', 'b', x=3) }}{{ '{0[role]}'.format(messages[0]) }}{{ '{m}'.format_map({'m': 1}) }}",
    "dict_and_namespace": "{% set d = dict(a=1, b=2) %}{{ d|dictsort }}{{ dict.fromkeys(['x', 'y'], 0) }}"
    "{% set ns = namespace(n=0, self=5) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }}{{ ns.self }}",
    "slices_and_concat": "{{ messages[1:]|length }}{{ messages[-1].content[::-1] }}{{ 'abcdef'[1:5:2] }}"
    "{{ messages[:1] }}{{ 1 ~ 'a' ~ none ~ [1] ~ messages[0] }}",
    "recursive_loop": "{% for x in [[1, [2, 3]], 4] recursive %}{% if x is iterable %}({{ loop(x) }})"
    "{% else %}{{ x }}{{ loop.depth }}{% endif %}{% endfor %}",
    "loop_filter_and_else": "{% for m in messages if m.role == 'tool' %}{{ m }}{% else %}none{% endfor %}"
    "{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}{% endfor %}",
    "filters": "{{ messages|map(attribute='role')|join(', ') }}{{ messages|selectattr('role', 'eq', 'user')|list }}"
    "{{ [1, 2, 3]|sum }}{{ [[1], [2]]|sum(start=[]) }}{{ [3, 1, 2]|sort }}{{ [1, 2, 3]|batch(2)|list }}"
    "{{ 'abc'|list }}{{ 'ab'|center(6) }}|{{ 'a\nb'|indent(2, true) }}{{ 'hello'|replace('l', 'L') }}"
    "{{ 'a b c d'|wordwrap(3) }}{{ messages[1].content|e }}{{ 1234567|filesizeformat }}{{ 'x'|pprint }}",
    "string_methods": "{{ 'aXbXc'.split('X') }}{{ '-'.join(['a', 'b']) }}{{ 'x'.ljust(3) }}{{ ' y '.strip() }}"
    "{{ 'ab'.replace('a', 'c') }}{{ 'Ab'.lower().startswith('a') }}",
    "operators": "{{ 'ab' * 3 }}{{ [1] * 2 }}{{ 2 ** 10 }}{{ 7 % 3 }}{{ 2 * 3.5 }}{{ 10 // 3 }}{{ 'a' + 'b' }}",
    "undefined": "{{ foo }}{{ foo.bar is defined }}{% for x in foo %}{{ x }}{% endfor %}{{ messages[0].x|default('d') }}",
    "globals": "{% set c = cycler('a', 'b') %}{% set j = joiner('|') %}{% for m in messages %}{{ j() }}{{ c.next() }}"
    "{% endfor %}{{ range(1, 10, 3)|list }}{{ range(200000)|length }}",
    "reasoning": "{% for m in messages %}{{ m.thinking }}/{{ m.reasoning_content }}/{{ m|length }};{% endfor %}",
    "errors": "{{ 'a' + messages[0] }}",
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_same_as_transformers(name):
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <b>&"},
        {"role": "assistant", "content": "Yo", "reasoning_content": "think"},
        {"role": "user", "content": "More"},
    ]

    def outcome(render):
        try:
            return "ok", render()
        except Exception as error:  # the error is part of the behaviour
            return type(error), str(error)

    mine = outcome(lambda: render_chat_template(FEATURES[name], messages, bos_token="<s>"))
    theirs = outcome(
        lambda: utils.render_jinja_template([messages], chat_template=FEATURES[name], bos_token="<s>")[0][0]
    )
    assert mine == theirs


# ------------------------------------------------------------------------------------------------ validate_chat


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ("hello", ValueError, "must be a list of messages"),
        ({"role": "user", "content": "hi"}, ValueError, "not a single dict"),
        ([], ValueError, "empty"),
        (["hi"], TypeError, "message 0 must be a dict"),
        ([{"role": "user", "content": "a"}, None], TypeError, "message 1 must be a dict"),
        ([{"content": "hi"}], ValueError, "message 0 has no 'role'"),
        ([{"role": 3, "content": "hi"}], ValueError, "message 0 has a 'role' that is not a string"),
        ([{"role": "user"}], ValueError, r"message 0 \(user\) has no 'content'"),
        ([{"role": "user", "content": None}], ValueError, r"message 0 \(user\) has no 'content'"),
        ([{"role": "assistant", "content": None, "tool_calls": []}], ValueError, "has no 'content'"),
        ([{"role": "user", "content": 42}], TypeError, r"message 0 \(user\) has 'content' of type int"),
        ([{"role": "user", "content": {"text": "hi"}}], TypeError, "of type dict"),
        (
            [{"role": "user", "content": ["hi"]}],
            TypeError,
            r"message 0 \(user\): content part 0 must be a dict",
        ),
    ],
)
def test_validate_chat_rejects(messages, error, match):
    with pytest.raises(error, match=match):
        validate_chat(messages)


def test_validate_chat_accepts():
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "url": "x.png"}]},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
        },
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "g"}}]},
        {"role": "tool", "content": "{}", "name": "f"},
    ]
    assert validate_chat(chat) == chat
    assert validate_chat(tuple(chat)) == chat


# ------------------------------------------------------------------------------------------------ select_chat_template

NAMED = {"default": "D", "tool_use": "T", "rag": "R"}


def test_select_named_templates():
    assert select_chat_template(NAMED, None, None) == "D"
    assert select_chat_template(NAMED, None, [{"type": "function"}]) == "T"
    assert select_chat_template(NAMED, None, []) == "T"  # tools given, even if empty, as in transformers
    assert select_chat_template(NAMED, "rag", None) == "R"
    assert select_chat_template(NAMED, "default", [{}]) == "D"  # an explicit name wins over tools
    assert (
        select_chat_template(NAMED, "{{ messages }}", None) == "{{ messages }}"
    )  # not a name: template text
    assert select_chat_template({"default": "D"}, None, [{}]) == "D"  # no tool_use template


def test_select_from_tokenizer_config_list():
    stored = [{"name": name, "template": text} for name, text in NAMED.items()]
    assert select_chat_template(stored, None, None) == "D"
    assert select_chat_template(stored, None, [{}]) == "T"


def test_select_single_template():
    assert select_chat_template("S", None, None) == "S"
    assert select_chat_template("S", None, [{}]) == "S"
    assert select_chat_template("S", "other text", None) == "other text"
    assert select_chat_template(None, "given", None) == "given"


def test_select_without_a_template():
    for stored in (None, {}, []):
        with pytest.raises(ValueError, match="no chat template.*plain string prompt"):
            select_chat_template(stored, None, None)
    with pytest.raises(ValueError, match=r"none is named 'default'.*\['rag', 'tool_use'\]"):
        select_chat_template({"rag": "R", "tool_use": "T"}, None, None)


# ------------------------------------------------------------------------------------------------ sandbox


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self._TemplateReference__context.parent }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages.__setitem__(0, 1) }}",
        "{{ namespace.__init__.__globals__ }}",
        "{% set ns = namespace(_secret=1) %}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ '{0.__class__.__mro__}'.format(1) }}",
    ],
)
def test_sandbox_escapes_fail(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(SecurityError):
        render_chat_template(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "template",
    [
        "{{ self._TemplateReference__context }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{{ '{x.__class__}'.format_map({'x': 1}) }}",
        "{{ cycler.__init__ }}",
        "{{ dict.__class__ }}",
        "{{ ''|attr('__class__')|attr('__mro__') }}",
    ],
)
def test_unsafe_attributes_print_nothing(template):
    # as in jinja and transformers: an unsafe attribute is an undefined value, which prints as "" and raises
    # SecurityError as soon as it is used
    try:
        out = render_chat_template(template, CHAT)
    except SecurityError:
        return
    assert out == ""


BOMBS = {
    "doubling_concat": "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "doubling_plus": "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "string_times_power": "{{ 'a' * 10**10 }}",
    "string_times_literal": "{{ 'a' * 10000000000 }}",
    "huge_power": "{{ 10 ** (10 ** 10) }}",  # jinja's ** is left-associative
    "squaring": "{% set ns = namespace(x=10) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "nested_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_list_loops": "{% set l = range(100000)|list %}{% for i in l %}{% for j in l %}{% endfor %}{% endfor %}",
    "exponential_macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    "{{ f(60) }}",
    "infinite_recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "center_filter": "{{ 'x'|center(10000000000) }}",
    "ljust_method": "{{ 'x'.ljust(10**10) }}",
    "percent_width": "{{ '%0999999999d' % 1 }}",
    "format_filter_width": "{{ '%0999999999d'|format(1) }}",
    "format_method_width": "{{ '{:>{}}'.format(1, 999999999) }}",
    "replace_blowup": "{% set s = 'x' * 10000 %}{{ s.replace('', s) }}",
    "join_many_references": "{% set s = 'x' * 10000000 %}{{ ([s] * 1000)|join }}",
    "print_many_references": "{% set s = 'x' * 10000000 %}{{ [s] * 1000 }}",
    "tojson_many_references": "{% set s = 'x' * 10000000 %}{{ ([s] * 1000)|tojson }}",
    "indent_blowup": "{{ ('x\\n' * 1000000)|indent(1000) }}",
    "batch_padding": "{{ [1]|batch(1000000000, 'x')|list }}",
    "sum_of_lists": "{{ ([[1]] * 100000)|sum(start=[]) }}",
    "macro_buffer": "{% set s = 'x' * 10000000 %}{% macro m() %}{% for i in range(100000) %}{{ s[i:] }}"
    "{% endfor %}{% endmacro %}{% set y = m() %}",
    "retained_copies": "{% set ns = namespace(l=[]) %}{% set s = 'x' * 10000000 %}{% for i in range(100000) %}"
    "{% set ns.l = ns.l + [s ~ i] %}{% endfor %}",
    "huge_output": "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_resource_bombs_stop_quickly(name):
    start = time.perf_counter()
    with pytest.raises(TemplateLimitError, match=r"chat template stopped: .*(limit|deeply)"):
        render_chat_template(BOMBS[name], CHAT)
    assert time.perf_counter() - start < 2.0


def test_limits_can_be_changed(monkeypatch):
    monkeypatch.setattr(chat_template, "LIMITS", dataclasses.replace(chat_template.LIMITS, seconds=0.1))
    start = time.perf_counter()
    with pytest.raises(TemplateLimitError, match="0.1 s limit"):
        render_chat_template(BOMBS["nested_ranges"], CHAT)
    assert time.perf_counter() - start < 0.5
