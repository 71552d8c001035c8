"""Importance-redundancy selection and the chunk K/V store (specs/flowcache.md A3/B3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from cache_core.kv_compress import importance, pick_queries, redundancy, score_tokens, select_tokens
from cache_core.kv_store import ChunkLayout, CompressConfig, KVStore

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

def test_layout_last_chunk_may_be_short():
    lay = ChunkLayout.from_frames(num_frames=5, chunk_frames=2, tokens_per_frame=3)
    assert lay.chunk_tokens == (6, 6, 3)
    assert (lay.start(1), lay.end(1), lay.total) == (6, 12, 15)


def _chunk(g, rows=1, tokens=4, c=4):
    return torch.full((rows, tokens, c), float(g + 1)), torch.full((rows, tokens, c), -float(g + 1))


def test_store_write_visible_freeze():
    store = KVStore(ChunkLayout((4, 4, 4)), num_layers=2)
    for layer in range(2):
        for g in range(2):
            store.write(0, layer, g, *_chunk(g))
    k, v = store.visible(0, 1, 1)
    assert k.shape == (1, 8, 4)
    assert torch.equal(k, torch.cat([_chunk(0)[0], _chunk(1)[0]], 1))
    assert torch.equal(v, torch.cat([_chunk(0)[1], _chunk(1)[1]], 1))
    assert store.is_written(0, 1) and not store.is_written(0, 2) and not store.is_written(1, 0)
    store.freeze(0, 0)
    with pytest.raises(RuntimeError):
        store.write(0, 0, 0, *_chunk(0))
    with pytest.raises(RuntimeError):
        store.freeze(0, 2)
    # model dtype is kept
    s16 = KVStore(ChunkLayout((4,)), num_layers=1)
    s16.write(0, 0, 0, *(t.half() for t in _chunk(0)))
    assert s16.visible(0, 0, 0)[0].dtype == torch.float16
    assert s16.bytes_allocated() == 2 * 4 * 4 * 2


def test_token_indexed_writes_touch_only_those_tokens():
    store = KVStore(ChunkLayout((4, 4)), num_layers=1)
    store.write(0, 0, 0, *_chunk(0))
    store.write(0, 0, 1, *_chunk(1))
    idx = torch.tensor([1, 3])
    store.write(0, 0, 1, torch.full((1, 2, 4), 9.0), torch.full((1, 2, 4), -9.0), tokens=idx)
    k, v = store.visible(0, 0, 1)
    assert k[0, 4:, 0].tolist() == [2.0, 9.0, 2.0, 9.0] and v[0, 4:, 0].tolist() == [-2.0, -9.0, -2.0, -9.0]
    assert k[0, :4, 0].tolist() == [1.0] * 4                      # chunk 0 untouched
    with pytest.raises(RuntimeError):                               # a chunk starts with all its tokens
        KVStore(ChunkLayout((4,)), num_layers=1).write(0, 0, 0, *_chunk(0, tokens=2), tokens=idx)
    with pytest.raises(ValueError):
        store.write(0, 0, 1, *_chunk(1, tokens=3), tokens=idx)


def test_visible_key_range_first_and_last_chunk():
    store = KVStore(ChunkLayout((4, 4, 4)), num_layers=1)
    for g in range(3):
        store.write(0, 0, g, *_chunk(g))
    k, _ = store.visible(0, 0, last=2, first=1)
    assert k[0, :, 0].tolist() == [2.0] * 4 + [3.0] * 4
    k, _ = store.visible(0, 0, last=0)                              # chunk-causal chunk 0
    assert k[0, :, 0].tolist() == [1.0] * 4
    k, _ = store.visible(0, 0, last=2)                              # chunk 0 seeing all (bidirectional)
    assert k.shape[1] == 12


def test_compression_keeps_budget_and_frees_memory():
    torch.manual_seed(2)
    heads, d, T = 2, 3, 4
    lay = ChunkLayout((T, T, T))
    store = KVStore(lay, num_layers=1, compress=CompressConfig(lam=0.07, kernel=7), budget_tokens=T)
    ks = [torch.randn(1, T, heads * d) for _ in range(3)]
    vs = [torch.randn(1, T, heads * d) for _ in range(3)]
    for g in range(3):
        store.write(0, 0, g, ks[g], vs[g])
    full_bytes = store.bytes_allocated()
    assert full_bytes == 2 * 3 * T * heads * d * 4
    q = torch.randn(1, T, heads * d)

    store.freeze(0, 0)                          # one chunk of history fits the budget
    assert store.maybe_compress(0, 0, q, heads) is False
    store.freeze(0, 1)                          # two chunks: squeeze to one chunk's worth
    assert store.maybe_compress(0, 0, q, heads) is True
    assert store.history_chunks(0, 0) == 2
    assert store.bytes_allocated() == 2 * 2 * T * heads * d * 4 < full_bytes
    assert store.peak_bytes == full_bytes + store.bytes_allocated()   # old + new during the swap

    k, v = store.visible(0, 0, 2)
    assert k.shape == (1, 2 * T, heads * d)
    assert torch.equal(k[:, T:], ks[2]) and torch.equal(v[:, T:], vs[2])   # live chunk intact
    hist_k = torch.cat(ks[:2], 1).view(1, 2 * T, heads, d)
    hist_v = torch.cat(vs[:2], 1).view(1, 2 * T, heads, d)
    ek, ev, _ = select_tokens(hist_k, hist_v, q.view(1, T, heads, d), T, 0.07, 7)
    assert torch.equal(k[:, :T].view(1, T, heads, d), ek)
    assert torch.equal(v[:, :T].view(1, T, heads, d), ev)
    hk, hv = store.visible(0, 0, 1)             # a range ending inside the history: all of it (MAGI-1's reads)
    assert torch.equal(hk, k[:, :T]) and torch.equal(hv, v[:, :T])
    store.write(0, 0, 2, ks[0], vs[0])          # a live chunk is still writable
    store.reset()
    assert store.bytes_allocated() == 0


def _async_run(compress: bool, n=8, active=2, T=4, heads=2, d=3, layers=2, plan=True):
    """Chunks start one after another (async diffusion forcing, ar_step 1): chunk g is live
    during steps g .. g+active-1, then frozen. Mirrors forward_chunked: freeze, then per live
    chunk and layer: squeeze (with that chunk's queries), write, attend."""
    torch.manual_seed(4)
    cfg = CompressConfig() if compress else None
    store = KVStore(ChunkLayout((T,) * n), num_layers=layers, compress=cfg, budget_tokens=T if compress else None)
    held, keys = [], []
    for step in range(n + active - 1):
        for g in range(n):
            if g <= step - active and store.is_written(0, g) and not store.is_frozen(0, g):
                store.freeze(0, g)
        live = [g for g in range(n) if step - active < g <= step]
        if plan:
            store.plan(0, live[-1])
        for g in live:
            for layer in range(layers):
                store.maybe_compress(0, layer, torch.randn(1, T, heads * d), heads)
                store.write(0, layer, g, torch.randn(1, T, heads * d), torch.randn(1, T, heads * d))
                k, v = store.visible(0, layer, g)
                assert k.shape == v.shape and k.shape[1] <= store._layers[(0, layer)].used
        held.append(store.bytes_allocated())
        keys.append(k.shape[1])
    return store, held, keys


def test_compression_lowers_the_peak_when_chunks_start_one_after_another():
    n, active, T, heads, d, layers = 8, 2, 4, 2, 3, 2
    unit = 2 * T * heads * d * 4               # one chunk of K and V in one (branch, layer), fp32
    full, full_held, full_keys = _async_run(False)
    comp, comp_held, comp_keys = _async_run(True)
    # without compression the buffers grow to the whole window; the last growth of the last
    # layer briefly holds its old buffer next to the new one
    assert max(full_held) == layers * n * unit
    assert full.peak_bytes == (layers * n + (n - 1)) * unit
    # with a budget of one chunk: once the history is full, every start reuses the tail freed
    # by squeezing the chunk that just finished: (budget + active chunks) tokens, per layer
    budget_chunks = 1
    steady = comp_held[active:n]
    assert steady == [layers * (budget_chunks + active) * unit] * len(steady)
    assert comp_keys[active:n] == [(budget_chunks + active) * T] * len(steady)   # newest chunk's keys
    assert comp.peak_bytes == (layers * (budget_chunks + active) + (budget_chunks + active - 1)) * unit
    assert comp.peak_bytes < full.peak_bytes
    # once no chunk is left to start, the spare tail is released
    assert comp_held[-1] == layers * (budget_chunks + 1) * unit
    assert all(comp.history_chunks(0, layer) == n - 1 for layer in range(layers))


def test_chunks_starting_together_allocate_once():
    """Synchronous schedule: all chunks live at once, the peak is the window (no overlap)."""
    n, T, heads, d, layers = 4, 4, 2, 3, 2
    window = layers * 2 * n * T * heads * d * 4
    for cfg, plan in ((None, True), (CompressConfig(), True), (None, False)):
        store = KVStore(ChunkLayout((T,) * n), num_layers=layers, compress=cfg, budget_tokens=T)
        if plan:
            store.plan(0, n - 1)
        for g in range(n):
            for layer in range(layers):
                store.maybe_compress(0, layer, torch.randn(1, T, heads * d), heads)
                store.write(0, layer, g, torch.randn(1, T, heads * d), torch.randn(1, T, heads * d))
        assert store.bytes_allocated() == window
        if plan:
            assert store.peak_bytes == window
        else:   # each start grew the buffers by itself, copying the old ones
            assert store.peak_bytes == window + (n - 1) * 2 * T * heads * d * 4


def test_chunks_start_in_order():
    store = KVStore(ChunkLayout((4, 4, 4)), num_layers=1)
    store.write(0, 0, 0, *_chunk(0))
    with pytest.raises(RuntimeError):
        store.write(0, 0, 2, *_chunk(2))       # chunk 1 has not started
    with pytest.raises(IndexError):
        store.visible(0, 0, 1)
    assert store.bytes_allocated() == 2 * 4 * 4 * 4     # only the started chunk holds memory
