"""Importance-redundancy selection (specs/flowcache.md A3/B3); the store that uses it: test_kv_store.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from cache_core.kv_compress import importance, pick_queries, redundancy, score_tokens, select_tokens

# Five 2-d keys of one head: three identical, one orthogonal, one opposite.
KEYS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).view(1, 5, 1, 2)


def test_redundancy_hand_values():
    # cosine to the others over L = 5 (the references' divisor): k0..2 (1+1+0-1)/5 = .2, k3 0,
    # k4 (-1-1-1+0)/5 = -.6
    expected = torch.tensor([0.2, 0.2, 0.2, 0.0, -0.6]).softmax(-1)
    assert torch.allclose(redundancy(KEYS)[0, 0], expected, atol=1e-6)


def test_redundancy_matches_full_matrix():
    torch.manual_seed(0)
    keys = torch.randn(2, 37, 3, 8)
    kn = F.normalize(keys, dim=-1).permute(0, 2, 1, 3)            # [rows, H, L, D]
    sim = kn @ kn.transpose(-1, -2)
    sim = sim - torch.diag_embed(torch.diagonal(sim, dim1=-2, dim2=-1))
    full = sim.mean(-1).softmax(-1)          # SkyReels reference: row mean with a zeroed diagonal
    assert torch.allclose(redundancy(keys), full, atol=1e-6)


def test_importance_softmax_mean_and_maxpool():
    q = torch.tensor([[5.0, 0.0]]).view(1, 1, 1, 2)
    logits = torch.tensor([5, 5, 5, 0, -5]) / math.sqrt(2)
    assert torch.allclose(importance(KEYS, q, kernel=1)[0, 0], logits.softmax(-1), atol=1e-6)
    # kernel 3: a lone peak spreads to its two neighbours
    q = torch.tensor([[0.0, 9.0]]).view(1, 1, 1, 2)
    imp1 = importance(KEYS, q, kernel=1)[0, 0]
    imp3 = importance(KEYS, q, kernel=3)[0, 0]
    assert imp3[2] == imp3[3] == imp3[4] == imp1[3]
    # mean over several queries
    qs = torch.tensor([[5.0, 0.0], [0.0, 9.0]]).view(1, 2, 1, 2)
    both = (importance(KEYS, qs[:, :1], 1) + importance(KEYS, qs[:, 1:], 1)) / 2
    assert torch.allclose(importance(KEYS, qs, 1), both, atol=1e-7)


def test_hand_computed_topk():
    q = torch.tensor([[5.0, 0.0]]).view(1, 1, 1, 2)
    # importance (softmax of 3.54, 3.54, 3.54, 0, -3.54) = [.3300 x3, .0096, .0003]
    # redundancy (softmax of .2, .2, .2, 0, -.6)         = [.2343 x3, .1918, .1053]
    # score at lambda .5 = [.0479 x3, -.0911, -.0525]: keep 0, 1, 2 and the non-redundant 4
    _, _, idx = select_tokens(KEYS, KEYS, q, budget=4, lam=0.5, kernel=1)
    assert idx[0, 0].tolist() == [0, 1, 2, 4]
    # importance only keeps the attended ones, redundancy only the unusual ones
    _, _, idx = select_tokens(KEYS, KEYS, q, budget=3, lam=1.0, kernel=1)
    assert idx[0, 0].tolist() == [0, 1, 2]
    _, _, idx = select_tokens(KEYS, KEYS, q, budget=2, lam=0.0, kernel=1)
    assert idx[0, 0].tolist() == [3, 4]


def test_budget_per_head_and_gather():
    torch.manual_seed(1)
    keys, values = torch.randn(2, 20, 3, 4), torch.randn(2, 20, 3, 4)
    q = torch.randn(2, 9, 3, 4)
    kk, vv, idx = select_tokens(keys, values, q, budget=6, lam=0.07, kernel=7)
    assert kk.shape == vv.shape == (2, 6, 3, 4) and idx.shape == (2, 3, 6)
    scores = score_tokens(keys, q, 0.07, 7)
    for r in range(2):
        for h in range(3):
            top = set(scores[r, h].topk(6).indices.tolist())
            assert set(idx[r, h].tolist()) == top
            assert torch.equal(kk[r, :, h], keys[r, idx[r, h], h])
            assert torch.equal(vv[r, :, h], values[r, idx[r, h], h])
    assert not torch.equal(idx[0, 0], idx[0, 1])   # heads choose independently


def test_pick_queries_is_bounded_and_even():
    q = torch.arange(10.0).view(1, 10, 1, 1)
    assert pick_queries(q, 4).flatten().tolist() == [0.0, 3.0, 6.0, 9.0]
    assert pick_queries(q, 50) is q


# ------------------------------------------------------------------ the store
