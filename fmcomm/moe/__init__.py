"""Token exchange for expert-parallel Mixture-of-Experts layers: ``dispatch`` and ``combine``.

Example, experts spread evenly over the ranks of the default communicator::

    scores = router(x).softmax(-1)                      # [T, E]
    weights, experts = scores.topk(2, dim=-1)           # top-2 routing
    expert_in, handle = fmcomm.moe.dispatch(x, experts, E, weights=weights)
    parts = expert_in.split(handle.tokens_per_expert)   # one block per local expert
    expert_out = torch.cat([f(p) for f, p in zip(my_experts, parts)])
    y = fmcomm.moe.combine(expert_out, handle)          # [T, H]: Σ_k weights[t, k] · expert_k(x[t])

Steps of a dispatch:
  1. Every rank validates its own arguments and sorts its T·K (token, k) slots by expert.
  2. One small all-reduce (``layout.py``): every rank learns every rank's rows per
     destination, validation status, ``num_experts``, hidden size and dtype, so that
     any problem raises the same typed error on every rank before a token moves.
  3. The rows travel along a route (``route.py``): ``direct`` (one uneven
     all-to-all) or ``hierarchical`` (inside the node, then between nodes), each
     source's block headed by its counts per local expert of the destination
     (``heads.py``); ``compress="fp8"`` sends them as fp8 with a scale per row
     (``fp8_rows.py``).
Combine runs the same route backward and sums each token's K results, weighted. One
dispatch and its combine make three collectives on the ``direct`` route (the
agreement and one all-to-all each way), as the same exchange written by hand on the
engine does (counts, tokens, results).

Both are differentiable: the backward of dispatch is the combine-shaped exchange of
the gradients (summed over each token's K copies), the backward of combine the
dispatch-shaped one; ``weights`` get their gradient ⟨expert output, grad⟩. Gradients
travel at full precision even where the forward tokens went as fp8.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import fp8_rows, heads, route
from .layout import Layout, agree
from ..errors import InvalidArgument

__all__ = ["dispatch", "combine", "MoEHandle", "PendingExchange", "select_algorithm", "AUTO_RULE"]

AUTO_RULE_FILE = Path(__file__).with_name("auto_rule.json")
AUTO_RULE = json.loads(AUTO_RULE_FILE.read_text())


@dataclasses.dataclass
class MoEHandle:
    """What a dispatch learned; pass it to ``combine``. ``tokens_per_expert[e]``: rows for local expert e."""
    layout: Layout
    comm: object  # the Communicator the exchange runs on
    steps: list
    algo: str  # the route taken: direct or hierarchical
    compress: str | None
    weights: torch.Tensor | None

    @property
    def tokens_per_expert(self) -> list[int]:
        return self.layout.tokens_per_expert


class PendingExchange:
    """The result of an ``async_op=True`` dispatch or combine: ``wait()`` returns what the call would have."""

    def __init__(self, work, moved: dict, finish):
        self._work, self._moved, self._finish = work, moved, finish

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def wait(self, timeout: float | None = None):
        self._work.wait(timeout)
        return self._finish(self._moved["rows"])


def _communicator(group):
    if group is not None:
        return group
    from ..api import default_communicator
    return default_communicator()


def select_algorithm(comm, layout: Layout, requested: str, row_bytes: int) -> str:
    """``direct`` or ``hierarchical``; identical on every rank (it reads only agreed facts).

    ``hierarchical`` needs nodes of equal size (``comm.levels()``); where they do not
    exist it is ``direct``. ``auto`` takes ``hierarchical`` only where the nodes hold
    two or more ranks each and the mean message per rank pair is at most
    ``AUTO_RULE["hierarchical_max_bytes_per_pair"]`` (measured; its source is in the
    file; 0 means never).
    """
    if requested == "direct" or comm.world == 1:
        return "direct"
    nodes = len(set(comm.topology.node_of))
    if nodes < 2:
        return "direct"
    if requested == "auto":
        if comm.world // nodes < 2:
            return "direct"
        limit = AUTO_RULE["hierarchical_max_bytes_per_pair"]  # 0: never
        total_rows = sum(sum(row) for row in layout.rows_matrix)
        if not limit or total_rows * row_bytes / comm.world ** 2 > limit:
            return "direct"
    return "hierarchical" if comm.levels() is not None else "direct"


def _run_async(comm, move, finish, async_op: bool):
    """Run ``move()`` (the exchange, no autograd) now or on the communicator's worker; ``finish`` its result."""
    if not async_op:
        return finish(move())
    moved: dict = {}

    def job() -> None:
        with torch.no_grad():
            moved["rows"] = move()
    return PendingExchange(comm.run_async(job), moved, finish)


