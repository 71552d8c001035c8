"""Sequence parallelism (DeepSpeed-Ulysses) on torch.distributed: one video's tokens across ranks.

Plain torch, no ComfyUI. Each rank runs the blocks on a contiguous shard of a chunk's tokens
(uneven shards allowed: the first n % world ranks take one token more, as MAGI-1 upstream splits
them); self-attention re-lays its q/k/v with one all-to-all from "my tokens, all heads" to "all
tokens, my heads", attends, and lays the output back. The K/V store therefore holds every token
for this rank's heads only (head-sharded: what compression scores and selects per head needs no
communication), and nothing in kv_store.py knows about ranks. Everything else (latents, noise,
schedules, decisions) is replicated: computed identically on every rank.

The transport is torch.distributed's own `all_to_all_single` with split sizes (NCCL on GPUs, gloo
on CPU); an uneven `all_gather` is not supported by gloo, so rows are gathered padded to the
largest shard and trimmed (the math is never padded). `NO_SP` (world 1) makes every operation the
identity, so the single-process path is untouched. Design: shared/specs/multigpu.md section 4.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from typing import Optional

import torch

from .errors import InputError

SP_KEY = "arcache_sp"      # transformer_options key of a run's SeqParallel (absent: one process)
RANKS_ENV = "ARCACHE_SEQUENCE_PARALLEL"   # "1": samplers in this process split over torch.distributed's ranks


def _collective(fn):
    """A collective that fails (a peer raised, ran out of memory, was killed, or timed out) raises an
    error that says so and names this rank, on every rank that was waiting in it."""
    def run(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except RuntimeError as e:
            if str(e).startswith("sequence parallel:"):
                raise
            raise RuntimeError(f"sequence parallel: rank {self.rank} of {self.world} stopped in {fn.__name__}: another "
                               f"rank stopped (it raised, ran out of memory or was killed) or the ranks timed out "
                               f"({type(e).__name__}: {str(e)[:300]})") from None
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


class SeqParallel:
    """A process group for one video's tokens (None: a single process, every method the identity)."""

    def __init__(self, group=None):
        import torch.distributed as dist
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.bytes_sent = 0          # all-to-all and gather payload this rank sent (the report adds them up)
        self._seconds = 0.0          # host seconds in them (CPU); on GPUs, CUDA event pairs read at the end
        self._events: list = []
        self.stop_requested = False  # a signal asked this rank to stop: the ranks stop together (stop_on_signals)

    def __deepcopy__(self, memo):      # a handle on the ranks' communicator: model option clones share it
        return self

    def stop_on_signals(self) -> None:
        """Ctrl-C / SIGTERM to a rank of the torchrun entry: a stop request that every rank acts on at the
        same interrupt check (the run's `check_interrupt`), instead of this rank vanishing mid-collective; a
        second signal ends the process at once."""
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum, frame):
            self.stop_requested = True
            signal.signal(signum, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)

    @property
    def active(self) -> bool:
        return self.world > 1

    def splits(self, n: int) -> list[int]:
        """Tokens per rank of an n-token set: contiguous, the first n % world ranks one more."""
        return [n // self.world + (r < n % self.world) for r in range(self.world)]

    def local(self, n: int) -> slice:
        sizes = self.splits(n)
        start = sum(sizes[:self.rank])
        return slice(start, start + sizes[self.rank])

    @_collective
    def seq_to_heads(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[B, n_r, H, D] (this rank's tokens, all heads) -> [B, n, H/world, D] (all tokens, this rank's heads)."""
        if not self.active:
            return x
        import torch.distributed as dist
        B, nr, H, D = x.shape
        h = H // self.world
        send = x.reshape(B, nr, self.world, h, D).permute(2, 1, 0, 3, 4).reshape(self.world * nr, B, h, D)
        recv = x.new_empty(sum(sizes), B, h, D)
        with self._clock(x):
            dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=sizes,
                                   input_split_sizes=[nr] * self.world, group=self.group)
        self.bytes_sent += send.numel() * send.element_size() * (self.world - 1) // self.world
        return recv.permute(1, 0, 2, 3)

    @_collective
    def heads_to_seq(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[B, n, h, D] (all tokens, this rank's heads) -> [B, n_r, h * world, D] (this rank's tokens)."""
        if not self.active:
            return x
        import torch.distributed as dist
        B, n, h, D = x.shape
        nr = sizes[self.rank]
        recv = x.new_empty(self.world * nr, B, h, D)
        send = x.permute(1, 0, 2, 3).contiguous()
        with self._clock(x):
            dist.all_to_all_single(recv, send, output_split_sizes=[nr] * self.world, input_split_sizes=sizes,
                                   group=self.group)
        self.bytes_sent += (n - nr) * B * h * D * send.element_size()
        return recv.reshape(self.world, nr, B, h, D).permute(2, 1, 0, 3, 4).reshape(B, nr, self.world * h, D)

    @_collective
    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[B, n_r, C] of every rank -> [B, n, C] on every rank (padded to the largest shard, trimmed)."""
        if not self.active:
            return x
        import torch.distributed as dist
        most = max(sizes)
        pad = x.new_zeros(x.shape[0], most, *x.shape[2:])
        pad[:, :x.shape[1]] = x
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        with self._clock(x):
            dist.all_gather(parts, pad.contiguous(), group=self.group)
        self.bytes_sent += pad.numel() * pad.element_size() * (self.world - 1)
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1)

    @contextlib.contextmanager
    def _clock(self, x: torch.Tensor):
        """Time in one transfer: host seconds on CPU (gloo is synchronous), CUDA events on GPUs (NCCL runs
        asynchronously to the host; the events are read once, at the end)."""
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t0

    @property
    def comm_seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events = []
        return self._seconds

    def reset_counters(self) -> None:
        self.bytes_sent, self._seconds, self._events = 0, 0.0, []

    @_collective
    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (an interrupt one rank received, at a point all ranks pass)."""
        if not self.active:
            return bool(flag)
        import torch.distributed as dist
        t = torch.tensor([int(bool(flag))])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t)

    @_collective
    def agree(self, values: list[int], what: str) -> None:
        """Every rank must hold the same integers here (a decision fingerprint): a rank that diverged
        stops every rank with a message naming it, instead of hanging in a later collective."""
        if not self.active:
            return
        import torch.distributed as dist
        mine = torch.tensor([int(v) for v in values], dtype=torch.int64)
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"sequence parallel: the ranks diverged at {what} (rank {self.rank} has "
                               f"{mine.tolist()}, the ranks span {lo.tolist()}..{hi.tolist()})")


    def agree_run(self, settings: dict, code: int) -> None:
        """Before any work: every rank runs the same request and schedule (`settings`) with the same pack
        code (`code`, a fingerprint of its sources), or every rank stops with a named error."""
        if not self.active:
            return
        fingerprint = zlib.crc32(json.dumps(settings, sort_keys=True, default=str).encode())
        try:
            self.agree([fingerprint, code], "the start of the run")
        except RuntimeError:
            raise RuntimeError(f"sequence parallel: the ranks were started with different settings or pack versions "
                               f"(rank {self.rank}: settings {fingerprint:08x}, pack code {code:08x}): start every "
                               "rank from the same command and the same installation") from None

    @_collective
    def summary(self, same: dict, per_rank: dict) -> dict:
        """The run report's view across ranks: the `same` integers (calls, frames, cache decisions)
        checked equal on every rank, each per-rank number as max and sum, the bytes every rank sent
        added up."""
        import torch.distributed as dist
        self.agree(list(same.values()), "the end of the run (" + ", ".join(same) + ")")
        out = {"world": self.world, "rank": self.rank}
        numbers = {**per_rank, "comm_bytes_sent": self.bytes_sent, "comm_seconds": self.comm_seconds}
        for name, value in numbers.items():
            total = torch.tensor([float(value)], dtype=torch.float64)
            most = total.clone()
            dist.all_reduce(total, group=self.group)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.group)
            kind = int if isinstance(value, int) else lambda v: round(float(v), 6)
            out[name] = {"this_rank": kind(value), "max": kind(most.item()), "sum": kind(total.item())}
        return out

    def run_blocks(self, adapter, call, rows, frames, h: torch.Tensor, attention, tokens=None) -> torch.Tensor:
        """`adapter.run_blocks` on this rank's share of h's tokens (h: the tokens of `frames`, or their
        subset `tokens`), self-attention through Ulysses, the hidden states gathered back: every rank
        returns all of them, so whatever follows (the head, a cache's residuals) stays replicated."""
        if not self.active:
            return adapter.run_blocks(call, rows, frames, h, attention, tokens)
        n = h.shape[1]
        sizes, part = self.splits(n), self.local(n)
        mine = torch.arange(part.start, part.stop, device=h.device) if tokens is None else tokens[part]
        out = adapter.run_blocks(call, rows, frames, h[:, part], SPAttention(self, attention, sizes), mine)
        return self.gather_rows(out, sizes)


