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

from ..chat_turn import ChatTurn, UnsupportedToolChoice
from ..generation import grammar
from ..generation.sampling import TokenLogprob
from ..reply_parsing import ReplyDelta
from .json_mode import JsonConstraint
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


@dataclass
class Reply:
    """One choice's whole reply: the assistant message's parts and what it cost."""

    content: str = ""
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(
        default_factory=list
    )  # the parser's: {"name", "arguments": dict}
    finish_reason: str = "cancelled"
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
                reply.finish_reason = step.finish_reason
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
        )
    except UnsupportedToolChoice as e:
        raise APIError(400, str(e), param="tool_choice", code="unsupported") from e
    except (ValueError, TypeError) as e:
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e


def _constrain(server: Server, req: ChatRequest, turn: ChatTurn) -> None:
    """What constrained decoding needs from the turn: a JSON reply (json_object, or a forced tool call that goes
    on with the JSON the prompt began), or a reply held to a JSON schema."""
    if turn.json_reply:
        req.params.constraint = functools.partial(
            JsonConstraint,
            server.tokenizer,
            server.engine.eos,
            turn.json_prefix,
            turn.json_starts,
            not turn.parses_reply,  # the text the JSON is read from skips special tokens as the reply's does
        )
    if req.json_schema is not None:
        _constrain_to_schema(server, req, turn)


def _constrain_to_schema(server: Server, req: ChatRequest, turn: ChatTurn) -> None:
    """response_format json_schema: the reply is held to the schema by the grammar engine; a schema it cannot
    compile is a 400 that says why (never an unconstrained reply)."""
    if turn.parses_reply:
        raise APIError(
            400,
            "response_format 'json_schema' together with tools (or a reasoning model's reply format) is not "
            "supported yet",
            param="response_format",
            code="unsupported",
        )
    vocab, eos = server.model.config.vocab_size, list(server.engine.eos)
    try:
        engine_tok = grammar.engine_tokenizer(server.tokenizer, eos, vocab)
        compiled = grammar.json_schema_grammar(req.json_schema, engine_tok)
    except grammar.GrammarError as e:
        raise APIError(400, str(e), param="response_format", code="invalid_json_schema") from e
    req.params.constraint = functools.partial(grammar.GrammarConstraint, engine_tok, compiled, vocab, eos)


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def thinking_kwargs(enabled: bool | None = None, effort: str | None = None) -> dict[str, Any]:
    """The template variables that turn a model's thinking on or off, under the names the templates read:
    ``enable_thinking`` (Qwen3, SmolLM3), ``thinking`` (DeepSeek-V3.1, Granite 3.3) and ``reasoning_effort``
    (gpt-oss). ``effort`` "none" turns thinking off; a template that reads none of them renders as before."""
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, not {effort!r}")
    if effort == "none":
        enabled = False
    out: dict[str, Any] = {}
    if enabled is not None:
        out["enable_thinking"] = out["thinking"] = enabled
    if effort not in (None, "none"):
        out["reasoning_effort"] = effort
    return out
