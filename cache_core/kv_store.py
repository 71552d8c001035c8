"""The one K/V store: per-layer, per-branch K/V buffers of chunks, for every family and schedule.

Chunks run chunk by chunk; chunk g writes its own K/V (all its tokens, or a token subset) into
its slot and attends to the keys of a range of chunks `visible(first, last)`. The store serves:
- the DF window executor: one store per AR window (a segment), chunks 0..N-1 of the window,
  finished chunks frozen and optionally compressed;
- MAGI-1's stages: one store per guidance pass for the whole video, K/V that persist across
  forward steps, chunks that no key range can reach again evicted (`keep`), optional CPU
  residence (`offload`), compression of the finished history at a chunk's end;
- the few-step causal Wan run: one store per guidance branch for the whole video, a rolling
  window of the last `keep` + 1 chunks behind `sink` chunks that stay (the first ones written),
  everything between them evicted.
Every (branch, layer) owns one contiguous buffer [rows, capacity, channels] in the model's dtype
(the reference keeps keys in fp32, twice the memory), laid out as

    [ compressed history | chunk first_live | ... | chunk started-1 | spare ]

so the keys visible to a chunk are always a contiguous view of the buffer (no copy per call).
Evicted chunks leave the front the same way compressed ones do, without a history; with a sink,
the sink chunks become the history (uncompressed) and the evicted ones leave from behind it.

Memory (spec flowcache.md A3/B3):
- Slots are allocated lazily: a chunk gets its slot when it is first written ("starts");
  nothing is reserved for chunks that have not started. When the buffer is full the start of
  a chunk grows it to exactly what is needed (a re-allocation: old and new coexist for one
  (branch, layer) during the copy, and the peak counts that). Chunks that start in the same
  call (announced by KVStore.plan) share one growth, so when all start together the first
  allocation is the last.
- Finished ("frozen") chunks are never written again. With compression on, once the frozen
  run at the front holds more than `budget` tokens it is squeezed to `budget` tokens per head
  (kv_compress.select_indices) IN PLACE: the kept tokens are gathered to the front head group
  by head group, the live chunks slide down behind them, and the freed tail becomes spare
  capacity. The squeeze runs in the first attention call after a chunk is frozen, before any
  chunk that starts in that call takes its slot, so a new chunk reuses the freed tail instead
  of growing the buffer.
- Result: when chunks start one after another (asynchronous diffusion forcing), the steady
  state holds (budget + active chunks) tokens per (branch, layer), and the peak is set by the
  ramp-up (plus one buffer's re-allocation overlap), not by the window length. Without
  compression the buffer grows to the whole window. In synchronous mode every chunk is active
  at once, so the peak is the whole window either way; compression then only shortens
  attention over the history.
- Spare capacity nobody can use any more (more than the chunks still to start need) is
  released after a squeeze, but only if the re-allocation overlap does not raise the peak:
  e.g. in synchronous mode the freed tail is kept until the segment ends, so compression never
  makes the peak higher than the same run without it.

Token order inside the history does not matter: RoPE is already applied and attention over
it has no mask. `peak_bytes` counts the buffers, including the moment old and new coexist
during a re-allocation. Short-lived workspace is not counted, as attention's own is not: the
scores of kv_compress (bounded per layer by its block size and `max_queries`), one head group
of gathered history (<= _GATHER_BLOCK_BYTES) and a slid piece (<= 1/16 of a buffer).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .kv_compress import pick_queries, select_indices

# Bound on the scratch of one in-place gather (one group of heads of the squeezed history).
_GATHER_BLOCK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ChunkLayout:
    """Token ranges of a window's chunks (the last chunk may be shorter)."""
    chunk_tokens: tuple[int, ...]

    @classmethod
    def from_frames(cls, num_frames: int, chunk_frames: int, tokens_per_frame: int) -> "ChunkLayout":
        sizes = []
        for f0 in range(0, num_frames, chunk_frames):
            sizes.append((min(f0 + chunk_frames, num_frames) - f0) * tokens_per_frame)
        return cls(tuple(sizes))

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_tokens)

    @functools.cached_property
    def _offsets(self) -> tuple[int, ...]:
        """Token offset of every chunk, and the total (a store of a long video has thousands of chunks)."""
        return (0, *itertools.accumulate(self.chunk_tokens))

    @property
    def total(self) -> int:
        return self._offsets[-1]

    def start(self, g: int) -> int:
        return self._offsets[g]

    def end(self, g: int) -> int:
        return self._offsets[g + 1]


