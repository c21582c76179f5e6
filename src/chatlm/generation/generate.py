"""``generate`` as transformers runs it, on the one decode-step loop (`decoding.Decoder`): prefill the prompt, then
step every row of the batch, with a proposer's guesses when decoding speculatively, and hand the tokens out
column by column."""

from __future__ import annotations

import functools
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..detokenize import StreamingDetokenizer
from ..models.cache import DynamicCache, KVCache
from . import grammar
from .config import GenerationConfig
from .decoding import Decoder, Row
from .ragged_cache import RaggedCache
from .sampling import Constraint, RowSampler, SamplingParams
from .speculative import (
    DraftModel,
    EarlyExitDraft,
    Governor,
    PromptLookup,
    SpeculationStats,
    check_speculation,
)


@dataclass
class Step:
    """One column of the batch: the chosen token per row (B,), which rows were already done before it, and the
    processed scores and raw logits (B, vocab) the tokens were chosen from."""

    tokens: torch.Tensor
    done: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor | None = None


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns, as in transformers."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None  # processed scores per step (output_scores)
    logits: tuple[torch.Tensor, ...] | None = None  # raw logits per step (output_logits)
    speculation: SpeculationStats | None = None  # guesses proposed / accepted, when decoding speculatively
    past_key_values: KVCache | None = None  # the cache passed in, now holding the sequence but its last token

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else (self.sequences, self.scores)[key]


def prepare_inputs(
    input_ids, attention_mask, config: GenerationConfig, device
) -> tuple[torch.Tensor, torch.Tensor]:
    if input_ids is None:
        raise ValueError("generate() needs input_ids (a (batch, sequence) tensor of token ids)")
    if isinstance(input_ids, Mapping):  # apply_chat_template(..., return_dict=True) or tokenizer(...) output
        raise TypeError(
            "generate() got the tokenizer's output (a dict of input_ids and attention_mask): call "
            "model.generate(**inputs, ...)"
        )
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


def generate_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    tokenizer=None,
    proposer=None,
    stats: SpeculationStats | None = None,
    governor: Governor | None = None,
    keep_scores: bool = True,
    cache: RaggedCache | None = None,
    constraint: Callable[[], Constraint] | None = None,
) -> Iterator[Step]:
    """Decode a batch (left padding allowed) until every row is done (an end-of-sequence token, a stop string, or
    ``max_new_tokens``), one `Step` per column; finished rows get the pad token. With a ``proposer`` (and
    ``stats``, ``governor``), each step checks its guesses (`chatlm.generation.speculative`); a row that got
    ahead of the others holds its tokens back until every unfinished row has one for that column. ``cache``: one
    that holds the first ``cache.offset`` columns of the prompt already (`reuse_cache`). ``constraint``: makes
    each row's constraint (a JSON schema's grammar)."""
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    params = SamplingParams.from_generation_config(config, prompt_length, max_new_tokens)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    if params.stop and tokenizer is None:
        raise ValueError(
            "stop_strings needs the tokenizer: call generate(..., stop_strings=..., tokenizer=tok)"
        )

    if cache is None:
        cache = RaggedCache(model, batch, prompt_length + max_new_tokens + 16)
    # Speculation feeds the prompt's last token with the first round's guesses; plain decoding takes the first
    # token from the prompt's logits.
    cached = prompt_length - 1 if proposer is not None else prompt_length
    start = cache.offset
    logits = _prefill(model, cache, input_ids[:, start:cached], attention_mask[:, start:cached].bool())
    decoder = Decoder(
        cache, proposer, governor or (Governor() if proposer else None), stats, keep_scores=keep_scores
    )
    held: list[deque] = [deque() for _ in range(batch)]  # tokens settled, not handed out yet
    for r in range(batch):
        tokens = input_ids[r][attention_mask[r].bool()].tolist()
        sampler = RowSampler(
            params,
            input_ids[r],
            params.stop_token_ids,
            model.config.vocab_size,
            generator,
            constraint() if constraint is not None else None,
        )
        row = Row(sampler, tokens, _stop_text(tokenizer, params.stop))
        held[r].extend(decoder.add(r, row, logits[r] if proposer is None else None))

    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        while not all(held[r] for r in range(batch) if not done[r]):
            for r, settled in decoder.step().items():
                held[r].extend(settled)
        picked = [held[r].popleft() if not done[r] else None for r in range(batch)]
        tokens = torch.tensor([p.token if p else pad for p in picked], dtype=torch.long, device=device)
        scores = logits_ = None
        if keep_scores:
            like = next(p for p in picked if p)
            scores = torch.stack([p.scores if p else _certain(pad, like.scores) for p in picked])
            logits_ = torch.stack([p.logits if p else _certain(pad, like.logits) for p in picked])
        yield Step(tokens, done.clone(), scores, logits_)
        for r, p in enumerate(picked):
            if p is not None and p.finish_reason is not None:
                done[r] = True
                held[r].clear()
                decoder.drop(r)
        if bool(done.all()):
            return


