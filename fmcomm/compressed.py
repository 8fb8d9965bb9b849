"""Compressed all-reduce: a compressor composed with fmcomm's own collectives.

Over the p ranks of one group, with the tensor cut into p chunks (``chunk_bounds``)
and rank j owning chunk j:

1. every rank encodes each chunk (its contribution) and sends chunk j's payload to
   rank j, in one all-to-all of bytes whose sizes every rank computes alone;
2. each owner decodes the p payloads of its chunk and adds them in float32, in rank
   order, then encodes that sum;
3. one all-gather hands every owner's payload to every rank, and every rank decodes
   all of them into its output.

Every rank decodes the same bytes with the same code, so every rank ends with the
same bytes. Per rank on the wire: (p-1)/p of the tensor's payload twice, against
2(p-1)/p of the full-precision bytes for a ring.

With ``@inter`` the tensor is first reduce-scattered inside each node at full
precision, each local rank then runs the steps above on its shard with the ranks of
the same local index on the other nodes (so only compressed bytes cross between
nodes, every local rank on its own lane), and an all-gather inside the node
finishes. Where that split does not exist (one node, or nodes of unequal size) the
whole group runs the steps above. With ``FMCOMM_SHM=auto`` (the default) the two
intra-node steps go through a /dev/shm segment the node's ranks share
(``fmcomm.transport.shared_memory``) whenever every rank of the node can map it,
instead of through the transport; its node sums add the local ranks in rank order,
which is the transport's ring order too only for nodes of at most two ranks.

Non-finite values: every payload starts with an 8-byte header whose first word says
whether its sender's values held NaN or infinity; owners pass on what they saw, so
after step 3 every rank knows the same answer without a round of its own. Such a
call then runs uncompressed on the untouched input (the value reaches every output
identically) and that key's residuals are reset (they took the NaN in too). fp8's
shared scale needs max |x| over every rank before encoding, so fp8 (without
``block=``) first all-reduces it (MAX); with ``FMCOMM_NAN=raise`` that agreement
always happens first, so that every rank raises ``NonFiniteError`` before any data
moves.

Step 3 is itself one round: each owner sends its payload to every rank at once (the
bytes of a ring all-gather, in one round instead of p-1: payloads are small, and
on a loaded machine every round costs a scheduling delay).
"""
from __future__ import annotations

import math
import time

import torch

from .compression import CompressionSpec, Compressor, ErrorFeedback
from .compression.base import round_up
from .dtypes import DTYPES
from .errors import NonFiniteError
from .schedule import chunk_bounds


_F32, _WORDS = DTYPES["float32"], DTYPES["int32"]


# Seconds spent per phase, summed over calls, when a caller (benchmarks/) sets this
# to a dict; None costs nothing.
phase_seconds: "dict[str, float] | None" = None


class _Phase:
    __slots__ = ("name", "t0")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t0 = time.perf_counter() if phase_seconds is not None else 0.0

    def __exit__(self, *exc):
        if phase_seconds is not None:
            phase_seconds[self.name] = phase_seconds.get(self.name, 0.0) + time.perf_counter() - self.t0


def _amax(x: torch.Tensor) -> float:
    # max(|min|, |max|) from one aminmax pass: 8x faster here than x.abs().amax(),
    # which materialises |x|, and NaN comes out as NaN.
    if not x.numel():
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(abs(float(lo)), abs(float(hi))) if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


def _agree_on_bound(comm, x: torch.Tensor) -> float:
    """max |x| over every rank of ``comm`` (NaN or inf where any rank has one)."""
    local = _amax(x)
    if comm.world == 1:
        return local
    # [nonfinite, bound]: MAX of a flag keeps NaN visible (MAX of NaN itself is
    # engine-defined), and the bound only counts where every value is finite.
    v = torch.tensor([0.0 if math.isfinite(local) else 1.0, local if math.isfinite(local) else 0.0],
                     dtype=torch.float32)
    comm.all_reduce(v, op="max", algo="native" if comm.transport.supports_native(
        "all_reduce", _F32, "max", "cpu") else None)
    return math.inf if v[0].item() > 0 else float(v[1].item())


