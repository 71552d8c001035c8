"""The causal Wan run against an independent re-statement of upstream's causal inference.

Written here from the public code, not from the pack:
- the loop: guandeh17/Self-Forcing @33593df pipeline/causal_inference.py:134-244 (noise for every
  generated frame first as [B, F, C, H, W]; prefix blocks once at timestep 0; per block and step a
  [B, F] timestep, x0 = x - sigma flow in float64 (utils/wan_wrapper.py:169-193), re-noising
  (1 - sigma) x0 + sigma eps after every step but the last (utils/scheduler.py:159-176), sigma at
  the grid point nearest the timestep; then the clean block at context_noise);
- the K/V cache: wan/modules/causal_model.py:201-235 (a token buffer of the whole video or of
  local_attn_size frames, global/local end indices, a roll that keeps sink_size frames and drops
  the oldest others when a new block does not fit, RoPE at absolute frames, attention over the
  last max_attention_size tokens of the buffer);
- LongLive's prompt switch: NVlabs/LongLive v1.0 pipeline/interactive_causal_inference.py:34-96
  and wan/modules/causal_model.py:213-349 (the last min(local_attn_size, current) frames re-run
  at context_noise under the new prompt; with the global sink, a re-computed block writes from
  the end of the sink on, so the sink keeps its K/V).
The transformer is toy_world's ToyWan (an independent Wan 2.1, checked against ComfyUI's in
test_toy_model_matches_comfy.py) with its self-attention routed through that buffer. Both sides
draw their noise from one seeded generator in upstream's order.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tools.inprocess import load_comfy, pack

load_comfy(cpu=True)
import comfy.latent_formats  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from toy_world.model import HEAD_DIM, load_toy_wan, rope_tables, timestep_embedding, apply_rope  # noqa: E402

cs = pack("cache_core.causal_schedule")
video_run = pack("model_patches.video_run")
families = pack("model_patches.families")
H = W = 8                      # latent pixels: 4 x 4 tokens per frame
FS = (H // 2) * (W // 2)


# --- the independent re-statement -------------------------------------------------------------------

class Upstream:
    """Self-Forcing's CausalWanModel forward with its K/V buffers, on ToyWan's weights."""

    def __init__(self, toy, total_frames: int, local_attn_size: int = -1, sink_size: int = 0, global_sink=True):
        self.toy, self.heads = toy, toy.cfg.num_heads
        self.size = (total_frames if local_attn_size == -1 else local_attn_size) * FS
        self.max_attention = self.size
        self.local, self.sink = local_attn_size, sink_size * FS
        self.global_sink = global_sink
        d = toy.cfg.dim
        self.caches = [dict(k=torch.zeros(1, self.size, d), v=torch.zeros(1, self.size, d), g=0, l=0)
                       for _ in toy.blocks]

    def attend(self, c, q, k, v, start, recompute_protect):
        n = q.shape[1]
        end = start + n
        if self.local != -1 and end > c["g"] and n + c["l"] > self.size:     # roll: keep the sink, drop the oldest
            ev = n + c["l"] - self.size
            rolled = c["l"] - ev - self.sink
            for t in ("k", "v"):
                c[t][:, self.sink:self.sink + rolled] = c[t][:, self.sink + ev:self.sink + ev + rolled].clone()
            le = c["l"] + end - c["g"] - ev
        else:
            le = c["l"] + end - c["g"]
        ls = le - n
        ws = max(ls, self.sink) if recompute_protect and end <= c["g"] and start > 0 else ls
        c["k"][:, ws:le], c["v"][:, ws:le] = k[:, ws - ls:], v[:, ws - ls:]
        lo = max(0, le - self.max_attention)
        keys, vals = c["k"][:, lo:le], c["v"][:, lo:le]
        if end > c["g"]:
            c["g"] = end
            c["l"] = le
        hd = q.shape[-1] // self.heads
        split = lambda t: t.unflatten(-1, (self.heads, hd)).transpose(1, 2)     # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(keys), split(vals)).transpose(1, 2).flatten(2)

    @torch.no_grad()
    def __call__(self, x, t, context, start_frame: int, recompute_protect=False):
        toy = self.toy
        B, _, f, h, w = x.shape
        tok, grid = toy._patchify(x)
        t = torch.full((f,), float(t)) if isinstance(t, (int, float)) else torch.tensor(t, dtype=torch.float32)
        e = toy.time_embedding(timestep_embedding(t, toy.cfg.freq_dim)).view(1, f, -1)
        e0 = toy.time_projection(e).unflatten(2, (6, toy.cfg.dim))
        cos, sin = rope_tables(start_frame + f, grid[1], grid[2], HEAD_DIM, x.device)
        cos, sin = cos[start_frame * FS:], sin[start_frame * FS:]
        ctx = toy.text_embedding(context)
        L, C = tok.shape[1], tok.shape[2]
        for blk, c in zip(toy.blocks, self.caches):
            sh1, sc1, g1, sh2, sc2, g2 = (blk.modulation.unsqueeze(0) + e0).unsqueeze(3).unbind(2)

            def modulate(z, shift, scale):
                return torch.addcmul(shift, z.view(B, f, L // f, C), 1 + scale).view(B, L, C)
            sa = blk.self_attn
            z = modulate(F.layer_norm(tok, (C,), eps=blk.eps), sh1, sc1)
            n = sa.heads
            q = apply_rope(sa.norm_q(sa.q(z)).unflatten(-1, (n, -1)), cos, sin).flatten(2)
            k = apply_rope(sa.norm_k(sa.k(z)).unflatten(-1, (n, -1)), cos, sin).flatten(2)
            y = sa.o(self.attend(c, q, k, sa.v(z), start_frame * FS, recompute_protect))
            tok = tok + (y.view(B, f, L // f, C) * g1).view(B, L, C)
            tok = tok + blk.cross_attn(blk.norm3(tok), ctx)
            y = blk.ffn(modulate(F.layer_norm(tok, (C,), eps=blk.eps), sh2, sc2))
            tok = tok + (y.view(B, f, L // f, C) * g2).view(B, L, C)
        return toy._unpatchify(toy.head(tok, e, grid), grid)


def upstream_video(toy, sched, texts, n_gen, seed, prefix=None, switch_at=None, negative=None, cfg=1.0):
    """causal_inference.py's loop (and LongLive's switch) over n_gen generated latent frames;
    texts[k] is block k's prompt. Returns the model-space latents [1, C, P + n_gen, H, W]."""
    b = sched.chunk_frames
    P = 0 if prefix is None else prefix.shape[2]
    total = P + n_gen
    local = sched.attention_frames or -1
    models = {"cond": Upstream(toy, total, local, sched.sink_frames)}
    if cfg != 1.0:
        models["uncond"] = Upstream(toy, total, local, sched.sink_frames)
    sigmas, grid = cs.flow_grid(sched.shift)
    grid0 = torch.cat([grid, torch.zeros(1)])
    steps = [float(grid0[1000 - s]) for s in sched.denoising_steps] if sched.warp else list(sched.denoising_steps)

    def sigma(t):
        return sigmas[torch.argmin((grid - torch.tensor(t)).abs())]

    def flow(x, t, text, start, protect=False):
        out = models["cond"](x, t, text, start, protect)
        if cfg == 1.0:
            return out
        un = models["uncond"](x, t, negative, start, protect)
        return un + cfg * (out - un)

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, n_gen, 16, H, W), generator=gen)
    out = torch.zeros(1, 16, total, H, W)
    start = 0
    if P:
        out[:, :, :P] = prefix
        sizes = ([P % b] if P % b else []) + [b] * (P // b)
        for n in sizes:
            flow(prefix[:, :, start:start + n], 0.0, texts[0], start)
            start += n
    for k in range(n_gen // b):
        if switch_at is not None and k == switch_at:        # LongLive: re-cache under the new prompt
            n = start if local == -1 else min(local, start)
            for m, text in (("cond", texts[k]), ("uncond", negative)):
                if m in models:
                    models[m](out[:, :, start - n:start], sched.context_noise, text, start - n, recompute_protect=True)
        x = noise[:, k * b:(k + 1) * b].movedim(1, 2)
        for i, t in enumerate(steps):
            v = flow(x, t, texts[k], start)
            x0 = (x.double() - sigma(t).double() * v.double()).float()
            if i + 1 < len(steps):
                eps = torch.randn((b, 16, H, W), generator=gen).movedim(0, 1)[None]
                x = (1 - sigma(steps[i + 1])) * x0 + sigma(steps[i + 1]) * eps
        out[:, :, start:start + b] = x0
        flow(x0, sched.context_noise, texts[k], start)
        start += b
    return out


# --- the pack --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_models):
    comfy_model = comfy.sd.load_diffusion_model(str(tiny_models["14b"]))
    setattr(comfy_model.model, "arcache_causal", "test: tiny random weights")
    toy, _ = load_toy_wan(str(tiny_models["14b"]))
    return comfy_model, toy


def texts(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((1, 512, 4096), generator=g) * 0.5 for _ in range(n)]


def pack_video(model, sched, prompts, n_gen, seed, prefix_raw=None, cfg=1.0, negative=None):
    made = {}                                  # one CONDITIONING per prompt, as a Prompt Schedule passes them
    conds = [made.setdefault(id(p), [[p, {}]]) for p in prompts]
    neg = [[negative if negative is not None else torch.zeros(1, 512, 4096), {}]]
    req = video_run.VideoRequest(width=W * 8, height=H * 8, length=4 * (n_gen - 1) + 1, seed=seed, steps=4, cfg=cfg,
                                 schedule=sched, positives=conds, negative=neg, prefix_latent=prefix_raw)
    raw, report = families.new_video_run(model, req).run()
    return comfy.latent_formats.Wan21().process_in(raw), report


def assert_rel(mine, theirs, tol=1e-5):
    err = float((mine - theirs).detach().norm() / theirs.detach().norm())
    assert err <= tol, f"relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("attention_frames,sink_frames", [(0, 0), (6, 2), (4, 0)],
                         ids=["full-history", "window6-sink2", "window4-no-sink"])
def test_t2v_equals_upstream_loop(models, attention_frames, sink_frames):
    model, toy = models
    sched = cs.CausalSchedule(chunk_frames=2, attention_frames=attention_frames, sink_frames=sink_frames)
    prompt = texts(1)
    mine, report = pack_video(model, sched, prompt, n_gen=12, seed=7)
    theirs = upstream_video(toy, sched, prompt * 6, n_gen=12, seed=7)
    assert_rel(mine, theirs)
    assert report["model_calls"] == 6 * 4 + 5          # 4 steps a chunk, a K/V pass after all but the last
    if attention_frames:                               # the window dropped chunks: memory is the window's
        assert report["kv_frames_held"] == attention_frames


def test_the_window_changes_the_video(models):
    """The windowed run is not the full-history run in disguise (chunks far back do matter)."""
    model, _ = models
    prompt = texts(1)
    full, _ = pack_video(model, cs.CausalSchedule(chunk_frames=2), prompt, n_gen=12, seed=7)
    windowed, _ = pack_video(model, cs.CausalSchedule(chunk_frames=2, attention_frames=4), prompt, n_gen=12, seed=7)
    assert torch.equal(full[:, :, :4], windowed[:, :, :4])        # the first chunks see no difference yet
    assert float((full[:, :, 6:] - windowed[:, :, 6:]).abs().max()) > 1e-3


def test_continuation_prefix_equals_upstream(models):
    """Video continuation: a 3-frame prefix goes into the K/V as a 1-frame chunk and a 2-frame chunk
    at timestep 0 (the remainder first: upstream's independent first frame), then 4 chunks."""
    model, toy = models
    sched = cs.CausalSchedule(chunk_frames=2, attention_frames=6, sink_frames=2)
    prefix = torch.randn(1, 16, 3, H, W, generator=torch.Generator().manual_seed(11))
    raw_prefix = comfy.latent_formats.Wan21().process_out(prefix)
    prompt = texts(1)
    mine, report = pack_video(model, sched, prompt, n_gen=8, seed=5, prefix_raw=raw_prefix)
    theirs = upstream_video(toy, sched, prompt * 4, n_gen=8, seed=5, prefix=prefix)
    assert mine.shape[2] == 11
    assert_rel(mine[:, :, 3:], theirs[:, :, 3:])
    torch.testing.assert_close(mine[:, :, :3], prefix, rtol=1e-5, atol=1e-5)


def test_prompt_switch_recache_equals_longlive(models):
    """A storyboard switch at chunk 4 with recache: the held chunks after the sink re-run under the
    new prompt (LongLive's global sink keeps the sink's K/V)."""
    model, toy = models
    sched = cs.CausalSchedule(chunk_frames=2, attention_frames=6, sink_frames=2, switch="recache")
    a, b = texts(2, seed=9)
    mine, report = pack_video(model, sched, [a, a, a, a, b], n_gen=12, seed=2)
    theirs = upstream_video(toy, sched, [a] * 4 + [b] * 2, n_gen=12, seed=2, switch_at=4)
    assert_rel(mine, theirs)
    assert report["recache_passes"] == 1
    keep, _ = pack_video(model, cs.CausalSchedule(chunk_frames=2, attention_frames=6, sink_frames=2, switch="keep"),
                         [a, a, a, a, b], n_gen=12, seed=2)
    assert torch.equal(keep[:, :, :8], mine[:, :, :8])             # the chunks before the switch are the same
    assert float((keep[:, :, 8:] - mine[:, :, 8:]).abs().max()) > 1e-4     # the re-cache changes what follows


def test_cfg_keeps_each_branch_own_kv_and_equals_upstream(models):
    model, toy = models
    sched = cs.CausalSchedule(chunk_frames=2)
    prompt, negative = texts(1), texts(1, seed=21)[0]
    mine, report = pack_video(model, sched, prompt, n_gen=6, seed=4, cfg=3.0, negative=negative)
    theirs = upstream_video(toy, sched, prompt * 3, n_gen=6, seed=4, cfg=3.0, negative=negative)
    assert_rel(mine, theirs)
    one, report1 = pack_video(model, sched, prompt, n_gen=6, seed=4, cfg=1.0)
    assert float((one - mine).abs().max()) > 1e-3
    assert report["kv_bytes_peak"] == 2 * report1["kv_bytes_peak"]        # a K/V store per branch


# --- LongLive 2.0: a fresh UniPC per chunk (diffusers' scheduler as the independent solver) -------------

def longlive2_video(toy, sched, text, n_frames, seed, steps=4, image=None, channels=16):
    """NVlabs/LongLive @7860ad9 pipeline/causal_diffusion_inference.py:366-765 re-stated: noise for the
    whole video first ([B, F, C, H, W]); per chunk a fresh FlowUniPC (diffusers' UniPCMultistepScheduler
    with flow sigmas, the same solver: tests/unit/test_unipc_upstream.py) over `steps` steps at the
    schedule's shift, the model fed the scheduler's integer timesteps per frame; with an image, frame 0
    of the first chunk set to it at timestep 0 before every call and after every step
    (utils/i2v_conditioning.py); then the clean chunk at timestep 0. No re-compute protection (2.0's
    single-GPU cache has none)."""
    from diffusers import UniPCMultistepScheduler
    b = sched.chunk_frames
    model = Upstream(toy, n_frames, sched.attention_frames or -1, sched.sink_frames)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, n_frames, channels, H, W), generator=gen)
    out = torch.zeros(1, channels, n_frames, H, W)
    for k in range(n_frames // b):
        start = k * b
        x = noise[:, start:start + b].movedim(1, 2).clone()
        solver = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                         lower_order_final=True, prediction_type="flow_prediction",
                                         use_flow_sigmas=True, flow_shift=sched.shift, final_sigmas_type="zero")
        solver.set_timesteps(steps)
        # Wan's FlowUniPC grid (wan_5b/utils/fm_solvers_unipc.py:162-229: linspace(float32 0.999, 0)[:-1]
        # shifted, then 0; sigmas float32, timesteps x1000 truncated to int64) put into diffusers'
        # scheduler, whose own flow grid starts at 1 (the stepping code is the same method)
        base = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]
        sig = sched.shift * base / (1 + (sched.shift - 1) * base)
        solver.sigmas = torch.tensor(np.append(sig, 0.0), dtype=torch.float32)
        solver.timesteps = torch.from_numpy((sig * 1000).astype(np.int64))
        fed = solver.timesteps.tolist()
        clamp = image is not None and k == 0
        for t in solver.timesteps:
            ts = [float(t)] * b
            if clamp:
                x[:, :, 0], ts[0] = image[:, :, 0], 0.0
            v = model(x, ts, text, start)
            x = solver.step(v, t, x, return_dict=False)[0]
            if clamp:
                x[:, :, 0] = image[:, :, 0]
        out[:, :, start:start + b] = x
        model(x, 0.0, text, start)
    return out, fed