def _prefill(model, cache: RaggedCache, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor | None:
    """Feed the prompt in chunks, so that activations stay bounded by the chunk, not the prompt (an 8K-token
    prompt through a 1B model's MLP would otherwise hold hundreds of MB at once): the last column's logits.
    Longrope models take the prompt in one call, since the rope factors they rotate with depend on the positions
    of the call."""
    length = ids.shape[1]
    if not length:
        return None
    longrope = getattr(model, "_longrope_context", None) is not None
    chunk = length if longrope else PREFILL_CHUNK
    logits = None
    for start in range(0, length, max(chunk, 1)):
        stop = min(length, start + chunk)
        logits = cache.forward(ids[:, start:stop], real[:, start:stop], logits_to_keep=1)[:, -1]
    return logits


def reuse_cache(
    model, past_key_values, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int
) -> RaggedCache:
    """A `RaggedCache` over the caller's cache, keeping only the slots that hold the prompt's own first tokens
    (as transformers' prompt-reuse pattern expects; a cache that diverges from the prompt is cut back to where it
    agrees, never used beyond), and at most all but the last prompt token, whose logits are needed."""
    if not isinstance(past_key_values, KVCache):
        raise TypeError(
            f"past_key_values must be a chatlm KVCache or DynamicCache, not {type(past_key_values).__name__}"
        )
    cache, batch = past_key_values, input_ids.shape[0]
    if isinstance(cache, DynamicCache) and not cache.allocated:
        cache.allocate(model, batch, capacity)
    if cache.batch_size != batch or (batch > 1 and cache.offset > 0):
        raise ValueError(
            f"past_key_values is reused for one sequence at a time; got a cache of {cache.batch_size} rows "
            f"for {batch} rows of input_ids"
        )
    if len(cache.keys) != model.config.num_hidden_layers or cache.dtype != model.dtype:
        raise ValueError(
            f"past_key_values was made for another model: {len(cache.keys)} layers of {cache.dtype}, this model "
            f"has {model.config.num_hidden_layers} of {model.dtype}"
        )
    prompt = input_ids[0].tolist()
    reuse = 0
    if batch > 1:  # an empty cache to fill
        return RaggedCache(model, batch, capacity, cache=cache)
    longrope = getattr(model, "_longrope_context", None)
    if bool(attention_mask.all()) and (longrope is None or len(prompt) <= longrope):
        cached = cache.tokens()[: len(prompt) - 1]
        while reuse < len(cached) and cached[reuse] == prompt[reuse]:
            reuse += 1
    cache.crop(reuse)
    return RaggedCache(model, batch, capacity, cache=cache)


def _stop_text(tokenizer, stops: tuple[str, ...]):
    """A row's text stream when it has stop strings to watch for (transformers keeps the string in the output)."""
    if not stops:
        return None
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError("stop_strings must be a non-empty string or a list of non-empty strings")
    return StreamingDetokenizer(tokenizer, stops, skip_special_tokens=False)


def _certain(token: int, like: torch.Tensor) -> torch.Tensor:
    """The scores of a row that is done: certain of the pad token it gets."""
    scores = torch.full_like(like, -float("inf"))
    scores[token] = 0
    return scores


def response_format_constraint(model, config, response_format: Mapping | None, tokenizer):
    """The per-row constraint factory of ``response_format`` (None: none), with ``config``'s end tokens."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping) or response_format.get("type") not in ("json_schema", "text"):
        raise ValueError(
            'response_format must be {"type": "json_schema", "json_schema": {"schema": {...}}} (or type "text")'
        )
    if response_format["type"] == "text":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or "schema" not in spec:
        raise ValueError('response_format "json_schema" needs {"json_schema": {"schema": {...}}}')
    if tokenizer is None:
        raise ValueError(
            "response_format needs the tokenizer: call generate(..., response_format=..., tokenizer=tok)"
        )
    vocab, eos = model.config.vocab_size, list(config.eos_token_ids)
    engine_tok = grammar.engine_tokenizer(tokenizer, eos, vocab)
    compiled = grammar.json_schema_grammar(spec["schema"], engine_tok)
    return functools.partial(grammar.GrammarConstraint, engine_tok, compiled, vocab, eos)


def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer=None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    assistant_model=None,
    past_key_values: KVCache | None = None,
    response_format: Mapping | None = None,
    constraint: Callable[[], Constraint] | None = None,
    **kwargs,
) -> torch.Tensor | GenerateOutput:
    """transformers' ``generate``: returns (B, prompt + new) token ids; finished rows are padded with the pad token.

    Options are GenerationConfig fields (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``min_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``stop_strings``, ...), given as keywords
    or as ``generation_config``; any other keyword is a TypeError. ``assistant_model`` (a smaller model with the
    same tokenizer) or ``prompt_lookup_num_tokens=N`` decode speculatively (`chatlm.generation.speculative`), with
    the same greedy output; ``model.last_speculation`` then holds the guesses proposed and accepted.

    ``past_key_values``: a `KVCache` (or an empty ``DynamicCache()``) from an earlier forward call or generate
    whose tokens begin the prompt: only the rest of the prompt is computed (transformers' prompt reuse). The cache
    is extended in place to hold the whole sequence but its last token; copy it first to reuse it again.

    ``response_format`` (with ``tokenizer``): OpenAI's ``{"type": "json_schema", "json_schema": {"schema": ...}}``
    holds every row's new tokens to the JSON schema (`chatlm.generation.grammar`: the llguidance engine masks the
    scores; greedy, sampled and speculative alike); a row ends when its document is complete. A schema the engine
    cannot compile raises `GrammarError` (a ValueError) before anything is generated. ``constraint``: makes each
    row's `Constraint` (the logits processor behind both: `grammar.GrammarConstraint`,
    `thinking.ThinkingConstraint` for a reasoning budget), instead of ``response_format``.
    """
    config = (generation_config or model.generation_config).update(**kwargs)
    config.validate()
    if constraint is not None and response_format is not None:
        raise ValueError(
            "give response_format or constraint, not both (a constraint may hold the schema itself)"
        )
    constraint = constraint or response_format_constraint(model, config, response_format, tokenizer)
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
    proposer = stats = None
    if (
        assistant_model is not None
        or config.prompt_lookup_num_tokens is not None
        or config.assistant_early_exit is not None
    ):
        check_speculation(config, assistant_model, right_padded)
        stats = model.last_speculation = SpeculationStats()
        if config.assistant_early_exit is not None:
            proposer = EarlyExitDraft(model, config.assistant_early_exit, config, generator)
        elif assistant_model is not None:
            proposer = DraftModel(assistant_model, config, generator)
        else:
            proposer = PromptLookup(config.prompt_lookup_num_tokens, config.max_matching_ngram_size or 2)
    keep_scores = config.output_scores or config.output_logits
    out, scores, logits = [input_ids], [], []
    with torch.inference_mode():
        cache = None
        if past_key_values is not None:
            capacity = prompt_length + max_new + 16
            cache = reuse_cache(model, past_key_values, input_ids, attention_mask, capacity)
        steps = generate_steps(
            model,
            input_ids,
            attention_mask,
            config,
            max_new,
            generator,
            tokenizer,
            proposer,
            stats,
            keep_scores=keep_scores,
            cache=cache,
            constraint=constraint,
        )
        for step in steps:
            out.append(step.tokens[:, None])
            if config.output_scores:
                scores.append(step.scores)
            if config.output_logits:
                logits.append(step.logits)
            if streamer is not None:
                streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    sequences = torch.cat(out, dim=1)
    if config.return_dict_in_generate:
        return GenerateOutput(
            sequences,
            tuple(scores) if config.output_scores else None,
            tuple(logits) if config.output_logits else None,
            stats,
            past_key_values,
        )
    return sequences
