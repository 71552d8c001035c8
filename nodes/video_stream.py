"""Write frames to a fragmented mp4 as they are emitted: playable while it grows, memory flat for any
video length, and what was finished kept when a run is interrupted."""
from __future__ import annotations

import os

import av
import numpy as np
import torch

# Every frame its own fragment, flushed at once: players (and PyAV) read the file while it is
# written, and a run that stops leaves a valid file up to its last frame.
MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof"


class StreamingVideoWriter:
    """Appends frames to `<name>.partial.mp4`, renamed to `<name>.mp4` when the run completes. An
    interrupted or failed run keeps what was written as `<name>_interrupted.mp4` (playable)."""

    def __init__(self, path: str, fps: int, crf: int = 19):
        self.path, self.fps, self.crf = path, max(1, int(round(fps))), crf
        self.partial = path[:-4] + ".partial.mp4"
        self.interrupted = path[:-4] + "_interrupted.mp4"
        self.container = None
        self.stream = None
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        """frames: [N, H, W, 3] floats in 0..1."""
        if self.container is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.container = av.open(self.partial, mode="w", format="mp4",
                                     options={"movflags": MOVFLAGS, "flush_packets": "1"})
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = frames.shape[2] // 2 * 2, frames.shape[1] // 2 * 2
            self.stream.pix_fmt = "yuv420p"
            # no look-ahead or B-frames: each frame's packet comes out as it goes in
            self.stream.options = {"crf": str(self.crf), "tune": "zerolatency"}
        arr = (frames[:, :self.stream.height, :self.stream.width].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for frame in arr:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)
        self.frames += len(arr)

    def _finish(self) -> None:
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
        finally:
            self.container.close()

    def close(self) -> str:
        if self.container is not None:
            self._finish()
            os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> str | None:
        """The run stopped: keep what was written, under a name that says so (None: nothing was)."""
        if self.container is None:
            return None
        try:
            self._finish()
            os.replace(self.partial, self.interrupted)
        except Exception:        # never mask why the run stopped; the fragments written so far still play
            return self.partial if os.path.exists(self.partial) else None
        return self.interrupted
