"""Tools as Python functions: schemas equal transformers' get_json_schema, and they render like transformers."""

from __future__ import annotations

import json
from typing import Literal, Optional, Union

import pytest
import transformers
from transformers.utils import get_json_schema as hf_get_json_schema

from chatlm import AutoTokenizer
from chatlm.tool_schema import get_json_schema


def get_current_temperature(location: str, unit: str) -> float:
    """
    Get the current temperature at a location.

    Args:
        location: The location to get the temperature for, in the format "City, Country"
        unit: The unit to return the temperature in. (choices: ["celsius", "fahrenheit"])
    Returns:
        The current temperature at the specified location in the specified units, as a float.
    """


def many_types(
    x: int,
    y: Optional[float] = None,  # noqa: UP045 - the typing spelling is what users write too
    tags: list[str] | None = None,
    mode: Literal["a", "b"] = "a",
    either: Union[int, str] = 1,  # noqa: UP007
    mapping: dict[str, int] | None = None,
    pair: tuple[int, str] | None = None,
    flag: bool = False,
    mixed: list[int] | str = "x",
) -> str:
    """
    Do a thing with many kinds of argument.

    Args:
        x: The x value.
        y: Why (choices: [1.0, 2.0])
        tags: Some tags
            over two lines.
        mode: The mode
        either: An int or a string
        mapping: A dict
        pair: A tuple
        flag: A flag
        mixed: A list or a string

    Returns:
        A string result.
    """


def no_return(query: str):
    """Search.

    Args:
        query: What to look for
    """


@pytest.mark.parametrize("func", [get_current_temperature, many_types, no_return])
def test_schema_equals_transformers(func):
    assert json.dumps(get_json_schema(func)) == json.dumps(hf_get_json_schema(func))


def test_bad_functions_are_clear_errors():
    def untyped(a):
        """Doc.

        Args:
            a: thing
        """

    def undocumented(a: int):
        """Doc without args."""

    def no_doc(a: int):
        pass

    with pytest.raises(TypeError, match="type hint"):
        get_json_schema(untyped)
    with pytest.raises(ValueError, match="not described"):
        get_json_schema(undocumented)
    with pytest.raises(ValueError, match="no docstring"):
        get_json_schema(no_doc)


def test_function_tools_render_like_transformers(tmp_path, tiny_checkpoints, shared_dir):
    template = shared_dir / "chat_templates" / "templates_public" / "hermes-2-pro-llama-3-8b-tool_use.jinja"
    text = template.read_text(encoding="utf-8")
    path = tmp_path / "tok"
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tiny_checkpoints["llama"] / name).read_bytes())
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": text}))
    chat = [{"role": "user", "content": "How warm is it in Paris?"}]
    tools = [get_current_temperature, many_types]
    ours = AutoTokenizer.from_pretrained(path).apply_chat_template(
        chat, tools=tools, tokenize=False, add_generation_prompt=True
    )
    theirs = transformers.AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        chat, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs and "get_current_temperature" in ours
