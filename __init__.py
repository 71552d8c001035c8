"""ComfyUI-ARCache: fast long videos from autoregressive video models (SkyReels-V2-DF, ...).

ComfyUI imports this file; everything the pack offers is registered in `nodes`.
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

WEB_DIRECTORY = "./web"          # the live view player (web/arcache_live.js)
