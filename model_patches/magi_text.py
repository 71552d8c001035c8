"""MAGI-1's caption handling around a T5-XXL (specs/magi1.md sections 3.1 and 4).

The text encoder is ComfyUI's (CLIPLoader), so only what MAGI adds lives here: caption
cleaning, keeping the valid token rows, and the learned special-token embeddings of
`special_tokens.npz` (HQ and DURATION_1..8) that are prepended per chunk.
"""
from __future__ import annotations

import html
import re
import urllib.parse

import numpy as np
import torch

from ..cache_core.errors import InputError
from .files import check_npz

SPECIAL_KEY = "magi_special_tokens"     # in the CONDITIONING's dict: {"hq": [C], "duration": [8, C]}
HQ_INDEX, DURATION_FIRST = 1, 7         # rows of other_tokens (prompt_process.py)
T5_EOS, T5_PAD = 1, 0


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_caption(text: str) -> str:
    """A compact form of the PixArt/DeepFloyd cleaning MAGI applies (twice): lower case, no URLs,
    HTML, @handles or CJK, unified quotes and dashes, single spaces. The full upstream rule set
    (ftfy, BeautifulSoup, ~30 regexes for shop/file-name noise) is not reproduced; for ordinary
    prompts both give the same text."""
    text = LONE_SURROGATE.sub("", str(text))    # a broken paste: unencodable, the tokenizer would raise
    for _ in range(2):
        text = html.unescape(urllib.parse.unquote_plus(str(text))).strip().lower()
        text = re.sub(r"<[^>]+>", " ", text)
        text = re.sub(r"\b(?:https?:|www\.)\S+", " ", text)
        text = re.sub(r"@[\w\d]+\b", " ", text)
        text = re.sub(r"[\u2e80-\u2eff\u2f00-\u2fdf\u3040-\u30ff\u3100-\u312f\u3200-\u32ff\u3400-\u4dbf\u4e00-\u9fff]+", " ", text)
        text = re.sub(r"[\u2010-\u2015\u2212]", "-", text)
        text = re.sub(r"[`´«»“”¨]", '"', text)
        text = re.sub(r"[‘’]", "'", text)
        text = re.sub(r"\s+", " ", text).strip()
    return text


def load_special_tokens(path: str, width: int | None = None) -> dict:
    """HQ and the 8 DURATION embeddings, rounded to fp16 as upstream loads them."""
    check_npz(path, "special_tokens", "take it again from the MAGI-1 repository (example/assets/special_tokens.npz)")
    try:
        data = np.load(path)
        other = data["other_tokens"]
    except Exception as e:
        raise InputError("special_tokens", f"{path} is not MAGI-1's special_tokens.npz ({e}); take it from the "
                         "MAGI-1 repository (example/assets/special_tokens.npz)") from None
    if other.ndim != 2 or other.shape[0] < DURATION_FIRST + 8:
        raise InputError("special_tokens", f"other_tokens has shape {other.shape}; MAGI-1's has (100, 4096)")
    if width is not None and other.shape[1] != width:
        raise InputError("special_tokens", f"embeddings are {other.shape[1]} wide but the text encoder gives {width}")
    t = torch.from_numpy(other.astype(np.float16)).float()
    return {"hq": t[HQ_INDEX], "duration": t[DURATION_FIRST:DURATION_FIRST + 8]}


def t5_states(clip, text: str) -> torch.Tensor:
    """Valid T5 hidden-state rows [n, width] of a cleaned prompt (EOS kept).

    Upstream pads to 800 tokens and masks the padding; here the padding is cut from the tokens
    before encoding, so the result is the same whatever padding the CLIPLoader type adds."""
    tokens = clip.tokenize(text)
    key = next((k for k in tokens if "t5" in k), None)
    if key is not None and key.startswith("umt5"):
        raise InputError("clip", "is UMT5-XXL, Wan's text encoder (CLIPLoader type wan). MAGI-1 was trained with "
                         "T5-XXL v1.1, whose states differ though both are 4096 wide: load t5xxl (e.g. "
                         "t5xxl_fp16.safetensors) with CLIPLoader, type pixart")
    if key is None:
        raise InputError("clip", f"is not a T5 text encoder (its tokenizers: {', '.join(tokens) or 'none'}). Load "
                         "t5xxl (e.g. t5xxl_fp16.safetensors) with CLIPLoader, type pixart")
    batch = tokens[key][0]
    ids = [tok[0] if isinstance(tok[0], int) else -1 for tok in batch]
    valid = ids.index(T5_EOS) + 1 if T5_EOS in ids else len([i for i in ids if i != T5_PAD])
    tokens = {**tokens, key: [batch[:valid]]}
    cond = clip.encode_from_tokens(tokens, return_pooled=False)
    if isinstance(cond, tuple):
        cond = cond[0]
    return cond[0, :valid].float().cpu()


def chunk_text(caption: torch.Tensor, special: dict, remaining: int, max_length: int) -> torch.Tensor:
    """A generated chunk's text: [DURATION(min(remaining, 7)), HQ, caption] cut to max_length rows.
    remaining = generated chunks after this one (upstream: DURATION_TOKEN_N, N chunks to come).
    special None: the caption alone (models trained without MAGI's special tokens, e.g. the toy)."""
    if special is None:
        return caption[:max_length]
    rows = torch.cat([special["duration"][min(remaining, 7)][None], special["hq"][None], caption], dim=0)
    return rows[:max_length]