_HEADER = 8  # bytes before each payload: int32 non-finite flag, int32 padding


def _flat(comm, x: torch.Tensor, out: torch.Tensor, compressor: Compressor, slot, bound: float | None) -> bool:
    """Steps 1-3 over ``comm`` (float32 ``x`` -> ``out``; they may be one tensor).

    Returns False, with ``out`` not written, where some rank's ``x`` held NaN or
    infinity: the caller falls back. ``bound``: max |x| over the group, where known.
    """
    p, me, n = comm.world, comm.rank, x.numel()
    if bound is None:
        local = _amax(x)
        if compressor.needs_bound:
            bound = _agree_on_bound(comm, x) if p > 1 else local
            if not math.isfinite(bound):
                return False
        nonfinite = not math.isfinite(local)
    else:
        nonfinite = not math.isfinite(bound)
    codec = compressor.begin(p, bound if bound is not None and math.isfinite(bound) else 0.0)
    chunks = chunk_bounds(n, p)
    size = [compressor.payload_bytes(c) for _, c in chunks]
    slot_bytes = [_HEADER + round_up(s) for s in size]  # 8-byte aligned: payloads hold float32/int32 views
    start = [sum(slot_bytes[:j]) for j in range(p)]

    send = torch.empty(sum(slot_bytes), dtype=torch.uint8, device=x.device)
    with _Phase("encode"):
        for j, (o, c) in enumerate(chunks):
            send[start[j]:start[j] + _HEADER].view(torch.int32).copy_(_flag_words(nonfinite, x.device))
            codec.encode_contribution(x[o:o + c], send[start[j] + _HEADER:start[j] + _HEADER + size[j]],
                                      slot.worker[o:o + c] if slot is not None else None)
    mine_bytes = slot_bytes[me]
    recv = torch.empty(p * mine_bytes, dtype=torch.uint8, device=x.device)
    # Moved as int32 words (slots are multiples of 8 bytes): the collectives carry
    # the dtypes they reduce, and a byte exchange needs no other.
    with _Phase("exchange"):
        comm._all_to_all_counts(recv.view(torch.int32), send.view(torch.int32), _WORDS,
                                [[b // 4 for b in slot_bytes]] * p, None, False)

    my_off, my_count = chunks[me]
    width = max(slot_bytes)
    mine = torch.zeros(width, dtype=torch.uint8, device=x.device)
    with _Phase("reduce_and_encode"):
        seen = bool(recv.view(p, mine_bytes)[:, :4].contiguous().view(torch.int32).any())
        mine[:_HEADER].view(torch.int32).copy_(_flag_words(seen, x.device))
        acc = torch.zeros(my_count, dtype=torch.float32, device=x.device)
        for src in range(p):
            base = src * mine_bytes + _HEADER
            codec.add_contribution(recv[base: base + size[me]], acc)
        codec.encode_sum(acc, mine[_HEADER:_HEADER + size[me]], slot.server if slot is not None else None)
    gathered = torch.empty(p * width, dtype=torch.uint8, device=x.device)
    with _Phase("gather"):
        words = width // 4
        comm._all_to_all_counts(gathered.view(torch.int32), mine.view(torch.int32).repeat(p), _WORDS,
                                [[words] * p] * p, None, False)
    if bool(gathered.view(p, width)[:, :4].contiguous().view(torch.int32).any()):
        return False
    with _Phase("decode"):
        for j, (o, c) in enumerate(chunks):
            base = j * width + _HEADER
            codec.decode_sum(gathered[base: base + size[j]], out[o:o + c])
    return True


def _flag_words(flag: bool, device) -> torch.Tensor:
    return torch.tensor([1 if flag else 0, 0], dtype=torch.int32, device=device)


def _forget(slot) -> None:
    """A call that met NaN/inf: its residuals took it in; start them afresh."""
    if slot is not None:
        slot.worker.zero_()
        slot.server.zero_()


def _nonfinite(comm, inp, out, op: str, raising: bool) -> None:
    if raising:
        raise NonFiniteError("an input of this compressed all_reduce holds NaN or infinity "
                             "(FMCOMM_NAN=raise)", rank=comm.rank, op="all_reduce")
    comm.all_reduce(inp, op=op, output=out if out.data_ptr() != inp.data_ptr() else None)


def _slot(state: ErrorFeedback, key, level: str, compressor: Compressor, comm, n: int, device):
    if not compressor.error_feedback:
        return None
    return state.slot(key, level, n, chunk_bounds(n, comm.world)[comm.rank][1], device)


def _node_shared_memory(comm, node, shard: int, device):
    """The node's shared segment for this call's intra-node steps, or None for the transport.

    A collective of the node group where it attaches: every rank of the node decides
    from the same configuration and sizes.
    """
    if comm.config.shm == "off" or node.world == 1 or not shard or device.type != "cpu":
        return None
    # The reduce-scatter's round needs the most: every local rank's whole input.
    return node.shared_memory.get(node.world * shard * 4)


def all_reduce(comm, inp: torch.Tensor, out: torch.Tensor, spec: CompressionSpec, state: ErrorFeedback, key,
               op: str, levels) -> None:
    """The compressed all-reduce of ``inp`` into ``out`` over ``comm`` (see the module docstring)."""
    with _Phase("call"):
        _all_reduce(comm, inp, out, spec, state, key, op, levels)


def _all_reduce(comm, inp, out, spec, state, key, op, levels) -> None:
    compressor = spec.compressor
    x = inp if inp.dtype == torch.float32 else inp.float()
    raising = comm.config.nan == "raise"
    bound = None
    if raising or (levels is None and compressor.needs_bound):
        with _Phase("agree"):
            bound = _agree_on_bound(comm, x)
        if not math.isfinite(bound):
            _nonfinite(comm, inp, out, op, raising)
            return
    result = out if out.dtype == torch.float32 else torch.empty_like(x)
    n = x.numel()
    if levels is None:
        slot = _slot(state, key, "all", compressor, comm, n, x.device)
        if not _flat(comm, x, result, compressor, slot, bound):
            _forget(slot)
            _nonfinite(comm, inp, out, op, raising)
            return
    else:
        node, lane = levels
        local = node.world
        shard = -(-n // local)
        whole = local * shard == n  # no padding needed: work on the caller's buffers
        with _Phase("intra_reduce_scatter"):
            shared = _node_shared_memory(comm, node, shard, x.device)
            intra = shared if shared is not None else node
            if whole:
                padded = None
                source = x
            else:
                padded = torch.zeros(local * shard, dtype=torch.float32, device=x.device)
                padded[:n] = x
                source = padded
            node_sum = torch.empty(shard, dtype=torch.float32, device=x.device)
            intra.reduce_scatter(node_sum, source)
        # A node sum is bounded by local·(max |x| of any rank) where that is known;
        # else each lane agrees on its own (fp8) or learns of NaN from the payloads.
        slot = _slot(state, key, "inter", compressor, lane, shard, x.device)
        lane_bound = bound * local if bound is not None else None
        if not _flat(lane, node_sum, node_sum, compressor, slot, lane_bound):
            # This lane's shard met NaN/inf (every rank of the lane knows): it runs
            # uncompressed; other lanes keep their compressed shards.
            _forget(slot)
            lane.all_reduce(node_sum)
        with _Phase("intra_all_gather"):
            if whole:
                intra.all_gather(result, node_sum)
            else:
                intra.all_gather(padded, node_sum)
                result.copy_(padded[:n])
    if op == "avg":
        result.div_(comm.world)
    if result.data_ptr() != out.data_ptr():
        out.copy_(result)


