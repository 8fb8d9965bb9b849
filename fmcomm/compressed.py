"""Compressed all-reduce: a compressor composed with fmcomm's own collectives.

It runs the plan of phases of :mod:`fmcomm.algorithms.compressed_plan` (the one the
cost model prices): the plan says whether the call runs on one level or two, over
which groups and in which pieces, and each phase is timed under its name there.

Over the p ranks of one group, with the tensor cut into p chunks (``chunk_bounds``)
and rank j owning chunk j:

1. every rank encodes each chunk but its own (its contribution) and sends chunk j's
   payload to rank j, in one all-to-all of bytes whose sizes every rank computes
   alone;
2. each owner decodes the p - 1 payloads of its chunk and adds them and its own
   values, uncoded (they never cross a link, so coding them would only lose
   precision), in float32, in rank order, then encodes that sum;
3. one all-gather hands every owner's payload to every rank, and every rank decodes
   all of them into its output.

Every rank decodes the same bytes with the same code, so every rank ends with the
same bytes. Per rank on the wire: (p-1)/p of the tensor's payload twice, against
2(p-1)/p of the full-precision bytes for a ring.

With ``@inter`` the tensor is first reduce-scattered inside each node at full
precision, each local rank then runs the steps above on its shard with the ranks of
the same local index on the other nodes (so only compressed bytes cross between
nodes, every local rank on its own lane), and the node's ranks then all-gather
their lanes' sum payloads, not decoded shards: compressed bytes, 1/4 (fp8) to
1/32 (onebit) of the shards', and every rank of the node decodes every shard
itself. (A node one of whose lanes met NaN/inf gathers full-precision shards
instead.) Where that split does not exist (one node, or nodes of unequal size) the
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

import functools
import math
import time

import torch

from .algorithms.compressed_plan import CompressedPlan
from .compression import CompressionSpec, Compressor, ErrorFeedback
from .compression.state import Slot
from .compression.base import round_up
from .dtypes import DTYPES
from .errors import NonFiniteError, ScheduleError
from .runtime.executor import arguments_agreed
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


class _Sums:
    """What step 3 leaves on a rank: every owner's sum payload, and the codec that reads them."""
    __slots__ = ("codec", "bound", "gathered", "chunks", "size", "width")

    def __init__(self, codec, bound, gathered, chunks, size, width):
        self.codec, self.bound, self.gathered = codec, bound, gathered
        self.chunks, self.size, self.width = chunks, size, width

    def decode(self, out: torch.Tensor, codec=None, gathered=None, divisor: int = 1) -> None:
        """out = every owner's decoded sum / ``divisor``, in chunk order (another rank's bytes and codec if given)."""
        codec = codec or self.codec
        gathered = self.gathered if gathered is None else gathered
        for j, (o, c) in enumerate(self.chunks):
            base = j * self.width + _HEADER
            codec.decode_sum(gathered[base: base + self.size[j]], out[o:o + c], divisor)


def _layout(compressor: Compressor, n: int, p: int):
    """chunks, payload sizes, 8-byte-aligned slot sizes and the gather's slot width of n values over p."""
    chunks = chunk_bounds(n, p)
    size = [compressor.payload_bytes(c) for _, c in chunks]
    slot_bytes = [_HEADER + round_up(s) for s in size]  # 8-byte aligned: payloads hold float32/int32 views
    return chunks, size, slot_bytes, max(slot_bytes)


def _flat(comm, x: torch.Tensor, out: torch.Tensor, compressor: Compressor, slot, bound: float | None,
          divisor: int) -> bool:
    """Steps 1-3 over ``comm`` (float32 ``x`` -> ``out`` = sum / ``divisor``; they may be one tensor).

    Returns False, with ``out`` not written, where some rank's ``x`` held NaN or
    infinity: the caller falls back. ``bound``: max |x| over the group, where known.
    """
    sums = _flat_sums(comm, x, compressor, slot, bound)
    if sums is None:
        return False
    with _Phase("decode"):
        sums.decode(out, divisor=divisor)
    return True


