#!/usr/bin/env python3
"""One-shot GPU benchmark: ComfyUI's own WanModel, uncached vs chunk-causal vs FlowCache skips.

Meant to run ONCE on a rented GPU (H100 80 GB) inside a few minutes, with RANDOM weights at the
real SkyReels-V2-DF sizes (nothing is downloaded):

  1.3B  dim 1536, ffn 8960, 30 layers, 12 heads, t2v
  14B   dim 5120, ffn 13824, 40 layers, 40 heads, t2v   (if memory and time allow)

Input: one 540P window, 97 video frames = 25 latent frames of 68x120 latent (544x960 pixels),
i.e. 25 x 34 x 60 = 51,000 tokens, per-frame timesteps [B, 25] (five chunks of five frames at
five noise levels), zero text context [B, 512, 4096], batch 2 = cond + uncond together
(transformer_options["cond_or_uncond"] = [0, 1]).

Measured, every time CUDA-synchronised (the median of a few calls after a warm-up call):

- uncached: the model's own bidirectional forward (`WanModel.forward`).
- chunk_causal: the chunk executor (`model_patches.ar_cache.forward_chunkwise` through the Wan
  chunk adapter) with the restructure-only policy, all five chunks active and computed.
- flowcache_patterns: FIXED skip patterns. A FlowCache run state (`ar_cache.flowcache_spec`) with
  rel_l1_thresh=1e9, warmup_steps=1, final_steps=0: its first call computes every chunk (warm-up,
  residuals stored); from then on the real FlowCache rule would skip every chunk. The policy's
  `decide` is wrapped on the instance: the real `decide` still runs (indicator, accumulator,
  the `.item()` sync: its full cost is in the timing), then every chunk NOT in the pattern is
  forced to compute. For each pattern: realised time vs the ideal time predicted by the analytic
  FLOP ratio of cache_core/flops.py (ideal = t(no skip) x FLOPs(pattern) / FLOPs(no skip)).
- decision_overhead: one `FlowCachePolicy.decide` alone (isolated, per decision and per call of
  2 branches x 5 chunks), the embeddings + head alone (the model's own modules, the floor of a
  call in which every chunk skips), the all-skip call, and the difference between computing all
  chunks with the FlowCache state (decisions + residuals) and without (restructure only).
- kv_async: K/V memory in an asynchronous diffusion-forcing situation, with and without
  kv_compress (budget 1 chunk): calls in one window with active chunks {0}, {0,1}, {1,2},
  {2,3}, {3,4}, {4}; the last call has chunks 0-3 finished (frozen) and chunk 4 active.
  Per call: `store.bytes_allocated()`, `store.peak_bytes`, torch.cuda.memory_allocated /
  max_memory_allocated above the model + inputs.
- Memory for every case (store bytes, store peak, CUDA peak above the model and inputs).
- sp: sequence parallel on one GPU: a 5-frame chunk's block pass at 1.3B dimensions against a timed
  local copy of the bytes one rank would send for it at 2/4/8 ranks (at one rank the code path is the
  one-process path).
- causal: the few-step causal Wan run end to end at 1.3B dimensions and 480x832 (Self-Forcing's
  schedule, full history and LongLive's window + sink, two lengths): TTFF, frames/s, K/V and CUDA
  peaks (the window's must not grow with the length).
- stream: the live stream's decode, a Wan 2.1 VAE at full width (dim 96, random weights) through
  the pack's stream decoder one async block at a time against ComfyUI's whole decode of the same
  latents (max difference, share of identical uint8 pixels: the CPU tests prove them bit for bit),
  seconds per latent frame and the VAE's peak memory; and the shipped long async schedule's TTFF,
  block period, sustained frames/s and real-time factor computed from the measured 1.3B window
  call and block decode.

The 14B repeats the key numbers (uncached, FlowCache patterns, async K/V, restructure) at the
largest window/batch whose K/V fits the free memory (its full-window K/V at batch 2 is ~84 GB);
it is skipped with a note when neither memory nor the time left allow it.

A global time budget (--budget-s, counted from the start of this script, imports included)
gates every call; the JSON is rewritten after every stage, so a stop still leaves what was
measured. Errors (OOM included) are recorded per stage and the run goes on.

Usage (repo root):
  PYTHONUNBUFFERED=1 python3 bench/gpu.py            # GPU, writes bench/results/gpu-<device>.json
  python3 bench/gpu.py --device cpu --tiny --out x.json   # the whole flow, tiny, on CPU (seconds)
ComfyUI is imported from --comfyui (default .host/ComfyUI, or $COMFYUI_PATH); its
comfy.ldm.wan.model import chain needs torch, einops, psutil, pillow and numpy (the script
checks first and prints the pip command for whatever is missing). --tiny shrinks the models
(dim 128/256), the latent (4x6) and the text context (16 x 64); everything else is the same flow.
"""
from __future__ import annotations

import time

T0 = time.monotonic()   # the budget counts from here (the interpreter start is negligible)

import argparse  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}
TINY_SIZES = {   # same code paths, CPU-sized
    "1.3B": dict(dim=128, ffn_dim=256, num_heads=2, num_layers=2),
    "14B": dict(dim=256, ffn_dim=512, num_heads=4, num_layers=1),
}
TEXT_LEN, TEXT_DIM, IN_DIM = 512, 4096, 16
TINY_TEXT = (16, 64)                     # text context [B, len, dim] in --tiny mode
CHUNK_FRAMES = 5
FRAMES = 25                              # 97 video frames -> (97 - 1) / 4 + 1 latent frames
LATENT_HW = (68, 120)                    # 544 x 960 pixels
TINY_LATENT_HW = (4, 6)
CHUNK_SIGMAS = (0.95, 0.8, 0.6, 0.4, 0.2)   # one noise level per chunk (diffusion forcing)
PATTERNS = [(), (0,), (4,), (1, 3), (0, 2, 4), (0, 1, 2, 3), (0, 1, 2, 3, 4)]
PATTERNS_14B = [(), (1, 3), (0, 2, 4), (0, 1, 2, 3, 4)]
PATTERNS_TINY = [(), (0, 2, 4), (0, 1, 2, 3, 4)]
STEPS = 1000                             # record.steps: large, so no forced final step
# third-party modules ComfyUI's comfy.ldm.wan.model import chain needs (module -> pip name)
NEEDED = {"einops": "einops", "psutil": "psutil", "PIL": "pillow", "numpy": "numpy",
          "safetensors": "safetensors"}
GiB = float(1 << 30)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float, reserve: float):
        self.deadline = T0 + seconds
        self.reserve = reserve

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() - self.reserve > seconds


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "device"


