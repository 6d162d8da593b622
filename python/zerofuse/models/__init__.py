"""Models built from zerofuse's modules."""
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
