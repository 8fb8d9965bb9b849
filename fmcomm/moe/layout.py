"""Where every routed token goes: validation, the count exchange, the exchange's layout.

Terms. A *slot* is one (token, k) pair of top-K routing: T tokens give T·K slots, in
the order ``t·K + k``. A *row* is one slot's copy of its token on the wire. Experts are
laid out contiguously over the ranks: rank d holds experts d·E_local … (d+1)·E_local − 1,
E_local = num_experts / world. The sender orders its rows by expert (so by destination
rank, then by the destination's local expert); the receiver gets them grouped by source
rank, and hands its experts the rows grouped by local expert, sources in rank order.

The count exchange is the one collective before the tokens travel. Every rank sends
every peer a block of int64 (``Header`` below): its validation status, its
``num_experts``, hidden size, dtype and options, how many rows it sends to *each* rank
(the full row, so that every rank knows the whole rows matrix, which the hierarchical
route needs for its intermediate steps and ``auto`` needs to decide alike everywhere),
and how many rows it sends to each of that peer's experts. A rank whose own arguments
are wrong still takes part, with its problem in its block, so every rank raises the same
error naming it, and no rank is left waiting for tokens. The block's length depends on
``num_experts``; ranks that disagree on it therefore disagree on the split sizes of this
exchange, which the communicator's all-to-all detects on every rank (MismatchError); the
rest of a disagreement (same block length) is caught from the blocks' contents.
"""
from __future__ import annotations

import dataclasses

import torch

from ..dtypes import DTYPES
from ..errors import InvalidArgument, MismatchError

ALGORITHMS = ("auto", "direct", "hierarchical")
COMPRESSIONS = (None, "fp8")

# Status codes a rank puts in its block (0: its arguments are fine). They never leave
# one job, so they may change between versions.
OK, BAD_TOKENS, BAD_INDICES, INDEX_OUT_OF_RANGE, BAD_WEIGHTS, INDIVISIBLE, BAD_OPTION = range(7)
# Header fields, in order, before the rows row and the per-expert counts.
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
    rows_matrix: list[list[int]]     # rows_matrix[s][d]: rows rank s sends rank d (every rank knows all)
    received_per_expert: torch.Tensor  # [world, experts_per_rank]: rows from source s for local expert e
    tokens_per_expert: list[int]     # rows this rank's local experts receive, per local expert

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
    """Sorted order of the slots (by expert, stable), and the rows per destination and per expert."""
    flat = expert_indices.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=num_experts)
    per_rank = per_expert.view(world, num_experts // world).sum(1)
    return order, per_expert, per_rank


def exchange_counts(comm, tokens, expert_indices, num_experts, weights, algo, compress) -> Layout:
    """Validate everywhere, then learn every rank's counts in one all-to-all; raise alike on every rank."""
    world, rank = comm.world, comm.rank
    problem = check_arguments(tokens, expert_indices, num_experts, weights, world, algo, compress)
    experts_per_rank = -(-num_experts // world) if isinstance(num_experts, int) and num_experts > 0 else 1
    width = HEADER_FIELDS + world + experts_per_rank
    blocks = torch.zeros(world, width, dtype=torch.int64)
    if problem is None:
        top_k = expert_indices.shape[1]
        order, per_expert, per_rank = route_slots(expert_indices, num_experts, world)
        blocks[:, HEADER_FIELDS:HEADER_FIELDS + world] = per_rank
        blocks[:, HEADER_FIELDS + world:] = per_expert.view(world, experts_per_rank)
        hidden, dtype_code = tokens.shape[1], next(d.code for d in DTYPES.values() if d.torch == tokens.dtype)
    else:
        hidden = dtype_code = top_k = 0
        blocks[:, STATUS], blocks[:, DETAIL] = problem.code, problem.detail
    blocks[:, NUM_EXPERTS] = num_experts if isinstance(num_experts, int) else -1
    blocks[:, HIDDEN], blocks[:, DTYPE_CODE] = hidden, dtype_code
    blocks[:, OPTIONS] = option_code(algo, compress)
    received = torch.empty_like(blocks)
    try:
        comm.all_to_all_single(received, blocks)
    except MismatchError as e:
        raise MismatchError(f"moe.dispatch: ranks disagree on num_experts (this rank has {num_experts!r}; "
                            f"{e})", rank=rank, op="moe.dispatch", peer=e.peer) from None

    problems = []
    for source in range(world):
        code, detail = int(received[source, STATUS]), int(received[source, DETAIL])
        if code != OK:
            text = problem.text if source == rank else describe(code, detail, int(received[source, NUM_EXPERTS]))
            problems.append(f"rank {source}: {text}")
    if problems:
        raise InvalidArgument(f"moe.dispatch (seen by rank {rank}): " + "; ".join(problems))
    for field, name in ((NUM_EXPERTS, "num_experts"), (HIDDEN, "hidden size"), (DTYPE_CODE, "dtype code"),
                        (OPTIONS, "algo/compress")):
        values = received[:, field].tolist()
        if len(set(values)) != 1:
            raise MismatchError(f"moe.dispatch: ranks disagree on {name}: " +
                                ", ".join(f"rank {s} has {v}" for s, v in enumerate(values)),
                                rank=rank, op="moe.dispatch")
    rows_matrix = received[:, HEADER_FIELDS:HEADER_FIELDS + world].tolist()
    per_source_expert = received[:, HEADER_FIELDS + world:].contiguous()
    # Counts come from peers: before they size anything, they must be non-negative and
    # agree with each other (a source's rows here are the sum of its rows per expert here).
    for source in range(world):
        if (min(rows_matrix[source]) < 0 or int(per_source_expert[source].min()) < 0
                or int(per_source_expert[source].sum()) != rows_matrix[source][rank]):
            raise MismatchError(f"moe.dispatch: rank {source}'s counts do not add up ({rows_matrix[source]}, "
                                f"{per_source_expert[source].tolist()} for this rank's experts)",
                                rank=rank, op="moe.dispatch", peer=source)
    return Layout(rank=rank, world=world, num_experts=num_experts, experts_per_rank=num_experts // world,
                  top_k=top_k, num_tokens=tokens.shape[0], hidden=hidden, dtype=tokens.dtype,
                  row_of_slot_order=order, token_of_row=order // max(top_k, 1), rows_matrix=rows_matrix,
                  received_per_expert=per_source_expert,
                  tokens_per_expert=per_source_expert.sum(0).tolist())
