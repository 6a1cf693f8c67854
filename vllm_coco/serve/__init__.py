"""Serve: the vLLM plugin and gated model classes, the Hugging Face reference, batch generation."""
