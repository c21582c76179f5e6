"""Render Hugging Face chat templates, byte for byte as transformers 5.24 does, in a bounded Jinja2 sandbox.

Chat templates come from model repositories, so they are untrusted code. They run in jinja2's
`ImmutableSandboxedEnvironment` (no private attributes, no mutation of the lists and dicts passed in), and on top of
that every render is bounded (`RenderLimits`): a deadline checked at each loop step, call, filter and operator,
size checks made *before* the operations that can build huge values (``*``, ``**``, ``%``, ``~``, ``+``, slices,
string methods such as ``center`` or ``replace``, filters such as ``join`` or ``indent``) and on what they build,
a budget for all they build together, and a cap on the output, which is streamed. A template that goes over a
limit stops with `TemplateLimitError`, a `jinja2.exceptions.SecurityError`.

Public API: `render_chat_template`, `validate_chat`, `select_chat_template`, `RenderLimits` / `LIMITS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import string
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import Context, LoopContext, Macro, Undefined, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

__all__ = [
    "LIMITS",
    "RenderLimits",
    "TemplateLimitError",
    "render_chat_template",
    "select_chat_template",
    "validate_chat",
]


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """What one render may cost. Real chat templates stay far below these (a few ms, a few hundred KB)."""

    seconds: float = 1.0  # wall-clock time
    max_chars: int = 16 * 2**20  # the longest string a template may build, and the longest output
    max_items: int = 2**18  # the longest list, tuple or dict a template may build
    max_total: int = 128 * 2**20  # characters and items built during the render, all together
    max_int_bits: int = 2**16  # the largest integer a template may compute


#: The limits every render uses; replace it (e.g. ``dataclasses.replace(LIMITS, seconds=5)``) to change them.
LIMITS = RenderLimits()


class TemplateLimitError(SecurityError):
    """A chat template went over one of the `RenderLimits`."""


# ------------------------------------------------------------------------------------------------ render state


class _RenderState:
    """One render's clock and budget. Outside a render (jinja folding constants while it compiles) an idle state
    applies the size limits only."""

    __slots__ = ("limits", "deadline", "left", "now", "output", "spans")

    def __init__(
        self,
        limits: RenderLimits,
        now: datetime | None,
        *,
        idle: bool = False,
        spans: list[tuple[int, int]] | None = None,
    ):
        self.limits = limits
        self.deadline = math.inf if idle else time.monotonic() + limits.seconds
        self.left = math.inf if idle else limits.max_total
        self.now = now
        self.output = 0  # characters streamed out so far
        self.spans = spans  # where to record the spans of {% generation %} blocks, if anywhere

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _limit_error(f"rendering took longer than the {self.limits.seconds:g} s limit")

    def charge(self, amount: int) -> None:
        """Count `amount` newly built characters or items against the render's total."""
        self.left -= amount
        if self.left < 0:
            raise _limit_error(
                f"it built more than {self.limits.max_total} characters and items in all (the max_total limit)"
            )

    def account(self, value: Any) -> Any:
        """Check and charge a value that an operation has just built."""
        if isinstance(value, (str, bytes)):
            size = len(value)
            if size > self.limits.max_chars:
                _check_chars(size)
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            size = len(value)
            if size > self.limits.max_items:
                _check_items(size)
        else:
            return value
        self.charge(size)
        return value


# Set for the duration of a render.
_STATE: ContextVar[_RenderState | None] = ContextVar("chatlm_chat_template_render", default=None)


def _state() -> _RenderState:
    return _STATE.get() or _RenderState(LIMITS, None, idle=True)


def _limits() -> RenderLimits:
    return _state().limits


def _limit_error(what: str) -> TemplateLimitError:
    return TemplateLimitError(f"chat template stopped: {what}")


def _tick() -> None:
    _state().tick()


def _charge(amount: int) -> None:
    _state().charge(amount)


def _account(value: Any) -> Any:
    return _state().account(value)


def _check_chars(size: int, what: str = "a string") -> None:
    limit = _limits().max_chars
    if size > limit:
        raise _limit_error(f"{what} of about {size} characters is over the {limit}-character limit")


def _check_items(size: int, what: str = "a sequence") -> None:
    limit = _limits().max_items
    if size > limit:
        raise _limit_error(f"{what} of {size} items is over the {limit}-item limit")


_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_MAX_DEPTH = 200  # deeper data is not something a chat template should print


