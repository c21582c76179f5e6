"""One chat request on the engine, for every API that speaks chat (OpenAI's chat completions and Responses,
Anthropic's Messages): the turn rendered (`ChatTurn`), the reply held to its constraints (a JSON schema, a forced
tool call, a reasoning budget), fitted to the context window and submitted; the reply comes back parsed
(content, reasoning, tool calls) step by step (`ChatRun.steps`) or whole (`ChatRun.replies`). The endpoints only
translate their request into a `ChatRequest` and these results into their own shapes."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..chat_turn import ChatTurn, UnsupportedToolChoice, json_start
from ..generation import grammar
from ..generation.sampling import TokenLogprob
from ..generation.thinking import reply_constraint
from ..reply_parsing import ReplyDelta
from .protocol import APIError, ChatRequest
from .server import Job, Server


@dataclass
class ReplyStep:
    """What one choice produced since its last step: parsed pieces (content, reasoning or a whole tool call),
    the tokens spent (and how many of them thinking), log-probabilities, and at the end the engine's finish
    reason ("stop", "length", "cancelled")."""

    index: int
    pieces: list[ReplyDelta]
    tokens: int
    reasoning_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop: str | None = None  # the stop string the reply ended at


@dataclass
class Reply:
    """One choice's whole reply: the assistant message's parts and what it cost."""

    content: str = ""
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(
        default_factory=list
    )  # the parser's: {"name", "arguments": dict}
    finish_reason: str = "cancelled"
    stop: str | None = None  # the stop string the reply ended at
    tokens: int = 0
    reasoning_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class ChatRun:
    """A `ChatRequest` rendered, constrained, fitted and submitted (errors of any of these are `APIError`s)."""

    def __init__(self, server: Server, req: ChatRequest):
        self.server, self.req = server, req
        self.turn = render_turn(server.tokenizer, req)
        _constrain(server, req, self.turn)
        self.prompt = self.turn.prompt_ids
        server.fit(req.params, req.max_tokens_given, len(self.prompt))
        # markers such as <|python_tag|> may be special tokens: a reply to parse keeps them
        self.job = Job(server.engine, self.prompt, req.params, req.n, skip_special=not self.turn.parses_reply)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def cached_tokens(self) -> int:
        return self.job.request.cached_tokens

    async def steps(self, http: Request | None = None) -> AsyncIterator[ReplyStep]:
        """The choices' replies as they come (with ``http``, a client that went away cancels the generation)."""
        parsers = [self.turn.reply_stream() if self.turn.parses_reply else None for _ in range(self.req.n)]
        async for delta in self.job.deltas(http):
            parser = parsers[delta.index]
            if parser is None:
                pieces = [ReplyDelta(content=delta.text)] if delta.text else []
                thinking = False
            else:
                before = parser.in_reasoning
                pieces = parser.feed(delta.text)
                if delta.finish_reason:
                    pieces += parser.finish()
                # tokens written inside the section, or opening or closing it (its tags count as thinking)
                thinking = before or parser.in_reasoning
            tokens = len(delta.token_ids)
            yield ReplyStep(
                delta.index,
                pieces,
                tokens,
                tokens if thinking or any(p.reasoning_content for p in pieces) else 0,
                delta.logprobs or None,
                delta.finish_reason,
                delta.stop,
            )

    async def replies(self, http: Request | None = None) -> list[Reply]:
        """Every choice's whole reply (a client that leaves cancels them)."""
        replies = [Reply() for _ in range(self.req.n)]
        reasoning: list[list[str]] = [[] for _ in range(self.req.n)]
        async for step in self.steps(http):
            reply = replies[step.index]
            reply.tokens += step.tokens
            reply.reasoning_tokens += step.reasoning_tokens
            reply.logprobs += step.logprobs or []
            for piece in step.pieces:
                reply.content += piece.content
                if piece.reasoning_content:
                    reasoning[step.index].append(piece.reasoning_content)
                if piece.tool_call:
                    reply.tool_calls.append(piece.tool_call)
            if step.finish_reason:
                reply.finish_reason, reply.stop = step.finish_reason, step.stop
        for reply, parts in zip(replies, reasoning):
            reply.reasoning = "".join(parts) if parts else None
        return replies

    def cancel(self) -> None:
        if self.job.open:
            self.server.engine.cancel(self.job.request)


def render_turn(tokenizer, req: ChatRequest) -> ChatTurn:
    """The request's prompt and reply format; what the template or the model cannot do is a 400."""
    try:
        return ChatTurn.render(
            tokenizer,
            req.messages,
            tools=req.tools,
            tool_choice=req.tool_choice,
            json_object=req.json_object,
            template_kwargs=req.template_kwargs,
            continue_final_message=req.continue_final,
        )
    except UnsupportedToolChoice as e:
        raise APIError(400, str(e), param="tool_choice", code="unsupported") from e
    except (ValueError, TypeError) as e:
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e


