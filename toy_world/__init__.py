"""Toy world: a tiny diffusion-forcing Wan 2.1 (SkyReels-V2-DF layout) trained on procedural
sprite videos, for exercising and demonstrating the AR caches without real weights.

Modules: `scenes` (procedural videos in Wan 2.1 processed latent space), `model` (a torch-only,
ComfyUI-compatible Wan 2.1 DiT + safetensors I/O), `train` (diffusion-forcing trainer),
`sample_check` (Euler sync / async DF sampler and PNG/GIF strips).  See README.md.
"""