class _Holder:
    """Carries rows moved before an autograd Function runs, without making them one of its inputs."""

    def __init__(self, rows):
        self.rows = rows


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, handle, moved):
        ctx.handle = handle
        return moved.rows

    @staticmethod
    def backward(ctx, grad_expert_tokens):
        layout = ctx.handle.layout
        grad_rows = route.run(ctx.handle.steps, grad_expert_tokens.contiguous(), backward=True)
        # Each token's K copies came from one row each: their gradients add up, per slot then per token.
        return _weighted_sum(_to_slots(grad_rows, layout), None), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_outputs, weights, handle, moved):
        slots = _to_slots(moved.rows, handle.layout)
        ctx.handle = handle
        ctx.save_for_backward(slots, weights)
        return _weighted_sum(slots, weights)

    @staticmethod
    def backward(ctx, grad_out):
        slots, weights = ctx.saved_tensors
        layout = ctx.handle.layout
        grad_slots = grad_out.unsqueeze(1).expand_as(slots)
        if weights is not None:
            grad_slots = grad_slots * weights.to(slots.dtype).unsqueeze(-1)
        grad_weights = None
        if weights is not None and ctx.needs_input_grad[1]:
            grad_weights = (slots * grad_out.unsqueeze(1)).sum(-1).to(weights.dtype)
        grad_rows = grad_slots.reshape(-1, slots.shape[-1])[layout.row_of_slot_order]
        grad_expert_outputs = route.run(ctx.handle.steps, grad_rows.contiguous())
        return grad_expert_outputs, grad_weights, None, None


