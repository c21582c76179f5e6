"""The quickstart of the transformers guide "Chatting with Transformers", with only the import line and the
model name changed (pass another model as the first argument)."""

import sys

import torch

from chatlm import pipeline

MODEL = sys.argv[1] if len(sys.argv) > 1 else "SmolLM2-135M-Instruct"  # the bundled model

chat = [
    {
        "role": "system",
        "content": "You are a sassy, wise-cracking robot as imagined by Hollywood circa 1986.",
    },
    {"role": "user", "content": "Hey, can you tell me any fun things to do in New York?"},
]

pipe = pipeline("text-generation", MODEL, torch_dtype=torch.bfloat16, device_map="auto")
response = pipe(chat, max_new_tokens=512)
print(response[0]["generated_text"][-1]["content"])

chat = response[0]["generated_text"]
chat.append({"role": "user", "content": "Wait, what's so wild about soup cans?"})
response = pipe(chat, max_new_tokens=512)
print(response[0]["generated_text"][-1]["content"])