@dataclass(frozen=True)
class CompressConfig:
    """K/V compression of the finished history (see kv_compress): at most `budget_chunks` chunks'
    worth of tokens per head, scored with weight `lam` on importance, pooled over `kernel`
    tokens, by at most `max_queries` queries."""
    budget_chunks: int = 1
    lam: float = 0.07
    kernel: int = 7
    max_queries: int = 256


class _Accounting:
    """Bytes held by all buffers of a store, and the peak (including re-allocation overlap)."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def alloc(self, nbytes: int):
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def free(self, nbytes: int):
        self.current -= nbytes


class LayerKV:
    """K/V buffer of one (branch, layer): [history | live chunks in order | spare]."""

    def __init__(self, layout: ChunkLayout, rows: int, channels: int, dtype, device, account: _Accounting):
        self.layout = layout
        self.account = account
        self.hist_len = 0       # tokens of compressed history at the front
        self.first_live = 0     # chunks before this one live inside the history (or were evicted)
        self.dropped = 0        # chunks before this one were evicted: no range may reach them
        self.sink = (0, 0)      # chunks [start, end) held as a sink in the (uncompressed) history
        self.started = 0        # chunks [0, started) have been written (own a slot or are history)
        self.used = 0           # tokens in use: history + slots of chunks first_live .. started-1
        self.k = torch.empty(rows, 0, channels, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def rows(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def _resize(self, tokens: int) -> None:
        """Re-allocate to `tokens` of capacity, keeping the tokens in use (old and new coexist)."""
        rows, _, c = self.k.shape
        k = torch.empty(rows, tokens, c, dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        self.account.alloc(k.nbytes + v.nbytes)
        k[:, :self.used].copy_(self.k[:, :self.used])
        v[:, :self.used].copy_(self.v[:, :self.used])
        self.account.free(self.nbytes)
        self.k, self.v = k, v

    def offset(self, g: int) -> int:
        """Start of chunk g's slot in the buffer (g must have started and still be live)."""
        if g < self.first_live:
            raise IndexError(f"chunk {g} was merged into the compressed history")
        if g >= self.started:
            raise IndexError(f"chunk {g} has not started (chunks {self.dropped}..{self.started - 1} have)")
        return self.hist_len + self.layout.start(g) - self.layout.start(self.first_live)

    def write(self, g: int, k: torch.Tensor, v: torch.Tensor, upto: Optional[int] = None,
              tokens: Optional[torch.Tensor] = None) -> None:
        """Write chunk g; if g starts now and the buffer is full, grow it once to also hold the
        chunks g+1..upto that are known to start right after (see KVStore.plan).

        tokens: write only these token indices of the chunk (k, v hold just those rows); the
        others keep their K/V. Only a chunk that has started can be written in part."""
        n = self.layout.chunk_tokens[g]
        if tokens is not None:
            if g >= self.started:
                raise RuntimeError(f"chunk {g} has not started: its first write must cover all {n} tokens")
            if k.shape[1] != tokens.numel() or v.shape[1] != tokens.numel():
                raise ValueError(f"{tokens.numel()} token indices, got K/V with {k.shape[1]}/{v.shape[1]}")
            s = self.offset(g)
            self.k[:, s:s + n].index_copy_(1, tokens, k)
            self.v[:, s:s + n].index_copy_(1, tokens, v)
            return
        if k.shape[1] != n or v.shape[1] != n:
            raise ValueError(f"chunk {g} has {n} tokens, got K/V with {k.shape[1]}/{v.shape[1]}")
        if g > self.started and self.used == 0:      # a first write may start anywhere: chunks before it
            self.first_live = self.dropped = self.started = g    # were never written, as if evicted
        if g > self.started:
            raise RuntimeError(f"chunk {g} cannot start before chunk {self.started} (chunks start in order)")
        if g == self.started:           # a new chunk takes its slot (growing only when full)
            if self.used + n > self.capacity:
                upto = g if upto is None else max(g, min(upto, self.layout.num_chunks - 1))
                self._resize(self.used + sum(self.layout.chunk_tokens[g:upto + 1]))
            self.started += 1
            self.used += n
        s = self.offset(g)
        self.k[:, s:s + n].copy_(k)
        self.v[:, s:s + n].copy_(v)

    def visible(self, last: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of chunks first..last (views). Chunks merged into the compressed
        history cannot be told apart: a range that starts inside it includes all of it."""
        if self.sink[1] <= first < self.dropped:
            raise RuntimeError(f"chunk {first} was evicted (chunks {self.dropped}..{self.started - 1} are held)")
        e = self.hist_len if last < self.first_live else self.offset(last) + self.layout.chunk_tokens[last]
        s = 0 if first < self.first_live else self.offset(first)
        return self.k[:, s:e], self.v[:, s:e]

    def _slide_down(self, src: int, dst: int, n: int) -> None:
        """Move tokens [src, src+n) to [dst, dst+n), dst < src, piece by piece in ascending order.

        A piece lands below the sources of every later piece. A piece longer than the shift
        overlaps its own source, so it goes through a copy (at most 1/16 of the tokens moved)."""
        shift = src - dst
        if n <= 0 or shift <= 0:
            return
        piece = max(shift, -(-n // 16))
        for p in range(0, n, piece):
            q = min(p + piece, n)
            for t in (self.k, self.v):
                block = t[:, src + p:src + q]
                t[:, dst + p:dst + q].copy_(block.clone() if piece > shift else block)

    def evict_before(self, upto: int, sink: int = 0) -> None:
        """Drop the chunks before `upto` (none may be reached again); the live ones slide down.

        sink: the first `sink` chunks written stay (they become the uncompressed history, which a
        range from chunk 0 includes); the chunks between them and `upto` are dropped."""
        upto = min(upto, self.started)
        if sink and not self.hist_len:              # the sink is pinned when the first chunk after it goes
            if upto <= self.first_live + sink:
                return
            self.sink = (self.first_live, self.first_live + sink)
            self.hist_len = self.layout.start(self.sink[1]) - self.layout.start(self.first_live)
            self.first_live = self.sink[1]
        if upto <= self.first_live:
            return
        if self.hist_len and not self.sink[1]:
            raise RuntimeError("a store evicts or compresses its history, not both")
        cut = self.offset(upto) if upto < self.started else self.used
        self._slide_down(cut, self.hist_len, self.used - cut)
        self.used -= cut - self.hist_len
        self.first_live = self.dropped = upto

    def key_count(self, first: int, last: int) -> int:
        """Keys of chunks first..last as `visible` gives them (chunks not written yet at full size)."""
        if first < self.first_live:
            return self.hist_len + sum(self.layout.chunk_tokens[self.first_live:last + 1])
        return sum(self.layout.chunk_tokens[first:last + 1])

    def squeeze_history(self, upto: int, queries: torch.Tensor, heads: int, cfg: CompressConfig, budget: int) -> bool:
        """Merge chunks [first_live, upto) into the history; compress it to the budget in place.

        queries: [rows, Lq, heads*head_dim] of the chunk being forwarded now.
        Returns True if it compressed. Afterwards the freed tokens are spare capacity for the
        chunks still to start; capacity beyond what they can need is released when that does
        not raise the peak.
        """
        upto = min(upto, self.started)
        if upto <= self.first_live:
            return False
        cut = self.offset(upto) if upto < self.started else self.used
        if cut <= budget:
            return False
        rows, cap, c = self.k.shape
        d = c // heads
        idx = select_indices(self.k[:, :cut].view(rows, cut, heads, d),
                             queries.reshape(queries.shape[0], -1, heads, d), budget,
                             lam=cfg.lam, kernel=cfg.kernel, max_queries=cfg.max_queries)   # [rows, H, budget]
        # Gather the kept tokens to the front, one group of heads at a time: a head's channels
        # are only read and written by its own group, so nothing is overwritten before it is read.
        per_head = rows * budget * d * self.k.element_size()
        group = max(1, min(heads, _GATHER_BLOCK_BYTES // max(1, per_head)))
        for t in (self.k, self.v):
            th = t.view(rows, cap, heads, d)
            for h0 in range(0, heads, group):
                h1 = min(heads, h0 + group)
                ix = idx[:, h0:h1].permute(0, 2, 1).unsqueeze(-1).expand(-1, -1, -1, d)   # [rows, budget, h, d]
                th[:, :budget, h0:h1].copy_(th[:, :cut, h0:h1].gather(1, ix))
        del idx
        live = self.used - cut
        self._slide_down(cut, budget, live)
        self.hist_len, self.first_live, self.used = budget, upto, budget + live
        # release spare capacity the chunks still to start cannot use
        need = self.used + sum(self.layout.chunk_tokens[self.started:])
        if self.capacity > need:
            new_bytes = 2 * rows * need * c * self.k.element_size()
            if self.account.current + new_bytes <= self.account.peak:
                self._resize(need)
        return True


class KVStore:
    """All (branch, layer) K/V buffers of one AR window, plus which chunks are written/frozen.

    Buffers are created on a branch's first write, with that write's rows, dtype and device
    (`offload`: in CPU memory, moved to the compute device by the reader), and hold only chunks
    that have started (see the module docstring for the memory bound). `compress=None` keeps
    every chunk at full length; with it, the frozen history is squeezed to `budget_tokens` per
    head. `keep`: from a write of chunk c on, chunks before c - keep are evicted (no key range
    reaches back further); None keeps them all. `reserve`: a buffer that must grow makes room for
    this many chunks at once (a store that persists over a whole video knows how many it holds at
    most: one allocation instead of a growing copy per new chunk). `sink` (with `keep`): the first
    `sink` chunks written are never evicted; a range from chunk 0 sees them, then the chunks kept.
    """

    def __init__(self, layout: ChunkLayout, num_layers: int, compress: Optional[CompressConfig] = None,
                 budget_tokens: Optional[int] = None, keep: Optional[int] = None, offload: bool = False,
                 reserve: Optional[int] = None, sink: int = 0):
        if compress is not None and budget_tokens is None:
            raise ValueError("compression needs budget_tokens")
        if compress is not None and keep is not None:
            raise ValueError("a store evicts or compresses its history, not both")
        self.layout = layout
        self.num_layers = num_layers
        self.compress, self.budget_tokens = compress, budget_tokens
        if sink and keep is None:
            raise ValueError("a sink is what a rolling window (keep) does not evict: give keep too")
        self.keep, self.offload, self.reserve, self.sink = keep, offload, reserve, sink
        self._queries: dict[tuple[int, int], torch.Tensor] = {}
        self._layers: dict[tuple[int, int], LayerKV] = {}
        self._written: dict[int, set] = {}
        self._frozen: dict[int, set] = {}
        self._plan: dict[int, int] = {}
        self._account = _Accounting()

    # --- bookkeeping -------------------------------------------------------------------
    def reset(self) -> None:
        for lkv in self._layers.values():
            self._account.free(lkv.nbytes)
        self._layers.clear()
        self._written.clear()
        self._frozen.clear()
        self._plan.clear()
        self._queries.clear()

    def reset_branch(self, branch: int) -> None:
        for key in [k for k in self._layers if k[0] == branch]:
            self._account.free(self._layers.pop(key).nbytes)
        self._written.pop(branch, None)
        self._frozen.pop(branch, None)
        self._plan.pop(branch, None)

    def bytes_allocated(self) -> int:
        return self._account.current

    @property
    def peak_bytes(self) -> int:
        return self._account.peak

    def batch_rows(self, branch: int) -> Optional[int]:
        lkv = self._layers.get((branch, 0))
        return None if lkv is None else lkv.rows

    def is_written(self, branch: int, chunk: int) -> bool:
        return chunk in self._written.get(branch, ())

    def is_frozen(self, branch: int, chunk: int) -> bool:
        return chunk in self._frozen.get(branch, ())

    def freeze(self, branch: int, chunks: Sequence[int] | int) -> None:
        """Mark finished chunks: their K/V stay as last written and may be compressed."""
        if isinstance(chunks, int):
            chunks = (chunks,)
        for g in chunks:
            if not self.is_written(branch, g):
                raise RuntimeError(f"cannot freeze chunk {g} of branch {branch}: never written")
            self._frozen.setdefault(branch, set()).add(int(g))

    def plan(self, branch: int, last: int) -> None:
        """Announce that every chunk of `branch` up to `last` is written during this call.

        A buffer that must grow when a chunk starts then grows once for all chunks that start
        in the call (no slot is reserved beyond them), instead of once per chunk: when all
        chunks start together (synchronous schedule, plain sampler) the first allocation is
        the final one and nothing is copied. Optional; without it a buffer grows per chunk.
        """
        self._plan[branch] = int(last)

    def history_chunks(self, branch: int, layer: int) -> int:
        """Chunks merged into the compressed history of (branch, layer)."""
        lkv = self._layers.get((branch, layer))
        return 0 if lkv is None else lkv.first_live

    # --- the three operations of a self-attention call ------------------------------------
    def write(self, branch: int, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor,
              tokens: Optional[torch.Tensor] = None) -> None:
        """Store chunk's K/V [rows, T_chunk, C] into its slot of (branch, layer); with `tokens`
        (indices within the chunk) only those rows [rows, len(tokens), C] are written."""
        if self.is_frozen(branch, chunk):
            raise RuntimeError(f"chunk {chunk} of branch {branch} is frozen")
        lkv = self._layers.get((branch, layer))
        if lkv is None:
            lkv = self._layers[(branch, layer)] = LayerKV(
                self.layout, k.shape[0], k.shape[-1], k.dtype, "cpu" if self.offload else k.device, self._account)
        elif lkv.rows != k.shape[0]:
            raise ValueError(f"branch {branch} has {lkv.rows} rows, got {k.shape[0]}: reset_branch first")
        if tokens is not None:
            tokens, k, v = tokens.to(lkv.k.device), k.to(lkv.k.device), v.to(lkv.k.device)
        upto = self._plan.get(branch)
        if upto is None and self.reserve:
            upto = chunk + self.reserve - 1
        if self.keep is not None:       # before the write: a new chunk reuses the evicted one's room
            lkv.evict_before(chunk - self.keep, self.sink)
        lkv.write(chunk, k, v, upto, tokens)
        if layer == self.num_layers - 1:
            self._written.setdefault(branch, set()).add(int(chunk))

    def visible(self, branch: int, layer: int, last: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of chunks first..last (chunk-causal: first 0, last the chunk itself), views
        [rows, L, C]; a range from 0 includes the compressed history."""
        lkv = self._layers.get((branch, layer))
        if lkv is None:
            raise RuntimeError(f"no K/V of branch {branch} has been written (asked for chunks {first}..{last})")
        return lkv.visible(last, first)

    def key_count(self, branch: int, first: int, last: int) -> int:
        """Keys a query of chunk `last` sees with its range starting at `first` (for FLOP counts)."""
        lkv = self._layers.get((branch, 0))
        return sum(self.layout.chunk_tokens[first:last + 1]) if lkv is None else lkv.key_count(first, last)

    def chunks(self, branch: int = 0) -> list[int]:
        """The chunks held at full length (not evicted, not merged into the compressed history): a
        sink's, then the live ones."""
        lkv = self._layers.get((branch, 0))
        return [] if lkv is None else list(range(*lkv.sink)) + list(range(lkv.first_live, lkv.started))

    def sink_chunks(self, branch: int = 0) -> list[int]:
        """The chunks pinned as the sink (empty until the window first drops a chunk behind it)."""
        lkv = self._layers.get((branch, 0))
        return [] if lkv is None else list(range(*lkv.sink))

    def history_tokens(self, branch: int = 0) -> int:
        lkv = self._layers.get((branch, 0))
        return 0 if lkv is None else lkv.hist_len

    def note_queries(self, branch: int, layer: int, queries: torch.Tensor) -> None:
        """The queries [rows, Lq, heads*head_dim] of the chunk last forwarded: they score a later
        `compress_finished` (families that compress at a chunk's end rather than in attention)."""
        if self.compress is not None:        # only the evenly spaced ones scoring uses (kv_compress.pick_queries)
            self._queries[(branch, layer)] = pick_queries(queries.unsqueeze(2), self.compress.max_queries).squeeze(2)

    def compress_finished(self, branch: int, upto: int, heads: int) -> None:
        """Chunks up to `upto` are finished: squeeze them and the history to the budget, scored by
        each layer's noted queries."""
        for layer in range(self.num_layers):
            lkv, q = self._layers.get((branch, layer)), self._queries.get((branch, layer))
            if lkv is not None and q is not None:
                lkv.squeeze_history(upto + 1, q.to(lkv.k.device), heads, self.compress, self.budget_tokens)

    def maybe_compress(self, branch: int, layer: int, queries: torch.Tensor, heads: int) -> bool:
        """Squeeze the frozen front of (branch, layer) to the budget, scored by `queries`.

        Only a contiguous run of frozen chunks right after the history is merged (finished
        chunks always precede live ones in AR order). Returns True if it compressed.
        """
        if self.compress is None:
            return False
        lkv = self._layers.get((branch, layer))
        if lkv is None:
            return False
        frozen = self._frozen.get(branch, set())
        upto = lkv.first_live
        while upto in frozen:
            upto += 1
        return lkv.squeeze_history(upto, queries, heads, self.compress, self.budget_tokens)
