"""Per-layer, per-branch K/V buffers for chunk-causal execution of one AR window.

A window of N chunks runs chunk by chunk; chunk g writes its own K/V into its slot and attends
to slots [0, end of g]. Every (branch, layer) owns one buffer [rows, tokens, channels] in the
model's dtype (the reference keeps keys in fp32, twice the memory), laid out as

    [ compressed history | chunk first_live | chunk first_live+1 | ... | chunk N-1 ]

so the keys visible to a chunk are always a prefix view of the buffer (no copies per call).
Finished ("frozen") chunks are never written again. With compression on, once the frozen
chunks at the front hold more than `budget` tokens they are squeezed to `budget` tokens per
head (kv_compress.select_tokens) and the buffer is RE-ALLOCATED at the smaller size, so the
memory actually held drops, not only the attention length. Token order inside the history
does not matter: RoPE is already applied and attention over it has no mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .kv_compress import select_tokens


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

    @property
    def total(self) -> int:
        return sum(self.chunk_tokens)

    def start(self, g: int) -> int:
        return sum(self.chunk_tokens[:g])

    def end(self, g: int) -> int:
        return sum(self.chunk_tokens[:g + 1])


@dataclass(frozen=True)
class CompressSettings:
    """When and how the frozen history is squeezed (see kv_compress)."""
    budget_tokens: int
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
    """K/V buffers of one (branch, layer)."""

    def __init__(self, layout: ChunkLayout, rows: int, channels: int, dtype, device, account: _Accounting):
        self.layout = layout
        self.account = account
        self.hist_len = 0       # tokens of compressed history at the front
        self.first_live = 0     # chunks before this one live inside the history
        self.k = self.v = None
        self._allocate(rows, layout.total, channels, dtype, device)

    def _allocate(self, rows, tokens, channels, dtype, device):
        k = torch.zeros(rows, tokens, channels, dtype=dtype, device=device)
        v = torch.zeros_like(k)
        self.account.alloc(k.nbytes + v.nbytes)
        old = (self.k, self.v)
        self.k, self.v = k, v
        return old

    def _release(self, old):
        for t in old:
            if t is not None:
                self.account.free(t.nbytes)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def rows(self) -> int:
        return self.k.shape[0]

    def offset(self, g: int) -> int:
        """Start of chunk g's slot in the buffer (g must still be live)."""
        if g < self.first_live:
            raise IndexError(f"chunk {g} was merged into the compressed history")
        return self.hist_len + self.layout.start(g) - self.layout.start(self.first_live)

    def write(self, g: int, k: torch.Tensor, v: torch.Tensor) -> None:
        s = self.offset(g)
        e = s + self.layout.chunk_tokens[g]
        if k.shape[1] != e - s:
            raise ValueError(f"chunk {g} has {e - s} tokens, got K/V with {k.shape[1]}")
        self.k[:, s:e].copy_(k)
        self.v[:, s:e].copy_(v)

    def visible(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.offset(g) + self.layout.chunk_tokens[g]
        return self.k[:, :e], self.v[:, :e]

    def squeeze_history(self, upto: int, queries: torch.Tensor, heads: int, cfg: CompressSettings) -> bool:
        """Merge chunks [first_live, upto) into the history; compress it to the budget.

        queries: [rows, Lq, heads*head_dim] of the chunk being forwarded now.
        Returns True if the buffer was re-allocated.
        """
        if upto <= self.first_live:
            return False
        cut = self.offset(upto) if upto < self.layout.num_chunks else self.k.shape[1]
        if cut <= cfg.budget_tokens:
            return False
        rows, _, c = self.k.shape
        d = c // heads
        hk, hv, _ = select_tokens(
            self.k[:, :cut].view(rows, cut, heads, d), self.v[:, :cut].view(rows, cut, heads, d),
            queries.reshape(queries.shape[0], -1, heads, d), cfg.budget_tokens,
            lam=cfg.lam, kernel=cfg.kernel, max_queries=cfg.max_queries)
        live_k, live_v = self.k[:, cut:], self.v[:, cut:]
        budget = cfg.budget_tokens
        old = self._allocate(rows, budget + live_k.shape[1], c, self.k.dtype, self.k.device)
        self.k[:, :budget].copy_(hk.reshape(rows, budget, c))
        self.v[:, :budget].copy_(hv.reshape(rows, budget, c))
        self.k[:, budget:].copy_(live_k)
        self.v[:, budget:].copy_(live_v)
        del live_k, live_v, hk, hv
        self._release(old)
        self.hist_len, self.first_live = budget, upto
        return True


class KVStore:
    """All (branch, layer) K/V buffers of one AR window, plus which chunks are written/frozen.

    Buffers are allocated lazily on a branch's first write, with that write's rows, dtype and
    device. `compress=None` keeps every chunk at full length.
    """

    def __init__(self, layout: ChunkLayout, num_layers: int, compress: Optional[CompressSettings] = None):
        self.layout = layout
        self.num_layers = num_layers
        self.compress = compress
        self._layers: dict[tuple[int, int], LayerKV] = {}
        self._written: dict[int, set] = {}
        self._frozen: dict[int, set] = {}
        self._account = _Accounting()

    # --- bookkeeping -------------------------------------------------------------------
    def reset(self) -> None:
        for lkv in self._layers.values():
            self._account.free(lkv.nbytes)
        self._layers.clear()
        self._written.clear()
        self._frozen.clear()

    def reset_branch(self, branch: int) -> None:
        for key in [k for k in self._layers if k[0] == branch]:
            self._account.free(self._layers.pop(key).nbytes)
        self._written.pop(branch, None)
        self._frozen.pop(branch, None)

    def bytes_allocated(self) -> int:
        return self._account.current

    @property
    def peak_bytes(self) -> int:
        return self._account.peak

    def rows(self, branch: int) -> Optional[int]:
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

    def history_chunks(self, branch: int, layer: int) -> int:
        """Chunks merged into the compressed history of (branch, layer)."""
        lkv = self._layers.get((branch, layer))
        return 0 if lkv is None else lkv.first_live

    # --- the three operations of a self-attention call ------------------------------------
    def write(self, branch: int, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store chunk's K/V [rows, T_chunk, C] into its slot of (branch, layer)."""
        if self.is_frozen(branch, chunk):
            raise RuntimeError(f"chunk {chunk} of branch {branch} is frozen")
        lkv = self._layers.get((branch, layer))
        if lkv is None:
            lkv = self._layers[(branch, layer)] = LayerKV(
                self.layout, k.shape[0], k.shape[-1], k.dtype, k.device, self._account)
        elif lkv.rows != k.shape[0]:
            raise ValueError(f"branch {branch} has {lkv.rows} rows, got {k.shape[0]}: reset_branch first")
        lkv.write(chunk, k, v)
        if layer == self.num_layers - 1:
            self._written.setdefault(branch, set()).add(int(chunk))

    def visible(self, branch: int, layer: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V chunk attends to: [history | chunks first_live .. chunk], views [rows, L, C]."""
        return self._layers[(branch, layer)].visible(chunk)

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
        return lkv.squeeze_history(upto, queries, heads, self.compress)
