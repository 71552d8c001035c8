"""Chunk-causal Wan execution against ComfyUI's own WanModel, in-process (no server).

Equivalences: all chunks computed == one masked (block-causal) full-window forward; a single
chunk == the model's normal forward; a skip adds the stored residual; frozen history is
really frozen; cond/uncond batched == called separately; compression squeezes the history in
place without raising the K/V peak.
"""
from __future__ import annotations

import types

import pytest
import torch

import comfy.model_management  # noqa: F401
import comfy.ops
import comfy.ldm.wan.model as wan_model
from tools.inprocess import pack

ar_cache = pack("model_patches.ar_cache")
families = pack("model_patches.families")
wan = pack("model_patches.wan")
FlowCacheConfig = pack("cache_core.flowcache_policy").FlowCacheConfig
RECORD_KEY, StepRecord = pack("cache_core.record").RECORD_KEY, pack("cache_core.record").StepRecord
RunReport = pack("cache_core.run_report").RunReport

CF = 2                        # latent frames per chunk in these tests
F, H, W = 5, 6, 4             # chunks of 2, 2, 1 frames; 3x2 = 6 tokens per frame
TPF = (H // 2) * (W // 2)
TEXT_DIM, TEXT_LEN = 32, 8
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def dm():
    torch.manual_seed(0)
    m = wan_model.WanModel(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16,
                           out_dim=16, text_dim=TEXT_DIM, text_len=TEXT_LEN,
                           operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            std = 0.3 if "modulation" in name else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight"):
                p.add_(1.0)
    return m.eval()


def inputs(batch=2, seed=1, h=H, w=W, frames=F):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    ctx = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    return x, ctx


def record(sigmas, active, row=0, window=0, prefix=0, steps=10):
    return StepRecord(frame_sigmas=torch.tensor(sigmas, dtype=torch.float32),
                      active=torch.tensor(active, dtype=torch.bool), prefix_frames=prefix,
                      chunk_frames=CF, steps=steps, window_index=window, call=row, calls=steps)


def opts(rec=None, cou=(0, 1)):
    o = {"cond_or_uncond": list(cou)}
    if rec is not None:
        o[RECORD_KEY] = rec
    return o


def new_state(cfg=None, skip=True):
    """The run state FlowCache makes per sampling run (its coefficients resolved for dim 256)."""
    spec = ar_cache.flowcache_spec(cfg or FlowCacheConfig(), families.WAN21, types.SimpleNamespace(dim=256), skip)
    return families.WAN21.new_cache_run(spec)


def forward(dm, x, t, ctx, o, state):
    return ar_cache.forward_chunkwise(state, wan.WanChunkAdapter(dm), x, t, ctx, o)


def run(dm, state, x, ctx, rec=None, cou=(0, 1), t=None):
    if t is None:
        t = torch.full((x.shape[0],), 1000.0 * float(rec.frame_sigmas.max()))
    with torch.no_grad():
        return forward(dm, x, t, ctx, opts(rec, cou), state)


def block_causal_override(frames, chunk_frames, tpf):
    chunk_of = torch.arange(frames).repeat_interleave(tpf) // chunk_frames
    allowed = chunk_of[None, :] <= chunk_of[:, None]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    L = frames * tpf

    def override(func, q, k, v, *args, **kwargs):
        if q.shape[1] == L and k.shape[1] == L:       # self-attention of the full window
            kwargs["mask"] = mask.to(q)
        return func(q, k, v, *args, **kwargs)
    return override


SIGMAS = [0.9, 0.9, 0.6, 0.6, 0.3]     # uniform within each chunk, different across chunks


def test_all_chunks_equal_block_causal_full_forward(dm):
    x, ctx = inputs()
    rec = record(SIGMAS, [True] * F)
    out = run(dm, new_state(FlowCacheConfig()), x, ctx, rec)
    t = (torch.tensor(SIGMAS) * 1000).expand(2, -1)
    with torch.no_grad():
        ref = dm(x, t, ctx, transformer_options={"optimized_attention_override": block_causal_override(F, CF, TPF)})
        bidir = dm(x, t, ctx, transformer_options={})
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    assert (out - bidir).abs().max() > 1e-3      # the mask matters: the test has teeth


def test_single_chunk_equals_normal_forward(dm):
    x, ctx = inputs(h=5, w=7)                     # odd sizes: padding path too
    state = new_state(FlowCacheConfig(chunk_frames=F))
    t = torch.tensor([700.0, 700.0])
    out = run(dm, state, x, ctx, t=t)
    with torch.no_grad():
        ref = dm(x, t, ctx, transformer_options={"cond_or_uncond": [0, 1]})
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    # per-frame timesteps given directly take the same path as the model's own [B, F] support
    tf = (torch.tensor(SIGMAS) * 1000).expand(2, -1)
    out_f = run(dm, new_state(FlowCacheConfig(chunk_frames=F)), x, ctx, t=tf)
    with torch.no_grad():
        ref_f = dm(x, tf, ctx, transformer_options={})
    torch.testing.assert_close(out_f, ref_f, atol=ATOL, rtol=1e-5)


def test_skip_reuses_residual_and_stale_kv(dm):
    cfg = FlowCacheConfig(rel_l1_thresh=1e9, warmup_steps=1, final_steps=0)
    state = new_state(cfg)
    x1, ctx = inputs(seed=1)
    x2, _ = inputs(seed=2)
    # call 1: only chunk 0 has started; call 2: chunk 0 goes on (skipped), chunk 1 starts
    rec1 = record([0.9, 0.9, 1.0, 1.0, 1.0], [True, True, False, False, False], row=0)
    rec2 = record([0.8, 0.8, 0.9, 0.9, 1.0], [True, True, True, True, False], row=1)
    run(dm, state, x1, ctx, rec1)
    res = {b: state.step.outputs.items[(b, 0)].values[0].clone() for b in (0, 1)}   # the step's cached residual
    out2 = run(dm, state, x2, ctx, rec2)
    assert state.counts["chunk_steps_skipped"] == 2 and state.counts["chunk_steps_computed"] == 4
    for b in (0, 1):
        assert torch.equal(state.step.outputs.items[(b, 0)].values[0], res[b])

    # chunk 0 of call 2 = head(embed(x2) + residual), by hand with the model's modules
    with torch.no_grad():
        xe = dm.patch_embedding(x2.float()).flatten(2).transpose(1, 2)[:, :CF * TPF]
        t2 = torch.tensor([800.0, 800.0]).expand(2, -1)
        e = dm.time_embedding(wan_model.sinusoidal_embedding_1d(dm.freq_dim, t2.flatten())).reshape(2, CF, -1)
        expect0 = dm.unpatchify(dm.head(xe + torch.cat([res[0], res[1]]), e), (CF, H // 2, W // 2))
    torch.testing.assert_close(out2[:, :, :CF], expect0, atol=1e-6, rtol=0)

    # chunk 1 attended to chunk 0's STALE K/V (from x1 at sigma .9): same as a fresh run whose
    # chunk 0 input is x1's
    x_mix = x2.clone()
    x_mix[:, :, :CF] = x1[:, :, :CF]
    rec_mix = record([0.9, 0.9, 0.9, 0.9, 1.0], [True, True, True, True, False])
    out_mix = run(dm, new_state(cfg), x_mix, ctx, rec_mix)
    torch.testing.assert_close(out2[:, :, CF:2 * CF], out_mix[:, :, CF:2 * CF], atol=1e-6, rtol=0)
    assert torch.count_nonzero(out2[:, :, 2 * CF:]) == 0          # chunk 2 not started: zeros


def test_history_chunk_is_computed_once_then_frozen(dm):
    x, ctx = inputs(seed=3)
    act = [False, False, True, True, True]
    sig = [0.02, 0.02, 0.9, 0.9, 0.9]
    outs = []
    for variant in (0, 1):
        state = new_state(FlowCacheConfig(rel_l1_thresh=0.0))
        run(dm, state, x, ctx, record(sig, act, prefix=2, row=0))
        x2 = x.clone()
        if variant:
            x2[:, :, :CF] += 1.0                  # history input changes: must not matter now
        outs.append(run(dm, state, x2, ctx, record(sig, act, prefix=2, row=1)))
        assert state.counts["chunk_steps_history"] == 2 and state.counts["chunk_steps_frozen"] == 2
    assert torch.count_nonzero(outs[0][:, :, :CF]) == 0
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_indicator_is_the_first_active_frame_of_a_chunk(dm):
    # prefix of 1 frame inside a 2-frame chunk: the chunk's indicator must follow frame 1's t
    x, ctx = inputs(seed=7)
    sig = [0.02, 0.9, 0.9, 0.9, 0.9]
    state = new_state(FlowCacheConfig())
    run(dm, state, x, ctx, record(sig, [False, True, True, True, True], prefix=1))
    with torch.no_grad():
        e0 = reference_modulation(dm, 900.0)
    torch.testing.assert_close(state.step.policy.state(0, 0).prev, e0, atol=1e-6, rtol=1e-6)
    assert state.step.policy.state(0, 0).prev.shape == (1, 6, 256)      # [rows, 6, dim]: no per-token copy


def reference_modulation(model, t: float) -> torch.Tensor:
    """e0 as the FlowCache reference builds it: float64 sinusoid, float32 time MLPs. [1, 6, dim]"""
    import numpy as np
    half = model.freq_dim // 2
    ang = np.float64(t) * np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
    h = torch.from_numpy(np.concatenate([np.cos(ang), np.sin(ang)])[None]).float()
    lin = [m for m in (*model.time_embedding, *model.time_projection)]
    h = torch.nn.functional.linear(h, lin[0].weight.float(), lin[0].bias.float())
    h = torch.nn.functional.linear(torch.nn.functional.silu(h), lin[2].weight.float(), lin[2].bias.float())
    h = torch.nn.functional.linear(torch.nn.functional.silu(h), lin[4].weight.float(), lin[4].bias.float())
    return h.unflatten(1, (6, model.dim))


def test_indicator_is_built_in_float32_in_a_bf16_model(dm):
    import copy
    bf = copy.deepcopy(dm).to(torch.bfloat16)
    bf.patch_embedding.float()                                    # ComfyUI keeps it in fp32
    x, ctx = inputs(seed=7)
    state = new_state(FlowCacheConfig())
    run(bf, state, x.bfloat16(), ctx.bfloat16(), record([0.9] * F, [True] * F))
    ours = state.step.policy.state(0, 0).prev
    with torch.no_grad():
        expected = reference_modulation(bf, 900.0)
        own = bf.time_projection(bf.time_embedding(
            wan_model.sinusoidal_embedding_1d(bf.freq_dim, torch.tensor([900.0])).bfloat16())).unflatten(1, (6, bf.dim))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (own.float() - expected).abs().max() > 1e-3           # what the bf16 path would have measured


def test_branches_batched_equal_separate_calls(dm):
    x, ctx = inputs(seed=4)
    cfg = FlowCacheConfig(rel_l1_thresh=0.15, warmup_steps=1, final_steps=0, coefficients="none")
    together, apart, swapped = (new_state(cfg) for _ in range(3))
    for row in range(6):
        s = 0.9 - 0.0003 * row            # small steps: the random time embedding is very sensitive
        rec = record([s] * F, [True] * F, row=row)
        xr = x * (1 - 0.1 * row)
        a = run(dm, together, xr, ctx, rec, cou=(0, 1))
        b0 = run(dm, apart, xr[:1], ctx[:1], rec, cou=(0,))
        b1 = run(dm, apart, xr[1:], ctx[1:], rec, cou=(1,))
        c = run(dm, swapped, xr.flip(0), ctx.flip(0), rec, cou=(1, 0))
        torch.testing.assert_close(a, torch.cat([b0, b1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c.flip(0), atol=1e-5, rtol=1e-5)
    assert 0 < together.counts["chunk_steps_skipped"] < 5 * 2 * 3
    assert together.counts["chunk_steps_skipped"] == apart.counts["chunk_steps_skipped"] == swapped.counts["chunk_steps_skipped"]


def test_compression_shrinks_kv_memory(dm):
    cfg = FlowCacheConfig(rel_l1_thresh=0.0, kv_compress=True, kv_budget_chunks=1)
    state = new_state(cfg)
    x, ctx = inputs(seed=5)
    run(dm, state, x, ctx, record(SIGMAS, [True] * F, row=0))
    full = state.store.bytes_allocated()
    flops_before = state.counts["transformer_flops"]
    # chunks 0 and 1 finished: the next forward of chunk 2 squeezes them to one chunk's tokens
    out = run(dm, state, x, ctx, record([0, 0, 0, 0, 0.2], [False] * 4 + [True], row=1))
    assert torch.isfinite(out).all()
    assert all(state.store.history_chunks(b, layer) == 2 for b in (0, 1) for layer in range(2))
    # all chunks started together, so the window was allocated once; the squeeze works in place
    # and keeps the freed tail (releasing it would need a re-allocation above that peak). The
    # memory bound when chunks start one after another: tests/unit/test_kv_compress.py.
    assert state.store.bytes_allocated() == full
    k, _ = state.store.visible(0, 1, 2)
    assert k.shape[1] == CF * TPF + TPF            # budget (one chunk) + chunk 2 itself
    assert state.summary()["kv_bytes_peak"] == full
    shape = wan.flop_shape(dm)
    from arcache_pack.cache_core.flops import chunk_causal_flops
    expect = chunk_causal_flops(shape, (12, 12, 6), [2], {2: 18}, frames=F, batch=1) * 2
    assert state.counts["transformer_flops"] - flops_before == expect


def test_a_chunk_is_compressed_right_after_its_last_step(dm):
    """As in the reference: a chunk that takes its last step in a call is frozen at once, so the
    next chunk of the same call already attends to the compressed history."""
    cfg = FlowCacheConfig(rel_l1_thresh=0.0, kv_compress=True, kv_budget_chunks=1)
    state = new_state(cfg)
    x, ctx = inputs(seed=6)
    run(dm, state, x, ctx, record([0.9] * 4 + [1.0], [True] * 4 + [False], row=0, steps=2))
    assert state.store.history_chunks(0, 0) == 0
    # chunks 0 and 1 take their 2nd and last step, chunk 2 its first, all in one call
    run(dm, state, x, ctx, record([0.5] * 4 + [0.9], [True] * 5, row=1, steps=2))
    assert all(state.store.history_chunks(b, layer) == 2 for b in (0, 1) for layer in range(2))
    assert state.store.is_frozen(0, 0) and state.store.is_frozen(1, 1) and not state.store.is_frozen(0, 2)
    k, _ = state.store.visible(0, 1, 2)
    assert k.shape[1] == CF * TPF + TPF            # chunk 2 saw budget (one chunk) + itself


def test_model_and_options_are_left_untouched(dm):
    before = set(vars(dm))
    o = opts(record(SIGMAS, [True] * F))
    keys = set(o)
    x, ctx = inputs(seed=6)
    run_report = RunReport(transformer_flops=0.0, cache=None)
    report = run_report.data
    o["arcache_report"] = run_report
    with torch.no_grad():
        forward(dm, x, torch.tensor([900.0, 900.0]), ctx, o, new_state())
    assert set(vars(dm)) == before
    assert set(o) == keys | {"arcache_report"} and "optimized_attention_override" not in o
    assert report["transformer_flops"] > 0 and report["cache"]["calls"] == 1
    assert wan.supports_chunks(dm)


def test_block_bookkeeping_reaches_chained_overrides_and_double_block_patches(dm):
    """Under the chunk executor other packs' per-block hooks see what the newest core's forward
    gives them: block_index / total_blocks per block, and `patches["double_block"]` after each."""
    seen_attn, seen_patch = [], []

    def override(func, q, k, v, *args, **kwargs):
        o = kwargs.get("transformer_options", {})
        seen_attn.append((o.get("block_index"), o.get("total_blocks"), q.shape[1]))
        return func(q, k, v, *args, **kwargs)

    def after_block(args):
        seen_patch.append((args["block_index"], args["img"].shape[1]))
        return {"img": args["img"] * 1.0}

    x, ctx = inputs(seed=8)
    o = opts(record(SIGMAS, [True] * F))
    o.update(optimized_attention_override=override, patches={"double_block": [after_block]})
    with torch.no_grad():
        forward(dm, x, torch.tensor([900.0, 900.0]), ctx, o, new_state())
    # per branch (outer), per chunk of 12, 12, 6 tokens, per block: self- then cross-attention
    assert seen_attn == [(i, 2, n) for _ in (0, 1) for n in (12, 12, 6) for i in range(2) for _ in range(2)]
    assert seen_patch == [(i, n) for _ in (0, 1) for n in (12, 12, 6) for i in range(2)]
    with torch.no_grad():                       # the plain model, where this core sets them too
        seen_attn.clear()
        dm(x, torch.tensor([900.0, 900.0]), ctx, transformer_options={"optimized_attention_override": override})
    if seen_attn[0][0] is not None:
        assert [a[0] for a in seen_attn] == [i for i in range(2) for _ in range(2)]


def test_inputs_the_chunk_executor_cannot_serve_are_refused(dm):
    x, ctx = inputs(seed=9)
    with pytest.raises(wan.ModelFamilyError, match="context_latents"):
        with torch.no_grad():
            ar_cache.forward_chunkwise(new_state(), wan.WanChunkAdapter(dm), x, torch.tensor([900.0, 900.0]), ctx,
                                       opts(), context_latents=[torch.zeros(1)])

    class Executor:                              # what ComfyUI's WrapperExecutor gives a wrapper
        class_obj = dm
    o = opts()
    o.update({ar_cache.CACHE_RUN_KEY: new_state(), "multigpu_thread_device": "cuda:1"})
    with pytest.raises(wan.ModelFamilyError, match="MultiGPU CFG Split"):
        ar_cache.diffusion_model_wrapper(Executor(), x, torch.tensor([900.0, 900.0]), ctx, transformer_options=o)


def test_wan_coefficients_by_name_and_size():
    c = wan.COEFFICIENTS
    assert wan.resolve_coefficients("auto", 1536) == c["1.3B"]
    assert wan.resolve_coefficients("auto", 5120) == c["14B"]
    assert wan.resolve_coefficients("auto", 256) == c["none"]
    assert wan.resolve_coefficients("14b") == c["14B"]
    assert wan.resolve_coefficients([2.0, 1.0]) == (2.0, 1.0)
    assert c["1.3B"][-1] == pytest.approx(-0.0499875664)
    with pytest.raises(ValueError, match="coefficients"):
        wan.resolve_coefficients("7B")
