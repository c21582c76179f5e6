"""What every causal LM shares: the transformers-style forward call, generate, and the model's vital statistics."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..generation.config import GenerationConfig
from .cache import DynamicCache, KVCache
from .config import ModelConfig
from .layers import (
    attention_masks,
    longrope_context,
    rope_attention_factor,
    rope_cos_sin,
    rope_inverse_frequencies,
)


@dataclass
class CausalLMOutput:
    """The forward call's result: ``logits`` (batch, sequence, vocab) and the cache it filled, if any."""

    logits: torch.Tensor
    past_key_values: KVCache | None = None

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return (self.logits, self.past_key_values)[key]


class CausalLM(nn.Module):
    """Base of the architectures. A subclass builds ``model`` and ``lm_head`` with Hugging Face parameter names
    and implements ``hidden_states``; everything else (masks, positions, cache, generate) lives here."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        self.name_or_path = ""
        self._inv_freq: torch.Tensor | None = None
        self._long_inv_freq: torch.Tensor | None = None
        self._longrope_context = longrope_context(config)
        self._rope_scale = rope_attention_factor(config)
        self._attention_windows = config.attention_windows  # once, not on every decode step
        self._exit_layer: int | None = None  # see early_exit

    # A fused decode path, attached from outside to a loaded model (`chatlm.kernels.fused_layer.attach`): it says
    # which steps it takes (``takes``) and plans each layer's native call (``plan``, None: the modules).
    decode_fusion = None

    def hidden_states(self, input_ids, cos, sin, masks, cache) -> torch.Tensor:
        raise NotImplementedError

    def run_layers(self, x, cos, sin, masks, cache) -> torch.Tensor:
        """x through the active decoder layers: each as one native call where the decode fusion planned it,
        else its modules. ``cos`` and ``sin`` may be dicts by attention type (Gemma 3's local and global rope)."""
        plans = self._decode_plans(x, cos, masks, cache)
        for i, layer in enumerate(self.active_layers()):
            if plans is not None and plans[i] is not None:  # the whole layer in one native call
                kind = layer.self_attn.attention_type
                c, s = (cos[kind], sin[kind]) if isinstance(cos, dict) else (cos, sin)
                plans[i].run(x, c, s, cache.keys[i], cache.values[i], cache.offset, masks.row_starts)
            else:
                x = layer(x, cos, sin, masks, cache)
        return x

    def _decode_plans(self, x, cos, masks, cache) -> list | None:
        """Per layer, the fused plan of this step (see ``decode_fusion``), or None for the module path: a step the
        fusion takes, over a cache, no padding (sliding windows the kernel applies) or rows starting at their own
        slots, no autograd."""
        fusion = self.decode_fusion
        if (
            fusion is None
            or cache is None
            or not fusion.takes(x, next(iter(cos.values())) if isinstance(cos, dict) else cos)
            or not (getattr(masks, "unpadded", False) or getattr(masks, "row_starts", None) is not None)
            or torch.is_grad_enabled()
        ):
            return None
        plans = self.__dict__.get("_plans")
        if plans is None or not all(p is None or p.valid() for p in plans):
            plans = [fusion.plan(layer) for layer in self.model.layers]
            self.__dict__["_plans"] = plans
        return plans

    def active_layers(self):
        """The decoder layers a forward call runs: all of them, or the first few inside `early_exit`."""
        layers = self.model.layers
        return layers if self._exit_layer is None else layers[: self._exit_layer]

    @contextlib.contextmanager
    def early_exit(self, layers: int):
        """Within the block, forward calls run only the first ``layers`` decoder layers, then the final norm and
        the LM head: the model's own cheap draft for self-speculative decoding. Their cache entries for those
        layers are the full model's too (the layers' inputs are the same)."""
        if not 0 < layers <= len(self.model.layers):
            raise ValueError(f"early exit needs 1 to {len(self.model.layers)} layers, got {layers}")
        self._exit_layer = layers
        try:
            yield self
        finally:
            self._exit_layer = None

    def checkpoint_slot(self, name: str) -> tuple[str | None, tuple]:
        """Where checkpoint tensor ``name`` goes: (parameter name, index into it); an empty index is the whole
        parameter, a None name a tensor to skip. Architectures whose parameters a checkpoint stores in pieces (MoE
        experts) or under other names (Gemma 3's image-text checkpoints) override this."""
        return name, ()

    # --- the forward call -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits for ``input_ids`` (B, T). ``attention_mask`` (B, past+T) marks real tokens; ``past_key_values`` is
        a cache to read and extend (``use_cache=True`` makes a new one); ``logits_to_keep=n`` computes only the
        last n positions' logits."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, sequence) tensor of token ids")
        batch, length = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(batch, length)
        if isinstance(cache, DynamicCache) and not cache.allocated:
            cache.allocate(self, batch, length)
        offset = cache.offset if cache is not None else 0
        if cache is not None:
            if cache.batch_size != batch:
                raise ValueError(f"the cache holds {cache.batch_size} rows but input_ids has {batch}")
            cache.reserve(offset + length)
            cache.record(input_ids)
        padding = None
        if attention_mask is not None:
            if attention_mask.shape != (batch, offset + length):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, offset + length)}"
                )
            if not bool(attention_mask.all()):
                padding = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if position_ids is None:
            position_ids = torch.arange(offset, offset + length, device=input_ids.device).expand(
                batch, length
            )
        cos, sin = self.rope_tables(position_ids)
        masks = attention_masks(padding, length, offset, self._attention_windows)
        hidden = self.hidden_states(input_ids, cos, sin, masks, cache)
        if cache is not None:
            cache.advance(length)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        # A 2-D input: on a 3-D slice, bf16 linear on CPU copies the whole transposed weight first (~15x slower).
        logits = self.lm_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:2], -1)
        return CausalLMOutput(logits=self.final_logits(logits), past_key_values=cache)

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The lm_head's output as the model hands it out: architectures that scale logits override this."""
        return logits

    def recompute_cache(self, cached: int, length: int) -> bool:
        """Whether generation should forget the cache and run the whole sequence of ``length`` tokens again
        instead of feeding one token to a cache of ``cached`` entries (Phi-3's switch to its long rope factors)."""
        return False

    def rope_tables(self, position_ids: torch.Tensor):
        """cos and sin tables for the positions, handed to ``hidden_states``. Architectures whose layer types
        rotate differently (Gemma 3's local and global layers) override this to return dicts by attention type."""
        return rope_cos_sin(self._rope_frequencies(position_ids), position_ids, self.dtype, self._rope_scale)

    def _rope_frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        # Computed on first use: the model is built on the meta device, where no real buffer can be made.
        device = positions.device
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inverse_frequencies(self.config).to(device)
            if self._longrope_context is not None:
                self._long_inv_freq = rope_inverse_frequencies(self.config, long=True).to(device)
        if self._longrope_context is None:
            return self._inv_freq
        # Longrope picks its factors per call, as transformers does: the long ones once any position of this call
        # is past the pre-training context (so keys cached earlier keep the short ones). No host sync.
        reaches_past = positions.max() + 1 > self._longrope_context
        return torch.where(reaches_past, self._long_inv_freq, self._inv_freq)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(
            c.num_hidden_layers,
            batch_size,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
            self.dtype,
            self.device,
        )

    # --- generation -------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Generate continuations of ``input_ids``, as transformers' ``generate`` (see chatlm.generation)."""
        from ..generation.generate import generate

        return generate(self, input_ids, **kwargs)

    def compute_transition_scores(
        self, sequences: torch.Tensor, scores: tuple[torch.Tensor, ...], normalize_logits: bool = False
    ) -> torch.Tensor:
        """transformers' ``compute_transition_scores`` for greedy and sampled output: the score of each generated
        token, (batch, new tokens); ``normalize_logits=True`` gives its log-probability (log-softmax over the
        vocabulary). Pass ``output.scores`` for the processed scores or ``output.logits`` for the raw ones."""
        stacked = torch.stack(scores, dim=1).float()  # (batch, new, vocab)
        if normalize_logits:
            stacked = stacked.log_softmax(-1)
        chosen = sequences[:, sequences.shape[1] - stacked.shape[1] :]
        return stacked.gather(-1, chosen[..., None].to(stacked.device))[..., 0]

    # --- vital statistics -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (tied embeddings count once)."""
        skip = (
            {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
            if exclude_embeddings
            else set()
        )
        count = sum(
            p.numel()
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )
        if getattr(self, "quantization_config", None) is not None and not only_trainable:
            count += self._quantized_weights(exclude_embeddings)
        return count

    def _quantized_weights(self, exclude_embeddings: bool) -> int:
        """int8/int4 weights are buffers, not parameters: counted as the float weights they stand for. A quantized
        module (`chatlm.quantization`) holds its table in ``qweight`` and says that count with ``num_weights()``;
        a table two modules share (a tied lm_head) counts once, and with the embeddings when they are excluded."""
        modules = [m for m in self.modules() if hasattr(m, "num_weights") and m.qweight is not None]
        embeddings = [m for m in modules if hasattr(m, "embedding_dim")]
        seen = {id(m.qweight) for m in embeddings} if exclude_embeddings else set()
        total = 0
        for m in modules:
            if id(m.qweight) not in seen:
                seen.add(id(m.qweight))
                total += m.num_weights()
        return total

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by parameters (and buffers): what the weights cost in memory."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        if return_buffers:
            total += sum(b.numel() * b.element_size() for b in self.buffers())
        return total

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            head, embedding = self.lm_head, self.model.embed_tokens
            # Quantized (`chatlm.quantization`): the head shares the embedding's int8 table.
            if hasattr(head, "tie_to") and hasattr(embedding, "qweight"):
                head.tie_to(embedding)
            else:
                head.weight = embedding.weight
