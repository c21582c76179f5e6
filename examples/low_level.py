"""The guide's "what happens inside the pipeline" path: model, tokenizer, chat template, generate, decode."""

import sys

import torch

from chatlm import AutoModelForCausalLM, AutoTokenizer

MODEL = sys.argv[1] if len(sys.argv) > 1 else "SmolLM2-135M-Instruct"  # the bundled model

# Prepare the input as before
chat = [
    {
        "role": "system",
        "content": "You are a sassy, wise-cracking robot as imagined by Hollywood circa 1986.",
    },
    {"role": "user", "content": "Hey, can you tell me any fun things to do in New York?"},
]

# 1: Load the model and tokenizer
model = AutoModelForCausalLM.from_pretrained(MODEL, device_map="auto", torch_dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(MODEL)

# 2: Apply the chat template
formatted_chat = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
print("Formatted chat:\n", formatted_chat)

# 3: Tokenize the chat (This can be combined with the previous step using tokenize=True)
inputs = tokenizer(formatted_chat, return_tensors="pt", add_special_tokens=False)
# Move the tokenized inputs to the same device the model is on (GPU/CPU)
inputs = {key: tensor.to(model.device) for key, tensor in inputs.items()}
print("Tokenized inputs:\n", inputs)

# 4: Generate text from the model
outputs = model.generate(**inputs, max_new_tokens=512, temperature=0.1)
print("Generated tokens:\n", outputs)

# 5: Decode the output back to a string
decoded_output = tokenizer.decode(outputs[0][inputs["input_ids"].size(1) :], skip_special_tokens=True)
print("Decoded output:\n", decoded_output)
