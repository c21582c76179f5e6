"""``pipeline("text-generation", ...)``: chats (or plain text) in, chats with the assistant's reply out."""

from __future__ import annotations

import os
from typing import Any

import torch

from .auto import AutoModelForCausalLM
from .chat_turn import ChatTurn
from .generation.config import GenerationConfig
from .generation.prefix_cache import PrefixCache
from .models.base import CausalLM

TASKS = ("text-generation",)
# What transformers' text-generation pipeline uses when the model brings no generation_config.json of its own.
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None}
# Options of the call that shape the prompt or the output rather than decoding.
CALL_OPTIONS = {
    "return_full_text",
    "continue_final_message",
    "add_special_tokens",
    "skip_special_tokens",
    "batch_size",
    "tools",
    "documents",
    "return_tensors",
    "return_text",
    "clean_up_tokenization_spaces",
    "assistant_model",
    # chatlm's: template variables (``{"enable_thinking": False}``), OpenAI's response_format (json_schema), and
    # a reasoning model's thinking budget in tokens
    "chat_template_kwargs",
    "response_format",
    "reasoning_budget",
    "streamer",  # as transformers' pipeline: handed to generate (one sequence at a time)
}


class TextGenerationPipeline:
    """Calls a chat model the way the transformers chat guide shows."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        batch_size: int = 8,
        assistant_model: CausalLM | None = None,
        prefix_cache: PrefixCache | bool = True,
        **generate_kwargs,
    ):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        # Keys and values of earlier calls, found again by token prefix: a chat continued by appending a message
        # and calling again computes only the new tokens (`chatlm.generation.prefix_cache`).
        if prefix_cache is True:
            prefix_cache = PrefixCache()
        if (
            prefix_cache is not False
            and prefix_cache is not None
            and not isinstance(prefix_cache, PrefixCache)
        ):
            raise TypeError(
                f"prefix_cache must be True, False or a PrefixCache, not {type(prefix_cache).__name__}"
            )
        self.prefix_cache: PrefixCache | None = (
            prefix_cache if isinstance(prefix_cache, PrefixCache) else None
        )
        self.assistant_model = (
            assistant_model  # a draft for speculative decoding (see chatlm.generation.speculative)
        )
        base = model.generation_config
        has_own = bool(base.extra) or base.do_sample or base.max_new_tokens is not None
        self.generation_config = base if has_own else base.update(**PIPELINE_DEFAULTS)
        if generate_kwargs:
            self.generation_config = self.generation_config.update(**generate_kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, text_inputs, **kwargs) -> list:
        unknown = set(kwargs) - CALL_OPTIONS - GenerationConfig.field_names()
        if unknown:
            raise TypeError(
                f"the text-generation pipeline got unexpected keyword arguments: {', '.join(sorted(unknown))}"
            )
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in CALL_OPTIONS}
        single, items = _as_batch(text_inputs)
        if kwargs.get("do_sample") is False:
            # Greedy on request: the pipeline's own sampling defaults do not apply (and are not worth a warning).
            kwargs = {**{k: v for k, v in NEUTRAL_SAMPLING.items() if k not in kwargs}, **kwargs}
        config = self.generation_config.update(**kwargs)
        batch_size = options.get("batch_size") or self.batch_size
        results = []
        for start in range(0, len(items), batch_size):
            results.extend(self._run(items[start : start + batch_size], config, options))
        return results[0] if single else results

    def _run(self, items: list, config: GenerationConfig, options: dict) -> list[list[dict[str, Any]]]:
        tok = self.tokenizer
        prompts, continues, turns = [], [], []
        for item in items:
            if isinstance(item, str):
                prompts.append(
                    tok(item, add_special_tokens=options.get("add_special_tokens", True))["input_ids"]
                )
                continues.append(False)
                turns.append(None)
                continue
            cont = options.get("continue_final_message")
            cont = item[-1]["role"] == "assistant" if cont is None else cont
            turn = ChatTurn.render(
                tok,
                item,
                tools=options.get("tools"),
                documents=options.get("documents"),
                continue_final_message=cont,
                template_kwargs=options.get("chat_template_kwargs"),
            )
            prompts.append(turn.prompt_ids)
            continues.append(cont)
            turns.append(turn)
        constraint = self._constraint(turns, config, options)
        streamer = options.get("streamer")
        if streamer is not None and len(prompts) * config.num_return_sequences > 1:
            raise ValueError(
                "a streamer takes one sequence: call the pipeline with one input and one sequence"
            )
        ids, mask = _left_pad(prompts, _pad_id(tok, config))
        n = config.num_return_sequences
        # One sequence at a time reuses and feeds the prefix cache; a batch of prompts decodes together.
        reuse = self.prefix_cache if len(prompts) == 1 and n == 1 and prompts[0] else None
        cache = reuse.fetch(self.model, prompts[0], limit=len(prompts[0]) - 1) if reuse is not None else None
        output = self.model.generate(
            ids.to(self.model.device),
            attention_mask=mask.to(self.model.device),
            generation_config=config,
            tokenizer=tok,
            assistant_model=options.get("assistant_model", self.assistant_model),
            past_key_values=cache,
            constraint=constraint,
            streamer=streamer,
        )
        if config.return_dict_in_generate:
            output = output.sequences
        if reuse is not None:
            reuse.insert_cache(cache)
        skip = options.get("skip_special_tokens", True)
        full = options.get("return_full_text", True)
        results = []
        for i, item in enumerate(items):
            records = []
            for row in output[i * n : (i + 1) * n]:
                reply = row[ids.shape[1] :].tolist()
                text = tok.decode(reply, skip_special_tokens=skip)
                if not full:
                    records.append({"generated_text": text})
                elif isinstance(item, str) or continues[i] or not turns[i].parses_reply:
                    records.append({"generated_text": _join(item, text, continues[i])})
                else:
                    message = self._parse_reply(reply, text, turns[i], config)
                    records.append({"generated_text": [*item, message]})
            results.append(records)
        return results

    def _constraint(self, turns: list, config: GenerationConfig, options: dict):
        """The rows' constraint: ``response_format`` holds the answers, ``reasoning_budget`` a reasoning model's
        thinking before them (the chats of one call share a template, so the first turn speaks for all)."""
        from .generation.generate import response_format_constraint
        from .generation.thinking import reply_constraint

        budget = options.get("reasoning_budget")
        answer = response_format_constraint(
            self.model, config, options.get("response_format"), self.tokenizer
        )
        turn = next((t for t in turns if t is not None), None)
        if budget is not None and (turn is None or turn.reply_format.reasoning is None):
            raise ValueError(
                "reasoning_budget needs a reasoning model: this chat template has no thinking section"
            )
        if turn is None:
            return answer
        return reply_constraint(turn, self.tokenizer, self.model.config.vocab_size, budget, answer)

    def _parse_reply(self, reply: list[int], text: str, turn: ChatTurn, config) -> dict[str, Any]:
        """The assistant message with its tool calls and reasoning apart. The markers may be special tokens
        (``<|python_tag|>``, ``[TOOL_CALLS]``), so the parser reads the reply with them, up to the stop token."""
        stops = set(config.eos_token_ids)
        end = next((k for k, token in enumerate(reply) if token in stops), len(reply))
        tok = self.tokenizer
        raw = tok.decode(reply[:end], skip_special_tokens=False)
        message = turn.parse_reply(raw)
        if "tool_calls" not in message and "reasoning_content" not in message:
            return {"role": "assistant", "content": text}  # a plain reply: exactly as decoded
        return message


def _as_batch(text_inputs) -> tuple[bool, list]:
    if isinstance(text_inputs, str):
        return True, [text_inputs]
    if (
        isinstance(text_inputs, (list, tuple))
        and text_inputs
        and all(isinstance(m, dict) for m in text_inputs)
    ):
        return True, [_check_chat(list(text_inputs))]
    if isinstance(text_inputs, (list, tuple)) and text_inputs:
        items = []
        for item in text_inputs:
            if isinstance(item, str):
                items.append(item)
            elif isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) for m in item):
                items.append(_check_chat(list(item)))
            else:
                raise TypeError(
                    "each input must be a string or a chat (a list of {'role', 'content'} messages)"
                )
        return False, items
    if isinstance(text_inputs, (list, tuple)):
        raise ValueError("the input is empty: give a string, a chat, or a list of them")
    raise TypeError(
        f"the text-generation pipeline takes a string or a chat, not {type(text_inputs).__name__}"
    )


def _check_chat(chat: list[dict]) -> list[dict]:
    from .chat_template import validate_chat

    return validate_chat(chat)


def _pad_id(tokenizer, config: GenerationConfig) -> int:
    for candidate in (tokenizer.pad_token_id, config.pad_token_id, *config.eos_token_ids):
        if candidate is not None:
            return candidate
    return 0


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def _join(item, text: str, continued: bool):
    if isinstance(item, str):
        return item + text
    if continued:
        last = dict(item[-1])
        return [*item[:-1], {**last, "content": last["content"] + text}]
    return [*item, {"role": "assistant", "content": text}]


def pipeline(
    task: str = "text-generation",
    model: str | os.PathLike | CausalLM | None = None,
    tokenizer=None,
    *,
    torch_dtype=None,
    dtype=None,
    device_map=None,
    device=None,
    model_kwargs: dict[str, Any] | None = None,
    quantization_config=None,
    **kwargs,
) -> TextGenerationPipeline:
    """``pipeline("text-generation", MODEL, torch_dtype=..., device_map=...)``; MODEL is a path, a Hub id, a loaded
    model, or None for the bundled model. ``assistant_model`` (a loaded model or a reference, loaded as MODEL is)
    drafts for speculative decoding. ``prefix_cache``: True (a `PrefixCache` of 1 GiB, the default), False, or
    a `PrefixCache` of your own budget; a chat continued by appending a message and calling again then computes
    only the new tokens. Remaining keywords are generation defaults (``max_new_tokens``,
    ``prompt_lookup_num_tokens``...)."""
    from .tokenizer import AutoTokenizer

    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported (supported: {', '.join(TASKS)})")
    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    load_kwargs = dict(model_kwargs or {})
    for key, value in (
        ("torch_dtype", torch_dtype),
        ("dtype", dtype),
        ("quantization_config", quantization_config),
    ):
        if value is not None:
            if key in load_kwargs:
                raise ValueError(f"{key} is given both directly and in model_kwargs")
            load_kwargs[key] = value
    batch_size = kwargs.pop("batch_size", 8)
    prefix_cache = kwargs.pop("prefix_cache", True)
    assistant = kwargs.pop("assistant_model", None)
    if assistant is not None and not isinstance(
        assistant, CausalLM
    ):  # a path or Hub id: load it as the model
        assistant = AutoModelForCausalLM.from_pretrained(
            assistant, device_map=device_map if device is None else _device(device), **load_kwargs
        )
    if isinstance(model, CausalLM):
        if load_kwargs:
            raise ValueError(
                f"{', '.join(load_kwargs)} apply when loading a model, but the model is already loaded"
            )
        if device is not None or device_map is not None:
            model = model.to(_device(device if device is not None else device_map))
        source = model.name_or_path or None
    else:
        source = model
        model = AutoModelForCausalLM.from_pretrained(
            model, device_map=device_map if device is None else _device(device), **load_kwargs
        )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(
        model,
        tokenizer,
        batch_size=batch_size,
        assistant_model=assistant,
        prefix_cache=prefix_cache,
        **kwargs,
    )


def _device(device) -> str:
    if isinstance(device, int):
        return "cpu" if device < 0 else f"cuda:{device}"
    return str(device)