def _constrain(server: Server, req: ChatRequest, turn: ChatTurn) -> None:
    """The reply's constraint: a grammar (a JSON schema, a JSON object, or a forced tool call that goes on with
    the JSON the prompt began), and for a reasoning model the thinking section before it (with its budget). A
    schema the grammar engine cannot compile is a 400 that says why, never an unconstrained reply."""
    answer = _answer_grammar(server, req, turn)
    vocab = server.model.config.vocab_size
    req.params.constraint = reply_constraint(turn, server.tokenizer, vocab, req.reasoning_budget, answer)


def _answer_grammar(server: Server, req: ChatRequest, turn: ChatTurn):
    """The per-row grammar constraint factory of the answer (None: a free answer)."""
    if turn.forced:
        syntax = turn.reply_format.tool_calls
        begun = server.tokenizer(turn.json_prefix, add_special_tokens=False)["input_ids"]
        many = turn.json_prefix.startswith("[")
        schema = grammar.tool_call_schema(req.tools, syntax.arguments_key, many)
        if not any(_strict(t) for t in req.tools):
            # OpenAI holds only strict tools' arguments to their schemas: a schema the engine cannot compile
            # leaves the others' arguments any JSON object (a strict one's is a 400)
            try:
                _grammar(server, schema, "tools")
            except APIError:
                schema = grammar.tool_call_schema(req.tools, syntax.arguments_key, many, free_arguments=True)
        return _grammar(server, schema, "tools", begun)
    if req.tools and any(_strict(t) for t in req.tools):
        if req.json_schema is not None or req.json_object:
            raise APIError(
                400,
                "response_format 'json_object' or 'json_schema' together with strict tools is not supported yet",
                param="response_format",
                code="unsupported",
            )
        return _strict_tools_grammar(server, req, turn)
    if req.json_schema is None and not req.json_object:
        return None
    if turn.reply_format.tool_calls is not None and req.tools:
        raise APIError(
            400,
            "response_format 'json_object' or 'json_schema' together with tools is not supported yet: the reply "
            "could not call them",
            param="response_format",
            code="unsupported",
        )
    schema = req.json_schema if req.json_schema is not None else {"type": "object"}
    return _grammar(server, schema, "response_format")


def _strict_tools_grammar(server: Server, req: ChatRequest, turn: ChatTurn):
    """tool_choice "auto" with strict tools: free text, or calls whose arguments follow the strict tools'
    parameter schemas, in the model's own tool-call syntax."""
    syntax = turn.reply_format.tool_calls
    if syntax is None or syntax.forced_opening is None:
        kind = syntax.name if syntax else "none"
        raise APIError(
            400,
            f"strict tools need a model whose tool calls chatlm can hold to their schemas; this model's format "
            f"is {kind!r} (leave 'strict' out)",
            param="tools",
            code="unsupported",
        )
    json_part = json_start(syntax.forced_opening)
    opening = syntax.forced_opening[: len(syntax.forced_opening) - len(json_part)]
    vocab, eos = server.model.config.vocab_size, list(server.engine.eos)
    try:
        engine_tok = grammar.engine_tokenizer(server.tokenizer, eos, vocab)
        text = grammar.tool_reply_grammar(
            engine_tok,
            req.tools,
            opening,
            json_part.startswith("["),
            syntax.arguments_key,
            syntax.open if opening else None,
            syntax.close,
        )
        compiled = grammar.lark_grammar(text, engine_tok)
    except grammar.GrammarError as e:
        raise APIError(400, str(e), param="tools", code="invalid_json_schema") from e
    return functools.partial(grammar.GrammarConstraint, engine_tok, compiled, vocab, eos)


def _strict(tool: Any) -> bool:
    return isinstance(tool, dict) and bool((tool.get("function") or {}).get("strict"))


def _grammar(server: Server, schema, param: str, begun: list[int] | None = None):
    vocab, eos = server.model.config.vocab_size, list(server.engine.eos)
    try:
        engine_tok = grammar.engine_tokenizer(server.tokenizer, eos, vocab)
        compiled = grammar.json_schema_grammar(schema, engine_tok)
    except grammar.GrammarError as e:
        raise APIError(400, str(e), param=param, code="invalid_json_schema") from e
    return functools.partial(grammar.GrammarConstraint, engine_tok, compiled, vocab, eos, begun or ())