def _text_size(value: Any, limit: int | None = None) -> int:
    """About how long ``str(value)`` is, without building it. Stops counting soon after `limit`, so measuring a
    huge value (say a list holding the same long string many times) stays cheap."""
    if isinstance(value, str):
        return len(value)
    limit = _limits().max_chars if limit is None else limit
    # Shared containers are measured once and counted each time they appear. The memo keeps each one alive, so
    # that its id cannot be reused by a temporary (such as the pairs of a dict's items view).
    memo: dict[int, tuple[Any, int]] = {}

    def size(obj: Any, depth: int) -> int:
        if isinstance(obj, str):
            return len(obj) + 2  # quotes
        if isinstance(obj, Undefined):
            return 0
        if isinstance(obj, bool) or obj is None or isinstance(obj, float):
            return 24
        if isinstance(obj, int):
            return obj.bit_length() // 3 + 2
        if isinstance(obj, (bytes, bytearray)):
            return 4 * len(obj) + 3
        if isinstance(obj, Namespace):
            # its repr is "<Namespace {...}>" over the attributes jinja keeps in this private dict
            obj = object.__getattribute__(obj, "_Namespace__attrs")
        if isinstance(obj, (list, tuple, set, frozenset, Mapping, *_VIEWS)):
            key = id(obj)
            if key in memo:
                return memo[key][1]
            if depth > _MAX_DEPTH:
                return limit + 1
            total = 2
            pairs = obj.items() if isinstance(obj, Mapping) else None
            for item in pairs if pairs is not None else obj:
                if pairs is not None:
                    total += size(item[0], depth + 1) + size(item[1], depth + 1) + 4
                else:
                    total += size(item, depth + 1) + 2
                if total > limit:
                    break
            memo[key] = (obj, total)
            return total
        return 64  # the default repr of an object

    return size(value, 0)


def _check_text(value: Any, factor: int = 1) -> None:
    """Refuse to turn `value` into a string that would be over the size limit (`factor`: how much a filter may
    grow it, e.g. escaping)."""
    if factor == 1 and type(value) is str:
        return  # already built, so already checked
    _check_chars(_text_size(value) * factor, "the text of a value")


# ------------------------------------------------------------------------------------------------ size predictions

# One %-conversion: mapping key, flags, width, precision, length modifier, type.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)
_DIGITS = re.compile(r"\d+")


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 12 else 10**12


def _check_percent(fmt: str, args: Any) -> None:
    """``fmt % args``: refuse results over the size limit, before Python pads or repeats anything."""
    specs = [match for match in _PERCENT_SPEC.findall(fmt) if match[2] != "%"]
    if not specs:
        return
    if isinstance(args, tuple):
        values = list(args)
    elif isinstance(args, Mapping):
        values = [args, *args.values()]  # %(key)s reads a value; a plain %s prints the mapping itself
    else:
        values = [args]
    width = 0
    for star_or_width, star_or_precision, _ in specs:
        for part in (star_or_width, star_or_precision):
            if part == "*":
                width = max([width, *(v for v in values if isinstance(v, int))])
            elif part:
                width = max(width, _number(part))
    limit = _limits().max_chars
    widest = max(_text_size(value, limit) for value in values)
    _check_chars(len(fmt) + len(specs) * (widest + width), "a %-formatted string")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    limits = _limits()
    if operator == "+":
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            _check_chars(len(left) + len(right))
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            _check_items(len(left) + len(right))
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > limits.max_int_bits:
                raise _limit_error(f"a product over the {limits.max_int_bits}-bit integer limit")
            return
        seq, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(count, int) and isinstance(seq, (str, bytes)):
            _check_chars(len(seq) * count)
        elif isinstance(count, int) and isinstance(seq, (list, tuple)):
            _check_items(len(seq) * count)
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > limits.max_int_bits:
                raise _limit_error(f"a power over the {limits.max_int_bits}-bit integer limit")
    elif operator == "%" and isinstance(left, str):
        _check_percent(left, right)


def _int_args(args: tuple, kwargs: dict) -> Iterator[int]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            yield value


