"""Where every routed token goes: validation, the agreement, the exchange's layout.

Terms. A *slot* is one (token, k) pair of top-K routing: T tokens give T·K slots, in
the order ``t·K + k``. A *row* is one slot's copy of its token on the wire. Experts are
laid out contiguously over the ranks: rank d holds experts d·E_local … (d+1)·E_local − 1,
E_local = num_experts / world. The sender orders its rows by expert (so by destination
rank, then by the destination's local expert); the receiver gets them grouped by source
rank, and hands its experts the rows grouped by local expert, sources in rank order.

The agreement is the one collective before the tokens travel: a sum all-reduce of a
[world, 6 + world] int64 matrix whose row r rank r fills (the header fields below): its
validation status, its ``num_experts``, hidden size, dtype and options, and how many
rows it sends to each rank. Its size depends on nothing a rank could get wrong, so it
always completes; afterwards every rank holds every rank's header and raises the same
error, naming the ranks at fault, before a token moves, and knows the whole rows
matrix (the hierarchical route needs it for its intermediate steps, and ``auto`` must
decide alike everywhere). How many of its rows a source sends to each of a
destination's experts travels in-band, at the head of that source's message
(``heads.py``), as DeepEP sends its layout with the tokens: a second round of counts
would cost one more latency on every dispatch.
"""
from __future__ import annotations

import dataclasses

import torch

from ..dtypes import DTYPES
from ..errors import InvalidArgument, MismatchError
from ..runtime.executor import arguments_agreed

ALGORITHMS = ("auto", "direct", "hierarchical")
COMPRESSIONS = (None, "fp8")

# Status codes a rank puts in its block (0: its arguments are fine). They never leave
# one job, so they may change between versions.
OK, BAD_TOKENS, BAD_INDICES, INDEX_OUT_OF_RANGE, BAD_WEIGHTS, INDIVISIBLE, BAD_OPTION = range(7)
# Header fields, in order, before the rows to each rank.
STATUS, DETAIL, NUM_EXPERTS, HIDDEN, DTYPE_CODE, OPTIONS = range(6)
HEADER_FIELDS = 6


@dataclasses.dataclass
class Problem:
    code: int
    detail: int
    text: str  # this rank's full description; peers rebuild theirs from code and detail


def describe(code: int, detail: int, num_experts: int) -> str:
    """The same words on every rank for a peer's status code."""
    return {
        BAD_TOKENS: "tokens must be a 2-D [T, H] float tensor of a dtype fmcomm moves",
        BAD_INDICES: "expert_indices must be a 2-D [T, K] integer tensor with T rows like tokens",
        INDEX_OUT_OF_RANGE: f"expert index {detail} is outside 0..{num_experts - 1}",
        BAD_WEIGHTS: f"weights must have expert_indices' shape [T, K] and a float dtype (it has {detail} elements)",
        INDIVISIBLE: f"num_experts {num_experts} is not a positive multiple of the group size",
        BAD_OPTION: "algo or compress is not one this function knows",
    }[code]


def check_arguments(tokens, expert_indices, num_experts, weights, world: int, algo, compress) -> Problem | None:
    """This rank's own arguments; the first problem found, or None."""
    if algo not in ALGORITHMS or compress not in COMPRESSIONS:
        return Problem(BAD_OPTION, 0, f"algo must be one of {ALGORITHMS} (got {algo!r}) and compress one of "
                                      f"{COMPRESSIONS} (got {compress!r})")
    if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % world:
        return Problem(INDIVISIBLE, 0, f"num_experts {num_experts!r} is not a positive multiple of the group "
                                       f"size {world}")
    if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.is_floating_point()
            or tokens.shape[1] == 0
            or tokens.dtype not in {d.torch for d in DTYPES.values()}):
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        return Problem(BAD_TOKENS, 0, f"tokens must be a 2-D [T, H] float tensor (got {shape}"
                                      f"{', ' + str(tokens.dtype) if isinstance(tokens, torch.Tensor) else ''})")
    if (not isinstance(expert_indices, torch.Tensor) or expert_indices.dim() != 2
            or expert_indices.is_floating_point() or expert_indices.is_complex()
            or expert_indices.shape[0] != tokens.shape[0]):
        shape = tuple(expert_indices.shape) if isinstance(expert_indices, torch.Tensor) else type(expert_indices)
        return Problem(BAD_INDICES, 0, f"expert_indices must be a 2-D [T, K] integer tensor with T = "
                                       f"{tokens.shape[0]} rows (got {shape})")
    if expert_indices.numel():
        low, high = int(expert_indices.min()), int(expert_indices.max())
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            return Problem(INDEX_OUT_OF_RANGE, bad, f"expert index {bad} is outside 0..{num_experts - 1}")
    if weights is not None and (not isinstance(weights, torch.Tensor) or not weights.is_floating_point()
                                or tuple(weights.shape) != tuple(expert_indices.shape)):
        n = weights.numel() if isinstance(weights, torch.Tensor) else -1
        return Problem(BAD_WEIGHTS, n, f"weights must have expert_indices' shape {tuple(expert_indices.shape)} "
                                       f"and a float dtype (got {getattr(weights, 'shape', type(weights))})")
    return None


