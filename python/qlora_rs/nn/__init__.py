"""Modules: :class:`Linear4bit` (frozen 4-bit linear) and the LoRA layers around it and around
``nn.Linear``."""

from .linear4bit import Linear4bit
from .lora import LoraLinear, LoraLinear4bit

__all__ = ["Linear4bit", "LoraLinear4bit", "LoraLinear"]
