"""Causal Wan checkpoints in their published layouts through the pack's loaders (tiny files written in
those layouts by scripts/make_tiny_checkpoints.py), and what a causal run's memory does over length."""
from __future__ import annotations

import logging

import pytest
import torch

from tools.inprocess import load_comfy, pack

load_comfy(cpu=True)
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

loader = pack("model_patches.causal_loader")
families = pack("model_patches.families")
cs = pack("cache_core.causal_schedule")
video_run = pack("model_patches.video_run")
errors = pack("cache_core.errors")


@pytest.fixture(scope="module")
def files(tiny_models):
    for name in ("self_forcing", "causal_comfy", "longlive_base"):
        folder_paths.add_model_folder_path("diffusion_models", str(tiny_models[name].parent))
    folder_paths.add_model_folder_path("loras", str(tiny_models["longlive_lora"].parent))
    return tiny_models


def weights_of(model) -> dict:
    return {k[len("diffusion_model."):]: v for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.")}


def test_self_forcing_training_file_loads_its_ema_weights(files):
    top = torch.load(files["self_forcing"], weights_only=True)
    for choice, key in (("auto", "generator_ema"), ("generator_ema", "generator_ema"), ("generator", "generator")):
        model = loader.load_causal_wan(files["self_forcing"].name, choice)
        got = weights_of(model)
        want = {k[len("model."):]: v for k, v in top[key].items()}
        assert set(got) == set(want)
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want), choice
        assert key in model.model.arcache_causal
        family, _ = families.detect(model)
        assert family is families.CAUSAL_WAN          # marked causal: the causal family without a schedule


def test_core_causal_ar_file_is_marked_from_its_metadata(files):
    model = loader.load_causal_wan(files["causal_comfy"].name)
    assert "causal_ar metadata" in model.model.arcache_causal
    sf = loader.load_causal_wan(files["self_forcing"].name)    # the same weights as the .pt's generator_ema
    a, b = weights_of(model), weights_of(sf)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_plain_wan_takes_diffusion_forcing_unless_the_schedule_says_causal(files):
    model = comfy.sd.load_diffusion_model(str(files["causal_comfy"]))   # 0.3.75's UNETLoader ignores the metadata
    assert families.detect(model)[0] is families.WAN21
    assert families.detect(model, cs.CausalSchedule())[0] is families.CAUSAL_WAN


def test_longlive_lora_applies_through_core_patching(files):
    base = loader.load_causal_wan(files["longlive_base"].name)
    patched = loader.apply_lora(base, files["longlive_lora"].name, 0.5)
    lora = torch.load(files["longlive_lora"], weights_only=True)["generator_lora"]
    a = lora["base_model.model.blocks.1.ffn.2.lora_A.weight"]
    b = lora["base_model.model.blocks.1.ffn.2.lora_B.weight"]
    w0 = weights_of(base)["blocks.1.ffn.2.weight"].clone()
    patched.patch_model()
    try:
        w1 = patched.model.diffusion_model.blocks[1].ffn[2].weight.detach().clone()
    finally:
        patched.unpatch_model()
    torch.testing.assert_close(w1, w0 + 0.5 * (b @ a), rtol=1e-5, atol=1e-6)
    assert len(patched.patches) - len(base.patches) == 2 * 10    # 10 Linears a block, 2 blocks


