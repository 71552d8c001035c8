"""Adapters between the model-agnostic `cache_core` and each model family in ComfyUI."""
