"""The caches the bench compares, applied to a loaded toy SkyReels-V2-DF model, and one timed run.

Every cache runs with its node's defaults (the papers' 50-step settings: FlowCache warm-up 5 and
1 final step, MotionCache warm-up 4 and 6 chunk-wise updates) and only the threshold varies (the
`_predict` series: predict_order 1, every skipped step predicted), so a curve point is what a user
gets from the node at that threshold. `coefficients="none"`: the toy's
size has no fitted polynomial (auto would pick none too).
"""
from __future__ import annotations

import dataclasses
import threading
import time

from curves import MODES, predict_order
from tools.inprocess import load_comfy, pack

load_comfy()
import psutil  # noqa: E402

import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode  # noqa: E402

streaming = pack("model_patches.video_run")
ar_cache = pack("model_patches.ar_cache")
flowcache_policy = pack("cache_core.flowcache_policy")
motioncache_policy = pack("cache_core.motioncache_policy")
record_mod = pack("cache_core.record")

def window_record_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                          transformer_options={}, **kwargs):
    """The baseline both papers beat: one TeaCache decision per whole window (the window is
    one chunk whose local steps are the window's rows)."""
    rec = transformer_options.get(record_mod.RECORD_KEY)
    if rec is not None:
        transformer_options = dict(transformer_options)
        transformer_options[record_mod.RECORD_KEY] = dataclasses.replace(rec, chunk_frames=rec.num_frames, steps=rec.calls)
    return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)


def with_method(model, method: str, thr: float | None):
    """The model patched with one cache at one threshold (None: the method's exact run)."""
    if method == "uncached":
        return model
    if method == "easycache":
        return EasyCacheNode.execute(model, thr, 0.15, 0.95, False).result[0]
    attention, order = MODES[method], predict_order(method)
    if method.startswith("motioncache"):
        cfg = motioncache_policy.MotionCacheConfig(threshold=thr, coefficients="none", predict_order=order)
        return ar_cache.apply_motioncache(model, cfg, attention)
    cfg = flowcache_policy.FlowCacheConfig(rel_l1_thresh=thr or 0.0, coefficients="none", predict_order=order)
    m = ar_cache.apply_flowcache(model, cfg, skip=method != "chunk_causal", attention=attention)
    if method == "teacache_window":   # our wrapper must run outside FlowCache's
        dm_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        m.wrappers[dm_type] = {"bench_window": [window_record_wrapper], **m.wrappers[dm_type]}
    return m


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def generate(model, job: dict):
    """-> (raw latent video, the sampler's report, wall seconds, peak RSS MiB)."""
    req = streaming.VideoRequest(positives=[job["cond"]], negative=job["cond"], **job["video"])
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        video, report = pack("model_patches.families").new_video_run(model, req).run()
        wall = time.perf_counter() - t0
    return video, report, wall, mem.peak / 2**20


def load_unet(path):
    return comfy.sd.load_diffusion_model(str(path))