@pytest.fixture(scope="module")
def models_5b(tiny_models):
    loader = pack("model_patches.causal_loader")
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_models["longlive2"].parent))
    comfy_model = loader.load_causal_wan(tiny_models["longlive2"].name)
    sd = {k[len("model."):]: v for k, v in torch.load(tiny_models["longlive2"], weights_only=True)["generator"].items()}
    from toy_world.model import ToyWan, ToyWanConfig
    toy = ToyWan(ToyWanConfig.from_state_dict(sd))
    toy.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return comfy_model, toy.eval()


def test_longlive2_on_wan22_5b_equals_its_unipc_loop(models_5b):
    """LongLive 2.0 (Wan2.2-TI2V-5B, 48-channel latents): chunks of 2 here, 4 UniPC steps, a 6-frame
    window behind a 2-frame sink; the pack's run equals the re-stated loop."""
    model, toy = models_5b
    sched = cs.CausalSchedule(chunk_frames=2, solver="unipc", attention_frames=6, sink_frames=2, switch="keep", fps=24)
    prompt = texts(1)
    conds = [[prompt[0], {}]]
    req = video_run.VideoRequest(width=W * 16, height=H * 16, length=4 * 11 + 1, seed=3, steps=4, cfg=1.0,
                                 schedule=sched, positives=[conds], negative=conds)
    raw, report = families.new_video_run(model, req).run()
    mine = comfy.latent_formats.Wan22().process_in(raw)
    theirs, timesteps = longlive2_video(toy, sched, prompt[0], 12, seed=3, channels=48)
    assert mine.shape == (1, 48, 12, H, W)
    assert report["timesteps"] == timesteps == [999, 937, 833, 624]
    assert_rel(mine, theirs)


