"""Decoding: a step generator that yields token ids, and ``generate`` that runs it the way transformers does."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .sampling import choose_tokens, make_processors
from .speculative import (
    DraftModel,
    EarlyExitDraft,
    PromptLookup,
    SpeculationStats,
    check_speculation,
    speculative_steps,
)


@dataclass
class Step:
    """One decoding step: the chosen token per row (B,), which rows were already done before it, and the
    processed scores (B, vocab) the token was chosen from."""

    tokens: torch.Tensor
    done: torch.Tensor
    scores: torch.Tensor


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns, as in transformers."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    speculation: SpeculationStats | None = None  # guesses proposed / accepted, when decoding speculatively

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else (self.sequences, self.scores)[key]


def prepare_inputs(
    input_ids, attention_mask, config: GenerationConfig, device
) -> tuple[torch.Tensor, torch.Tensor]:
    if input_ids is None:
        raise ValueError("generate() needs input_ids (a (batch, sequence) tensor of token ids)")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be a (batch, sequence) tensor of integer token ids")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        # As transformers: a pad token that is not also end-of-sequence marks padding wherever it occurs.
        attention_mask = torch.ones_like(input_ids)
        pad = config.pad_token_id
        if pad is not None and pad not in config.eos_token_ids and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
    else:
        attention_mask = torch.as_tensor(attention_mask).to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}"
            )
    return input_ids, attention_mask.long()


PREFILL_CHUNK = 512  # prompt tokens per forward call while prefilling


def _longrope(model) -> bool:
    return getattr(model, "_longrope_context", None) is not None


def generate_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    stop_check: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[Step]:
    """Prefill, then decode one token per step for every row until every row is done (an end-of-sequence token,
    or ``stop_check(tokens, done)`` says so) or ``max_new_tokens`` are out. Rows that finished get the pad token."""
    batch, prompt_length = input_ids.shape
    eos = torch.tensor(config.eos_token_ids, device=input_ids.device, dtype=torch.long)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    min_new = config.min_new_tokens or max(0, (config.min_length or 0) - prompt_length)
    processors = make_processors(config)

    cache = model.new_cache(batch, prompt_length + max_new_tokens)
    padded = not bool(attention_mask.all())
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.ones(batch, prompt_length + max_new_tokens, dtype=torch.long, device=input_ids.device)
    mask[:, :prompt_length] = attention_mask
    ids = torch.empty(batch, prompt_length + max_new_tokens, dtype=torch.long, device=input_ids.device)
    ids[:, :prompt_length] = input_ids
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)

    # The prompt in chunks: activations stay bounded by the chunk, not the prompt (an 8K-token prompt through a 1B
    # model's MLP would otherwise hold hundreds of MB at once). Longrope models take the whole prompt in one call,
    # since the rope factors they rotate with depend on the positions of the call.
    chunk = prompt_length if _longrope(model) else PREFILL_CHUNK
    for start in range(0, prompt_length, chunk):
        stop = min(prompt_length, start + chunk)
        logits = model(
            input_ids[:, start:stop],
            attention_mask=mask[:, :stop] if padded else None,
            position_ids=positions[:, start:stop],
            past_key_values=cache,
            logits_to_keep=1,
        ).logits[:, -1]
    length = prompt_length
    for step in range(max_new_tokens):
        scores = logits.float()
        for process in processors:
            scores = process(ids[:, :length], scores)
        if step < min_new and eos.numel():
            scores[:, eos] = -float("inf")
        tokens = choose_tokens(scores, config.do_sample, generator)
        tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
        ids[:, length] = tokens
        length += 1
        yield Step(tokens, done.clone(), scores)
        if eos.numel():
            done |= torch.isin(tokens, eos)
        if stop_check is not None:
            done |= stop_check(tokens, done)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        positions = positions[:, -1:] + 1
        fed = tokens[:, None]
        if model.recompute_cache(cache.offset, length):  # the cached keys are stale: run the whole sequence
            cache.trim(cache.offset)
            positions = (mask[:, :length].cumsum(-1) - 1).clamp(min=0)
            fed = ids[:, :length]
        logits = model(
            fed,
            attention_mask=mask[:, :length] if padded else None,
            position_ids=positions,
            past_key_values=cache,
            logits_to_keep=1,
        ).logits[:, -1]


class _StopStrings:
    """Ends a row once its generated text contains one of the stop strings (the string stays in the output)."""

    def __init__(self, stop_strings, tokenizer, batch: int):
        if tokenizer is None:
            raise ValueError(
                "stop_strings needs the tokenizer: call generate(..., stop_strings=..., tokenizer=tok)"
            )
        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stops or not all(isinstance(s, str) and s for s in self.stops):
            raise ValueError("stop_strings must be a non-empty string or a list of non-empty strings")
        self.tokenizer = tokenizer
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.window = max(len(s) for s in self.stops) + 8  # tokens: every token holds at least one character

    def hit(self, tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        hits = torch.zeros_like(done)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            self.generated[row].append(token)
            tail = self.tokenizer.decode(self.generated[row][-self.window :])
            hits[row] = any(s in tail for s in self.stops)  # a row stops at its first hit, so any hit is new
        return hits


def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer=None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    assistant_model=None,
    **kwargs,
) -> torch.Tensor | GenerateOutput:
    """transformers' ``generate``: returns (B, prompt + new) token ids; finished rows are padded with the pad token.

    Options are GenerationConfig fields (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``min_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``stop_strings``, ...), given as keywords
    or as ``generation_config``; any other keyword is a TypeError. ``assistant_model`` (a smaller model with the
    same tokenizer) or ``prompt_lookup_num_tokens=N`` decode speculatively (`chatlm.generation.speculative`), with
    the same greedy output; ``model.last_speculation`` then holds the guesses proposed and accepted.
    """
    config = (generation_config or model.generation_config).update(**kwargs)
    config.validate()
    input_ids, attention_mask = prepare_inputs(input_ids, attention_mask, config, model.device)
    if config.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    batch, prompt_length = input_ids.shape
    context = model.config.max_position_embeddings
    longest = int(attention_mask.sum(-1).max())
    if longest > context:
        raise ValueError(
            f"the prompt is {longest} tokens long, more than the model's context window of {context} tokens"
        )
    max_new = (
        config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_length
    )
    if max_new < 1:
        raise ValueError(
            f"the prompt ({prompt_length} tokens) already reaches max_length={config.max_length}; set max_new_tokens"
        )
    if longest + max_new > context:
        warnings.warn(
            f"generation stops at the context window ({context} tokens), {longest + max_new - context} tokens short "
            f"of max_new_tokens={max_new}",
            UserWarning,
            stacklevel=3,
        )
        max_new = context - longest
    right_padded = not bool(attention_mask[:, -1].all())
    if right_padded:
        warnings.warn(
            "right padding detected: a decoder-only model continues from the last column, so set "
            "padding_side='left' on the tokenizer for correct batched generation",
            UserWarning,
            stacklevel=3,
        )
    if streamer is not None:
        streamer.put(input_ids.cpu())
    stops = _StopStrings(config.stop_strings, tokenizer, batch) if config.stop_strings else None
    out, scores = [input_ids], []
    speculation = None
    if (
        assistant_model is not None
        or config.prompt_lookup_num_tokens is not None
        or config.assistant_early_exit is not None
    ):
        check_speculation(config, assistant_model, right_padded)
        speculation = SpeculationStats()
        if config.assistant_early_exit is not None:
            proposer = EarlyExitDraft(model, config.assistant_early_exit, config, generator)
        elif assistant_model is not None:
            proposer = DraftModel(assistant_model, config, generator)
        else:
            proposer = PromptLookup(config.prompt_lookup_num_tokens, config.max_matching_ngram_size or 2)
        model.last_speculation = speculation
    with torch.inference_mode():
        if speculation is not None:
            steps = speculative_steps(
                model,
                input_ids,
                attention_mask,
                config,
                max_new,
                proposer,
                speculation,
                stops.hit if stops else None,
                generator=generator,
            )
        else:
            steps = generate_steps(
                model, input_ids, attention_mask, config, max_new, generator, stops.hit if stops else None
            )
        for step in steps:
            out.append(step.tokens[:, None])
            if config.output_scores:
                scores.append(step.scores)
            if streamer is not None:
                streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    sequences = torch.cat(out, dim=1)
    if config.return_dict_in_generate:
        return GenerateOutput(sequences, tuple(scores) if config.output_scores else None, speculation)
    return sequences
