"""kbitrt: k-bit quantization converter and inference runtime for large language models."""

__version__ = "0.1.0"

# registers the "kbit" quantizer with transformers when (and only if) transformers is imported
__import__("kbitrt.runtime.hf_integration", fromlist=["install"]).install()