def test_a_lora_for_another_base_is_refused_by_name(files, tmp_path):
    bad = {"generator_lora": {"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 512),
                              "base_model.model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(256, 4)}}
    torch.save(bad, tmp_path / "other_base.pt")
    torch.save({"generator_lora": {"base_model.model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(4, 256)}},
               tmp_path / "deeper.pt")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    base = loader.load_causal_wan(files["longlive_base"].name)
    with pytest.raises(errors.InputError, match="another base"):
        loader.apply_lora(base, "other_base.pt", 1.0)
    with pytest.raises(errors.InputError, match="blocks.7.self_attn.q is not a weight"):
        loader.apply_lora(base, "deeper.pt", 1.0)


def test_not_a_wan_file_is_refused_by_name(files, tmp_path):
    torch.save({"generator": {"model.foo.weight": torch.zeros(2)}}, tmp_path / "foo.pt")
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    with pytest.raises(errors.InputError, match="not a Wan transformer"):
        loader.load_causal_wan("foo.pt")
    with pytest.raises(errors.InputError, match="no generator_ema"):
        loader.load_causal_wan(files["longlive_base"].name, "generator_ema")


def _run(model, sched, chunks, seed=0):
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = video_run.VideoRequest(width=32, height=32, length=4 * (chunks * sched.chunk_frames - 1) + 1, seed=seed,
                                 steps=4, cfg=1.0, schedule=sched, positives=[cond], negative=cond)
    return families.new_video_run(model, req).run()


def test_memory_is_flat_over_length_with_a_window(files):
    """The K/V peak of 10 and 100 chunks is the same with a rolling window (it is the window's size),
    and grows with the length over the full history."""
    model = loader.load_causal_wan(files["self_forcing"].name)
    window = cs.CausalSchedule(chunk_frames=1, attention_frames=4, sink_frames=1)
    _, short = _run(model, window, 10)
    video, long = _run(model, window, 100)
    assert video.shape[2] == 100
    assert short["kv_bytes_peak"] == long["kv_bytes_peak"] > 0
    frame = 2 * 2 * (2 * 2) * 256 * 4        # K and V, 2 layers, 4 tokens a frame, 256 wide, fp32
    assert long["kv_bytes_peak"] == 4 * frame                      # attention_frames, nothing more
    _, full_short = _run(model, cs.CausalSchedule(chunk_frames=1), 10)
    _, full_long = _run(model, cs.CausalSchedule(chunk_frames=1), 100)
    assert full_long["kv_bytes_peak"] == 10 * full_short["kv_bytes_peak"]


def test_an_unmarked_model_runs_with_a_warning(files, caplog):
    model = comfy.sd.load_diffusion_model(str(files["causal_comfy"]))
    with caplog.at_level(logging.WARNING):
        _, report = _run(model, cs.CausalSchedule(), 2)
    assert report["causal_weights"] == "unknown"
    assert "nothing in how it was loaded says it was trained that way" in caplog.text


def test_lora_keys_with_the_adapter_name_apply_and_a_second_lora_stacks(files, tmp_path):
    """PEFT's own state_dict keeps the adapter's name (lora_A.default.weight): the same LoRA. Applying
    a LoRA on top of one already applied stacks on the same layers (no false error)."""
    lora = torch.load(files["longlive_lora"], weights_only=True)["generator_lora"]
    named = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in lora.items()}
    torch.save({"generator_lora": named}, tmp_path / "named.pt")
    torch.save({"generator_lora": {**lora, "base_model.model.blocks.0.ffn.0.lora_magnitude_vector": torch.ones(512)}},
               tmp_path / "dora.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    base = loader.load_causal_wan(files["longlive_base"].name)
    plain = loader.apply_lora(base, files["longlive_lora"].name, 1.0)
    renamed = loader.apply_lora(base, "named.pt", 1.0)
    key = "diffusion_model.blocks.1.ffn.2.weight"
    assert len(renamed.patches[key]) == len(plain.patches[key]) == 1
    twice = loader.apply_lora(plain, "named.pt", 1.0)
    assert len(twice.patches[key]) == 2
    with pytest.raises(errors.InputError, match="not a plain LoRA matrix"):
        loader.apply_lora(base, "dora.pt", 1.0)
    with pytest.raises(errors.InputError, match="cannot be read as a checkpoint"):
        loader.apply_lora(base, "junk.pt", 1.0)


def test_schedule_values_out_of_range_are_named_errors():
    for kw, name in ((dict(sink_frames=-1, attention_frames=6), "sink_frames"), (dict(attention_frames=-3), "attention_frames"),
                     (dict(fps=0), "fps"), (dict(unipc_steps=0), "unipc_steps"), (dict(chunk_frames=0), "chunk_frames"),
                     (dict(denoising_steps="1000, 750, 750"), "denoising_steps"), (dict(solver="heun"), "solver"),
                     (dict(warp=True, denoising_steps="1000.5"), "denoising_steps"), (dict(shift=0), "shift")):
        with pytest.raises(errors.InputError) as e:
            cs.CausalSchedule(**kw)
        assert e.value.args[0].startswith(name) or name in str(e.value), (kw, str(e.value))
