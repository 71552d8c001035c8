"""The chunk executor against a tiny pure-torch model family (no ComfyUI).

The toy family is a 2-layer transformer on plain tokens (positions added at embedding), with
self-attention through the executor's KVAttention. Its reference is written out here: one
forward over the whole window with an explicit attention mask.
"""
import pytest
import torch
import torch.nn.functional as F

from cache_core.chunk_executor import ChunkCall, ChunkExecutor, branch_rows
from cache_core.chunk_step import COMPUTE, SKIP, ChunkPolicy, subset
from cache_core.flops import DiTShape
from cache_core.record import StepRecord

FRAMES, TPF, CF, DIM, HEADS = 5, 3, 2, 16, 2      # chunks of 2, 2, 1 frames; 15 tokens


class ToyFamily:
    """A tiny transformer as a chunk adapter: embed, blocks with a KV hook, head."""

    def __init__(self, layers=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g) * 0.3   # noqa: E731
        self.w = [dict(q=rnd(DIM, DIM), k=rnd(DIM, DIM), v=rnd(DIM, DIM), o=rnd(DIM, DIM),
                       f1=rnd(DIM, 2 * DIM), f2=rnd(2 * DIM, DIM)) for _ in range(layers)]
        self.pos = rnd(FRAMES * TPF, DIM)
        self.num_layers = layers
        self.flops = DiTShape(dim=DIM, ffn_dim=2 * DIM, num_layers=layers, text_len=0, text_dim=0,
                                   freq_dim=1, in_dim=DIM, out_dim=DIM, patch=(1, 1, 1))

    def embed(self, x, t):
        return ChunkCall(tokens=x + self.pos, timesteps=t, tokens_per_frame=TPF, shape_key=tuple(x.shape[1:]))

    def indicators(self, call, frames):
        return call.timesteps[:, list(frames)].float()[..., None]

    @staticmethod
    def sdpa(q, k, v, mask=None):
        b, lq, _ = q.shape
        split = lambda a: a.view(b, a.shape[1], HEADS, DIM // HEADS).transpose(1, 2)   # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, lq, DIM)

    def block(self, i, h, attend):
        w = self.w[i]
        h = h + attend(i, h @ w["q"], h @ w["k"], h @ w["v"]) @ w["o"]
        return h + torch.tanh(h @ w["f1"]) @ w["f2"]

    def run_blocks(self, call, rows, frames, h, attention, tokens=None):
        for i in range(self.num_layers):
            h = self.block(i, h, lambda layer, q, k, v: attention(layer, q, k, v, HEADS, self.sdpa))
        return h

    def head(self, call, h):
        return 0.5 * h

    def finish(self, call, out):
        return out

    def reference(self, x, mask):
        """The whole window in one forward, attention limited by mask [L, L] (True = may attend)."""
        h = x + self.pos
        bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        for i in range(self.num_layers):
            h = self.block(i, h, lambda layer, q, k, v: self.sdpa(q, k, v, bias))
        return 0.5 * h


def record(active, row, steps=4):
    return StepRecord(frame_sigmas=torch.full((FRAMES,), 0.5), active=torch.tensor(active), prefix_frames=0,
                      chunk_frames=CF, steps=steps, window_index=0, call=row, calls=steps)


def chunk_of_token():
    return torch.arange(FRAMES * TPF) // TPF // CF


class Residuals(ChunkPolicy):
    """A test policy: a fixed decision per chunk (the step reuses the residuals it left out)."""
    reuses = True

    def __init__(self, decide):
        self._decide = decide

    def decide(self, branch, chunk, indicator, local_step, steps):
        return self._decide(chunk, local_step)


@pytest.fixture
def toy():
    return ToyFamily()


def inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FRAMES * TPF, DIM, generator=g), torch.full((batch, FRAMES), 500.0)


def call_once(run, toy, x, t, rec, branches=None):
    return run.forward(toy, toy.embed(x, t), rec, branches or branch_rows([0, 1], x.shape[0]), rec.steps)


def test_chunk_by_chunk_with_kv_equals_one_block_masked_forward(toy):
    x, t = inputs()
    out = call_once(ChunkExecutor(ChunkPolicy()), toy, x, t, record([True] * FRAMES, 0))
    c = chunk_of_token()
    causal = toy.reference(x, c[None, :] <= c[:, None])
    torch.testing.assert_close(out, causal, atol=1e-5, rtol=1e-5)
    assert (out - toy.reference(x, torch.ones(15, 15, dtype=torch.bool))).abs().max() > 1e-3   # the mask matters


