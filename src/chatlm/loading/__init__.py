"""Finding and reading checkpoints: model references, safetensors, GGUF."""
