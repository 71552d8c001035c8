"""Model-agnostic AR-video caching and sampling algorithms on plain tensors (no ComfyUI)."""
