"""JSON schemas of Python functions, so that tools can be passed to chat templates as plain functions.

The schema is read from type hints and a Google-style docstring, in the shape transformers' ``get_json_schema``
produces (``{"type": "function", "function": {"name", "description", "parameters", "return"?}}``).
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

_BASIC = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null", Any: "any"}
_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?)\s*:\s*$"
)
_ARG = re.compile(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_CHOICES = re.compile(r"\(choices:\s*(\[.*?\])\)\s*$", re.DOTALL)


def get_json_schema(func: Callable) -> dict:
    """The JSON schema of ``func`` for a chat template's ``tools``: every argument needs a type hint and a line in
    the docstring's ``Args:`` section; ``(choices: [...])`` at the end of an argument's line becomes an enum."""
    if not callable(func):
        raise TypeError(f"get_json_schema needs a function, not {type(func).__name__}")
    name = getattr(func, "__name__", type(func).__name__)
    doc = inspect.getdoc(func)
    if not doc:
        raise ValueError(f"cannot build a JSON schema for {name}: it has no docstring")
    description, arg_docs, returns_doc = _parse_docstring(doc)
    hints = typing.get_type_hints(func)
    properties: dict[str, dict] = {}
    required = []
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name not in hints:
            raise TypeError(f"argument {param.name} of {name} has no type hint")
        if param.name not in arg_docs:
            raise ValueError(
                f"argument {param.name} of {name} is not described in the docstring's Args section"
            )
        schema = _type_schema(hints[param.name])
        text = arg_docs[param.name]
        choices = _CHOICES.search(text)
        if choices:
            schema["enum"] = json.loads(choices.group(1))
            text = text[: choices.start()].strip()
        schema["description"] = text
        properties[param.name] = schema
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    function: dict[str, Any] = {
        "name": name,
        "description": description,
        "parameters": {"type": "object", "properties": properties},
    }
    if required:
        function["parameters"]["required"] = required
    if "return" in hints and hints["return"] is not type(None):
        function["return"] = _type_schema(hints["return"])
        if returns_doc:
            function["return"]["description"] = returns_doc
    return {"type": "function", "function": function}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(description, {argument: text}, returns text) of a Google-style docstring."""
    description, args, returns = [], {}, []
    section, current = None, None
    for line in doc.splitlines():
        heading = _SECTION.match(line)
        if heading:
            section = heading.group(1).lower()
            current = None
            continue
        if section is None:
            description.append(line)
        elif section in ("args", "arguments", "parameters"):
            match = _ARG.match(line)
            if match and (current is None or len(line) - len(line.lstrip()) <= _indent_of_args(doc)):
                current = match.group(1)
                args[current] = match.group(2).strip()
            elif current and line.strip():
                args[current] = f"{args[current]} {line.strip()}".strip()
        elif section in ("returns", "return") and line.strip():
            returns.append(line.strip())
    return "\n".join(description).strip(), args, " ".join(returns) or None


def _indent_of_args(doc: str) -> int:
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if _SECTION.match(line) and line.strip().lower().startswith(("args", "arguments", "parameters")):
            for following in lines[i + 1 :]:
                if following.strip():
                    return len(following) - len(following.lstrip())
    return 0


def _type_schema(hint: Any) -> dict:
    if hint in _BASIC:
        return {"type": _BASIC[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is list or origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if hint is tuple or origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0])}
        return {"type": "array", "prefixItems": [_type_schema(a) for a in args]}
    if hint is dict or origin is dict:
        schema: dict[str, Any] = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = _type_schema(args[1])
        return schema
    if origin is Union or origin is types.UnionType:
        subtypes = [_type_schema(a) for a in args if a is not type(None)]
        if len(subtypes) == 1:
            schema = subtypes[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subtypes):
            names = sorted({s["type"] for s in subtypes})
            schema = {"type": names[0] if len(names) == 1 else names}
        else:
            schema = {"anyOf": subtypes}
        if type(None) in args:
            schema["nullable"] = True
        return schema
    if origin is Literal and args:
        kinds = sorted({_BASIC[type(a)] for a in args if type(a) in _BASIC})
        if len(kinds) != 1 or any(type(a) not in (int, float, str, bool) for a in args):
            raise TypeError(f"Literal choices must be plain values of one type, got {args!r}")
        return {"type": kinds[0], "enum": list(args)}
    raise TypeError(f"cannot express the type hint {hint!r} as a JSON schema")
