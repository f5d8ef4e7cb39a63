"""conqur-vllm: ConQuR W4A4 quantization and a vLLM plugin to serve it."""

__version__ = "0.1.0"
