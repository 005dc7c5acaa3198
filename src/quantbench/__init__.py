"""quantbench: a declarative, tracked experiment system for LLM weight quantization."""

__version__ = "0.1.0"
