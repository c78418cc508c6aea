"""kbitrt: k-bit quantization converter and inference runtime for large language models."""

__version__ = "0.1.0"
