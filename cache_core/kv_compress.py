"""Importance-redundancy K/V selection (R-KV style) for the finished-chunk history.

Per head, every history token gets
    score = lam * importance - (1 - lam) * redundancy
and the top-`budget` tokens are kept (spec flowcache.md A3/B3):
- importance: softmax attention of a bounded set of current queries over the history keys,
  averaged over the queries, then max-pooled along the token axis (kernel 7) so neighbours of
  an attended token survive too;
- redundancy: each key's mean cosine similarity to the other keys, in the O(L) form
  (k_i . sum_j k_j - |k_i|^2) / L on L2-normalised keys (no L x L matrix), then a softmax over
  tokens so both terms live on the same 1/L scale. The divisor is L, as in both references
  (SkyReels: the row mean of the L x L matrix with its diagonal zeroed; MAGI: the same O(L)
  form): the softmax is not scale-free, so L - 1 would change near-ties.

All tensors use the attention layout [rows, tokens, heads, head_dim]; scores are float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on one float32 logits block [rows, heads, queries, keys] (bytes): heads are
# scored in groups so a 14B layer never materialises more than this at once.
_SCORE_BLOCK_BYTES = 256 * 1024 * 1024


def pick_queries(q: torch.Tensor, max_queries: int) -> torch.Tensor:
    """At most `max_queries` queries of q [rows, Lq, H, D], evenly spaced over the chunk.

    Evenly spaced rather than the most recent ones: in a video chunk the last tokens are the
    bottom rows of its last frame, a spatially biased sample.
    """
    lq = q.shape[1]
    if lq <= max_queries:
        return q
    idx = torch.linspace(0, lq - 1, max_queries, device=q.device).round().long()
    return q.index_select(1, idx)


def importance(keys: torch.Tensor, queries: torch.Tensor, kernel: int = 7) -> torch.Tensor:
    """[rows, H, L]: mean softmax attention of `queries` over `keys`, max-pooled over tokens."""
    rows, L, H, D = keys.shape
    nq = queries.shape[1]
    scale = D ** -0.5
    k = keys.permute(0, 2, 3, 1)              # [rows, H, D, L]
    q = queries.permute(0, 2, 1, 3)           # [rows, H, Q, D]
    group = max(1, _SCORE_BLOCK_BYTES // max(1, rows * nq * L * 4))
    out = []
    for h0 in range(0, H, group):
        logits = torch.matmul(q[:, h0:h0 + group].float(), k[:, h0:h0 + group].float()) * scale
        out.append(logits.softmax(dim=-1).mean(dim=2))   # [rows, h, L]
        del logits
    imp = torch.cat(out, dim=1)
    if kernel > 1:
        imp = F.max_pool1d(imp.reshape(rows * H, 1, L), kernel, stride=1, padding=kernel // 2)
        imp = imp.reshape(rows, H, L)
    return imp


def redundancy(keys: torch.Tensor) -> torch.Tensor:
    """[rows, H, L]: softmax over tokens of each key's summed cosine similarity to the others / L."""
    L = keys.shape[1]
    k = F.normalize(keys.float(), dim=-1)                 # [rows, L, H, D]
    total = k.sum(dim=1, keepdim=True)                    # [rows, 1, H, D]
    self_sim = (k * k).sum(dim=-1)                        # 1, or 0 for an all-zero key
    mean_sim = ((k * total).sum(dim=-1) - self_sim) / L               # [rows, L, H]
    return mean_sim.permute(0, 2, 1).softmax(dim=-1)


def score_tokens(keys: torch.Tensor, queries: torch.Tensor, lam: float = 0.07, kernel: int = 7) -> torch.Tensor:
    """[rows, H, L] score; higher is kept first."""
    return lam * importance(keys, queries, kernel) - (1.0 - lam) * redundancy(keys)


def select_indices(keys: torch.Tensor, queries: torch.Tensor, budget: int, lam: float = 0.07, kernel: int = 7,
                   max_queries: int = 256) -> torch.Tensor:
    """Indices [rows, H, budget] of the top-`budget` tokens per (row, head), ascending.

    keys: [rows, L, H, D] with L > budget; queries: [rows, Lq, H, D]. Ascending order means
    kept token j never comes from a position before j, which lets a caller compact the keys
    in place (kv_store does).
    """
    scores = score_tokens(keys, pick_queries(queries, max_queries), lam, kernel)
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values


def select_tokens(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, budget: int,
                  lam: float = 0.07, kernel: int = 7, max_queries: int = 256):
    """Keep the top-`budget` tokens per (row, head).

    keys, values: [rows, L, H, D]; queries: [rows, Lq, H, D].
    Returns (kept_keys, kept_values, index): [rows, budget, H, D] twice and the kept token
    indices [rows, H, budget], ascending so the original order is preserved within a head.
    """
    L = keys.shape[1]
    if budget >= L:
        idx = torch.arange(L, device=keys.device).expand(keys.shape[0], keys.shape[2], L)
        return keys, values, idx
    idx = select_indices(keys, queries, budget, lam=lam, kernel=kernel, max_queries=max_queries)
    gather = idx.permute(0, 2, 1).unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])  # [rows, budget, H, D]
    return keys.gather(1, gather), values.gather(1, gather), idx