def test_clamped_first_frame_equals_longlive2_i2v(models, tiny_models):
    """LongLive 2.0's image-to-video (first_frame clamped) on the 16-channel tiny Wan (the tiny Wan 2.2
    VAE does not exist: ComfyUI builds it at full size): frame 0 of the first chunk is the image."""
    model, toy = models
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_models["vae"])))
    image = torch.rand(1, W * 8, H * 8, 3, generator=torch.Generator().manual_seed(1))
    sched = cs.CausalSchedule(chunk_frames=2, solver="unipc", first_frame="clamped")
    prompt = texts(1)
    conds = [[prompt[0], {}]]
    req = video_run.VideoRequest(width=W * 8, height=H * 8, length=4 * 7 + 1, seed=6, steps=4, cfg=1.0, schedule=sched,
                                 positives=[conds], negative=conds, vae=vae, start_image=image)
    raw, report = families.new_video_run(model, req).run()
    fmt = comfy.latent_formats.Wan21()
    image_latent = vae.encode(image)[:, :, :1].float()
    theirs, _ = longlive2_video(toy, sched, prompt[0], 8, seed=6, image=fmt.process_in(image_latent))
    assert torch.equal(raw[:, :, :1], image_latent)
    assert_rel(fmt.process_in(raw)[:, :, 1:], theirs[:, :, 1:])
    assert report["model_calls"] == 4 * 4 + 3          # no separate pass for the image