def clean(obj):
    """JSON-safe: non-finite floats become None, tuples lists, unknown objects strings."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    try:
        return float(obj)
    except Exception:
        return str(obj)


def median(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return (a / b) if (a is not None and b) else None


def missing_modules() -> list:
    return [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]


def source_fingerprint() -> dict:
    out = {}
    for rel in ("model_patches/wan.py", "cache_core/chunk_executor.py", "cache_core/chunk_step.py", "cache_core/kv_store.py", "cache_core/kv_compress.py",
                "cache_core/flowcache_policy.py", "cache_core/flops.py", "bench/gpu.py"):
        p = REPO / rel
        if p.is_file():
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()[:12]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            out["git_head"] = head.stdout.strip()
            out["git_dirty"] = [ln[3:] for ln in dirty.stdout.splitlines()]
    except Exception:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, mods: dict):
        self.args = args
        self.torch = mods["torch"]
        self.wan = mods["wan_model"]
        self.ops = mods["ops"]
        self.ar_cache = mods["ar_cache"]
        self.families = mods["families"]
        self.wan_family = mods["wan_family"]
        self.executor = mods["executor"]
        self.chunk_executor = mods["chunk_executor"]
        self.flops = mods["flops"]
        self.FlowCacheConfig = mods["FlowCacheConfig"]
        self.FlowCachePolicy = mods["FlowCachePolicy"]
        self.StepRecord = mods["StepRecord"]
        self.RECORD_KEY = mods["RECORD_KEY"]
        self.dev = self.torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.dtype = self.torch.bfloat16 if self.cuda else self.torch.float32
        self.budget = Budget(args.budget_s, reserve=args.reserve_s)
        self.results = mods["results"]
        self.out = Path(args.out)
        self.text_len, self.text_dim = TINY_TEXT if args.tiny else (TEXT_LEN, TEXT_DIM)

    # --- bookkeeping ---------------------------------------------------------------------------
    def write(self):
        self.results["elapsed_s"] = time.monotonic() - T0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".part")
        tmp.write_text(json.dumps(clean(self.results), indent=1))
        os.replace(tmp, self.out)

    def log(self, msg: str):
        print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)

    def stage(self, where: dict, name: str, fn, *a, **kw):
        """Run one stage; record an error instead of stopping; write the JSON after it."""
        self.log(f"stage {name} ...")
        try:
            where[name] = fn(*a, **kw)
        except Exception as exc:   # OOM included: note it and go on
            self.results["errors"][f"{where.get('_tag', '')}/{name}"] = (
                f"{type(exc).__name__}: {exc}"[:2000] + "\n" + traceback.format_exc(limit=6)[-3000:])
            self.log(f"stage {name} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            where[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        finally:
            self.free()
        self.write()
        return where[name]

    def skip(self, where: dict, name: str, why: str):
        self.log(f"stage {name} skipped: {why}")
        where[name] = {"skipped": why}
        self.results["skipped_stages"].append(f"{where.get('_tag', '')}/{name}: {why}")
        self.write()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def mem_base(self) -> int:
        if not self.cuda:
            return 0
        self.sync()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated()

    def mem_since(self, base: int) -> dict:
        if not self.cuda:
            return {"cuda_peak_bytes": None, "cuda_held_bytes": None}
        self.sync()
        return {"cuda_peak_bytes": self.torch.cuda.max_memory_allocated() - base,
                "cuda_held_bytes": self.torch.cuda.memory_allocated() - base,
                "cuda_reserved_bytes": self.torch.cuda.memory_reserved()}

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        y = fn()
        self.sync()
        return time.perf_counter() - t0, y

    def repeat(self, fn, reps: int, est: float) -> list:
        """Up to `reps` timed calls while the budget allows one more (estimate: slowest so far)."""
        times = []
        for _ in range(reps):
            if not self.budget.allows(1.2 * max(times + [est])):
                break
            dt, y = self.timed(fn)
            del y
            times.append(dt)
        return times

    # --- model and inputs -------------------------------------------------------------------------
    def model_kwargs(self, dims: dict) -> dict:
        return dict(model_type="t2v", patch_size=(1, 2, 2), text_len=self.text_len, in_dim=IN_DIM, dim=dims["dim"],
                    ffn_dim=dims["ffn_dim"], freq_dim=256, text_dim=self.text_dim, out_dim=IN_DIM,
                    num_heads=dims["num_heads"], num_layers=dims["num_layers"], qk_norm=True,
                    cross_attn_norm=True, eps=1e-6, operations=self.ops.disable_weight_init)

    def count_params(self, dims: dict) -> int:
        meta = self.wan.WanModel(device="meta", dtype=self.dtype, **self.model_kwargs(dims))
        n = sum(p.numel() for p in meta.parameters())
        del meta
        return n

    def build(self, dims: dict, seed: int = 0):
        """ComfyUI's WanModel with ComfyUI's no-init ops, filled with small random values."""
        torch = self.torch
        m = self.wan.WanModel(device=self.dev, dtype=self.dtype, **self.model_kwargs(dims))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "modulation" in name:
                    p.normal_(0.0, 0.05)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.01)
                elif p.ndim == 1:                      # norm weights (RMSNorm / LayerNorm affine)
                    p.fill_(1.0)
                else:                                  # Linear / Conv3d: keep activations O(1)
                    fan_in = p[0].numel()
                    p.normal_(0.0, 1.0 / math.sqrt(fan_in))
        return m.eval()

    def inputs(self, batch: int, frames: int, lat_hw, seed: int = 1):
        torch = self.torch
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(batch, IN_DIM, frames, *lat_hw, generator=g).to(self.dev, self.dtype)
        ctx = torch.zeros(batch, self.text_len, self.text_dim, device=self.dev, dtype=self.dtype)
        sig = self.frame_sigmas(frames)
        t = (sig * 1000.0).to(self.dev).unsqueeze(0).expand(batch, -1).contiguous()
        return x, ctx, t

    def frame_sigmas(self, frames: int):
        return self.torch.tensor([CHUNK_SIGMAS[min(f // CHUNK_FRAMES, len(CHUNK_SIGMAS) - 1)]
                                  for f in range(frames)], dtype=self.torch.float32)

    def record(self, frames: int, active_chunks, row: int):
        act = [f // CHUNK_FRAMES in active_chunks for f in range(frames)]
        return self.StepRecord(frame_sigmas=self.frame_sigmas(frames), active=self.torch.tensor(act),
                               prefix_frames=0, chunk_frames=CHUNK_FRAMES, steps=STEPS, window_index=0,
                               call=row, calls=STEPS)

    def run_state(self, dm, cfg, skip: bool):
        """The run state FlowCache makes per sampling run (skip False: restructure only)."""
        return self.families.WAN21.new_cache_run(self.ar_cache.flowcache_spec(cfg, self.families.WAN21, dm, skip))

    def chunked(self, dm, state, x, t, ctx, rec, cou):
        with self.torch.no_grad():
            return self.ar_cache.forward_chunkwise(state, self.wan_family.WanChunkAdapter(dm), x, t, ctx,
                                                   {"cond_or_uncond": list(cou), self.RECORD_KEY: rec})

    # --- one model size ---------------------------------------------------------------------------
    def bench_model(self, tag: str, dims: dict, frames: int, batch: int, lat_hw, plan: list, reps: int,
                    patterns: list, equivalence: bool, t_call_pred=None) -> dict:
        torch = self.torch
        res: dict = {"_tag": tag, "config": dict(dims), "frames": frames, "video_frames": 4 * (frames - 1) + 1,
                     "latent_hw": list(lat_hw), "pixel_hw": [8 * lat_hw[0], 8 * lat_hw[1]], "batch": batch,
                     "cond_or_uncond": [0, 1] if batch == 2 else [0], "chunk_frames": CHUNK_FRAMES,
                     "dtype": str(self.dtype).replace("torch.", "")}
        self.results["models"][tag] = res
        cou = res["cond_or_uncond"]
        tpf = (lat_hw[0] // 2) * (lat_hw[1] // 2)
        tokens = frames * tpf
        n_chunks = -(-frames // CHUNK_FRAMES)
        res.update(tokens=tokens, tokens_per_frame=tpf, chunks=n_chunks, chunk_tokens=CHUNK_FRAMES * tpf)

        self.log(f"{tag}: building WanModel {dims} ({self.dtype}) on {self.dev}")
        dt, dm = self.timed(lambda: self.build(dims))
        res["build_s"] = dt
        res["params"] = sum(p.numel() for p in dm.parameters())
        res["weight_bytes"] = sum(p.numel() * p.element_size() for p in dm.parameters())
        x, ctx, t = self.inputs(batch, frames, lat_hw)
        shape = self.wan_family.flop_shape(dm)
        vanilla = self.flops.window_flops(shape, tokens, frames, batch)
        res["flops_uncached"] = vanilla
        ctxt = dict(dm=dm, x=x, ctx=ctx, t=t, cou=cou, tokens=tokens, frames=frames, batch=batch,
                    n_chunks=n_chunks, shape=shape, vanilla=vanilla, reps=reps, patterns=patterns, res=res,
                    t_call_pred=t_call_pred or 1.0)
        if self.cuda:
            res["cuda_after_build_bytes"] = torch.cuda.memory_allocated()
        self.write()

        stages = {
            "uncached": self.st_uncached,
            "check": self.st_check,
            "chunk_causal": self.st_restructure,
            "flowcache": self.st_flowcache,
            "kv_async": self.st_kv_async,
            "subset": self.st_subset,
        }
        for name in plan:
            if name == "check" and not equivalence:
                continue
            est = self.estimate(name, ctxt)
            if not self.budget.allows(est):
                self.skip(res, name, f"needs ~{est:.0f}s, {self.budget.left() - self.budget.reserve:.0f}s left")
                continue
            self.stage(res, name, stages[name], ctxt)
        res.pop("_tag", None)
        del dm, x, ctx, t, ctxt
        self.free()
        return res

    def estimate(self, name: str, c: dict) -> float:
        """Seconds a stage needs at least (one warm-up + one timed call of each kind)."""
        u = c.get("t_call")          # measured cold uncached call
        if u is None:
            u = c.get("t_call_pred", 1.0)
        per = {"uncached": 2 * u, "check": 0.1 * u + 1, "chunk_causal": 1.6 * u,
               "flowcache": 2.5 * u, "kv_async": 2.0 * u, "subset": 1.5 * u}
        return per.get(name, u)

    # --- stages -----------------------------------------------------------------------------------
    def st_subset(self, c):
        """MotionCache's token-subset forward: the last chunk recomputes 0/25/50/75/100% of its tokens
        (the others skip, K/V and residuals from a first full call). The chunk's block time at each
        share against the ideal (its FLOP share), and what gathering/scattering costs beyond it."""
        torch, ex = self.torch, self.executor
        dm, x, ctx, t = c["dm"], c["x"], c["ctx"], c["t"]
        n_chunks, last = c["n_chunks"], c["n_chunks"] - 1
        chunk_tokens = c["res"]["chunk_tokens"]
        share = [1.0]

        class Fixed(ex.ChunkPolicy):       # the step keeps the residuals it reuses
            def decide(self, branch, chunk, indicator, local_step, steps):
                if local_step == 0 or (chunk == last and share[0] == 1.0):
                    return ex.COMPUTE
                if chunk != last or share[0] == 0.0:
                    return ex.SKIP
                n = max(1, int(round(share[0] * chunk_tokens)))
                return ex.subset(torch.linspace(0, chunk_tokens - 1, n).round().long().to(x.device))

        state = self.chunk_executor.ChunkExecutor(Fixed(), CHUNK_FRAMES)
        row = [0]

        def call():
            r = self.record(c["frames"], range(n_chunks), row[0])
            row[0] += 1
            return self.chunked(dm, state, x, t, ctx, r, c["cou"])
        cold, y = self.timed(call)                  # writes every chunk's K/V and residual
        del y
        times, flops = {}, {}
        for frac in (0.0, 1.0, 0.25, 0.5, 0.75):
            share[0] = frac
            f0 = state.counts["transformer_flops"]
            ts = self.repeat(call, c["reps"], cold)
            if not ts:
                break
            times[frac], flops[frac] = median(ts), (state.counts["transformer_flops"] - f0) / len(ts)
        out = {"cold_s": cold, "chunk_tokens": chunk_tokens, "shares": []}
        if 0.0 in times and 1.0 in times:
            base, full = times[0.0], times[1.0] - times[0.0]        # floor (all skip) and one chunk's blocks
            fbase, ffull = flops[0.0], flops[1.0] - flops[0.0]
            for frac in (0.25, 0.5, 0.75):
                if frac in times:
                    real = times[frac] - base
                    ideal = full * (flops[frac] - fbase) / ffull
                    out["shares"].append({"share": frac, "chunk_s": real, "ideal_chunk_s": ideal,
                                          "speedup_realised": full / real if real > 0 else None,
                                          "speedup_ideal": ffull / (flops[frac] - fbase),
                                          "gather_scatter_overhead_s": real - ideal})
            out.update(all_skip_call_s=base, full_chunk_s=full)
        state.reset()
        return out

    def st_uncached(self, c):
        dm, x, ctx, t = c["dm"], c["x"], c["ctx"], c["t"]
        base = self.mem_base()

        def call():
            with self.torch.no_grad():
                return dm(x, t, ctx, transformer_options={"cond_or_uncond": list(c["cou"])})
        cold, y = self.timed(call)
        finite = bool(self.torch.isfinite(y).all())
        del y
        c["t_call"] = cold
        times = self.repeat(call, c["reps"], cold)
        med = median(times) if times else cold
        c["t_uncached"] = med
        out = {"cold_s": cold, "times_s": times, "median_s": med, "warm": bool(times),
               "flops": c["vanilla"], "tflops_per_s": c["vanilla"] / med / 1e12, "output_finite": finite}
        out.update(self.mem_since(base))
        return out

    def st_check(self, c):
        """Numerics in the real dtype: all chunks computed == block-causal masked full forward."""
        torch = self.torch
        dm = c["dm"]
        frames, lat = 10, ((16, 30) if self.cuda else (4, 6))
        x, ctx, t = self.inputs(2, frames, lat, seed=3)
        tpf = (lat[0] // 2) * (lat[1] // 2)
        L = frames * tpf
        chunk_of = torch.arange(frames).repeat_interleave(tpf) // CHUNK_FRAMES
        allowed = (chunk_of[None, :] <= chunk_of[:, None]).to(self.dev)
        mask = torch.zeros(L, L, device=self.dev, dtype=self.dtype).masked_fill(~allowed, float("-inf"))

        def masked(func, q, k, v, *a, **kw):
            if q.shape[1] == L and k.shape[1] == L:
                kw["mask"] = mask
            return func(q, k, v, *a, **kw)
        state = self.run_state(dm, self.FlowCacheConfig(), skip=False)
        out = self.chunked(dm, state, x, t, ctx, self.record(frames, range(2), 0), [0, 1]).float()
        with torch.no_grad():
            ref = dm(x, t, ctx, transformer_options={"cond_or_uncond": [0, 1],
                                                     "optimized_attention_override": masked}).float()
            bid = dm(x, t, ctx, transformer_options={"cond_or_uncond": [0, 1]}).float()
        scale = ref.abs().max().clamp_min(1e-12)
        err = ((out - ref).abs().max() / scale).item()
        diff = ((out - bid).abs().max() / scale).item()
        state.reset()
        return {"frames": frames, "latent_hw": list(lat), "tokens": L, "rel_err_vs_block_causal": err,
                "rel_diff_vs_bidirectional": diff, "finite": bool(torch.isfinite(out).all()),
                "ok": bool(err < 0.05 and err < 0.5 * diff)}

    def _chunk_call_stats(self, state, flops0):
        return state.counts["transformer_flops"] - flops0

    def st_restructure(self, c):
        """Chunk-causal, every chunk active and computed, no skipping (restructure-only policy)."""
        dm, x, ctx, t = c["dm"], c["x"], c["ctx"], c["t"]
        base = self.mem_base()
        state = self.run_state(dm, self.FlowCacheConfig(chunk_frames=CHUNK_FRAMES), skip=False)
        row = [0]
        all_chunks = range(c["n_chunks"])

        def call():
            r = self.record(c["frames"], all_chunks, row[0])
            row[0] += 1
            return self.chunked(dm, state, x, t, ctx, r, c["cou"])
        f0 = state.counts["transformer_flops"]
        cold, y = self.timed(call)
        finite = bool(self.torch.isfinite(y).all())
        del y
        flops = state.counts["transformer_flops"] - f0
        times = self.repeat(call, c["reps"], cold)
        med = median(times) if times else cold
        c["t_restructure"] = med
        out = {"cold_s": cold, "times_s": times, "median_s": med, "warm": bool(times), "flops": flops,
               "tflops_per_s": flops / med / 1e12, "output_finite": finite,
               "speedup_vs_uncached": ratio(c.get("t_uncached"), med),
               "ideal_speedup_vs_uncached": ratio(c["vanilla"], flops),
               "kv_bytes": state.store.bytes_allocated(), "kv_peak_bytes": state.store.peak_bytes}
        out.update(self.mem_since(base))
        state.reset()
        return out

    def st_flowcache(self, c):
        """FlowCache state with fixed skip patterns (see the module docstring)."""
        dm, x, ctx, t = c["dm"], c["x"], c["ctx"], c["t"]
        n_chunks = c["n_chunks"]
        branches = len(c["cou"])
        base = self.mem_base()
        cfg = self.FlowCacheConfig(rel_l1_thresh=1e9, warmup_steps=1, final_steps=0, chunk_frames=CHUNK_FRAMES)
        state = self.run_state(dm, cfg, skip=True)
        row = [0]
        all_chunks = range(n_chunks)

        def call():
            r = self.record(c["frames"], all_chunks, row[0])
            row[0] += 1
            return self.chunked(dm, state, x, t, ctx, r, c["cou"])
        cold, y = self.timed(call)            # warm-up: every chunk forced to compute, residuals kept
        del y
        policy = state.step.policy
        real_decide = policy.decide
        skip_set: set = set()

        def fixed_decide(branch, chunk, indicator, local_step, steps):
            real = real_decide(branch, chunk, indicator, local_step, steps)   # full cost, incl. sync
            compute = real is self.executor.COMPUTE or chunk not in skip_set
            return self.executor.COMPUTE if compute else self.executor.SKIP
        policy.decide = fixed_decide          # instance attribute: shadows the method

        est = c.get("t_restructure") or cold
        patterns = []
        out = {"method": "decide wrapped: real rule (thresh 1e9, warmup 1, final 0) runs, chunks not in "
                         "the pattern are forced to compute", "cold_s": cold, "patterns": patterns}
        ref = None
        for pat in c["patterns"]:
            pat = tuple(g for g in pat if g < n_chunks)
            skip_set.clear()
            skip_set.update(pat)
            s0, f0, n0 = state.counts["chunk_steps_skipped"], state.counts["transformer_flops"], state.counts["calls"]
            times = self.repeat(call, c["reps"], est)
            if not times:
                out["stopped"] = f"budget: pattern {list(pat)} not run"
                break
            calls = state.counts["calls"] - n0
            flops = (state.counts["transformer_flops"] - f0) / calls
            skipped = (state.counts["chunk_steps_skipped"] - s0) / calls
            med = median(times)
            p = {"skip": list(pat), "k": len(pat), "times_s": times, "median_s": med, "flops": flops,
                 "tflops_per_s": flops / med / 1e12, "chunk_skips_per_call": skipped,
                 "expected_chunk_skips_per_call": len(pat) * branches}
            if ref is None and not pat:
                ref = p
            if ref is not None:
                p["ideal_s"] = ref["median_s"] * flops / ref["flops"]
                p["speedup_realised"] = ref["median_s"] / med
                p["speedup_ideal"] = ref["flops"] / flops
                p["efficiency"] = p["speedup_realised"] / p["speedup_ideal"]
            if c.get("t_uncached"):
                p["speedup_vs_uncached"] = c["t_uncached"] / med
                p["ideal_speedup_vs_uncached"] = c["vanilla"] / flops
                p["ideal_s_from_uncached"] = c["t_uncached"] * flops / c["vanilla"]
            patterns.append(p)
            est = max(times)
            self.log(f"  skip {list(pat)}: {med:.3f}s, {p['tflops_per_s']:.0f} TFLOP/s, "
                     f"speedup {p.get('speedup_realised', float('nan')):.2f} (ideal {p.get('speedup_ideal', float('nan')):.2f})")
            self.write()
        residual_bytes = state.step.outputs.peak_bytes
        out.update(kv_bytes=state.store.bytes_allocated(), kv_peak_bytes=state.store.peak_bytes,
                   residual_bytes=residual_bytes)
        out.update(self.mem_since(base))
        c["flowcache_patterns"] = {tuple(p["skip"]): p for p in patterns}

        # decision overhead, while the model and embeddings are at hand
        if self.budget.allows(5 + (c.get("t_call") or 1) * 0.5):
            out["decision_overhead"] = self.decision_overhead(c)
        del policy.decide
        state.reset()
        return out

    def decision_overhead(self, c) -> dict:
        torch = self.torch
        dm, x, ctx, t = c["dm"], c["x"], c["ctx"], c["t"]
        batch, frames, n_chunks = c["batch"], c["frames"], c["n_chunks"]
        branches = len(c["cou"])

        def embed_head():   # the model's own modules: what every chunk-causal call runs at least
            with torch.no_grad():
                xe = dm.patch_embedding(x.float()).to(x.dtype)
                grid = xe.shape[2:]
                xe = xe.flatten(2).transpose(1, 2)
                e = dm.time_embedding(self.wan.sinusoidal_embedding_1d(dm.freq_dim, t.flatten()).to(xe.dtype))
                e = e.reshape(batch, frames, -1)
                dm.time_projection(e).unflatten(2, (6, dm.dim))
                dm.text_embedding(ctx)
                return dm.unpatchify(dm.head(xe, e), grid)
        self.timed(embed_head)
        eh = self.repeat(embed_head, 5, 0.1)

        # isolated decisions: a fresh policy, indicators [1, 6, dim] of each (branch, chunk)
        with torch.no_grad():
            def e0_of(tt):
                e = dm.time_embedding(self.wan.sinusoidal_embedding_1d(dm.freq_dim, tt.flatten()).to(x.dtype))
                return dm.time_projection(e.reshape(batch, frames, -1)).unflatten(2, (6, dm.dim))
            inds = [e0_of(t), e0_of(t * 0.99)]
        pol = self.FlowCachePolicy(self.FlowCacheConfig(rel_l1_thresh=1e9, warmup_steps=0, final_steps=0),
                                   self.wan_family.resolve_coefficients("auto", dm.dim))
        keys = [(b, g) for b in range(branches) for g in range(n_chunks)]
        for b, g in keys:
            pol.decide(b, g, inds[0][b:b + 1, g * CHUNK_FRAMES], 0, STEPS)
            pol.state(b, g).computed = True
        rounds = 20

        def decide_all():
            for r in range(rounds):
                ind = inds[(r + 1) % 2]
                for b, g in keys:
                    pol.decide(b, g, ind[b:b + 1, g * CHUNK_FRAMES], 1, STEPS)
        self.timed(decide_all)
        dt, _ = self.timed(decide_all)
        per = dt / (rounds * len(keys))
        pats = c.get("flowcache_patterns", {})
        all_skip = pats.get(tuple(range(n_chunks)))
        none_skip = pats.get(())
        out = {"embed_head_times_s": eh, "embed_head_s": median(eh),
               "decide_isolated_s": per, "decisions_per_call": len(keys),
               "decide_per_call_isolated_s": per * len(keys)}
        if all_skip:
            out["all_skip_s"] = all_skip["median_s"]
            if eh:
                out["all_skip_minus_embed_head_s"] = all_skip["median_s"] - median(eh)
        if none_skip and c.get("t_restructure"):
            out["flowcache_compute_all_s"] = none_skip["median_s"]
            out["restructure_s"] = c["t_restructure"]
            out["flowcache_compute_all_minus_restructure_s"] = none_skip["median_s"] - c["t_restructure"]
        return out

    def st_kv_async(self, c):
        """Chunks start one after another; last call: chunks 0..n-2 frozen, chunk n-1 active."""
        n = c["n_chunks"]
        schedule = [sorted({r - 1, r} & set(range(n))) for r in range(n + 1)]
        out = {"schedule_active_chunks": schedule, "budget_chunks": 1}
        for name, compress in (("no_compress", False), ("compress", True)):
            est = (c.get("t_restructure") or c.get("t_call") or 1.0) * 1.5
            if not self.budget.allows(est):
                out[name] = {"skipped": "budget"}
                continue
            out[name] = self._async_run(c, schedule, compress)
            self.free()
            self.write()
        a, b = out.get("no_compress", {}), out.get("compress", {})
        if a.get("final_kv_bytes") and b.get("final_kv_bytes"):
            out["final_kv_ratio_compress"] = b["final_kv_bytes"] / a["final_kv_bytes"]
            out["kv_peak_ratio_compress"] = b["kv_peak_bytes"] / a["kv_peak_bytes"]
            if a.get("cuda_peak_bytes") and b.get("cuda_peak_bytes"):
                out["cuda_peak_ratio_compress"] = b["cuda_peak_bytes"] / a["cuda_peak_bytes"]
            out["last_call_speedup_compress"] = a["rows"][-1]["s"] / b["rows"][-1]["s"]
        return out

    def _async_run(self, c, schedule, compress: bool) -> dict:
        dm, x, ctx, t = c["dm"], c["x"], c["ctx"], c["t"]
        base = self.mem_base()
        cfg = self.FlowCacheConfig(chunk_frames=CHUNK_FRAMES, kv_compress=compress, kv_budget_chunks=1)
        state = self.run_state(dm, cfg, skip=False)
        rows, peak = [], 0
        for r, act in enumerate(schedule):
            rec = self.record(c["frames"], set(act), r)
            f0 = state.counts["transformer_flops"]
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            dt, y = self.timed(lambda: self.chunked(dm, state, x, t, ctx, rec, c["cou"]))
            del y
            m = self.mem_since(base)
            if m["cuda_peak_bytes"] is not None:
                peak = max(peak, m["cuda_peak_bytes"])
            rows.append({"active": act, "s": dt, "flops": state.counts["transformer_flops"] - f0,
                         "kv_bytes": state.store.bytes_allocated(), "kv_peak_bytes": state.store.peak_bytes,
                         "frozen": sorted(g for g in range(c["n_chunks"]) if state.store.is_frozen(0, g)),
                         **m})
        out = {"rows": rows, "final_kv_bytes": rows[-1]["kv_bytes"], "kv_peak_bytes": state.store.peak_bytes,
               "cuda_peak_bytes": peak if self.cuda else None,
               "final_cuda_held_bytes": rows[-1].get("cuda_held_bytes"),
               "history_chunks_merged": state.store.history_chunks(0, 0) if hasattr(state.store, "history_chunks") else None}
        state.reset()
        return out


# ----------------------------------------------------------------------------------------------
# planning the large model
# ----------------------------------------------------------------------------------------------
MAGI_SIZES = {"4.5B": dict(num_layers=34, hidden=3072, ffn=12288, heads=24, kv_heads=8, head_dim=128, cond_dim=768)}
TINY_MAGI_SIZES = {"4.5B": dict(num_layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, cond_dim=16)}
MAGI_LATENT_HW, TINY_MAGI_LATENT_HW = (90, 90), (8, 8)     # 720 x 720 pixels


def bench_magi(b: Bench, dims: dict, lat_hw, reps: int) -> dict:
    """MAGI-1 at 4.5B dimensions with random weights: one chunk forward against 0-4 cached chunks,
    a 4-chunk window (+ clean re-run chunk) in one call, time and peak memory per chunk, and
    SDPA in the model dtype against an fp32 reference of the same attention."""
    torch = b.torch
    magi = importlib.import_module("arcache_pack.model_patches.magi_model")
    cfg = magi.MagiConfig(in_channels=16, caption_channels=b.text_dim, caption_max_length=800, gated=False, **dims)
    base = b.mem_base()
    with torch.device("meta"):
        model = magi.MagiDiT(config=cfg, dtype=b.dtype, operations=b.ops.disable_weight_init)
    model = model.to_empty(device=b.dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan = p.shape[-1] if p.ndim > 1 else 1
            std = fan ** -0.5 if p.ndim > 1 else 0.02
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    out = {"params": sum(p.numel() for p in model.parameters()), "weights": b.mem_since(base)}
    h, w = lat_hw
    tokens = 6 * (h // 2) * (w // 2)
    text = [torch.randn(40, b.text_dim, device=b.dev)]
    x = torch.randn(1, 16, 6 * 5, h, w, device=b.dev, dtype=b.dtype)
    cache = magi.kv_store(cfg, 5, tokens)
    with torch.no_grad():
        model.forward_chunks(x[:, :, :6 * 4], magi.ChunkForward(0, [0.9999] * 4, text * 4, [0, 1, 2, 3], write=(0, 1, 2, 3)),
                             cache)                                    # 4 clean chunks in the cache
        rows = []
        for back in range(5):                                          # chunk 4 against `back` cached chunks
            call = magi.ChunkForward(4, [0.5], text, [4 - back])
            m0 = b.mem_base()
            times = [b.timed(lambda: model.forward_chunks(x[:, :, 24:30], call, cache))[0] for _ in range(reps)]
            rows.append({"cached_chunks": back, "keys": (back + 1) * tokens, "median_s": median(times),
                         **b.mem_since(m0)})
        window = magi.ChunkForward(0, [0.9999, 0.2, 0.4, 0.6, 0.8], text * 5, [0, 0, 0, 1, 2])   # upstream's 4+1 call
        m0 = b.mem_base()
        t_win = median([b.timed(lambda: model.forward_chunks(x, window, None))[0] for _ in range(reps)])
        win = {"chunks": 5, "tokens": 5 * tokens, "median_s": t_win, **b.mem_since(m0)}
        q = torch.randn(1, cfg.heads, min(tokens, 4096), cfg.head_dim, device=b.dev, dtype=b.dtype)
        k = torch.randn(1, cfg.kv_heads, 2 * tokens, cfg.head_dim, device=b.dev, dtype=b.dtype)
        v = torch.randn_like(k)
        fast = magi.attend(q, k, v).float()
        ref = magi.attend(q.float(), k.float(), v.float())
        sdpa = {"dtype": str(b.dtype), "max_abs_err_vs_fp32": (fast - ref).abs().max().item(),
                "rel_err_vs_fp32": ((fast - ref).norm() / ref.norm()).item()}
    out.update(tokens_per_chunk=tokens, per_chunk=rows, window=win, sdpa=sdpa,
               kv_cache_bytes_per_chunk=cache.bytes_allocated() // 4)
    del model, cache
    return out


def bench_stream(b: Bench, lat_hw, reps: int, t_call_s) -> dict:
    """The live stream's decode at real size: a Wan 2.1 VAE (dim 96, random weights) through the
    pack's stream decoder, one async block (5 latent frames) at a time, against ComfyUI's whole
    decode of the same latents (the equality the CPU tests prove bit for bit, here on the device);
    seconds per latent frame, the VAE's peak memory; then, from the 1.3B window call measured
    above, the shipped long async schedule's TTFF and sustained frames/s (computed from measured
    parts: calls x call time + the block decodes)."""
    torch = b.torch
    import comfy.sd
    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_checkpoints import tiny_vae_tensors
    vae_stream = importlib.import_module("arcache_pack.model_patches.vae_stream")
    base_dim = 8 if b.args.tiny else 96
    sd = tiny_vae_tensors(None, seed=1, base_dim=base_dim)
    m0 = b.mem_base()
    vae = comfy.sd.VAE(sd=sd)
    weights = b.mem_since(m0)
    g = torch.Generator().manual_seed(0)
    blocks, per = 4, CHUNK_FRAMES
    z = torch.randn(1, IN_DIM, 1 + blocks * per, *lat_hw, generator=g)
    m0 = b.mem_base()
    t_whole, whole = b.timed(lambda: vae_stream.decode_whole(vae, z))
    whole_mem = b.mem_since(m0)
    times, pieces = [], []
    dec = vae_stream.WanStreamDecoder(vae)
    m0 = b.mem_base()
    for i, (lo, hi) in enumerate([(0, 1 + per)] + [(1 + k * per, 1 + (k + 1) * per) for k in range(1, blocks)]):
        dt, frames = b.timed(lambda lo=lo, hi=hi: dec.push(z[:, :, lo:hi]))
        times.append(dt / (hi - lo))
        pieces.append(frames)
    stream_mem = b.mem_since(m0)
    stream = torch.cat(pieces)
    diff = (stream - whole).abs()
    q_equal = ((stream * 255).round() == (whole * 255).round()).float().mean().item()
    out = {"vae_dim": base_dim, "latent_hw": list(lat_hw), "latent_frames": int(z.shape[2]), "weights": weights,
           "whole_decode_s": t_whole, "whole_decode_memory": whole_mem, "stream_memory": stream_mem,
           "stream_s_per_latent_frame": median(times[1:]) if len(times) > 1 else times[0],
           "first_piece_s_per_latent_frame": times[0], "max_abs_diff_vs_vaedecode": diff.max().item(),
           "uint8_identical_fraction": q_equal, "frames": int(stream.shape[0]),
           "vae_memory_estimate_bytes": vae.memory_used_decode((1, IN_DIM, per, *lat_hw), vae.vae_dtype)}
    if t_call_s:                       # the shipped long async schedule: 30 steps, blocks of 5, ar_step 5
        dec_block = out["stream_s_per_latent_frame"] * per
        first = 30 * t_call_s + dec_block                      # the first block is final after 30 calls
        period = 5 * t_call_s + dec_block                      # then a block every 5 calls
        out["shipped_async_computed"] = {
            "window_call_s": t_call_s, "ttff_s": first, "block_period_s": period,
            "sustained_fps": 4 * per / period, "realtime_factor": period / (4 * per / 24.0),
            "decode_share": dec_block / period,
            "note": "computed from the measured window call (batch 2: cfg > 1) and block decode; not a sampler run"}
    del vae, dec
    return out


def bench_causal(b: Bench, dims: dict, lat_hw, chunks: tuple) -> dict:
    """Few-step causal Wan at 1.3B dimensions (random weights; 480x832 at full size): the pack's causal
    run end to end through ComfyUI's model loading (a random state dict in the Wan 2.1 layout), with
    Self-Forcing's schedule (4 steps, chunks of 3) over the full history and with LongLive's 12-frame
    window + 3-frame sink: TTFF, sustained frames/s, real-time factor, the K/V store's peak and the
    CUDA peak, at two lengths (the window's memory must not grow with the length)."""
    torch = b.torch
    import comfy.sd
    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_checkpoints import random_tensors, wan21_dit_shapes
    cs = importlib.import_module("arcache_pack.cache_core.causal_schedule")
    video_run = importlib.import_module("arcache_pack.model_patches.video_run")
    shapes = wan21_dit_shapes(dim=dims["dim"], ffn_dim=dims["ffn_dim"], num_layers=dims["num_layers"], fps_keys=False)
    sd = {k: v.to(b.dtype) for k, v in random_tensors(shapes, seed=3).items()}
    mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": b.dtype})
    del sd
    setattr(mp.model, "arcache_causal", "bench: random weights")
    h, w = 8 * lat_hw[0], 8 * lat_hw[1]
    ctx = torch.zeros(1, 512, 4096)
    out = {"pixel_hw": [h, w], "runs": []}
    for name, sched in (("full history", cs.CausalSchedule()), ("window 12 + sink 3", cs.CausalSchedule(
            attention_frames=12, sink_frames=3))):
        for n in chunks:
            if not b.budget.allows(30.0):
                out["runs"].append({"attention": name, "chunks": n, "skipped": "time budget"})
                continue
            req = video_run.VideoRequest(width=w, height=h, length=4 * (3 * n - 1) + 1, seed=0, steps=4, cfg=1.0,
                                         schedule=sched, positives=[[[ctx, {}]]], negative=[[ctx, {}]])
            m0 = b.mem_base()
            t0 = time.perf_counter()
            _, rep = b.families.new_video_run(mp, req).run()
            wall = time.perf_counter() - t0
            out["runs"].append({"attention": name, "chunks": n, "wall_s": wall, "ttff_s": rep["ttff_s"],
                                "sustained_fps": rep["sustained_fps"], "realtime_factor": rep["realtime_factor"],
                                "kv_bytes_peak": rep["kv_bytes_peak"], "model_calls": rep["model_calls"],
                                "transformer_flops": rep["transformer_flops"], **b.mem_since(m0)})
            b.log(f"causal {name}, {n} chunks: {wall:.2f}s, TTFF {rep['ttff_s']:.3f}s, "
                  f"{rep['sustained_fps']} fps, K/V peak {rep['kv_bytes_peak'] / GiB:.2f} GiB")
    del mp
    return out


def bench_sp(b: Bench, dims: dict, lat_hw, reps: int) -> dict:
    """Sequence parallel on one GPU (one GPU cannot host two NCCL ranks): one chunk's block pass at 1.3B
    dimensions (5 latent frames, through the chunk adapter as the executor runs it) against a timed local
    copy of the bytes one rank would send for it at 2/4/8 ranks (bench/seq_parallel.py's model, which the
    CPU bench checks against the real transfers). At one rank the code path is the one-process path
    (`NO_SP`: every sharding operation is the identity), so its overhead is nil by construction; the
    ratio copy/compute is the transfer's share of a pass if the link were as fast as this GPU's memory."""
    torch = b.torch
    import comfy.sd
    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_checkpoints import random_tensors, wan21_dit_shapes
    sys.path.insert(0, str(REPO))
    seq_bench = importlib.import_module("bench.seq_parallel")
    shapes = wan21_dit_shapes(dim=dims["dim"], ffn_dim=dims["ffn_dim"], num_layers=dims["num_layers"], fps_keys=False)
    sd = {k: v.to(b.dtype) for k, v in random_tensors(shapes, seed=4).items()}
    mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": b.dtype})
    del sd
    dm = mp.model.diffusion_model.to(b.dev)
    adapter = importlib.import_module("arcache_pack.model_patches.wan").WanChunkAdapter(dm)
    x = torch.randn(1, 16, 5, *lat_hw, device=b.dev, dtype=b.dtype)
    ctx = torch.zeros(1, 512, dm.text_embedding[0].weight.shape[1], device=b.dev, dtype=b.dtype)
    call = adapter.embed(x, torch.full((1,), 500.0, device=b.dev), ctx, {})
    n, elt = call.tokens.shape[1], call.tokens.element_size()
    attention = b.chunk_executor.PassAttention()
    with torch.no_grad():
        t_pass = median(b.repeat(lambda: adapter.run_blocks(call, slice(0, 1), (0, 5), call.tokens, attention), reps, 1.0))
    out = {"tokens": n, "dim": dm.dim, "layers": adapter.num_layers, "pass_s": t_pass, "ranks": {}}
    for w in (2, 4, 8):                 # (a real run also needs w to divide the heads: 1.3B has 12)
        sent = adapter.num_layers * seq_bench.wan_layer_bytes(n, dm.dim, w, elt) + seq_bench.gather_bytes(n, dm.dim, w, elt)
        src = torch.empty(sent, dtype=torch.uint8, device=b.dev)
        dst = torch.empty_like(src)
        t_copy = median(b.repeat(lambda: dst.copy_(src), reps, 0.01))
        out["ranks"][w] = {"divides_heads": dm.num_heads % w == 0, "bytes_per_pass": sent, "copy_s": t_copy,
                           "pass_share_s": t_pass / w,
                           "copy_vs_share": ratio(t_copy, t_pass / w)}
        b.log(f"sp {w} ranks: {sent / 1e6:.1f} MB per pass, copy {t_copy * 1e3:.2f} ms vs a rank's share of the pass "
              f"{t_pass / w * 1e3:.2f} ms")
    del mp, dm
    return out


def plan_large(b: Bench, dims: dict, lat_hw, t_per_flop: float, free_bytes, weight_bytes):
    """Largest (frames, batch) whose K/V + activations fit, and whose minimum run fits the time."""
    cands = [(25, 2), (25, 1), (20, 1), (15, 1), (10, 1)] if not b.args.tiny else [(25, 2)]
    tpf = (lat_hw[0] // 2) * (lat_hw[1] // 2)
    d, f, layers = dims["dim"], dims["ffn_dim"], dims["num_layers"]
    shape = b.flops.DiTShape(dim=d, ffn_dim=f, num_layers=layers, text_len=b.text_len, text_dim=b.text_dim)
    tried = []
    for frames, batch in cands:
        tokens = frames * tpf
        chunk = CHUNK_FRAMES * tpf
        kv = 2 * layers * batch * tokens * d * 2
        act_chunked = batch * tokens * d * 2 * 5 + batch * chunk * (8 * d + 3 * f) * 2
        act_uncached = batch * tokens * (8 * d + 3 * f) * 2
        need = weight_bytes + max(kv + act_chunked, act_uncached) + 2 * 10**9
        t_call = b.flops.window_flops(shape, tokens, frames, batch) * t_per_flop * 1.15
        # minimum: build, uncached warm-up + 1, FlowCache warm-up + 2 patterns
        t_need = 10 + 2 * t_call + 2.2 * t_call
        fits_mem = free_bytes is None or need <= 0.95 * free_bytes
        fits_time = b.budget.allows(t_need)
        tried.append({"frames": frames, "batch": batch, "need_bytes": need, "kv_bytes": kv,
                      "t_call_pred_s": t_call, "t_need_s": t_need, "fits_memory": fits_mem, "fits_time": fits_time})
        if fits_mem and fits_time:
            return frames, batch, t_call, tried
    return None, None, None, tried


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(REPO / ".host" / "ComfyUI")),
                    help="ComfyUI tree to import comfy from (default .host/ComfyUI or $COMFYUI_PATH)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-<device>.json)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-time budget from script start")
    ap.add_argument("--reserve-s", type=float, default=None, help="kept back at the end (default 12 s GPU, 2 s CPU)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny configs and latent (CPU smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case (default 3, tiny 2)")
    ap.add_argument("--skip-14b", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the small block-causal equivalence check")
    ap.add_argument("--allocator", choices=["expandable", "default"], default="expandable",
                    help="expandable: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless already set")
    a = ap.parse_args(argv)
    if a.reserve_s is None:
        a.reserve_s = 12.0 if a.device == "cuda" else 2.0
    if a.reps is None:
        a.reps = 1 if a.tiny else 3
    return a


def table_rows(results: dict) -> list:
    """The headline numbers, one row per (model, case): what the table prints and the JSON keeps."""
    rows = []
    for tag, m in results.get("models", {}).items():
        if not isinstance(m, dict) or "skipped" in m:
            continue

        def add(case, seconds, flops, speedup=None, ideal=None, kv=None, peak=None):
            if seconds is None:
                return
            rows.append({"model": tag, "case": case, "s": seconds,
                         "tflops_per_s": (flops / seconds / 1e12) if flops else None,
                         "speedup": speedup, "speedup_ideal": ideal, "kv_bytes": kv, "cuda_peak_bytes": peak})
        u = m.get("uncached") or {}
        add("uncached", u.get("median_s"), u.get("flops"), peak=u.get("cuda_peak_bytes"))
        cc = m.get("chunk_causal") or {}
        add("chunk-causal all", cc.get("median_s"), cc.get("flops"), cc.get("speedup_vs_uncached"),
            cc.get("ideal_speedup_vs_uncached"), cc.get("kv_bytes"), cc.get("cuda_peak_bytes"))
        fc = m.get("flowcache") or {}
        for p in fc.get("patterns", []):
            add(f"skip {p['skip']}", p.get("median_s"), p.get("flops"), p.get("speedup_realised"),
                p.get("speedup_ideal"), fc.get("kv_bytes"))
        ka = m.get("kv_async") or {}
        for name in ("no_compress", "compress"):
            d = ka.get(name) or {}
            if d.get("rows"):
                last = d["rows"][-1]
                add(f"async last call ({name})", last["s"], last["flops"], kv=d.get("final_kv_bytes"),
                    peak=d.get("cuda_peak_bytes"))
        mg = m.get("magi") or {}
        for r in mg.get("per_chunk", []):
            add(f"chunk vs {r['cached_chunks']} cached", r["median_s"], None, peak=r.get("cuda_peak_bytes"),
                kv=mg.get("kv_cache_bytes_per_chunk"))
        if mg.get("window"):
            add("window 4+1 chunks", mg["window"]["median_s"], None, peak=mg["window"].get("cuda_peak_bytes"))
    return rows


def print_table(rows: list):
    def f(v, scale=1.0):
        return "-" if v is None else f"{v / scale:.3g}"
    head = ("model", "case", "seconds", "TFLOP/s", "speedup", "ideal", "KV GiB", "CUDA peak GiB")
    lines = [head] + [(r["model"], r["case"], f(r["s"]), f(r["tflops_per_s"]), f(r["speedup"]),
                       f(r["speedup_ideal"]), f(r["kv_bytes"], GiB), f(r["cuda_peak_bytes"], GiB)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))
    print("speedup: chunk-causal vs uncached; skip patterns vs skipping none (FlowCache state). "
          "ideal: the analytic FLOP ratio (cache_core/flops.py).")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and args.allocator == "expandable":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    comfy_path = Path(args.comfyui).resolve()
    results: dict = {"schema": "arcache-gpu-bench/1", "argv": sys.argv[1:], "tiny": args.tiny,
                     "budget_s": args.budget_s, "complete": False, "models": {}, "errors": {}, "notes": [],
                     "skipped_stages": [],
                     "comfyui_path": str(comfy_path), "python": platform.python_version(),
                     "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                     "source": source_fingerprint()}

    def fail(msg: str, out_default="bench/results/gpu-failed.json") -> int:
        print("ERROR: " + msg, file=sys.stderr, flush=True)
        results["errors"]["setup"] = msg
        out = Path(args.out or REPO / out_default)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(clean(results), indent=1))
        return 2

    if not (comfy_path / "comfy" / "ldm" / "wan" / "model.py").is_file():
        return fail(f"no ComfyUI tree at {comfy_path} (pass --comfyui PATH or carry .host/ComfyUI)")
    miss = missing_modules()
    if importlib.util.find_spec("torch") is None:
        miss = ["torch"] + miss
    if miss:
        return fail("missing Python packages for ComfyUI's comfy.ldm.wan.model import chain: "
                    f"{' '.join(miss)}\n  install them with:  python3 -m pip install {' '.join(miss)}")

    # ---- imports: torch, ComfyUI (comfy.*), the pack as package `arcache_pack` ------------------
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but torch.cuda.is_available() is False (use --device cpu --tiny to test)")
    sys.path.insert(0, str(comfy_path))
    try:
        import comfy.cli_args
        if args.device == "cpu":
            comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.ops
        import comfy.ldm.wan.model as wan_model
        import comfy.ldm.modules.attention as comfy_attention
    except ImportError as exc:
        return fail(f"importing ComfyUI from {comfy_path} failed: {exc}\n  the chain needs "
                    f"python3 -m pip install {' '.join(NEEDED.values())}")
    if "arcache_pack" not in sys.modules:     # the repo as a package, without its ComfyUI entry point
        pkg = types.ModuleType("arcache_pack")
        pkg.__path__ = [str(REPO)]
        sys.modules["arcache_pack"] = pkg
    ar_cache = importlib.import_module("arcache_pack.model_patches.ar_cache")
    families = importlib.import_module("arcache_pack.model_patches.families")
    wan_family = importlib.import_module("arcache_pack.model_patches.wan")
    executor = importlib.import_module("arcache_pack.cache_core.chunk_step")
    chunk_executor = importlib.import_module("arcache_pack.cache_core.chunk_executor")
    flops = importlib.import_module("arcache_pack.cache_core.flops")
    fcp = importlib.import_module("arcache_pack.cache_core.flowcache_policy")
    rec = importlib.import_module("arcache_pack.cache_core.record")

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    if args.device == "cpu":
        dev_name = f"cpu-{dev_name}"
    results.update(device=dev_name, device_type=args.device, torch=torch.__version__,
                   cuda=torch.version.cuda, attention=getattr(comfy_attention.optimized_attention, "__name__", "?"),
                   import_s=time.monotonic() - T0)
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        results.update(gpu_total_bytes=props.total_memory, gpu_sms=props.multi_processor_count)
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / f"gpu-{slug(dev_name)}{'-tiny' if args.tiny else ''}.json")
    if args.device == "cpu":
        torch.set_num_threads(1)          # tiny tensors: more threads only add contention

    b = Bench(args, dict(torch=torch, wan_model=wan_model, ops=comfy.ops, ar_cache=ar_cache, families=families,
                         wan_family=wan_family, executor=executor, chunk_executor=chunk_executor, flops=flops,
                         FlowCacheConfig=fcp.FlowCacheConfig, FlowCachePolicy=fcp.FlowCachePolicy,
                         StepRecord=rec.StepRecord, RECORD_KEY=rec.RECORD_KEY, results=results))
    b.log(f"device {dev_name}, torch {torch.__version__}, attention {results['attention']}, "
          f"out {args.out}, budget {args.budget_s:.0f}s")
    b.write()
    sizes = TINY_SIZES if args.tiny else SIZES
    lat = TINY_LATENT_HW if args.tiny else LATENT_HW
    results["window"] = {"latent_frames": FRAMES, "video_frames": 4 * (FRAMES - 1) + 1, "latent_hw": list(lat),
                         "pixel_hw": [8 * lat[0], 8 * lat[1]], "chunk_frames": CHUNK_FRAMES,
                         "tokens": FRAMES * (lat[0] // 2) * (lat[1] // 2), "chunk_sigmas": list(CHUNK_SIGMAS),
                         "text_context": [b.text_len, b.text_dim], "batch_small": 2}

    # ---- 1.3B, everything ------------------------------------------------------------------------
    small = b.bench_model("1.3B", sizes["1.3B"], FRAMES, 2, lat,
                          ["uncached", "check", "chunk_causal", "flowcache", "kv_async", "subset"],
                          args.reps, PATTERNS_TINY if args.tiny else PATTERNS, equivalence=not args.no_check)
    b.write()

    # ---- 14B, the key numbers if memory and time allow --------------------------------------------
    if args.skip_14b:
        results["models"]["14B"] = {"skipped": "--skip-14b"}
    else:
        try:
            unc = small.get("uncached") or {}
            t_per_flop = (unc["median_s"] / unc["flops"]) if unc.get("median_s") else None
            if t_per_flop is None:
                results["models"]["14B"] = {"skipped": "no 1.3B uncached timing to predict from"}
            else:
                b.free()
                free = torch.cuda.mem_get_info()[0] if b.cuda else None
                wbytes = b.count_params(sizes["14B"]) * (2 if b.cuda else 4)
                frames, batch, t_call, tried = plan_large(b, sizes["14B"], lat, t_per_flop, free, wbytes)
                plan_info = {"free_bytes_before": free, "weight_bytes_pred": wbytes, "candidates": tried}
                if frames is None:
                    results["models"]["14B"] = {"skipped": "no window/batch fits the free memory and time left",
                                                "plan": plan_info}
                else:
                    b.log(f"14B plan: {frames} latent frames, batch {batch}, predicted {t_call:.1f}s per call")
                    big = b.bench_model("14B", sizes["14B"], frames, batch, lat,
                                        ["uncached", "flowcache", "kv_async", "chunk_causal"],
                                        max(1, min(args.reps, 2)), PATTERNS_TINY if args.tiny else PATTERNS_14B,
                                        equivalence=False,
                                        t_call_pred=t_call)
                    big["plan"] = plan_info
                    if batch != 2 or frames != FRAMES:
                        results["notes"].append(f"14B measured at {frames} latent frames, batch {batch} "
                                                "(full window at batch 2 does not fit: K/V alone ~84 GB)")
        except Exception as exc:
            results["errors"]["14B"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
            results["models"].setdefault("14B", {})["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        b.free()

    # ---- the live stream's decode (Wan 2.1 VAE at full width, random weights) ---------------------
    stream_where = results["models"].setdefault("stream", {"_tag": "stream"})
    b.stage(stream_where, "stream", bench_stream, b, lat, max(1, min(args.reps, 3)),
            (small.get("uncached") or {}).get("median_s"))
    b.write()

    # ---- few-step causal Wan at 1.3B dimensions, 480x832 (random weights) -------------------------
    causal_where = results["models"].setdefault("causal", {"_tag": "causal"})
    b.stage(causal_where, "causal", bench_causal, b, sizes["1.3B"], TINY_LATENT_HW if args.tiny else (60, 104),
            (2, 4) if args.tiny else (8, 32))
    b.write()

    # ---- sequence parallel on one GPU: a chunk pass against a local copy of what a rank would send ------
    sp_where = results["models"].setdefault("sp", {"_tag": "sp"})
    b.stage(sp_where, "sp", bench_sp, b, sizes["1.3B"], TINY_LATENT_HW if args.tiny else (60, 104),
            max(1, min(args.reps, 3)))
    b.write()

    # ---- MAGI-1 at 4.5B dimensions (random weights) ------------------------------------------------
    magi_where = results["models"].setdefault("MAGI-1-4.5B", {"_tag": "MAGI-1-4.5B"})
    b.stage(magi_where, "magi", bench_magi, b, (TINY_MAGI_SIZES if args.tiny else MAGI_SIZES)["4.5B"],
            TINY_MAGI_LATENT_HW if args.tiny else MAGI_LATENT_HW, max(1, min(args.reps, 3)))

    results["table"] = table_rows(results)
    results["complete"] = True
    b.write()
    print()
    print_table(results["table"])
    if results["errors"]:
        print(f"\n{len(results['errors'])} stage error(s): {', '.join(results['errors'])}")
    print(f"\nwrote {args.out} in {time.monotonic() - T0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
