"""Write frames to an mp4 as windows finish, so memory stays flat for any video length."""
from __future__ import annotations

import os

import av
import numpy as np
import torch


class StreamingVideoWriter:
    """Appends frames to `<path>.partial.mp4`; renamed to `<path>` only when the run completes,
    so an interrupted run never leaves a file that looks finished."""

    def __init__(self, path: str, fps: int, crf: int = 19):
        self.path, self.fps, self.crf = path, max(1, fps), crf
        self.partial = path[:-4] + ".partial.mp4"
        self.container = None
        self.stream = None
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        """frames: [N, H, W, 3] floats in 0..1."""
        if self.container is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.container = av.open(self.partial, mode="w")
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = frames.shape[2] // 2 * 2, frames.shape[1] // 2 * 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf)}
        arr = (frames[:, :self.stream.height, :self.stream.width].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for frame in arr:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)
        self.frames += len(arr)

    def close(self) -> str:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            finally:
                if os.path.exists(self.partial):
                    os.remove(self.partial)
