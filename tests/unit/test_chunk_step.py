"""The per-chunk cache step (cache_core/chunk_step.py): the one driver every loop calls.

A scripted policy stands in for a caching method: each test checks what the step does with one
decision, by hand, and the counts it keeps. The loops that call it (the DF executor in both
attention modes, MAGI-1's chunk-wise forward) are tested end to end elsewhere.
"""
import pytest
import torch

from cache_core.chunk_step import COMPUTE, COUNT_KEYS, SKIP, ChunkPolicy, ChunkStep, ChunkView, subset


class Scripted(ChunkPolicy):
    """Answers from a script; remembers what it was shown and what it was told was reused."""

    method = "scripted"

    def __init__(self, decisions, needs_view=False, needs_indicator=False):
        self.decisions = list(decisions)
        self.needs_view, self.needs_indicator = needs_view, needs_indicator
        self.seen, self.observed, self.indicators, self.reused_out = [], [], [], []

    def see(self, branch, chunk, view):
        self.seen.append((branch, chunk, view.local_step))

    def decide(self, branch, chunk, indicator, local_step, steps):
        self.indicators.append(indicator)
        return self.decisions.pop(0)

    def observe(self, branch, chunk, h_in, h_out, tokens=None):
        self.observed.append((branch, chunk, h_out.clone(), tokens))

    def reused(self, branch, chunk, h_out):
        self.reused_out.append(h_out.clone())


def never(*_):
    raise AssertionError("built although the policy does not ask for it")


H_IN = torch.arange(12.0).view(1, 4, 3)           # one row, a chunk of 4 tokens


def computed_once(step, branch=0, chunk=0):
    """The chunk computed once with output h_in + 10: its cached residual is 10."""
    step.apply(branch, chunk, COMPUTE, H_IN, lambda tokens: H_IN + 10)
    step.policy.observed.clear()
    for key in ("chunk_steps_computed", "tokens_active", "tokens_computed"):
        step.counts[key] = 0
    return step


def test_decide_builds_view_and_indicator_only_when_asked():
    lazy = ChunkStep(Scripted([COMPUTE]))
    assert lazy.decide(0, 2, 1, 8, view=never, indicator=never) is COMPUTE
    eager = computed_once(ChunkStep(Scripted([SKIP], needs_view=True, needs_indicator=True)), 1, 2)
    view = ChunkView(frames=(0, 1), tokens=4, local_step=1)
    assert eager.decide(1, 2, 1, 8, view=lambda: view, indicator=lambda: torch.ones(2)) is SKIP
    assert eager.policy.seen == [(1, 2, 1)] and torch.equal(eager.policy.indicators[0], torch.ones(2))


def test_compute_runs_all_tokens_counts_them_and_heats_them():
    step = ChunkStep(Scripted([]))
    heat = torch.zeros(4)
    calls = []
    out = step.apply(0, 0, COMPUTE, H_IN, lambda tokens: calls.append(tokens) or H_IN * 2, heat=heat)
    assert calls == [None] and torch.equal(out, H_IN * 2)
    assert torch.equal(heat, torch.ones(4))
    c = step.counts
    assert (c["chunk_steps_computed"], c["chunk_steps_subset"], c["tokens_active"], c["tokens_computed"]) == (1, 0, 4, 4)
    (_, _, observed, tokens), = step.policy.observed
    assert torch.equal(observed, H_IN * 2) and tokens is None


def test_skip_reuses_without_running_or_observing():
    step = computed_once(ChunkStep(Scripted([])))
    heat = torch.zeros(4)
    h_new = H_IN * 3
    out = step.apply(0, 0, SKIP, h_new, never, heat=heat)
    assert torch.equal(out, h_new + 10) and torch.equal(heat, torch.zeros(4))   # the residual re-added
    assert step.counts["chunk_steps_skipped"] == 1 and step.counts["tokens_computed"] == 0
    assert step.counts["tokens_active"] == 4 and step.policy.observed == []
    assert len(step.policy.reused_out) == 1 and torch.equal(step.policy.reused_out[0], out)


def test_a_skip_with_nothing_cached_is_computed():
    """A policy cannot reuse what was never computed (a new chunk, a reset branch): the step computes."""
    step = ChunkStep(Scripted([SKIP, SKIP]))
    assert step.decide(0, 0, 1, 8) is COMPUTE
    computed_once(step)
    assert step.decide(0, 0, 2, 8) is SKIP
    step.reset_branch(0)
    step.policy.decisions.append(SKIP)
    assert step.decide(0, 0, 3, 8) is COMPUTE


def test_subset_runs_its_tokens_and_takes_the_others_from_reuse():
    step = computed_once(ChunkStep(Scripted([])))
    heat = torch.zeros(4)
    tokens = torch.tensor([1, 3])
    got = []

    def run(t):
        got.append(t)
        return -H_IN[:, t]

    out = step.apply(0, 0, subset(tokens), H_IN, run, heat=heat)
    want = H_IN + 10
    want[:, tokens] = -H_IN[:, tokens]
    assert torch.equal(got[0], tokens) and torch.equal(out, want)
    assert torch.equal(heat, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    c = step.counts
    assert (c["chunk_steps_computed"], c["chunk_steps_subset"], c["tokens_computed"]) == (1, 1, 2)
    assert torch.equal(step.policy.observed[0][3], tokens)


def test_a_history_chunk_runs_without_counting_as_active_or_being_observed():
    step = ChunkStep(Scripted([]))
    out = step.apply(0, 0, COMPUTE, H_IN, lambda t: H_IN * 3, active=False)
    assert torch.equal(out, H_IN * 3)
    assert step.counts["chunk_steps_history"] == 1 and step.counts["tokens_active"] == 0
    assert step.policy.observed == []


def test_counts_are_the_one_vocabulary_and_flops_are_added_where_spent():
    step = ChunkStep(ChunkPolicy())
    assert set(step.counts) == set(COUNT_KEYS)
    step.add_flops(5.0, 8.0, 13.0)
    step.add_flops(1.0, 1.0, 2.0)
    step.frozen()
    c = step.counts
    assert (c["calls"], c["transformer_flops"], c["transformer_flops_noskip"], c["transformer_flops_vanilla"]) == \
        (2, 6.0, 9.0, 15.0)
    assert c["chunk_steps_frozen"] == 1


def test_the_base_policy_computes_everything_and_never_predicts():
    step = ChunkStep(ChunkPolicy())
    assert step.decide(0, 0, 0, 4) is COMPUTE and step.method == "chunk_causal"
    assert not step.predicts
    with pytest.raises(KeyError):           # nothing was computed: nothing to reuse
        step.apply(0, 0, SKIP, H_IN, never)


def test_a_forced_step_is_computed_but_the_policy_still_sees_it():
    """MAGI-1's references always compute the run's last step: the loop forces it; the policy
    still takes its decision (its state moves on as on any step), and its answer is overridden."""
    policy = Scripted([SKIP], needs_indicator=True)
    step = ChunkStep(policy)
    assert step.decide(0, 3, 5, 8, indicator=lambda: torch.ones(1), force=True) is COMPUTE
    assert policy.decisions == [] and len(policy.indicators) == 1