def checksum(value) -> int:
    """A crc of what a request holds (tensors by their bytes, containers walked, other objects by
    their type): ranks compare it before any work."""
    if torch.is_tensor(value):
        return zlib.crc32(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return zlib.crc32(json.dumps({str(k): checksum(v) for k, v in value.items()}, sort_keys=True).encode())
    if isinstance(value, (list, tuple)):
        return zlib.crc32(json.dumps([checksum(v) for v in value]).encode())
    if value is None or isinstance(value, (bool, int, float, str)):
        return zlib.crc32(repr(value).encode())
    return zlib.crc32(type(value).__name__.encode())


NO_SP = SeqParallel()


def check_world(world: int, heads: int, what: str, tokens: int | None = None, name: str = "world_size") -> None:
    """`world` ranks (the input `name`) must split `heads` (`what` they are) evenly and, when `tokens` is
    given (the smallest block pass), each get one."""
    if heads % world:
        raise InputError(name, f"{world} ranks do not divide the {heads} {what}: use a number of ranks "
                         f"that divides {heads}")
    if tokens is not None and tokens < world:
        raise InputError(name, f"{world} ranks for a chunk of {tokens} tokens: at most {tokens} ranks")


def in_ranks() -> bool:
    """Whether this process is a rank the pack's torchrun entry (tools/sp_run.py) started."""
    import torch.distributed as dist
    return os.environ.get(RANKS_ENV) == "1" and dist.is_available() and dist.is_initialized()


def from_environment() -> SeqParallel:
    """The ranks a sampler in this process splits over: torch.distributed's default group when the pack's
    torchrun entry (tools/sp_run.py) started the process, else one process."""
    import torch.distributed as dist
    if not in_ranks():
        return NO_SP
    sp = SeqParallel(dist.group.WORLD)
    sp.stop_on_signals()
    return sp


class SPAttention:
    """Ulysses around a K/V-store attention (the chunk executor's KVAttention, the causal run's
    FrameAttention): q/k/v of this rank's tokens go to all tokens of this rank's heads, the inner
    attention writes and reads the head-sharded store as if it were alone, the output comes back."""

    def __init__(self, sp: SeqParallel, inner, sizes: list[int]):
        self.sp, self.inner, self.sizes = sp, inner, sizes

    @property
    def key_len(self) -> Optional[int]:
        return self.inner.key_len

    def __call__(self, layer: int, q, k, v, heads: int, attend):
        B, nr, HD = q.shape
        D, h = HD // heads, heads // self.sp.world
        q, k, v = (self.sp.seq_to_heads(t.reshape(B, nr, heads, D), self.sizes).flatten(2) for t in (q, k, v))
        out = self.inner(layer, q, k, v, h, lambda q_, k_, v_: attend(q_, k_, v_, heads=h))
        return self.sp.heads_to_seq(out.reshape(B, -1, h, D), self.sizes).flatten(2)