def _check_str_method(text: str | bytes | int, name: str, args: tuple, kwargs: dict) -> tuple:
    """Bound the built-in str / bytes / int methods that can build far more than they are given
    (``center``, ``ljust``, ``zfill``, ``expandtabs``, ``replace``, ``translate``, ``join``, ``to_bytes``)."""
    limit = _limits().max_chars
    # Widths, lengths and counts: nothing a chat template needs is anywhere near the size limit.
    for number in _int_args(args, kwargs):
        if number > limit:
            raise _limit_error(f"{type(text).__name__}.{name}() was given {number}, over the size limit")
    if isinstance(text, int):
        return args
    if name == "join" and len(args) == 1:
        items = list(args[0])
        _check_chars(sum(_text_size(item, limit) for item in items) + len(text) * len(items))
        return (items,)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], type(text)):
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        hits = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        if isinstance(new, (str, bytes)):
            _check_chars(len(text) + hits * max(len(new) - len(old), 0))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_chars(len(text) + text.count("\t" if isinstance(text, str) else b"\t") * size)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        _check_chars(len(text) * max(longest, 1))
    return args


# ------------------------------------------------------------------------------------------------ loops


class _GuardedIterable:
    """Wraps what a ``{% for %}`` loop iterates over, to check the deadline at every step.

    ``iter()`` is called at once, so a loop over None fails where and how it fails without the wrapper, and
    ``len()`` passes through so that ``loop.length`` does not have to copy the items.
    """

    __slots__ = ("_iterable", "_iterator")

    def __init__(self, iterable: Any):
        self._iterable = iterable
        self._iterator = iter(iterable)

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self) -> Iterator[Any]:
        state = _state()
        deadline, clock = state.deadline, time.monotonic
        for item in self._iterator:
            if clock() > deadline:
                state.tick()
            yield item