def _flat_sums(comm, x: torch.Tensor, compressor: Compressor, slot, bound: float | None,
               gathered: torch.Tensor | None = None) -> _Sums | None:
    """Steps 1-3 up to, not including, the decode; None where some rank met NaN/inf.

    ``gathered``: where step 3's bytes (p times the slot width) should land.
    """
    p, me, n = comm.world, comm.rank, x.numel()
    if bound is None:
        local = _amax(x)
        if compressor.needs_bound:
            bound = _agree_on_bound(comm, x) if p > 1 else local
            if not math.isfinite(bound):
                return None
        nonfinite = not math.isfinite(local)
    else:
        nonfinite = not math.isfinite(bound)
    begun_with = bound if bound is not None and math.isfinite(bound) else 0.0
    codec = compressor.begin(p, begun_with)
    chunks, size, slot_bytes, width = _layout(compressor, n, p)
    start = [sum(slot_bytes[:j]) for j in range(p)]

    send = torch.empty(sum(slot_bytes), dtype=torch.uint8, device=x.device)
    with _Phase("encode"):
        for j, (o, c) in enumerate(chunks):
            send[start[j]:start[j] + _HEADER].view(torch.int32).copy_(_flag_words(nonfinite, x.device))
            if j == me:
                continue  # this rank's own chunk stays here, uncoded (add_own below)
            codec.encode_contribution(x[o:o + c], send[start[j] + _HEADER:start[j] + _HEADER + size[j]],
                                      slot.worker[o:o + c] if slot is not None else None)
    mine_bytes = slot_bytes[me]
    recv = torch.empty(p * mine_bytes, dtype=torch.uint8, device=x.device)
    # Moved as int32 words (slots are multiples of 8 bytes): the collectives carry
    # the dtypes they reduce, and a byte exchange needs no other.
    with _Phase("exchange"):
        comm._all_to_all_counts(recv.view(torch.int32), send.view(torch.int32), _WORDS,
                                [[b // 4 for b in slot_bytes]] * p, None, False)

    my_count = chunks[me][1]
    mine = torch.zeros(width, dtype=torch.uint8, device=x.device)
    with _Phase("reduce_and_encode"):
        seen = bool(recv.view(p, mine_bytes)[:, :4].contiguous().view(torch.int32).any())
        mine[:_HEADER].view(torch.int32).copy_(_flag_words(seen, x.device))
        acc = torch.zeros(my_count, dtype=torch.float32, device=x.device)
        o, c = chunks[me]
        for src in range(p):
            if src == me:
                codec.add_own(x[o:o + c], acc, slot.worker[o:o + c] if slot is not None and not slot.own_clear
                              else None)
                continue
            base = src * mine_bytes + _HEADER
            codec.add_contribution(recv[base: base + size[me]], acc)
        codec.encode_sum(acc, mine[_HEADER:_HEADER + size[me]], slot.server if slot is not None else None)
    if gathered is None:
        gathered = torch.empty(p * width, dtype=torch.uint8, device=x.device)
    with _Phase("gather"):
        words = width // 4
        comm._all_to_all_counts(gathered.view(torch.int32), mine.view(torch.int32).repeat(p), _WORDS,
                                [[words] * p] * p, None, False)
    if bool(gathered.view(p, width)[:, :4].contiguous().view(torch.int32).any()):
        return None
    return _Sums(codec, begun_with, gathered, chunks, size, width)


# Each local rank's record in the node's exchange of lane sums: int32 "my lane ran
# uncompressed", int32 padding, float64 the bound its lane's codec began with, then
# its lane's gathered sum payloads.
_RECORD_HEAD = 16


def _share_lane_sums(intra, node, lane, compressor: Compressor, sums: _Sums | None, record: torch.Tensor,
                     target: torch.Tensor, shard: int, divisor: int) -> bool:
    """Every local rank's lane sums to every local rank, each decoding all of them (/ ``divisor``) into ``target``.

    The node exchanges compressed bytes (1/4 to 1/32 of the shard's) instead of
    full-precision shards, and every rank of the node decodes every shard itself;
    every rank still decodes the same bytes the same way. Returns False, with
    ``target`` not written, where some local rank's lane ran uncompressed: then
    the node gathers full-precision shards instead (every rank sees the same records,
    so every rank decides alike).
    """
    local, me = node.world, node.rank
    head = record[:_RECORD_HEAD]
    head[:8].view(torch.int32).copy_(_flag_words(sums is None, record.device))
    head[8:].view(torch.float64).fill_(sums.bound if sums is not None else 0.0)
    records = torch.empty(local * record.numel(), dtype=torch.uint8, device=record.device)
    with _Phase("intra_all_gather"):
        # float32 views: both the shared segment and the transports move them as bytes.
        intra.all_gather(records.view(torch.float32), record.view(torch.float32))
    rows = records.view(local, record.numel())
    if bool(rows[:, :4].contiguous().view(torch.int32).any()):
        return False
    with _Phase("decode"):
        for r in range(local):
            bound = float(rows[r, 8:_RECORD_HEAD].contiguous().view(torch.float64).item())
            codec = sums.codec if bound == sums.bound else compressor.begin(lane.world, bound)
            sums.decode(target[r * shard:(r + 1) * shard], codec, rows[r, _RECORD_HEAD:], divisor)
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
    return state.slot(key, slot_level(compressor, level), n, chunk_bounds(n, comm.world)[comm.rank][1], device)


def slot_level(compressor: Compressor, level: str) -> str:
    """The slot name of ``compressor``'s residuals at ``level``: one key coded by two
    compressors (a setting changed mid-run) keeps two sets, never one shared."""
    return f"{compressor.name}@{level}"


def _node_shared_memory(comm, node, shard: int, device):
    """The node's shared segment for this call's intra-node steps, or None for the transport.

    A collective of the node group where it attaches: every rank of the node decides
    from the same configuration and sizes.
    """
    if comm.config.shm == "off" or node.world == 1 or not shard or device.type != "cpu":
        return None
    # The reduce-scatter's round needs the most: every local rank's whole input.
    return node.shared_memory.get(node.world * shard * 4)


def _two_level(comm, x, result, compressor, state, key, bound, node, lane, divisor: int, layout) -> None:
    """``@inter``: node reduce-scatter, lane compression, node exchange of sums, piece by piece.

    The tensor goes in the plan's pieces (``layout.pieces``). This thread runs each
    piece's node steps; the lane communicator's worker runs its lane steps, so piece
    q's bytes cross the slow link while this thread reduce-scatters piece q+1 and
    shares piece q-1. Both orders are the same on every rank, and each piece's result
    depends on its bytes only, so the result does not depend on the timing.
    """
    local = node.world
    pieces = layout.pieces
    if not pieces:
        return  # nothing to reduce: every rank skips alike
    p_lane = lane.world
    owned = [chunk_bounds(shard, p_lane)[lane.rank][1] for _, _, shard in pieces]
    slot = (state.slot(key, slot_level(compressor, "inter"), sum(s for _, _, s in pieces), sum(owned), x.device)
            if compressor.error_feedback else None)
    # A node sum is bounded by local·(max |x| of any rank) where that is known;
    # else each lane agrees on its own (fp8) or learns of NaN from the payloads.
    lane_bound = bound * local if bound is not None else None
    shared = _node_shared_memory(comm, node, pieces[0][2], x.device)
    intra = shared if shared is not None else node
    worker_at = server_at = 0
    started = []  # per piece: ((lane job, its result box), node sum, record, target, padded, offset, count)
    for q, (o, c, shard) in enumerate(pieces):
        with _Phase("intra_reduce_scatter"):
            if local * shard == c:
                padded, source = None, x[o:o + c]
            else:
                padded = torch.zeros(local * shard, dtype=torch.float32, device=x.device)
                padded[:c] = x[o:o + c]
                source = padded
            node_sum = torch.empty(shard, dtype=torch.float32, device=x.device)
            intra.reduce_scatter(node_sum, source)
        piece_slot = None
        if slot is not None:
            piece_slot = Slot(slot.worker[worker_at:worker_at + shard], slot.server[server_at:server_at + owned[q]],
                              slot.own_clear)
            worker_at, server_at = worker_at + shard, server_at + owned[q]
        record = torch.empty(_RECORD_HEAD + p_lane * _layout(compressor, shard, p_lane)[3], dtype=torch.uint8,
                             device=x.device)
        box: list = []  # the lane job's _Sums (or None), once it ran
        job = lane.run_async(functools.partial(_lane_piece, lane, node_sum, compressor, piece_slot, lane_bound,
                                               record, box))
        started.append(((job, box), node_sum, record, result[o:o + c] if padded is None else padded, padded, o, c))
        if q:
            _finish_piece(intra, node, lane, compressor, result, divisor, *started[q - 1])
    _finish_piece(intra, node, lane, compressor, result, divisor, *started[-1])
    if slot is not None:
        slot.own_clear = True


def _lane_piece(lane, node_sum, compressor, slot, lane_bound, record, box: list) -> None:
    """A piece's lane steps, on the lane's worker (inside the call's argument agreement); the sums go in ``box``."""
    with arguments_agreed():
        sums = _flat_sums(lane, node_sum, compressor, slot, lane_bound, record[_RECORD_HEAD:])
        if sums is None:
            # This lane's shard met NaN/inf (every rank of the lane knows): it runs
            # uncompressed; other lanes keep their compressed shards.
            _forget(slot)
            lane.all_reduce(node_sum)
        box.append(sums)


def _finish_piece(intra, node, lane, compressor, result, divisor, job, node_sum, record, target, padded, o,
                  c) -> None:
    work, box = job
    with _Phase("lane_wait"):
        work.wait()
    sums = box[0]
    if not _share_lane_sums(intra, node, lane, compressor, sums, record, target, node_sum.numel(), divisor):
        if sums is not None:
            sums.decode(node_sum, divisor=divisor)
        elif divisor != 1:
            node_sum.div_(divisor)  # this lane's uncompressed sum
        with _Phase("intra_all_gather"):
            intra.all_gather(target, node_sum)
    if padded is not None:
        result[o:o + c].copy_(padded[:c])


def all_reduce(comm, inp: torch.Tensor, out: torch.Tensor, spec: CompressionSpec, state: ErrorFeedback, key,
               op: str, layout: CompressedPlan, levels) -> None:
    """The compressed all-reduce of ``inp`` into ``out`` over ``comm`` (see the module docstring),
    as ``layout`` plans it: over ``levels`` (the node and lane groups) where it runs on two."""
    if layout.two_level != (levels is not None):
        raise ScheduleError(f"rank {comm.rank}: the compressed all-reduce's plan runs on "
                            f"{'two levels' if layout.two_level else 'one'}, but the node and lane groups "
                            f"{'do not exist' if levels is None else 'were given'}")
    with _Phase("call"):
        _all_reduce(comm, inp, out, spec, state, key, op, layout, levels)


def _all_reduce(comm, inp, out, spec, state, key, op, layout, levels) -> None:
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
    # An average divides in the decode (the codecs that can, fold it in), not in a
    # pass of its own over the result.
    divisor = comm.world if op == "avg" else 1
    if levels is None:
        slot = _slot(state, key, "all", compressor, comm, n, x.device)
        if not _flat(comm, x, result, compressor, slot, bound, divisor):
            _forget(slot)
            _nonfinite(comm, inp, out, op, raising)
            return
        if slot is not None:
            slot.own_clear = True
    else:
        node, lane = levels
        _two_level(comm, x, result, compressor, state, key, bound, node, lane, divisor, layout)
    if result.data_ptr() != out.data_ptr():
        out.copy_(result)


