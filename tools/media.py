"""Small input files the tests and docs give ComfyUI's LoadVideo / LoadImage."""
from __future__ import annotations

from pathlib import Path


def write_test_video(path: str | Path, frames: int = 21, size: int = 64, fps: int = 24) -> Path:
    """An H.264 mp4 of flat grey frames whose level steps by 12 per frame (a visible, simple prefix)."""
    import av
    import numpy as np
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), (i * 12) % 255, np.uint8),
                                                         format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)
