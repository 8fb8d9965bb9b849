"""A single-process reference for fmcomm.moe: the MoE layer every rank's data goes through in one process.

Every rank can build every rank's inputs (seeded by rank), so each rank checks its
distributed results against this reference on its own, and the multi-rank and the
single-rank (tests/unit) tests share it.
"""
import zlib

import torch


def seeded(tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def tokens_on(rank: int, world: int, tag: str, hidden: int) -> torch.Tensor:
    """Rank r's tokens: a few, different per rank; the last rank of a group of 2 or more has none."""
    count = 0 if world > 1 and rank == world - 1 else 3 + (rank * 7) % 11
    return torch.randn(count, hidden, generator=seeded(f"{tag}/x/{rank}"))


def routing_on(rank: int, world: int, tag: str, kind: str, tokens: int, k: int, num_experts: int) -> torch.Tensor:
    """[T, K] expert indices: random distinct experts, all to the last expert, or only rank 0's experts."""
    g = seeded(f"{tag}/route/{rank}")
    if kind == "one_expert":
        return torch.full((tokens, k), num_experts - 1, dtype=torch.int64)
    pool = num_experts if kind == "random" else num_experts // world  # "first_rank": only rank 0 receives
    scores = torch.rand(tokens, pool, generator=g)
    return scores.topk(min(k, pool), dim=1).indices.repeat(1, -(-k // pool))[:, :k].contiguous()


def expected_rows(dest: int, world: int, per_rank_tokens, per_rank_indices, num_experts: int) -> torch.Tensor:
    """What ``dispatch`` must deliver to ``dest``: per local expert, per source in rank order, that
    source's slots for the expert in slot order (t·K + k)."""
    local = num_experts // world
    rows = []
    for e in range(dest * local, (dest + 1) * local):
        for x, idx in zip(per_rank_tokens, per_rank_indices):
            slots = (idx.reshape(-1) == e).nonzero().reshape(-1)
            rows.append(x[slots // max(idx.shape[1], 1)])
    hidden = per_rank_tokens[0].shape[1]
    return torch.cat(rows) if rows else torch.empty(0, hidden)


class ReferenceLayer:
    """Router (softmax, top-K) and E experts tanh(x W_e + b_e), weights seeded alike on every rank."""

    def __init__(self, hidden: int, num_experts: int, k: int, tag: str):
        g = seeded(f"{tag}/weights")
        self.k = k
        self.router = (torch.randn(hidden, num_experts, generator=g) / hidden ** 0.5).requires_grad_()
        self.w = (torch.randn(num_experts, hidden, hidden, generator=g) / hidden ** 0.5).requires_grad_()
        self.b = (0.1 * torch.randn(num_experts, hidden, generator=g)).requires_grad_()

    def route(self, x):
        weights, experts = torch.softmax(x @ self.router, dim=-1).topk(self.k, dim=-1)
        return weights, experts

    def expert(self, e: int, x):
        return torch.tanh(x @ self.w[e] + self.b[e])

    def forward(self, x):
        """The whole layer in one process: Σ_k weight_k · expert_k(x), k in order."""
        weights, experts = self.route(x)
        y = torch.zeros_like(x)
        for k in range(self.k):
            term = torch.zeros_like(x)
            for e in range(self.w.shape[0]):
                mask = experts[:, k] == e
                if mask.any():
                    term = term.index_put((mask.nonzero().reshape(-1),), self.expert(e, x[mask]))
            y = y + weights[:, k:k + 1] * term
        return y
