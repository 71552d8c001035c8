"""The two prediction inputs both cache nodes share (cache_core/predict.py)."""
from comfy_api.latest import io


def prediction_inputs(threshold: str) -> list:
    """predict_order and reuse_thresh, below the node's recompute threshold named `threshold`."""
    return [
        io.Int.Input("predict_order", default=0, min=0, max=2, optional=True,
                     tooltip="What a skipped step does with the chunk's cached output. 0: reuses it (the papers). "
                             "1 / 2: extrapolates it over the noise level from the chunk's last 2 / 3 computed "
                             "steps (linear / quadratic; with fewer points, the order they allow), once the "
                             "accumulated change reaches reuse_thresh. Keeps 1 / 2 more outputs per active chunk "
                             "(the report's cached_outputs_bytes_peak). README: Predicting skipped steps."),
        io.Float.Input("reuse_thresh", default=0.0, min=0.0, max=5.0, step=0.005, optional=True,
                       tooltip=f"With predict_order 1 or 2, a skipped step reuses below this accumulated change and "
                               f"predicts from it up to {threshold} (from {threshold} on, the chunk is recomputed; "
                               f"MotionCache: the token, and tokens that reach it but are left out by voting or "
                               f"min_update_ratio are predicted): 0 predicts every skipped step. Must not exceed "
                               f"{threshold}."),
    ]