def test_subset_of_all_tokens_equals_compute(toy):
    x, t = inputs(seed=2)
    x2, _ = inputs(seed=3)
    outs = []
    for second in (lambda g, k: COMPUTE, lambda g, k: subset(torch.arange(CF * TPF if g < 2 else TPF))):
        run = ChunkExecutor(Residuals(lambda g, k, s=second: COMPUTE if k == 0 else s(g, k)))
        call_once(run, toy, x, t, record([True] * FRAMES, 0))
        outs.append(call_once(run, toy, x2, t, record([True] * FRAMES, 1)))
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_subset_of_some_tokens_equals_the_full_forward_rows_when_the_rest_is_fresh(toy):
    x, t = inputs(seed=4)
    picked = torch.tensor([0, 2, 5])              # tokens of chunk 1 (its 6 tokens are 6..11)
    run = ChunkExecutor(Residuals(lambda g, k: subset(picked) if (k == 1 and g == 1) else COMPUTE))
    full = call_once(run, toy, x, t, record([True] * FRAMES, 0))
    first_flops = run.counts["transformer_flops"]
    again = call_once(run, toy, x, t, record([True] * FRAMES, 1))
    rows = 6 + picked
    torch.testing.assert_close(again[:, rows], full[:, rows], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again, full, atol=1e-6, rtol=1e-6)   # the others: residual of the same input
    assert run.counts["chunk_steps_computed"] == 2 * 2 * 3                # a subset counts as computed
    assert run.counts["transformer_flops"] - first_flops < first_flops   # and costs less


def test_not_started_chunks_are_not_forwarded(toy):
    x, t = inputs(seed=5)
    run = ChunkExecutor(ChunkPolicy())
    out = call_once(run, toy, x, t, record([True, True, False, False, False], 0))
    assert torch.count_nonzero(out[:, CF * TPF:]) == 0           # chunks after the last active one: zeros
    assert run.counts["chunk_steps_computed"] == 2 and run.counts["chunk_steps_frozen"] == 0   # chunk 0, both branches


def test_skip_reuses_the_residual_and_keeps_stale_kv(toy):
    x1, t = inputs(seed=7)
    x2, _ = inputs(seed=8)
    run = ChunkExecutor(Residuals(lambda g, k: SKIP if (g == 0 and k == 1) else COMPUTE))
    act = [True] * 4 + [False]
    out1 = call_once(run, toy, x1, t, record(act, 0))
    out2 = call_once(run, toy, x2, t, record(act, 1))
    n0 = CF * TPF
    e1, e2 = x1 + toy.pos, x2 + toy.pos
    torch.testing.assert_close(out2[:, :n0], 0.5 * (e2[:, :n0] + 2 * out1[:, :n0] - e1[:, :n0]), atol=1e-6, rtol=0)
    # chunk 1 attended to chunk 0's stale K/V (from x1): a fresh block-causal pass over the mix
    mix = x2.clone()
    mix[:, :n0] = x1[:, :n0]
    c = chunk_of_token()
    ref = toy.reference(mix, c[None, :] <= c[:, None])
    torch.testing.assert_close(out2[:, n0:2 * n0], ref[:, n0:2 * n0], atol=1e-5, rtol=1e-5)
    assert run.counts["chunk_steps_skipped"] == 2


def test_branches_from_cond_or_uncond():
    assert branch_rows(None, 4) == {0: slice(0, 4)}
    assert branch_rows([1, 0], 4) == {1: slice(0, 2), 0: slice(2, 4)}
    rows = branch_rows([0, 1, 0], 3)
    assert rows[1] == slice(1, 2) and rows[0].tolist() == [0, 2]
    with pytest.raises(ValueError):
        branch_rows([0, 1], 3)


def test_a_chunk_is_frozen_after_its_last_step_and_reset_clears_everything(toy):
    x, t = inputs(seed=6)
    run = ChunkExecutor(ChunkPolicy())
    for row in range(2):
        call_once(run, toy, x, t, record([True] * FRAMES, row, steps=2))
    assert all(run.store.is_frozen(b, g) for b in (0, 1) for g in range(3))
    run.reset()
    assert run.store is None and run.counts["calls"] == 0


