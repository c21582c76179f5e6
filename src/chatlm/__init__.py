"""chatlm: chat with open models on your own hardware, through the API of the transformers chat guide."""

__version__ = "0.1.0"