def _to_slots(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Rows in sorted order → [T, K, H], slot (t, k) at [t, k]."""
    slots = rows.new_empty((layout.num_tokens * layout.top_k,) + tuple(rows.shape[1:]))
    slots[layout.row_of_slot_order] = rows
    return slots.view(layout.num_tokens, layout.top_k, *rows.shape[1:])


def _weighted_sum(slots: torch.Tensor, weights) -> torch.Tensor:
    """Σ_k (weights[t, k] ·) slots[t, k], in k order (the same sum on every run)."""
    if weights is not None:
        slots = slots * weights.to(slots.dtype).unsqueeze(-1)
    return slots.sum(1)


def dispatch(tokens: torch.Tensor, expert_indices: torch.Tensor, num_experts: int, *, weights=None, group=None,
             algo: str = "auto", compress: str | None = None, async_op: bool = False):
    """Send each token to the ranks that hold its K experts; return ``(expert_tokens, handle)``.

    ``tokens`` [T, H] (a float dtype); ``expert_indices`` [T, K] integers in
    0..num_experts−1; experts are laid out contiguously over the group's ranks
    (``num_experts`` a multiple of its size). ``expert_tokens`` [R, H] holds the rows
    this rank's experts must process, grouped by local expert
    (``handle.tokens_per_expert``), sources in rank order. ``weights`` [T, K], if given,
    weight each result in ``combine`` (and get gradients). ``algo``: ``auto``,
    ``direct`` or ``hierarchical`` (see ``select_algorithm``). ``compress="fp8"``:
    tokens travel as fp8 e4m3 with one float32 scale per row (bound in
    ``fp8_rows``), gradients and combine at full precision. ``async_op=True``: the
    counts are exchanged now, the tokens on the communicator's worker; returns a
    ``PendingExchange`` whose ``wait()`` gives ``(expert_tokens, handle)``.

    Every rank raises the same ``InvalidArgument`` (naming the rank and the problem)
    for an index out of range, weights of the wrong shape, a ``num_experts`` the group
    size does not divide, and ``MismatchError`` where ranks disagree on
    ``num_experts``, hidden size, dtype, ``algo`` or ``compress``, before any token moves.
    """
    comm = _communicator(group)
    layout = agree(comm, tokens, expert_indices, num_experts, weights, algo, compress)
    row_bytes = (4 * fp8_rows.words_per_row(layout.hidden) if compress == "fp8"
                 else layout.hidden * tokens.element_size())
    chosen = select_algorithm(comm, layout, algo, row_bytes)
    levels = comm.levels() if chosen == "hierarchical" else None
    handle = MoEHandle(layout, comm, [], chosen, compress, weights)

    def move() -> torch.Tensor:
        # fp8: each token is coded once, not once per copy (K times fewer codes to make),
        # and the copies are gathered from the codes (a quarter of the bytes to move).
        source = fp8_rows.encode(tokens.detach()) if compress == "fp8" else tokens.detach()
        row_index = layout.token_of_row
        # This run carries the heads: its route moves each block with its head rows.
        n_head = heads.head_rows(layout.experts_per_rank, source.new_empty(source.shape[1:]))
        with_heads = [[n + n_head for n in row] for row in layout.rows_matrix]
        arrived = route.run(route.to_sources(comm, with_heads, chosen, levels),
                            heads.with_heads(source, row_index, layout.sent_per_expert, layout.sent_rows))
        rows_at, layout.received_per_expert = heads.read_heads(arrived, layout.received_rows,
                                                               layout.experts_per_rank, layout.rank)
        layout.tokens_per_expert = layout.received_per_expert.sum(0).tolist()
        by_expert = route.expert_grouping(layout.received_per_expert)
        handle.steps = route.to_sources(comm, layout.rows_matrix, chosen, levels) + [by_expert]
        arrived = arrived[rows_at[by_expert.index]]  # drop the heads and group by expert in one copy
        if compress == "fp8":
            return fp8_rows.decode(arrived, layout.hidden, layout.dtype)
        return arrived

    def finish(rows):
        return _Dispatch.apply(tokens, handle, _Holder(rows)), handle
    return _run_async(comm, move, finish, async_op)


def combine(expert_outputs: torch.Tensor, handle: MoEHandle, async_op: bool = False):
    """Bring each expert's results back to its token's rank and sum each token's K results.

    ``expert_outputs`` [R, H'] in ``expert_tokens``' order (H' may differ from H);
    returns [T, H'] with Σ_k weights[t, k]·output(t, k) (plain sum without weights),
    in ``expert_outputs``' dtype. ``async_op=True`` returns a ``PendingExchange``
    whose ``wait()`` gives that tensor.

    A wrong row count is an ``InvalidArgument`` on this rank before anything is sent
    (its peers, already in the exchange, then end with ``CommTimeoutError``).
    """
    if not isinstance(handle, MoEHandle):
        raise InvalidArgument(f"moe.combine: handle must be the MoEHandle dispatch returned, not {type(handle)}")
    layout = handle.layout
    expected = sum(layout.tokens_per_expert)
    if (not isinstance(expert_outputs, torch.Tensor) or expert_outputs.dim() != 2
            or expert_outputs.shape[0] != expected):
        raise InvalidArgument(f"moe.combine (rank {layout.rank}): expert_outputs must be [{expected}, H'] as "
                              f"dispatch delivered, got {getattr(expert_outputs, 'shape', type(expert_outputs))}")
    weights = handle.weights

    def move() -> torch.Tensor:
        return route.run(handle.steps, expert_outputs.detach().contiguous(), backward=True)

    def finish(rows):
        return _Combine.apply(expert_outputs, weights, handle, _Holder(rows))
    return _run_async(handle.comm, move, finish, async_op)