def test_bidirectional_computing_everything_equals_the_unmasked_forward(toy):
    x, t = inputs(seed=9)
    run = ChunkExecutor(ChunkPolicy(), attention="bidirectional")
    out = call_once(run, toy, x, t, record([True, True, False, False, False], 0))
    full = toy.reference(x, torch.ones(15, 15, dtype=torch.bool))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)       # every chunk forwarded, all attend
    assert run.counts["chunk_steps_computed"] == 2 and run.counts["chunk_steps_history"] == 4


def test_bidirectional_subset_and_skip_keep_the_last_kv(toy):
    x, t = inputs(seed=10)
    picked = torch.tensor([1, 4])
    decide = lambda g, k: COMPUTE if k == 0 else (SKIP if g == 0 else subset(picked) if g == 1 else COMPUTE)  # noqa: E731
    run = ChunkExecutor(Residuals(decide), attention="bidirectional")
    first = call_once(run, toy, x, t, record([True] * FRAMES, 0))
    again = call_once(run, toy, x, t, record([True] * FRAMES, 1))
    # same input, the others' K/V fresh from call 1: every row equals the full forward
    torch.testing.assert_close(again, first, atol=1e-5, rtol=1e-5)
    x2, _ = inputs(seed=11)
    k_before = run.store.visible(0, 1, 0)[0].clone()          # layer 1, branch 0, the whole window
    call_once(run, toy, x2, t, record([True] * FRAMES, 2))
    k_after = run.store.visible(0, 1, 0)[0]
    n0 = CF * TPF
    kept = torch.ones(15, dtype=torch.bool)
    kept[n0 + picked] = False
    kept[2 * n0:] = False
    assert torch.equal(k_after[:, kept], k_before[:, kept])       # chunk 0 (skipped), chunk 1's others
    assert not torch.allclose(k_after[:, n0 + picked], k_before[:, n0 + picked])   # recomputed
    assert not torch.allclose(k_after[:, 2 * n0:], k_before[:, 2 * n0:])


def test_bidirectional_refuses_compression():
    from cache_core.kv_store import CompressConfig
    with pytest.raises(ValueError, match="kv_compress"):
        ChunkExecutor(ChunkPolicy(), compress=CompressConfig(), attention="bidirectional")


class Levels(ChunkPolicy):
    """Computes everything at order 1, so the step records each chunk's noise level."""
    order = 1


@pytest.mark.parametrize("attention", ["chunk_causal", "bidirectional"])
def test_each_chunk_is_given_its_own_rows_timestep_as_its_noise_level(toy, attention):
    """What predictions extrapolate over: the timestep of the chunk's first active frame, in the
    branch's rows (rows of two branches here carry different timesteps)."""
    x, _ = inputs(seed=11)
    t = torch.tensor([[900.0, 800.0, 700.0, 600.0, 500.0], [901.0, 801.0, 701.0, 601.0, 501.0]])
    act = [False, True, True, True, True]                # chunk 0 starts with a history frame
    run = ChunkExecutor(Levels(), attention=attention)
    seen = {}
    push = run.step.outputs.push
    run.step.outputs.push = lambda b, g, r, level, tokens=None: seen.setdefault((b, g), level) or push(b, g, r, level, tokens)
    run.forward(toy, toy.embed(x, t), record(act, 0), branch_rows([0, 1], 2), 4)
    # chunks of 2, 2, 1 frames; chunk 0's indicator frame is frame 1 (its first active one)
    assert seen == {(0, 0): 800.0, (0, 1): 700.0, (0, 2): 500.0, (1, 0): 801.0, (1, 1): 701.0, (1, 2): 501.0}


def test_a_finished_chunk_drops_its_cached_outputs(toy):
    x, t = inputs(seed=12)
    run = ChunkExecutor(Levels())
    call_once(run, toy, x, t, record([True] * FRAMES, 0, steps=2))
    assert run.step.outputs.has(0, 0)
    call_once(run, toy, x, t, record([True] * FRAMES, 1, steps=2))     # every chunk's last step
    assert run.step.outputs.items == {} and run.summary()["cached_outputs_bytes_peak"] > 0
