"""The one K/V store (cache_core/kv_store.py): writes, key ranges, freezing, compression in place,
the peak account, and what persistent families need (eviction, a first write anywhere, key
counts, compression at a chunk's end)."""
import pytest
import torch

from cache_core.kv_compress import select_tokens
from cache_core.kv_store import ChunkLayout, CompressConfig, KVStore


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


def test_keep_evicts_what_no_range_reaches_and_live_chunks_slide_down():
    store = KVStore(ChunkLayout((4,) * 6), num_layers=1, keep=1)
    ks = [_chunk(g)[0] for g in range(6)]
    for g in range(4):
        store.write(0, 0, g, ks[g], ks[g] + 1)
    assert store.chunks() == [2, 3]                      # chunk 3 written: chunks before 3 - 1 evicted
    k, v = store.visible(0, 0, 3, 2)
    assert torch.equal(k, torch.cat(ks[2:4], 1)) and torch.equal(v, torch.cat(ks[2:4], 1) + 1)
    with pytest.raises(RuntimeError, match="chunk 1 was evicted"):
        store.visible(0, 0, 3, 1)
    held = store.bytes_allocated()
    store.write(0, 0, 4, ks[4], ks[4])                  # evicted before the write: its room is reused
    assert store.bytes_allocated() == held == 2 * 2 * 4 * 4 * 4   # keep + 1 live chunks, no spare
    assert store.key_count(0, 3, 5) == 3 * 4            # chunk 5 not written yet: counted at full size


def test_a_first_write_may_start_at_any_chunk():
    """A guidance pass that first runs when the window has moved on (MAGI-1's history-free pass)."""
    store = KVStore(ChunkLayout((4,) * 6), num_layers=1, keep=2)
    k = _chunk(3)[0]
    store.write(0, 0, 3, k, k)
    assert store.chunks() == [3] and torch.equal(store.visible(0, 0, 3, 3)[0], k)
    with pytest.raises(RuntimeError, match="cannot start before chunk 4"):
        store.write(0, 0, 5, k, k)


def test_offloaded_buffers_live_in_cpu_memory():
    store = KVStore(ChunkLayout((4,) * 2), num_layers=1, offload=True)
    k = _chunk(0)[0]
    store.write(0, 0, 0, k, k)
    assert store.visible(0, 0, 0)[0].device.type == "cpu" and torch.equal(store.visible(0, 0, 0)[0], k)


def test_compression_at_a_chunks_end_is_the_merge_then_select_rule():
    """MAGI-1's rule (the reference's): at a chunk's end, the history and every finished chunk are
    merged and the top-budget tokens per KV head kept, scored by the last forwarded chunk's queries
    (noted per layer). Stated here with kv_compress.select_tokens on the concatenated keys."""
    torch.manual_seed(3)
    T, heads, d, layers = 4, 2, 3, 2
    store = KVStore(ChunkLayout((T,) * 4), num_layers=layers, compress=CompressConfig(lam=0.3, kernel=3),
                    budget_tokens=T)
    ks = {(g, l): torch.randn(1, T, heads * d) for g in range(4) for l in range(layers)}
    queries = {}
    for g in range(3):
        for layer in range(layers):
            store.write(0, layer, g, ks[(g, layer)], -ks[(g, layer)])
            queries[layer] = torch.randn(1, 6, heads * d)
            store.note_queries(0, layer, queries[layer])
    store.compress_finished(0, 1, heads)                   # chunks 0 and 1 finished
    for layer in range(layers):
        merged = torch.cat([ks[(0, layer)], ks[(1, layer)]], 1).view(1, 2 * T, heads, d)
        want_k, want_v, _ = select_tokens(merged, -merged, queries[layer].view(1, 6, heads, d), T, 0.3, 3)
        k, v = store.visible(0, layer, 2)
        assert torch.equal(k[:, :T].view(1, T, heads, d), want_k) and torch.equal(v[:, :T].view(1, T, heads, d), want_v)
        assert torch.equal(k[:, T:], ks[(2, layer)])         # the live chunk after the history, intact
    assert store.history_tokens() == T and store.chunks() == [2]
    assert store.key_count(0, 0, 3) == T + 2 * T            # history + chunk 2 + chunk 3 (not written yet)
    assert torch.equal(store.visible(0, 0, 1)[0], store.visible(0, 0, 2)[0][:, :T])   # a range ending inside


