"""The thin ComfyUI layer: V3 node classes, one feature per module."""
from comfy_api.latest import ComfyExtension, io

from .anchor import DriftAnchorNode
from .causal import CausalScheduleNode, CausalWanLoaderNode, CausalWanLoraNode
from .conditioning import EmptyConditioningNode
from .flowcache import FlowCacheNode
from .heatmap import ComputeHeatmapNode
from .live import LiveViewNode
from .magi import MagiModelLoaderNode, MagiScheduleNode, MagiTextEncodeNode, MagiVAELoaderNode
from .motioncache import MotionCacheNode
from .multigpu import MultiGPUNode
from .preview import LatentPreviewNode
from .sampler import StreamingSamplerNode
from .schedules import DFScheduleNode, PromptScheduleNode


class ARCacheExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            EmptyConditioningNode,
            StreamingSamplerNode,
            DFScheduleNode,
            PromptScheduleNode,
            FlowCacheNode,
            MotionCacheNode,
            LatentPreviewNode,
            ComputeHeatmapNode,
            MagiModelLoaderNode,
            MagiVAELoaderNode,
            MagiTextEncodeNode,
            MagiScheduleNode,
            DriftAnchorNode,
            LiveViewNode,
            CausalScheduleNode,
            CausalWanLoaderNode,
            CausalWanLoraNode,
            MultiGPUNode,
        ]


def comfy_entrypoint() -> ARCacheExtension:
    return ARCacheExtension()
