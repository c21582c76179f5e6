"""The command line: ``chatlm chat [MODEL]`` (interactive), ``chatlm run [MODEL] PROMPT`` (one shot) and
``chatlm doctor [MODEL]`` (checks a model's chat template, tokenizer and stop tokens), ``chatlm info [MODEL]``
(parameters, memory, KV cache and speed estimates, read off the files without loading the weights) and
``chatlm bench [MODEL]`` (load time, prefill and decode speed, memory and bandwidth use, perplexity) and
``chatlm serve [MODEL]`` (an OpenAI-compatible HTTP server with continuous batching)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable

from . import cli_models

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int8", "int4", "gguf")  # bench.QUANTIZATIONS (not imported: torch is slow)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("chatlm")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatlm", description="Chat with open models on your own hardware.")
    parser.add_argument("--version", action="version", version=f"chatlm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def weights(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
        p.add_argument(
            "--quantization",
            choices=QUANTIZATIONS,
            default="auto",
            help="weights on the CPU: gguf keeps a GGUF file's own blocks (Q4_K, Q6_K, Q8_0, ...), int8 / int4 "
            "quantize, none loads floats (default auto: gguf for a GGUF file, else none)",
        )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--system", help="a system message to start the chat with")
        p.add_argument(
            "--max-new-tokens", type=_positive_int, default=512, help="reply length limit (default 512)"
        )
        p.add_argument(
            "--temperature",
            type=_non_negative_float,
            default=None,
            help="sampling temperature; 0 decodes greedily (default: the model's own; else 0.7 in a chat, 0 for "
            "run)",
        )
        p.add_argument(
            "--top-p",
            type=_probability,
            default=None,
            help="nucleus sampling threshold (default 0.9 in a chat)",
        )
        p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
        p.add_argument(
            "--think",
            choices=("on", "off"),
            default=None,
            help="a reasoning model's thinking on or off (default: its template's default; /think in a chat)",
        )
        p.add_argument(
            "--reasoning-budget",
            type=_non_negative_int,
            default=None,
            metavar="N",
            help="a reasoning model thinks N tokens at most, then answers",
        )
        weights(p)
        p.add_argument(
            "--prompt-lookup",
            type=_positive_int,
            default=None,
            metavar="N",
            help="speculative decoding: guess N tokens from the chat so far (the same replies, faster when they quote)",
        )
        p.add_argument(
            "--draft", default=None, metavar="MODEL", help="speculative decoding with a smaller draft model"
        )
        cache_ram(p)
        p.add_argument(
            "--verbose",
            action="store_true",
            help="after each reply: prompt tokens reused from the cache, speed",
        )

    def cache_ram(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--cache-ram",
            type=_non_negative_int,
            default=1024,
            metavar="MIB",
            help="memory for keys and values kept across turns and requests, so that a prompt that starts as an "
            "earlier one did computes only the rest (default 1024 MiB; 0 turns it off)",
        )

    chat = sub.add_parser(
        "chat",
        help="an interactive chat (/reset starts over, /save FILE and /load FILE keep it, /exit quits)",
    )
    chat.add_argument(
        "model", nargs="?", help="local directory, .gguf file or Hub id (default: the bundled model)"
    )
    chat.add_argument(
        "--save",
        metavar="FILE",
        help="resume the chat kept in FILE (if it exists) and keep it there after every turn, with its cache "
        "when the model is the same",
    )
    common(chat)
    chat.set_defaults(func=cmd_chat)

    run = sub.add_parser("run", help="answer one prompt and exit (for scripts); with only a model, a chat")
    run.add_argument(
        "model_and_prompt",
        nargs="+",
        metavar="[MODEL] PROMPT",
        help="an optional model, then the prompt ('-' reads it from standard input)",
    )
    run.add_argument(
        "--raw",
        action="store_true",
        help="the prompt as plain text, without the chat template (base models, template-less files)",
    )
    run.add_argument(
        "--json-schema",
        metavar="FILE",
        help="hold the answer to the JSON schema in FILE (a grammar engine masks every step)",
    )
    common(run)
    run.set_defaults(func=cmd_run)

    doctor = sub.add_parser(
        "doctor", help="check a model's chat template, tokenizer and stop tokens (exit code 1 on a problem)"
    )
    doctor.add_argument(
        "model", nargs="?", help="local directory, .gguf file or Hub id (default: the bundled model)"
    )
    doctor.add_argument("--strict", action="store_true", help="exit with code 1 on warnings too")
    doctor.set_defaults(func=cmd_doctor)

    info = sub.add_parser(
        "info", help="parameters, memory, KV cache and decode speed estimate, without loading"
    )
    info.add_argument(
        "model", nargs="?", help="local directory, .gguf file or cached Hub id (default: the bundled model)"
    )
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.add_argument(
        "--context",
        type=_positive_int,
        default=1000,
        help="tokens of KV cache in the speed estimate (default 1000)",
    )
    info.add_argument(
        "--dtype", choices=DTYPES[1:], default=None, help="the KV cache's dtype (default: the model's)"
    )
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench", help="load time, prefill and decode speed, memory, bandwidth use (and perplexity: --quality)"
    )
    bench.add_argument(
        "model", nargs="?", help="local directory, .gguf file or Hub id (default: the bundled model)"
    )
    bench.add_argument(
        "--dtype", choices=DTYPES[1:], default="float32", help="weights' dtype (default float32)"
    )
    bench.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="auto",
        help="weight quantization (default auto: a GGUF file's own blocks, else none)",
    )
    bench.add_argument("--prompt-tokens", type=_positive_int, default=500, help="prompt length (default 500)")
    bench.add_argument(
        "--new-tokens", type=_positive_int, default=128, help="tokens to decode, at least 2 (default 128)"
    )
    bench.add_argument(
        "--repeats", type=_positive_int, default=3, help="timed runs; the best counts (default 3)"
    )
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    bench.add_argument("--quality", action="store_true", help="also the perplexity on a shipped English text")
    bench.add_argument("--window", type=_positive_int, default=None, help="perplexity window (default 1024)")
    bench.add_argument(
        "--stride", type=_positive_int, default=None, help="perplexity stride (default window/2)"
    )
    bench.add_argument("--json", action="store_true", help="print machine-readable JSON")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser(
        "serve", help="an OpenAI-compatible server (/v1/chat/completions, /v1/completions)"
    )
    serve.add_argument(
        "model", nargs="?", help="local directory, .gguf file or Hub id (default: the bundled model)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("CHATLM_API_KEY"),
        help="require this bearer key (or $CHATLM_API_KEY)",
    )
    serve.add_argument(
        "--max-batch", type=_positive_int, default=16, help="sequences decoded together (default 16)"
    )
    serve.add_argument(
        "--max-queue",
        type=_positive_int,
        default=64,
        help="requests that may wait; more get 429 (default 64)",
    )
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API")
    serve.add_argument(
        "--quiet", action="store_true", help="no line per request (endpoint, status, tokens, speed) on stderr"
    )
    serve.add_argument("--no-web", action="store_true", help="no chat page at / (the API only)")
    serve.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="open connections at most; more get 503 (default 4096, less if the file limit is lower)",
    )
    serve.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request's headers (default 10)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds requests in flight get to finish before they are ended (default 30)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API from a browser; repeatable "
        "(default: none)",
    )
    cache_ram(serve)
    weights(serve)
    serve.set_defaults(func=cmd_serve)
    cli_models.add_commands(sub)  # pull, list, rm
    return parser


def _convert(text: str, kind: type, what: str):
    # argparse would name the function in its message ("invalid _positive_int value"): say what is wanted
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None


def _positive_int(text: str) -> int:
    value = _convert(text, int, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _convert(text, int, "a whole number, 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _port(text: str) -> int:
    value = _convert(text, int, "a port number (0-65535)")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _convert(text, float, "a number, 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = _convert(text, float, "a number over 0")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number over 0, not {text!r}")
    return value


def _probability(text: str) -> float:
    value = _convert(text, float, "a number over 0 and at most 1")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be over 0 and at most 1, not {text}")
    return value


def _load_model(model_ref: str | None, args: argparse.Namespace, tensor_parallel: bool):
    """The model as --dtype, --device and --quantization say (split over torchrun's ranks if asked)."""
    from .auto import AutoModelForCausalLM
    from .bench import quantization_config

    quantization = args.quantization
    if quantization == "auto" and tensor_parallel:
        quantization = "none"  # GGUF blocks as stored do not split over ranks (yet)
    return AutoModelForCausalLM.from_pretrained(
        model_ref,
        torch_dtype=args.dtype,
        device_map=args.device,
        quantization_config=quantization_config(quantization, model_ref, args.device),
        tp_plan="auto" if tensor_parallel else None,
    )


class Session:
    """A loaded model and tokenizer plus the chat so far."""

    def __init__(self, model_ref: str | None, args: argparse.Namespace):
        from .tokenizer import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_ref)
        if self.tokenizer.chat_template is None:  # said before the weights load
            raise ValueError(
                f"{model_ref or 'the model'} has no chat template; use `chatlm run --raw` with plain text"
            )
        if args.prompt_lookup and args.draft:
            raise ValueError("choose one of --prompt-lookup and --draft")
        self.model_ref = model_ref
        self.model = _load_model(model_ref, args, tensor_parallel=_distributed())
        _sampling_defaults(args, self.model.generation_config)
        self.draft = None
        if args.draft:
            self.draft = _load_model(args.draft, args, tensor_parallel=False)  # whole on every rank
        self.system, self.args = args.system, args
        self.think = {"on": True, "off": False, None: None}[getattr(args, "think", None)]
        from .chat_turn import reply_format_for

        wants_thinking = self.think is not None or getattr(args, "reasoning_budget", None) is not None
        if wants_thinking and reply_format_for(self.tokenizer).reasoning is None:
            raise ValueError(
                "--think and --reasoning-budget need a reasoning model: this chat template has no thinking section"
            )
        from .generation.prefix_cache import PrefixCache

        self.prefix_cache = PrefixCache(args.cache_ram << 20)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = []  # the chat's tokens as last computed, whose keys and values may be cached

    def set_system(self, text: str) -> None:
        """A new system prompt, the chat kept."""
        self.system = text
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})

    def set_thinking(self, on: bool) -> None:
        from .chat_turn import reply_format_for

        if reply_format_for(self.tokenizer).reasoning is None:
            raise ValueError("/think: this model's chat template has no thinking section")
        self.think = on

    def describe(self) -> str:
        """/model: the model, its size, weights and context window."""
        from .loading.resolve import BUNDLED_NAME

        config = self.model.config
        quantization = getattr(self.model, "quantization_config", None)
        weights = f"{self.model.dtype}".replace("torch.", "")
        if quantization is not None:
            kind = (
                "GGUF blocks as stored"
                if quantization.keep_gguf_blocks
                else "int8"
                if quantization.load_in_8bit
                else "int4"
            )
            weights = f"{kind}, computing in {weights}"
        return (
            f"{self.model_ref or BUNDLED_NAME}: {config.model_type}, {config.num_hidden_layers} layers of "
            f"{config.hidden_size}; weights {weights}; context window {config.max_position_embeddings} tokens; "
            f"temperature {self.args.temperature}, top_p {self.args.top_p}, max_tokens {self.args.max_new_tokens}"
        )

    def _fit_context(self, turn_of):
        """The turn of the chat so far, the oldest turns dropped (the system prompt kept) until its prompt
        leaves room for a reply; said, never silent. A message that cannot fit even alone is a ValueError (it is
        taken back)."""
        context = self.model.config.max_position_embeddings
        room = min(self.args.max_new_tokens, max(context // 4, 1))
        turn = turn_of()
        dropped = 0
        while len(turn.prompt_ids) + room > context:
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                self.messages.pop()
                raise ValueError(
                    f"this message ({len(turn.prompt_ids)} tokens with the system prompt) leaves no room for a "
                    f"reply in the context window of {context} tokens; it was not sent"
                )
            # drop the oldest exchange: its user message and what follows up to the next one
            end = first + 1
            while end < len(self.messages) - 1 and self.messages[end]["role"] != "user":
                end += 1
            dropped += end - first
            del self.messages[first:end]
            turn = turn_of()
        if dropped:
            print(
                f"(the chat outgrew the context window of {context} tokens: the {dropped} oldest messages were "
                "dropped, the system prompt kept)",
                file=sys.stderr,
            )
        return turn

    def save(self, path: str) -> int:
        """Keep the chat in ``path`` with the keys and values of its tokens (not under tensor parallelism, where
        each rank holds a share of them); how many tokens of them were saved."""
        from .generation.chat_file import save_chat

        cache = None if _distributed() else self.prefix_cache
        return save_chat(path, self.messages, self.model, cache, self.ids)

    def load(self, path: str):
        """Continue the chat kept in ``path`` (`chat_file.LoadedChat`: its cache restored, or why not)."""
        from .generation.chat_file import load_chat

        loaded = load_chat(path, self.model, None if _distributed() else self.prefix_cache)
        self.messages, self.ids = loaded.messages, loaded.ids
        return loaded

    def reply(
        self,
        user_text: str,
        on_text: Callable[[str], None],
        on_reasoning: Callable[[str], None] | None = None,
    ) -> str:
        """Answer `user_text`, streaming the answer to `on_text` and the model's reasoning (if its template has
        any) to `on_reasoning`; the chat keeps the parsed message, reasoning apart from content."""
        import torch

        from .chat_turn import ChatTurn, thinking_kwargs

        self.messages.append({"role": "user", "content": user_text})
        turn = self._fit_context(
            lambda: ChatTurn.render(
                self.tokenizer, self.messages, template_kwargs=thinking_kwargs(enabled=self.think)
            )
        )
        ids = torch.tensor([turn.prompt_ids])
        parser = turn.reply_stream() if turn.parses_reply else None
        streamer = _callback_streamer(
            self.tokenizer, on_text, on_reasoning, parser, self.model.generation_config
        )
        sampling = self.args.temperature > 0
        options = {"do_sample": sampling}
        if sampling:
            options.update(temperature=self.args.temperature, top_p=self.args.top_p or 1.0)
        constraint = self._constraint(turn)
        if constraint is not None:
            options["constraint"] = constraint
        if self.args.prompt_lookup:
            options["prompt_lookup_num_tokens"] = self.args.prompt_lookup
        elif self.draft is not None:
            options["assistant_model"] = self.draft
        seed = self.args.seed
        if _distributed():  # every rank draws the same tokens from the same logits: one seed for all
            seed = _from_rank0(seed if seed is not None else secrets.randbits(31))
        if seed is not None:
            from .utils import set_seed

            set_seed(seed)
        prompt = turn.prompt_ids
        cache = self.prefix_cache.fetch(self.model, prompt, limit=len(prompt) - 1)
        reused, started = cache.offset, time.perf_counter()
        room = self.model.config.max_position_embeddings - len(prompt)
        output = self.model.generate(
            ids.to(self.model.device),
            max_new_tokens=min(self.args.max_new_tokens, room),
            streamer=streamer,
            past_key_values=cache,
            **options,
        )
        elapsed = time.perf_counter() - started
        self.prefix_cache.insert_cache(cache)
        self.ids = cache.tokens()
        if parser is not None:
            message = parser.message
        else:
            text = self.tokenizer.decode(output[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            message = {"role": "assistant", "content": text}
        self.messages.append(message)
        speculative = "prompt_lookup_num_tokens" in options or "assistant_model" in options
        stats = self.model.last_speculation if speculative else None
        if stats is not None and sys.stderr.isatty():  # on a terminal: how much the guessing helped
            print(
                f"\n\033[2m(speculation: {stats.accepted} of {stats.proposed} guesses accepted)\033[0m",
                file=sys.stderr,
                end="",
            )
        if self.args.verbose:
            new = output.shape[1] - len(prompt)
            print(
                f"\n(prompt {len(prompt)} tokens, {reused} reused from the cache; reply {new} tokens in "
                f"{elapsed:.2f} s, {new / max(elapsed, 1e-9):.1f} tokens/s)",
                file=sys.stderr,
                end="",
            )
        return message["content"]

    def _constraint(self, turn):
        """The reply's constraint: ``--json-schema`` (`chatlm run`) holds the answer, ``--reasoning-budget``
        the thinking before it (None: neither)."""
        from .generation.generate import response_format_constraint
        from .generation.thinking import reply_constraint

        schema = getattr(self.args, "schema", None)
        answer = None
        if schema is not None:
            response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
            config = self.model.generation_config
            answer = response_format_constraint(self.model, config, response_format, self.tokenizer)
        vocab = self.model.config.vocab_size
        return reply_constraint(turn, self.tokenizer, vocab, self.args.reasoning_budget, answer)


def _sampling_defaults(args: argparse.Namespace, generation_config) -> None:
    """Sampling options left unset: the model's own (its generation_config, as transformers' pipeline does) for
    a chat, else temperature 0.7 and top_p 0.9; greedy for `chatlm run` (a script's reply is reproducible)."""
    if args.temperature is not None:
        return
    if args.command == "run":
        args.temperature = 0.0
    elif generation_config.do_sample:
        args.temperature = generation_config.temperature if generation_config.temperature is not None else 1.0
        args.top_p = args.top_p if args.top_p is not None else generation_config.top_p
    else:
        args.temperature = 0.7
        args.top_p = args.top_p if args.top_p is not None else 0.9


def _callback_streamer(tokenizer, on_text, on_reasoning, parser, generation_config):
    """A streamer that hands each piece of the reply to ``on_text``; with a reply parser, the reasoning goes to
    ``on_reasoning`` and tool calls are shown as lines."""
    from .generation.streamers import TextStreamer, _ids

    if parser is None:

        class Plain(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        return Plain(tokenizer, skip_prompt=True, skip_special_tokens=True)

    stops = set(generation_config.eos_token_ids)

    class Parsed(TextStreamer):
        # special tokens are kept (markers such as <|python_tag|> are special), stop tokens are not text
        def put(self, value) -> None:
            if self.next_tokens_are_prompt:
                super().put(value)
            else:
                super().put([t for t in _ids(value) if t not in stops])

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            deltas = parser.feed(text) + (parser.finish() if stream_end else [])
            for delta in deltas:
                if delta.reasoning_content and on_reasoning is not None:
                    on_reasoning(delta.reasoning_content)
                if delta.content:
                    on_text(delta.content)
                if delta.tool_call:
                    function = delta.tool_call["function"]
                    on_text(f"\n[tool call] {function['name']}({json.dumps(function['arguments'])})\n")

    return Parsed(tokenizer, skip_prompt=True, skip_special_tokens=False)


def _distributed() -> bool:
    """Under torchrun with several ranks: the model is split over them (rank 0 talks to the user, the others
    follow and compute their share)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _from_rank0(value):
    """Rank 0's value, on every rank (a prompt, a chat message, a seed)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat_repl import follow, run_chat

    session = Session(args.model, args)
    share = _from_rank0 if _distributed() else (lambda text: text)
    if _distributed() and _rank() != 0:
        return follow(session, share)
    try:
        return run_chat(session, share, _write, _write_reasoning)
    finally:
        if _distributed():
            share(None)  # the followers stop too


def cmd_run(args: argparse.Namespace) -> int:
    parts = args.model_and_prompt
    if len(parts) > 2:
        raise ValueError("give at most a model and one prompt (quote the prompt)")
    if len(parts) == 1 and _names_a_model(parts[0]):  # `chatlm run MODEL`: a chat, as `ollama run` opens one
        if args.raw or args.json_schema:
            raise ValueError("--raw and --json-schema answer one prompt: give the prompt after the model")
        args.model, args.command, args.save = parts[0], "chat", None
        return cmd_chat(args)
    model_ref, prompt = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
    if prompt == "-" and _rank() == 0:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    args.schema = _read_schema(args.json_schema) if args.json_schema else None
    if args.raw:
        return _run_raw(model_ref, prompt, args)
    session = Session(model_ref, args)
    if _distributed():  # rank 0 read the prompt; the others compute their share of the same reply, silently
        prompt = _from_rank0(prompt)
        if _rank() != 0:
            session.reply(prompt, lambda _: None, lambda _: None)
            return 0
    session.reply(prompt, _write, _write_reasoning)
    print(flush=True)
    return 0


def _names_a_model(text: str) -> bool:
    """Whether `chatlm run`'s one argument is a model rather than a prompt: a file or folder that exists, the
    bundled model's name, or a Hub id (ORG/NAME, with a :QUANT tag or not)."""
    import re

    from .loading.resolve import BUNDLED_NAME

    return (
        os.path.exists(text)
        or text == BUNDLED_NAME
        or re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", text) is not None
    )


def _run_raw(model_ref: str | None, prompt: str, args: argparse.Namespace) -> int:
    """`chatlm run --raw`: the prompt as plain text, no chat template (base models, template-less GGUFs)."""
    from .generation.streamers import TextStreamer
    from .tokenizer import AutoTokenizer

    if args.schema is not None or args.think or args.reasoning_budget is not None:
        raise ValueError("--raw takes no --json-schema, --think or --reasoning-budget")
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    model = _load_model(model_ref, args, tensor_parallel=False)
    _sampling_defaults(args, model.generation_config)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    options = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        options.update(temperature=args.temperature, top_p=args.top_p or 1.0)
    room = model.config.max_position_embeddings - ids.shape[1]
    if room < 1:
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) fills the context window")

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            _write(text)

    model.generate(
        ids.to(model.device),
        max_new_tokens=min(args.max_new_tokens, room),
        streamer=Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        **options,
    )
    print(flush=True)
    return 0


def _read_schema(path: str) -> dict | bool:
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the JSON schema {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{path} holds no JSON schema (an object)")
    return schema


def cmd_doctor(args: argparse.Namespace) -> int:
    # Only the tokenizer and the stop tokens are read: no weights, so it is quick even for big models.
    from .doctor import diagnose, exit_code, format_report, load_for_doctor
    from .loading.resolve import BUNDLED_NAME

    tokenizer, generation_config = load_for_doctor(args.model)
    findings = diagnose(tokenizer, generation_config)
    print(format_report(findings, args.model or BUNDLED_NAME))
    return exit_code(findings, strict=args.strict)


def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, model_info

    info = model_info(args.model, dtype=args.dtype, context_tokens=args.context)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_bench, run_bench

    def progress(line: str) -> None:
        if sys.stderr.isatty():
            print(f"chatlm bench: {line}", file=sys.stderr, flush=True)

    result = run_bench(
        args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        quality=args.quality,
        window=args.window,
        stride=args.stride,
        threads=args.threads,
        device=args.device,
        progress=progress,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_bench(result))
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _write_reasoning(text: str) -> None:
    """The model's reasoning goes to stderr (dimmed on a terminal), so that stdout holds only the answer."""
    dim = sys.stderr.isatty()
    sys.stderr.write(f"\033[2m{text}\033[0m" if dim else text)
    sys.stderr.flush()


def _check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(
                f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port)"
            ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serving.app import create_app
    from .serving.connections import connection_cap, guarded_protocol
    from .tokenizer import AutoTokenizer

    if _rank() == 0:
        _check_port(args.host, args.port)  # before the weights load: a port in use is said at once
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.chat_template is None:
        print(
            "chatlm: warning: the model has no chat template; only /v1/completions will work", file=sys.stderr
        )
    model = _load_model(args.model, args, tensor_parallel=_distributed())
    if not args.quiet:
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        requests = logging.getLogger("chatlm.requests")
        requests.addHandler(handler)
        requests.setLevel(logging.INFO)
    side = None
    if (
        _distributed()
    ):  # rank 0 serves HTTP and runs the engine; the others run its model calls on their share
        from .generation.prefix_cache import PrefixCache
        from .serving.model_side import BroadcastingSide, ModelSide, follow

        # every rank keeps its share of the heads in a prefix cache of its own, in step with rank 0's
        cache = PrefixCache(args.cache_ram << 20) if args.cache_ram else None
        if _rank() != 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 shuts down and then tells us
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(ModelSide(model, cache))
            return 0
        side = BroadcastingSide(model, cache)
    name = args.served_model_name or _model_name(args.model)
    app = create_app(
        model,
        tokenizer,
        name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        engine_thread=False,
        side=side,
        cache_ram=args.cache_ram << 20,
        cors_origins=tuple(args.cors_origin),
        web_page=not args.no_web,
    )
    engine = app.state.server.engine
    # On SIGTERM or Ctrl-C, in-flight requests get --shutdown-timeout seconds to finish; then the engine cancels
    # them, so that every stream still gets its last chunk (finish_reason "abort") and [DONE], before uvicorn's own
    # deadline closes the connections. HTTP runs on a thread and the engine on this one (see `Engine`), so the
    # signals are ours to pass on to uvicorn.
    drain = args.shutdown_timeout
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=drain + 5,
            timeout_keep_alive=5,
            # slow or numerous clients: a deadline on headers, a cap on connections below the descriptor limit
            http=guarded_protocol(args.header_timeout, connection_cap(args.max_connections)),
        )
    )

    def stop(*_) -> None:
        if not server.should_exit:
            server.should_exit = True
            timer = threading.Timer(drain, engine.cancel_all)
            timer.daemon = True  # the process need not wait for it
            timer.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    http = threading.Thread(target=server.run, name="chatlm-http")
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not http.is_alive():
        engine.shutdown()
        raise OSError(f"could not serve on {args.host}:{args.port}")
    print(f"chatlm: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    if not args.no_web:
        print(f"chatlm: chat page at http://{args.host}:{args.port}/", file=sys.stderr)
    try:
        engine.run()  # until the app's lifespan ends: uvicorn has finished with its connections
    except Exception as error:  # the model step itself failed (every row): exit non-zero, for a supervisor
        server.should_exit = True
        http.join(60)
        print(
            f"chatlm: the engine failed, so the server stops: {type(error).__name__}: {error}",
            file=sys.stderr,
        )
        return 1
    http.join()
    return 0


def _model_name(reference: str | None) -> str:
    if reference is None:
        return "SmolLM2-135M-Instruct"
    path = reference.rstrip("/")
    name = path.rsplit("/", 1)[-1] if os.path.exists(path) else path
    return name[:-5] if name.endswith(".gguf") else name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError, ImportError, MemoryError) as e:
        # A bad model path, a corrupt file or a bad option: one line, no traceback (CHATLM_DEBUG=1 shows it).
        if os.environ.get("CHATLM_DEBUG"):
            raise
        print(f"chatlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