@dataclasses.dataclass
class Layout:
    """Everything a dispatch learned, kept for its combine and both backward passes."""
    rank: int
    world: int
    num_experts: int
    experts_per_rank: int
    top_k: int
    num_tokens: int
    hidden: int
    dtype: torch.dtype
    row_of_slot_order: torch.Tensor  # sorted row i carries slot row_of_slot_order[i]
    token_of_row: torch.Tensor       # sorted row i carries token token_of_row[i]
    sent_per_expert: torch.Tensor    # [world, experts_per_rank]: rows this rank sends to each rank's experts
    rows_matrix: list[list[int]]     # rows_matrix[s][d]: rows rank s sends rank d (every rank knows all)
    received_per_expert: torch.Tensor | None = None  # [world, experts_per_rank], from the messages' heads
    tokens_per_expert: list[int] | None = None       # rows this rank's local experts receive, per expert

    @property
    def sent_rows(self) -> list[int]:
        return self.rows_matrix[self.rank]

    @property
    def received_rows(self) -> list[int]:
        return [row[self.rank] for row in self.rows_matrix]


def option_code(algo: str, compress) -> int:
    return (ALGORITHMS.index(algo) if algo in ALGORITHMS else 99) * 4 + (COMPRESSIONS.index(compress)
                                                                         if compress in COMPRESSIONS else 3)


def route_slots(expert_indices: torch.Tensor, num_experts: int, world: int):
    """Sorted order of the slots (by expert, stable), and the rows per expert and per destination."""
    flat = expert_indices.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=num_experts)
    per_rank = per_expert.view(world, num_experts // world).sum(1)
    return order, per_expert, per_rank


def agree(comm, tokens, expert_indices, num_experts, weights, algo, compress) -> Layout:
    """Validate everywhere and learn every rank's rows per destination in one all-reduce; raise alike everywhere."""
    world, rank = comm.world, comm.rank
    problem = check_arguments(tokens, expert_indices, num_experts, weights, world, algo, compress)
    headers = torch.zeros(world, HEADER_FIELDS + world, dtype=torch.int64)
    mine = headers[rank]
    if problem is None:
        order, per_expert, per_rank = route_slots(expert_indices, num_experts, world)
        mine[HEADER_FIELDS:] = per_rank
        mine[HIDDEN] = tokens.shape[1]
        mine[DTYPE_CODE] = next(d.code for d in DTYPES.values() if d.torch == tokens.dtype)
    else:
        mine[STATUS], mine[DETAIL] = problem.code, problem.detail
    mine[NUM_EXPERTS] = num_experts if isinstance(num_experts, int) else -1
    mine[OPTIONS] = option_code(algo, compress)
    if world > 1:
        # Its size is the same on every rank whatever the arguments, so the call's own
        # agreement round (FMCOMM_CHECK) would only repeat what the headers say.
        with arguments_agreed():
            comm.all_reduce(headers, algo="native")

    problems = []
    for source in range(world):
        code, detail = int(headers[source, STATUS]), int(headers[source, DETAIL])
        if code != OK:
            problems.append(f"rank {source}: {describe(code, detail, int(headers[source, NUM_EXPERTS]))}")
    if problems:
        own = f" (here: {problem.text})" if problem is not None else ""
        raise InvalidArgument("moe.dispatch: " + "; ".join(problems) + own)
    for field, name in ((NUM_EXPERTS, "num_experts"), (HIDDEN, "hidden size"), (DTYPE_CODE, "dtype code"),
                        (OPTIONS, "algo/compress")):
        values = headers[:, field].tolist()
        if len(set(values)) != 1:
            raise MismatchError(f"moe.dispatch: ranks disagree on {name}: " +
                                ", ".join(f"rank {s} has {v}" for s, v in enumerate(values)),
                                rank=rank, op="moe.dispatch")
    rows_matrix = headers[:, HEADER_FIELDS:].tolist()
    if any(x < 0 for row in rows_matrix for x in row):  # peers' figures size buffers: check them first
        raise MismatchError(f"moe.dispatch: a rank reports a negative row count: {rows_matrix}",
                            rank=rank, op="moe.dispatch")
    top_k = expert_indices.shape[1]
    return Layout(rank=rank, world=world, num_experts=num_experts, experts_per_rank=num_experts // world,
                  top_k=top_k, num_tokens=tokens.shape[0], hidden=tokens.shape[1], dtype=tokens.dtype,
                  row_of_slot_order=order, token_of_row=order // max(top_k, 1),
                  sent_per_expert=per_expert.view(world, num_experts // world), rows_matrix=rows_matrix)