def _is_guarded(node: nodes.Expr) -> bool:
    return (
        isinstance(node, nodes.Call)
        and isinstance(node.node, nodes.EnvironmentAttribute)
        and node.node.name == "guard_iter"
    )


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles templates as jinja does, except that for loops check the deadline at every step, and ``~`` and
    slices check the size of what they build (jinja compiles both to plain Python, out of the sandbox's reach).
    Attribute and item lookups need no deadline check: templates repeat only through loops and calls."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        # {% for x in items %} iterates over environment.guard_iter(items). (jinja forbids custom node types.)
        for loop in list(node.find_all(nodes.For)):
            if not _is_guarded(loop.iter):
                guard = nodes.EnvironmentAttribute("guard_iter", lineno=loop.iter.lineno)
                loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.iter.lineno)
                loop.iter.set_environment(self.environment)
        super().visit_Template(node, frame)

    @optimizeconst
    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        # jinja compiles x[a:b] to a plain Python slice; this one checks the size of the copy it makes
        if not isinstance(node.arg, nodes.Slice):
            return super().visit_Getitem(node, frame)
        self.write("environment.guarded_slice(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
            self.write(", ")
        self.write("))")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # the same choice between markup_join and str_join as jinja makes
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"
        else:
            markup = "True" if frame.eval_ctx.autoescape else "False"
        self.write(f"environment.guarded_concat({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


# ------------------------------------------------------------------------------------------------ template globals


class _GenerationExtension(Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text. The body renders as usual; a render
    that tracks them (``return_assistant_tokens_mask``) also records the block's character span."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation_block"), [], [], body).set_lineno(lineno)

    def _generation_block(self, caller: Macro) -> str:
        body = caller()
        state = _state()
        if state.spans is not None:
            # As transformers does, the block starts where the output streamed so far ends. That is exact for
            # blocks written straight to the output; inside a macro or a {% set %} block, whose output is
            # buffered, it is only where the output stood when the block ran.
            state.spans.append((state.output, state.output + len(body)))
        return body


def _raise_exception(message: Any) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    now = _state().now
    now = datetime.now() if now is None else now
    return now.strftime(fmt)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # jinja's argument names
    if not all(isinstance(v, int) for v in (n, min, max)) or n * max > 20_000:
        raise _limit_error("lipsum() asked for more than 20000 words")
    return generate_lorem_ipsum(n, html, min, max)


class _DictFactory:
    """The ``dict`` global: ``dict(...)`` and ``dict.fromkeys(...)`` only, not the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(Namespace):
    """``namespace()``, refusing attribute names that start with an underscore."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no named self, as jinja's: namespace(self=1) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"chat templates cannot store {name!r} on a namespace: the name starts with '_'"
            )


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """``json.dumps(x, ensure_ascii=False, ...)``, as transformers' filter (jinja's own escapes HTML)."""
    limit = _limits().max_chars
    encoder = json.JSONEncoder(
        ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    if indent is None and separators is None:
        _check_chars(6 * _text_size(x, limit), "the JSON of a value")  # \uXXXX escapes are 6 characters
        return encoder.encode(x)
    # With indentation json.dumps runs the pure-Python encoder anyway: stream it, counting as it goes.
    if isinstance(indent, int) and not isinstance(indent, bool):
        width = indent
    else:
        width = len(indent) if isinstance(indent, str) else 0
    if width > 256:
        raise _limit_error(f"tojson was given an indent of {width}, over 256")
    chunks, total = [], 0
    for chunk in encoder.iterencode(x):
        total += len(chunk)
        if total > limit:
            _check_chars(total, "the JSON of a value")
        chunks.append(chunk)
    return "".join(chunks)


# ------------------------------------------------------------------------------------------------ filters


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    """A filter argument after the value, given by position or by name."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _pre_indent(value: Any, args: tuple, kwargs: dict) -> Any:
    _check_text(value)
    width = _arg(args, kwargs, 0, "width", 4)
    width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    text = str(value)
    _check_chars(len(text) + (text.count("\n") + 1) * max(width, 0))
    return value


def _pre_center(value: Any, args: tuple, kwargs: dict) -> Any:
    _check_text(value)
    width = _arg(args, kwargs, 0, "width", 80)
    if isinstance(width, int):
        _check_chars(width)
    return value


def _pre_wordwrap(value: Any, args: tuple, kwargs: dict) -> Any:
    _check_text(value)
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    size = _text_size(value)
    _check_chars(size + (size + 1) * (len(wrap) if isinstance(wrap, str) else 1))
    return value


def _pre_replace(value: Any, args: tuple, kwargs: dict) -> Any:
    _check_text(value)
    text = value if isinstance(value, str) else str(value)
    old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
    _check_text(old)
    _check_text(new)
    count = _arg(args, kwargs, 2, "count", None)
    _check_str_method(text, "replace", (str(old), str(new), -1 if count is None else count), {})
    return value


def _pre_format(value: Any, args: tuple, kwargs: dict) -> Any:
    _check_text(value)
    _check_percent(str(value), kwargs or args)
    return value


def _pre_join(value: Any, args: tuple, kwargs: dict) -> Any:
    items = value if isinstance(value, (list, tuple, str)) else list(value)
    sep = _arg(args, kwargs, 0, "d", "")
    _check_chars(_text_size(items) + _text_size(sep) * len(items), "a joined string")
    return items


def _pre_count(name: str, index: int, default: Any) -> Callable[[Any, tuple, dict], Any]:
    def check(value: Any, args: tuple, kwargs: dict) -> Any:
        count = _arg(args, kwargs, index, name, default)
        if isinstance(count, int):
            _check_items(count, f"a {name} argument")
        return value

    return check


def _pre_list(value: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _check_items(len(value), "a list")
    return value


def _text_check(factor: int) -> Callable[[Any, tuple, dict], Any]:
    def check(value: Any, args: tuple, kwargs: dict) -> Any:
        _check_text(value, factor)
        return value

    return check


# What to check before each filter runs (it may also hand the filter a materialized copy of the value).
_FILTER_CHECKS: dict[str, Callable[[Any, tuple, dict], Any]] = {
    **dict.fromkeys(
        "string safe lower upper title capitalize trim striptags truncate wordcount pprint xmlattr".split(),
        _text_check(1),
    ),
    **dict.fromkeys("e escape forceescape urlencode".split(), _text_check(6)),
    "urlize": _text_check(10),
    "indent": _pre_indent,
    "center": _pre_center,
    "wordwrap": _pre_wordwrap,
    "replace": _pre_replace,
    "format": _pre_format,
    "join": _pre_join,
    "batch": _pre_count("linecount", 0, 1),
    "slice": _pre_count("slices", 0, 1),
    "list": _pre_list,
}


def _guard_filter(name: str, func: Callable) -> Callable:
    """Wrap a filter: deadline, checks before, size of the result after.

    The wrapper takes the context, so jinja never runs filters at compile time (it folds constant filter calls,
    unbounded), and `Context.call` passes the original whatever context, eval context or environment it asks for.
    """
    check = _FILTER_CHECKS.get(name)

    @pass_context
    def guarded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        state = _state()
        state.tick()
        if name == "sum":
            return _guarded_sum(context, func, value, *args, **kwargs)
        if check is not None:
            value = check(value, args, kwargs)
        return state.account(context.call(func, value, *args, **kwargs))

    guarded.__name__ = guarded.__qualname__ = f"guarded_{name}"
    return guarded


def _guarded_sum(context: Context, func: Callable, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``sum`` of lists (``start=[]``) is quadratic in C, out of reach of the deadline: fold it with the sandbox's
    ``+`` instead, which gives the same result, step by step and checked. Numbers go to jinja's filter."""
    attribute = _arg(args, kwargs, 0, "attribute", None)
    start = _arg(args, kwargs, 1, "start", 0)
    if not isinstance(start, (list, tuple)):
        return _account(context.call(func, value, *args, **kwargs))
    env = context.environment
    if attribute is not None:
        value = env.call_filter("map", value, (), {"attribute": attribute}, context=context)
    total = start
    for item in _GuardedIterable(value):
        total = env.call_binop(context, "+", total, item)
    return total


# ------------------------------------------------------------------------------------------------ environment


class _BoundedFormatting:
    """For ``str.format``: checks each field before it is formatted, and the running size of the result."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._size = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        _check_text(value)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        width = max((_number(d) for d in _DIGITS.findall(format_spec)), default=0)
        self._size += _text_size(value) + width
        _check_chars(self._size, "a formatted string")
        return super().format_field(value, format_spec)


class _BoundedFormatter(_BoundedFormatting, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_BoundedFormatting, SandboxedEscapeFormatter):
    pass


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template environment, with every render bounded by `RenderLimits`."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationExtension, loopcontrols],
            finalize=_finalize,
        )
        for name, func in list(self.filters.items()):
            self.filters[name] = _guard_filter(name, func)
        self.filters["tojson"] = _guard_filter("tojson", _tojson)
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_DictFactory(),
            namespace=_Namespace,
            lipsum=_lipsum,
        )

    # --- hooks that sandboxed code goes through

    def guard_iter(self, iterable: Any) -> _GuardedIterable:
        return _GuardedIterable(iterable)

    def guarded_concat(self, markup: bool, parts: tuple) -> str:
        limit = _limits().max_chars
        total = 0
        for part in parts:
            total += _text_size(part, limit - total)
            if total > limit:
                _check_chars(total)
        _charge(total)
        return markup_join(parts) if markup else str_join(parts)

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        # joins the output buffers of macros, {% set %} blocks, {% filter %} blocks and call blocks
        parts = parts if isinstance(parts, list) else list(parts)
        total = sum(map(len, parts))
        _check_chars(total, "a block's output")
        _charge(total)
        return "".join(parts)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        state = _state()
        if time.monotonic() > state.deadline:
            state.tick()
        if operator == "+" and type(left) is str and type(right) is str:
            # the common case, templates building strings with +: only the size matters (kept inline: it is hot)
            size = len(left) + len(right)
            if size > state.limits.max_chars:
                _check_chars(size)
            state.charge(size)
            return left + right
        _check_binop(operator, left, right)
        result = self.binop_table[operator](left, right)
        if isinstance(result, int) and result.bit_length() > state.limits.max_int_bits:
            raise _limit_error("an integer over the size limit")
        return state.account(result)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        state = _state()
        state.tick()
        if isinstance(obj, LoopContext) and args:
            # loop(children) in a recursive loop iterates again
            args = (_GuardedIterable(args[0]), *args[1:])
        elif isinstance(obj, types.BuiltinMethodType) and isinstance(
            getattr(obj, "__self__", None), (str, bytes, int)
        ):
            args = _check_str_method(obj.__self__, obj.__name__, args, kwargs)
        return state.account(super().call(context, obj, *args, **kwargs))

    def guarded_slice(self, obj: Any, key: slice) -> Any:
        return _account(obj[key])  # a slice is a new string or list

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # jinja's own wrapper, with a formatter that also bounds the size of what it builds
        if not (
            isinstance(value, (types.MethodType, types.BuiltinMethodType))
            and value.__name__ in ("format", "format_map")
            and isinstance(value.__self__, str)
        ):
            return None
        text: str = value.__self__
        is_format_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                args, kwargs = (), args[0]
            if isinstance(text, Markup):
                formatter: string.Formatter = _BoundedEscapeFormatter(self, escape=text.escape)
            else:
                formatter = _BoundedFormatter(self)
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(bounded_format, value)


def _finalize(value: Any) -> Any:
    """Every ``{{ ... }}`` goes through here before jinja calls str() on it: refuse what would print too long."""
    if type(value) is str:
        return value
    size = _text_size(value)
    _check_chars(size, "the text of a value")
    _charge(size)
    return value


@functools.lru_cache(maxsize=1)
def _environment() -> _ChatTemplateEnvironment:
    return _ChatTemplateEnvironment()


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> Any:
    return _environment().from_string(template)


# ------------------------------------------------------------------------------------------------ template data


def _template_data(value: Any) -> Any:
    """A plain copy of what the template will see: JSON-like types only.

    As transformers does, dataclasses and pydantic models become dicts, subclasses of str / int / float (enums,
    numpy scalars) their base type, and anything else a placeholder such as ``"<ndarray>"``: rich objects have
    methods the sandbox does not know to be dangerous. The copy also keeps the caller's data safe from the edits
    below.
    """
    kind = type(value)
    if value is None or kind in (str, int, float, bool):
        return value
    if kind is dict:  # the common cases first: isinstance(value, Mapping) is slow
        return {_template_data(k): _template_data(v) for k, v in value.items()}
    if kind is list:
        return [_template_data(v) for v in value]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(k): _template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_template_data(v) for v in value)
    if kind.__module__ == "numpy" and callable(getattr(value, "item", None)) and not hasattr(value, "shape"):
        return _template_data(value.item())  # numpy scalars (np.bool_ is not an int)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _template_data(value.model_dump())
    return f"<{kind.__name__}>"


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _prepare_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, not {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation: give at least one message")
    prepared = []
    for message in messages:
        message = _template_data(message)
        if not isinstance(message, dict):
            raise TypeError(
                f"chat messages must be dicts, dataclasses or pydantic models, but got {message!r}"
            )
        # Keys set to None are dropped (APIs send content=None, tool_calls=None, which templates print as "None").
        message = {key: value for key, value in message.items() if value is not None}
        # Templates read the reasoning as reasoning_content, gpt-oss ones as thinking: fill both from any name.
        reasoning = next((message[key] for key in _REASONING_KEYS if key in message), None)
        if reasoning is not None:
            aliased = {"thinking": reasoning}
            aliased.update(message)
            aliased["reasoning_content"] = reasoning
            message = aliased
        prepared.append(message)
    return prepared


def _tag_final_message(template: str, messages: list[dict]) -> str:
    """Mark the end of the final message's content, to cut the output there; return the content."""
    final = messages[-1].get("content")
    if final is None:
        raise ValueError('continue_final_message is set but the final message has no "content" to continue!')
    if "content" not in template:
        raise ValueError(
            'continue_final_message is set to "content" but this is not an accepted field in the chat_template'
        )
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:  # the last text block
                final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
                return final
        raise ValueError(
            "continue_final_message is set but we could not find any text to continue in the final message!"
        )
    messages[-1]["content"] = final + _CONTINUE_TAG
    return final


def _cut_after_final_message(rendered: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the chat after applying the "
            "chat template! This can happen if the chat template deletes portions of the final message. Please "
            "verify the chat template and final message in your chat to ensure they are compatible."
            f"Final message to continue: {final.strip()}\nRendered chat:\n{rendered}"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the trailing space, and maybe the message's own


# ------------------------------------------------------------------------------------------------ public API


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    tools: list | None = None,
    documents: list | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    now: datetime | None = None,
    **variables: Any,
) -> str:
    """Render a chat with a Hugging Face chat template, exactly as transformers'
    ``apply_chat_template(..., tokenize=False)`` does. Like transformers, it leaves the shape of the chat to the
    template (which may raise on what it does not support): call `validate_chat` first for clear errors.

    Args:
        template: the Jinja template text (see `select_chat_template`).
        messages: the chat, a list of ``{"role", "content", ...}`` dicts. Keys set to None are dropped, and
            ``reasoning_content`` (or ``thinking`` / ``reasoning``) is passed under both the first two names.
        tools: the tools the model may call: JSON schemas, or Python functions (see ``get_json_schema``).
        documents: ``{"title", "text"}`` dicts for retrieval-augmented templates.
        add_generation_prompt: end with the header that starts the assistant's reply.
        continue_final_message: end right after the final message's content, for the model to continue it.
        now: the time ``strftime_now()`` sees (default: the current local time).
        variables: ``bos_token``, ``eos_token`` and the other special tokens, and any template options such as
            ``enable_thinking=False``.

    Raises:
        jinja2.exceptions.TemplateError: the template failed (`TemplateLimitError` if it went over `LIMITS`),
            or called ``raise_exception``; errors of the template's own making (TypeError, ...) pass through.
        ValueError: the chat is empty, or ``continue_final_message`` cannot apply.
    """
    return _render(
        template,
        messages,
        None,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        now=now,
        **variables,
    )


def _render_with_generation_spans(
    template: str, messages: list[dict], /, **options: Any
) -> tuple[str, list[tuple[int, int]]]:
    """`render_chat_template` (same options), also giving the ``(start, end)`` character span of the output of
    each ``{% generation %}`` block, in the order the blocks ended: what ``return_assistant_tokens_mask`` needs."""
    spans: list[tuple[int, int]] = []
    text = _render(template, messages, spans, **options)
    # continue_final_message cuts the end of the text off: keep the spans within what is left
    end = len(text)
    return text, [(min(start, end), min(stop, end)) for start, stop in spans]


def _render(
    template: str,
    messages: list[dict],
    spans: list[tuple[int, int]] | None,
    /,  # positional only, so that template variables may have any of these names
    *,
    tools: list | None = None,
    documents: list | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    now: datetime | None = None,
    **variables: Any,
) -> str:
    """`render_chat_template`, recording the spans of ``{% generation %}`` blocks into `spans` unless it is None."""
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible: use continue_final_message for "
            "the model to continue the final message, add_generation_prompt for it to start a new assistant message"
        )
    if not isinstance(template, str):
        raise TypeError(f"template must be the template's text, not {type(template).__name__}")
    compiled = _compile(template)
    chat = _prepare_messages(messages)
    if tools is not None:
        tools = [_tool_schema(tool) for tool in tools]
    if documents is not None:
        for document in documents:
            if not isinstance(document, Mapping):
                raise TypeError("documents should be a list of dicts with 'title' and 'text' keys")
    final = _tag_final_message(template, chat) if continue_final_message else None

    state = _RenderState(LIMITS, now, spans=spans)
    token = _STATE.set(state)
    try:
        chunks, total = [], 0
        limit = state.limits.max_chars
        for chunk in compiled.generate(
            messages=chat,
            tools=_template_data(tools),
            documents=_template_data(documents),
            add_generation_prompt=add_generation_prompt,
            **_template_data(variables),
        ):
            total += len(chunk)  # output is streamed, so a runaway template stops before it is all in memory
            if total > limit:
                _check_chars(total, "the output")
            state.output = total  # for {% generation %} blocks: the template resumes only after this
            chunks.append(chunk)
    except RecursionError as error:
        raise _limit_error("the template recursed too deeply") from error
    except MemoryError as error:
        raise _limit_error("the template ran out of memory") from error
    finally:
        _STATE.reset(token)
    rendered = "".join(chunks)
    return rendered if final is None else _cut_after_final_message(rendered, final)


def validate_chat(messages: Any) -> list[dict]:
    """Check that `messages` is a well-formed chat, and return it as a list.

    A chat is a non-empty list (or tuple) of dicts, each with a string ``role`` and a ``content`` that is a
    string, a list of content parts (dicts such as ``{"type": "text", "text": ...}``), or left out / None in a
    message that has ``tool_calls``. Raises ValueError or TypeError naming the problem and the message's index.
    """
    if isinstance(messages, Mapping):
        raise ValueError("a chat is a list of messages, not a single dict: wrap the message in a list")
    if not isinstance(messages, (list, tuple)):
        kind = type(messages).__name__
        raise ValueError(f"a chat must be a list of messages (dicts with 'role' and 'content'), not {kind}")
    if not messages:
        raise ValueError("the chat is empty: give at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"message {i} must be a dict with 'role' and 'content', not {type(message).__name__}: {message!r}"
            )
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role' (such as 'system', 'user' or 'assistant')")
        role = message["role"]
        if not isinstance(role, str):
            raise ValueError(f"message {i} has a 'role' that is not a string: {role!r}")
        content = message.get("content")
        if content is None:
            if not message.get("tool_calls"):
                raise ValueError(
                    f"message {i} ({role}) has no 'content'; only a message with 'tool_calls' may leave it out"
                )
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise TypeError(
                        f"message {i} ({role}): content part {j} must be a dict such as "
                        f"{{'type': 'text', 'text': ...}}, not {type(part).__name__}"
                    )
        elif not isinstance(content, str):
            raise TypeError(
                f"message {i} ({role}) has 'content' of type {type(content).__name__}: it must be a string, a list "
                "of content parts (dicts), or None in a message with 'tool_calls'"
            )
    return list(messages)


# Content parts of other kinds than text (OpenAI's and Anthropic's names), for a clear refusal: chatlm's models
# read text.
_MEDIA_PARTS = {
    "image_url": "an image",
    "image": "an image",
    "input_image": "an image",
    "input_audio": "audio",
    "audio": "audio",
    "video": "a video",
    "video_url": "a video",
    "file": "a file",
    "input_file": "a file",
    "document": "a document",
}


@functools.lru_cache(maxsize=64)
def iterates_content_parts(template: str) -> bool:
    """Whether the template loops over a message's ``content`` itself (as Gemma 3's does, for parts): such a
    template gets content parts as they are; others get their text joined (see `text_content_parts`)."""

    def names_content(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Getattr):
            return node.attr == "content"
        return (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and node.arg.value == "content"
        )

    for loop in _environment().parse(template).find_all(nodes.For):
        if names_content(loop.iter) or any(
            names_content(n) for n in loop.iter.find_all((nodes.Getattr, nodes.Getitem))
        ):
            return True
    return False


def text_content_parts(template: str, messages: list[dict]) -> list[dict]:
    """The chat with each message's content parts as a text model's template takes them: the text parts joined
    with newlines into a string (as OpenAI's and vLLM's servers do for text-only models), or, for a template that
    loops over parts itself, the text parts as they are. A part of another kind (an image, audio) or a malformed
    one is a ValueError that names it."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind in _MEDIA_PARTS:
                raise ValueError(
                    f"message {i} ({message.get('role')}): content part {j} is {_MEDIA_PARTS[kind]} ({kind!r}), "
                    "and this model reads text only"
                )
            if kind not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"message {i} ({message.get('role')}): content part {j} must be "
                    f"{{'type': 'text', 'text': '...'}}, not {part!r}"
                )
            texts.append(part["text"])
        if iterates_content_parts(template):
            parts = [{"type": "text", "text": text} for text in texts]
            out.append({**message, "content": parts})
        else:
            out.append({**message, "content": "\n".join(texts)})
    return out


def _tool_schema(tool: Any) -> Mapping:
    """A tool as the template sees it: a JSON schema as given, or one built from a Python function."""
    if isinstance(tool, Mapping):
        return tool
    if callable(tool):
        from .tool_schema import get_json_schema

        return get_json_schema(tool)
    raise ValueError(
        f"tools must be JSON schemas (dicts) or Python functions, but got {type(tool).__name__}: {tool!r}"
    )


def select_chat_template(
    chat_template: str | dict | list | None, template_name_or_text: str | None, tools: Any
) -> str:
    """Choose the template text as transformers does.

    `chat_template` is what the model stores: one template, or several named ones (a dict, or the
    ``[{"name", "template"}]`` list of tokenizer_config.json). `template_name_or_text` is the caller's choice: the
    name of one of those, or else a template text itself. Without a choice: the ``tool_use`` template when `tools`
    is not None and there is one, else ``default``.
    """
    if isinstance(chat_template, (list, tuple)):
        chat_template = {entry["name"]: entry["template"] for entry in chat_template}
    if isinstance(chat_template, dict) and chat_template:
        if template_name_or_text is not None:
            return chat_template.get(template_name_or_text, template_name_or_text)
        if tools is not None and "tool_use" in chat_template:
            return chat_template["tool_use"]
        if "default" in chat_template:
            return chat_template["default"]
        raise ValueError(
            "this model has several chat templates and none is named 'default': pass the name of the one to use "
            f"(chat_template=...), one of {sorted(chat_template)}"
        )
    if template_name_or_text is not None:
        return template_name_or_text
    if isinstance(chat_template, str):
        return chat_template
    raise ValueError(
        "this model's tokenizer has no chat template, so it cannot format a chat: pass a template "
        "(chat_template=...), or give the model a plain string prompt instead of a list of messages"
    )
