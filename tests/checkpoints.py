"""Tiny random-weight Hugging Face checkpoints, written by transformers itself, for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "Chatting with models on your own hardware is fun and fast.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Café, naïve, 你好, 🙂.",
    "user assistant system: tell me a story about a robot who loves tea.",
] * 4

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# What distinguishes each family, plus a few variants of llama's options.
VARIANTS = {
    "llama": ("llama", {}),
    "llama_tied_llama3": (
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama_mha_linear": (
        "llama",
        dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "mistral": ("mistral", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("qwen2", dict(use_sliding_window=False)),
    # Mixture of experts: top-2 of 4 (Mixtral renormalises the two probabilities).
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # A shared expert with a sigmoid gate; layer 1 dense (mlp_only_layers); raw top-k probabilities.
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
    ),
    # Only every second layer sparse (decoder_sparse_step), top-3 renormalised (norm_topk_prob).
    "qwen2_moe_step2_norm": (
        "qwen2_moe",
        dict(
            num_hidden_layers=3,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            decoder_sparse_step=2,
            norm_topk_prob=True,
        ),
    ),
    # Qwen3's per-head q/k norms and an explicit head_dim; top-2 of 8, renormalised.
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=24, norm_topk_prob=True
        ),
    ),
    # head_dim apart from hidden/heads; layer 0 full attention, layer 1 a sliding window shorter than the prompt
    "qwen3": (
        "qwen3",
        dict(
            head_dim=24,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    # The 20-token prompt of the parity test reaches past original_max_position_embeddings (16): long factors; the
    # 7-token generation starts short and switches to long mid-way, as transformers does per call.
    "phi3_longrope": (
        "phi3",
        dict(
            original_max_position_embeddings=16,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
                "long_factor": [1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0],
            },
        ),
    ),
    # Short factors only (every position stays under 64), a partial rotary embedding and a sliding window.
    "phi3_short_partial": (
        "phi3",
        dict(
            original_max_position_embeddings=64,
            partial_rotary_factor=0.5,
            sliding_window=8,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.5, 2.0, 3.0],
                "long_factor": [2.0, 3.0, 5.0, 9.0],
            },
        ),
    ),
    "olmo2": ("olmo2", {}),
    "granite": (
        "granite",
        dict(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0),
    ),
    # Gemma's config class defaults head_dim to 256: give the tiny ones their own.
    "gemma": ("gemma", dict(head_dim=16)),
    # Layers alternate sliding (window 8 < the 20-token prompt) and global; both softcaps bend the values.
    "gemma2": (
        "gemma2",
        dict(
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
        ),
    ),
    # Sliding, global, sliding; the global layers' rope (base 1000, linear x2) apart from the sliding ones' (50).
    "gemma3_text": (
        "gemma3_text",
        dict(
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=8,
            sliding_window_pattern=2,
            query_pre_attn_scalar=20,
            final_logit_softcapping=10.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            },
        ),
    ),
}


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tokenizer(path: Path) -> int:
    tok = train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def write_checkpoint(path: Path, variant: str, seed: int = 0, std: float = 0.2, **overrides) -> Path:
    """A random model of the given variant, saved with save_pretrained (config.json + model.safetensors +
    generation_config.json), with a tokenizer whose special ids are 0 (pad), 1 (bos), 2 (eos). ``std``: of the
    matrices' weights (0.2 suits the tiny widths; wider models want less to keep each layer's gain)."""
    import transformers

    model_type, options = VARIANTS[variant]
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path)
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    config = config_class(**{**BASE, "vocab_size": vocab, **options, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # wider weights than the init's, so that logits differ enough for stable argmaxes
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    model.save_pretrained(path)
    return path
