"""Per-expert counts carried in-band, at the head of each source's message (see route.py).

A head is E_local int32 counts written into the bytes of ``head_rows`` rows of the
message's own dtype and width, so it travels through every route step as rows do (the
engines and fmcomm's schedules move bytes; nothing does arithmetic on them).
"""
from __future__ import annotations

import math

import torch

from ..errors import MismatchError


def head_rows(experts_per_rank: int, row: torch.Tensor) -> int:
    """Rows of ``row``'s dtype and width that hold ``experts_per_rank`` int32 counts."""
    row_bytes = row.numel() * row.element_size()
    return -(-4 * experts_per_rank // row_bytes)


def with_heads(source: torch.Tensor, row_index: torch.Tensor, sent_per_expert: torch.Tensor,
               sent_rows: list[int]) -> torch.Tensor:
    """The message: for each destination its head, then its rows ``source[row_index[...]]``.

    The rows are gathered straight into their place (one copy of the tokens, as the
    send buffer of any all-to-all needs)."""
    world, local = sent_per_expert.shape
    width = source.shape[1:]
    n_head = head_rows(local, source.new_empty(width))
    head_bytes = torch.zeros(world, n_head * math.prod(width) * source.element_size(), dtype=torch.uint8)
    head_bytes[:, :4 * local] = sent_per_expert.to(torch.int32).contiguous().view(torch.uint8).view(world, 4 * local)
    heads = head_bytes.view(source.dtype).view(world, n_head, *width)
    message = source.new_empty((world * n_head + sum(sent_rows),) + tuple(width))
    at, taken = 0, 0
    for d in range(world):
        message[at:at + n_head] = heads[d]
        at += n_head
        torch.index_select(source, 0, row_index[taken:taken + sent_rows[d]], out=message[at:at + sent_rows[d]])
        at += sent_rows[d]
        taken += sent_rows[d]
    return message


def read_heads(arrived: torch.Tensor, received_rows: list[int], local: int, rank: int):
    """(positions of the rows that are not heads, [sources, local] counts) from blocks grouped by source rank.

    The counts come from peers: they must add up to what the agreement said each
    source sends here, or nothing is taken from them."""
    world = len(received_rows)
    width = arrived.shape[1:]
    n_head = head_rows(local, arrived.new_empty(width))
    keep, counts, at = [], [], 0
    for s in range(world):
        head = arrived[at:at + n_head].contiguous().view(torch.uint8).reshape(-1)[:4 * local]
        c = head.contiguous().view(torch.int32).to(torch.int64)
        if int(c.min()) < 0 or int(c.sum()) != received_rows[s]:
            raise MismatchError(f"moe.dispatch: rank {s}'s per-expert counts {c.tolist()} do not add up to "
                                f"the {received_rows[s]} rows it agreed to send", rank=rank, op="moe.dispatch",
                                peer=s)
        counts.append(c)
        keep.append(torch.arange(at + n_head, at + n_head + received_rows[s]))
        at += n_head + received_rows[s]
    return torch.cat(keep), torch.stack(counts)
