"""MAGI-1's caption handling: cleaning, special tokens, per-chunk text, and refusing non-T5 encoders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.inprocess import load_comfy, pack

load_comfy()
text = pack("model_patches.magi_text")
errors = pack("cache_core.errors")


def test_clean_caption_lowercases_and_strips_noise():
    got = text.clean_caption("A <b>Red</b> Kite  over https://example.com/x.png the “HILL” @someone")
    assert got == 'a red kite over the "hill"'
    assert text.clean_caption(got) == got                       # idempotent, as applying it twice implies


def test_special_tokens_are_fp16_rounded_rows_hq_and_durations(tmp_path):
    g = np.random.default_rng(0)
    other = g.standard_normal((100, 8))
    path = tmp_path / "special_tokens.npz"
    np.savez(path, caption_token=g.standard_normal((1, 8)), logo_token=g.standard_normal((1, 8)), other_tokens=other)
    sp = text.load_special_tokens(str(path), width=8)
    assert torch.equal(sp["hq"], torch.from_numpy(other[1].astype(np.float16)).float())          # HQ = row 1
    assert torch.equal(sp["duration"], torch.from_numpy(other[7:15].astype(np.float16)).float())  # DURATION_1..8
    with pytest.raises(errors.InputError, match="wide"):
        text.load_special_tokens(str(path), width=16)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(errors.InputError, match="special_tokens"):
        text.load_special_tokens(str(tmp_path / "bad.npz"))


def test_chunk_text_prepends_duration_then_hq_and_truncates():
    caption = torch.arange(12.0).view(6, 2)
    special = {"hq": torch.full((2,), -1.0), "duration": torch.stack([torch.full((2,), 10.0 + i) for i in range(8)])}
    rows = text.chunk_text(caption, special, remaining=3, max_length=800)
    assert torch.equal(rows[0], special["duration"][3]) and torch.equal(rows[1], special["hq"])
    assert torch.equal(rows[2:], caption)
    assert torch.equal(text.chunk_text(caption, special, remaining=20, max_length=800)[0], special["duration"][7])
    assert text.chunk_text(caption, special, remaining=0, max_length=4).shape[0] == 4
    assert torch.equal(text.chunk_text(caption, None, remaining=0, max_length=4), caption[:4])


def test_a_clip_l_text_encoder_is_refused_by_name():
    from comfy import sd1_clip

    class ClipL:                          # ComfyUI's own CLIP-L tokenizer, as an SD1.5 CLIP would have
        tokenize = sd1_clip.SD1Tokenizer().tokenize_with_weights

    with pytest.raises(errors.InputError) as e:
        text.t5_states(ClipL(), "a red kite")
    assert e.value.input_name == "clip" and "not a T5 text encoder (its tokenizers: l)" in e.value.problem
