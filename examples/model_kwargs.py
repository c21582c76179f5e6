"""The guide's memory section: options for loading go through `model_kwargs`, and a quantization config loads the
weights in 4 bits (int4, group-wise with scales and zero points; computed in bfloat16)."""

import sys

import torch

from chatlm import BitsAndBytesConfig, pipeline

MODEL = sys.argv[1] if len(sys.argv) > 1 else "SmolLM2-135M-Instruct"  # the bundled model

pipe = pipeline("text-generation", MODEL, model_kwargs={"torch_dtype": torch.bfloat16}, device_map="auto")
print(pipe("The capital of France is", max_new_tokens=8, do_sample=False)[0]["generated_text"])

quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
pipe = pipeline("text-generation", MODEL, model_kwargs={"quantization_config": quantization_config})
print(f"4-bit weights: {pipe.model.get_memory_footprint() / 1e6:.0f} MB")
print(pipe("The capital of France is", max_new_tokens=8, do_sample=False)[0]["generated_text"])