def test_reserve_sizes_a_persistent_buffer_once():
    """A store that lives for a whole video (MAGI-1's) knows how many chunks it holds at most: its
    first write makes room for all of them, so no later chunk copies the buffer."""
    store = KVStore(ChunkLayout((4,) * 8), num_layers=1, keep=1, reserve=3)
    k = _chunk(0)[0]
    store.write(0, 0, 0, k, k)
    one_chunk = 2 * k.nbytes
    assert store.bytes_allocated() == 3 * one_chunk
    for g in range(1, 8):                      # keep 1: chunks g-1 and g held, g+1 writes into the third slot
        store.write(0, 0, g, k, k)
    assert store.bytes_allocated() == store.peak_bytes == 3 * one_chunk


def _rolling_reference(written: list, keep: int, sink: int) -> list:
    """What a rolling window with a sink holds after each write, stated on plain lists: the first
    `sink` chunks written, then the newest keep + 1 (no chunk twice)."""
    held = written[:sink]
    return held + [g for g in written[-(keep + 1):] if g not in held]


@pytest.mark.parametrize("keep,sink", [(1, 1), (2, 1), (1, 2), (3, 0), (0, 2)])
def test_sink_stays_and_the_middle_is_evicted(keep, sink):
    """A rolling window behind a sink (LongLive, StreamDiffusionV2): after every write the store
    holds the first `sink` chunks and the newest keep + 1, exactly, in that order; a range from
    the first chunk sees them; a chunk between them is refused; memory never grows past sink +
    keep + 1 chunks (the evicted chunk's room is reused by the new one, as upstream's rolling
    buffer does)."""
    store = KVStore(ChunkLayout((4,) * 12), num_layers=2, keep=keep, sink=sink, reserve=sink + keep + 1)
    ks = [_chunk(g)[0] for g in range(12)]
    for g in range(12):
        for layer in range(2):
            store.write(0, layer, g, ks[g], ks[g] + 1)
            expect = _rolling_reference(list(range(g + 1)), keep, sink)
            k, v = store.visible(0, layer, g, expect[0])
            assert torch.equal(k, torch.cat([ks[c] for c in expect], 1))
            assert torch.equal(v, torch.cat([ks[c] + 1 for c in expect], 1))
        assert store.chunks() == expect
        assert store.key_count(0, 0, g) == 4 * len(expect)
    one_chunk = 2 * ks[0].nbytes
    assert store.peak_bytes == store.bytes_allocated() == 2 * (sink + keep + 1) * one_chunk
    if sink and keep + 1 + sink < 11:
        with pytest.raises(RuntimeError, match="was evicted"):
            store.visible(0, 0, 11, sink)


def test_a_sink_of_a_store_first_written_later_is_its_first_chunks():
    """After a prompt switch the K/V are rebuilt from the kept chunks on: the sink is the first
    chunks written into the fresh store (LongLive's re-cache), not chunk 0 of the video."""
    store = KVStore(ChunkLayout((4,) * 10), num_layers=1, keep=1, sink=1)
    ks = [_chunk(g)[0] for g in range(10)]
    for g in range(4, 8):
        store.write(0, 0, g, ks[g], ks[g])
    assert store.chunks() == [4, 6, 7]
    assert torch.equal(store.visible(0, 0, 7, 4)[0], torch.cat([ks[4], ks[6], ks[7]], 1))


def test_a_sink_needs_a_window():
    with pytest.raises(ValueError, match="keep"):
        KVStore(ChunkLayout((4,) * 3), num_layers=1, sink=1)
