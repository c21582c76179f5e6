"""The guide's memory section: options for loading go through `model_kwargs`; a quantization config is accepted
and, until 8/4-bit weights land in chatlm, refused with a clear error instead of being ignored."""

import sys

import torch

from chatlm import BitsAndBytesConfig, pipeline

MODEL = sys.argv[1] if len(sys.argv) > 1 else "SmolLM2-135M-Instruct"  # the bundled model

pipe = pipeline("text-generation", MODEL, model_kwargs={"torch_dtype": torch.bfloat16}, device_map="auto")
print(pipe("The capital of France is", max_new_tokens=8, do_sample=False)[0]["generated_text"])

quantization_config = BitsAndBytesConfig(load_in_4bit=True)
try:
    pipeline("text-generation", MODEL, model_kwargs={"quantization_config": quantization_config})
except ValueError as error:
    print(f"quantization_config refused: {error}")
