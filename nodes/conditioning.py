"""Conditioning helpers that let graphs run without the 5.7B umt5 text encoder."""
import torch
from comfy_api.latest import io

from .errors import named_errors

# Wan's text context: umt5-xxl hidden states, padded to 512 tokens of width 4096.
WAN_TEXT_TOKENS = 512
WAN_TEXT_DIM = 4096


class EmptyConditioningNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheEmptyConditioning",
            display_name="Empty Wan Conditioning (tests/demos)",
            category="ARCache/conditioning",
            description=(
                "A zero Wan-style text conditioning ([1, 512, 4096]). For tests and demos: it lets "
                "a graph run without loading the 5.7B umt5-xxl text encoder. Real prompts need "
                "CLIPLoader (type wan) + CLIPTextEncode."
            ),
            inputs=[
                io.Float.Input("value", default=0.0, min=-10.0, max=10.0, step=0.01, optional=True,
                               tooltip="0 gives the empty (zero) conditioning. Other values fill it with a constant: distinct dummy prompts for tests and demos."),
            ],
            outputs=[
                io.Conditioning.Output(
                    tooltip="Zero text conditioning in Wan's layout; for tests and demos, not for real prompts."
                ),
            ],
        )

    @classmethod
    @named_errors("Empty Wan Conditioning")
    def execute(cls, value: float = 0.0) -> io.NodeOutput:
        return io.NodeOutput([[torch.full((1, WAN_TEXT_TOKENS, WAN_TEXT_DIM), float(value)), {}]])
