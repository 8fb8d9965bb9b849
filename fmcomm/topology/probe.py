"""Short measurements of α and β per level, and of the bandwidth a node's ranks share.

Every rank calls :func:`probe` (a collective); only some ranks move bytes:

- **α** of a level: half the median round trip of an 8-byte message, with every rank of
  the job ping-ponging with a partner on that level at the same time (local ranks 2j
  and 2j+1 of each node; local rank i of nodes 2m and 2m+1), as in a collective's
  round; where ranks outnumber cores that includes waiting for a core.
- **β**: the first two ranks of node 0 (intra), the first ranks of nodes 0 and 1
  (inter): the slope of one-way time between S and 2S bytes, S found by doubling from
  64 KiB until one way takes ``target_s``.
- **shared** (``node_bandwidth``): every local rank i of node 0 sends the same large
  message to local rank i of node 1 at once (for intra: every rank of node 0 sends to
  its neighbour on the node); the bytes all of them moved over the time the slowest
  took.

Each figure is measured ``repeats`` times; the reported value is the median and the
figure's ``spread`` is (max - min) / median over the repeats, the run-to-run
stability the machine file records. Rank 0's figures reach every rank through one
all-reduce of a fixed float64 vector. The kernel rates (reduce, copy, and each
compressor family's encode and decode) are measured on every rank at once, as a job
runs them, and the slowest rank's rate kept.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from ..dtypes import DTYPES
from ..errors import CommTimeoutError
from ..kernels import Reducer
from ..transport.base import Transport
from .model import CodecRates, Figure, Kernels, Level, Topology

# Above the executor's data and header tags (2 * 8192 + 2), below MPI's guaranteed 32767.
_TAG_SIZE, _TAG_DATA, _TAG_ACK = 20001, 20002, 20003
_PINGS = 30
_IDLE_POLL_S = 0.0005
_MIN_BYTES, _MAX_BYTES = 64 << 10, 64 << 20


class _Link:
    """Blocking send/recv of byte tensors between this rank and one peer, with a deadline."""

    def __init__(self, transport: Transport, timeout: float):
        self.t, self.timeout = transport, timeout

    def _wait(self, req, peer: int, what: str) -> None:
        if not self.t.wait([req], time.monotonic() + self.timeout):
            raise CommTimeoutError(f"topology probe: {what} did not complete within {self.timeout:g} s",
                                   rank=self.t.rank, op="probe", peer=peer)

    def send(self, peer: int, buf: torch.Tensor, tag: int) -> None:
        self._wait(self.t.isend(peer, self.t.byte_view(buf), tag), peer, "send")

    def recv(self, peer: int, buf: torch.Tensor, tag: int) -> None:
        self._wait(self.t.irecv(peer, self.t.byte_view(buf), tag), peer, "receive")

    def recv_idle(self, peer: int, buf: torch.Tensor, tag: int) -> None:
        """A receive for ranks waiting their turn. MPI's waits spin, so on a machine with
        fewer cores than ranks a waiting rank would take a core from the ranks being
        measured: there it tests the receive and sleeps between tests. gloo's waits
        block without spinning, and its receives complete only inside a wait (a wait
        that times out breaks the connection), so elsewhere it is a plain receive."""
        if self.t.name != "mpi":
            self.recv(peer, buf, tag)
            return
        req = self.t.irecv(peer, self.t.byte_view(buf), tag)
        deadline = time.monotonic() + self.timeout
        while not self.t.wait([req], time.monotonic()):
            if time.monotonic() > deadline:
                raise CommTimeoutError(f"topology probe: receive did not complete within {self.timeout:g} s",
                                       rank=self.t.rank, op="probe", peer=peer)
            time.sleep(_IDLE_POLL_S)


def _ping_pong(link: _Link, peer: int, leader: bool, nbytes: int, rounds: int) -> list[float]:
    """Round-trip seconds of ``rounds`` exchanges of ``nbytes`` (measured on the leader)."""
    buf = torch.zeros(max(nbytes, 1), dtype=torch.uint8)
    times = []
    for _ in range(rounds):
        if leader:
            t0 = time.perf_counter()
            link.send(peer, buf, _TAG_DATA)
            link.recv(peer, buf, _TAG_DATA)
            times.append(time.perf_counter() - t0)
        else:
            link.recv(peer, buf, _TAG_DATA)
            link.send(peer, buf, _TAG_DATA)
    return times


def _agree_size(link: _Link, peer: int, leader: bool, size: int) -> int:
    """The leader's ``size`` on both sides (0 ends the sequence)."""
    word = torch.tensor([size], dtype=torch.int64)
    if leader:
        link.send(peer, word, _TAG_SIZE)
    else:
        link.recv(peer, word, _TAG_SIZE)
    return int(word.item())


def _alpha(link: _Link, me: int, pairs: list[tuple[int, int]]) -> float:
    """Half the median round trip of 8 bytes, every pair at once (meaningful on a pair's first rank).

    All pairs of the level ping-pong together because that is how a collective's round
    runs: every rank busy. Where ranks outnumber cores, this is what a message costs
    then (a quiet pair would not see the others' polling)."""
    for a, b in pairs:
        if me in (a, b):
            rtt = _ping_pong(link, b if me == a else a, me == a, 8, _PINGS)
            return statistics.median(rtt) / 2 if me == a else 0.0
    return 0.0


def _pair(link: _Link, peer: int, leader: bool, target_s: float, size: int) -> tuple[float, int]:
    """(β bytes/s, message size S) between this rank and ``peer``; β on the leader.

    β is the slope between S and 2S bytes, S/(t(2S) - t(S)) one way, so neither α nor a
    shaper's burst allowance (tbf lets its bucket's bytes through at once) inflates it.
    ``size`` 0: find S first, doubling from 64 KiB until one way takes ``target_s``;
    later repeats pass the S found."""
    if size == 0:
        size = _MIN_BYTES
        while True:
            size = _agree_size(link, peer, leader, size)
            if size < 0:
                size = -size
                break
            times = _ping_pong(link, peer, leader, size, 2)
            if leader and (statistics.median(times) / 2 >= target_s or size >= _MAX_BYTES // 2):
                size = -size  # found: tell the partner and stop
            elif leader:
                size *= 2
    one = _ping_pong(link, peer, leader, size, 5)
    two = _ping_pong(link, peer, leader, 2 * size, 5)
    if not leader:
        return 0.0, size
    t1, t2 = statistics.median(one) / 2, statistics.median(two) / 2
    # A slope at or below zero is noise (a descheduled rank in the S run); then 2S/t(2S),
    # which α and the burst can only make smaller than β: a lower bound.
    return (size / (t2 - t1) if t2 > t1 else 2 * size / t2), size


def _shared(link: _Link, transport: Transport, senders: list[int], receivers: list[int], nbytes: int) -> float:
    """Seconds from a common start until every sender's ``nbytes`` reached its receiver (on senders[0]).

    Sender i sends to receivers[i]; a rank may be both (a ring inside a node), so its
    send and receive are posted together."""
    me, t = transport.rank, transport
    out_buf, in_buf = torch.zeros(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    ack = torch.zeros(1, dtype=torch.uint8)
    lead = senders[0]
    others = sorted(set(senders + receivers) - {lead})
    t0 = 0.0
    # Start together: the lead releases everyone with a one-byte message.
    if me == lead:
        for r in others:
            link.send(r, ack, _TAG_ACK)
        t0 = time.perf_counter()
    elif me in others:
        link.recv_idle(lead, ack, _TAG_ACK)
    reqs, peers = [], []
    if me in receivers:
        peer = senders[receivers.index(me)]
        reqs.append(t.irecv(peer, t.byte_view(in_buf), _TAG_DATA))
        peers.append(peer)
    if me in senders:
        peer = receivers[senders.index(me)]
        reqs.append(t.isend(peer, t.byte_view(out_buf), _TAG_DATA))
        peers.append(peer)
    for req, peer in zip(reqs, peers):
        link._wait(req, peer, "shared-link transfer")
    if me in receivers and me != lead:
        link.send(lead, ack, _TAG_ACK)  # arrived
    if me == lead:
        for r in receivers:
            if r != lead:
                link.recv(r, ack, _TAG_ACK)
        return time.perf_counter() - t0
    return 0.0


def _kernel_rates(nbytes: int, repeats: int) -> tuple[list[float], list[float]]:
    """Bytes per second of a float32 sum (of the bytes written) and of a copy, ``repeats`` times."""
    n = nbytes // 4
    a, b, out = torch.ones(n), torch.ones(n), torch.empty(n)
    reducer = Reducer(DTYPES["float32"], "sum", use_native=True)
    reducer(out, a, b)  # first touch of ``out`` (page faults) outside the timing
    reduce_rates, copy_rates = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reducer(out, a, b)
        t1 = time.perf_counter()
        out.copy_(a)
        t2 = time.perf_counter()
        reduce_rates.append(nbytes / (t1 - t0))
        copy_rates.append(nbytes / (t2 - t1))
    return reduce_rates, copy_rates


# The compressor families whose kernels the probe times, with the spec each is timed as.
CODEC_SPECS = (("fp8", "fp8"), ("onebit", "onebit"), ("topk", "topk:0.01"))


def _codec_rates(nbytes: int, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Float32 bytes per second of each family's encode (with error feedback, as the
    compressed all-reduce runs it) and decode, ``repeats`` times, on this rank while
    every rank times its own: the rates a job gets with all its ranks at work."""
    from ..compression import parse
    n = nbytes // 4
    values = torch.randn(n, generator=torch.Generator().manual_seed(0))
    out = torch.empty(n)
    rates = {}
    for family, text in CODEC_SPECS:
        comp = parse(text).compressor
        codec = comp.begin(2, float(values.abs().max()))
        payload = torch.empty(comp.payload_bytes(n), dtype=torch.uint8)
        residual = torch.zeros(n)
        codec.encode_contribution(values, payload, residual)  # first touch outside the timing
        codec.decode_sum(payload, out)
        enc, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            codec.encode_contribution(values, payload, residual)
            t1 = time.perf_counter()
            codec.decode_sum(payload, out)
            t2 = time.perf_counter()
            enc.append(nbytes / (t1 - t0))
            dec.append(nbytes / (t2 - t1))
        rates[family] = (enc, dec)
    return rates


def _summary(values: list[float]) -> tuple[float, float]:
    """(median, (max - min) / median) of the repeats."""
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med if med else 0.0


def _share(transport: Transport, values: list[float], timeout: float, combine: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if transport.world > 1:
        req = transport.native_all_reduce(t, t, DTYPES["float64"], combine)
        if not transport.wait([req], time.monotonic() + timeout):
            raise CommTimeoutError("topology probe: sharing the results timed out", rank=transport.rank, op="probe")
    return t.tolist()


def probe(transport: Transport, topo: Topology, *, repeats: int = 5, target_s: float = 0.004,
          kernel_bytes: int = 16 << 20, timeout: float = 60.0) -> Topology:
    """``topo`` with measured levels and kernel rates (every rank gets the same figures)."""
    me = transport.rank
    link = _Link(transport, timeout)
    groups = topo.groups()
    started = time.perf_counter()
    # (level, [α samples], [β samples], [shared samples])
    results: dict[str, tuple[list[float], list[float], list[float]]] = {}
    plans = []
    if len(groups[0]) >= 2:
        g = groups[0]
        # α: local ranks 2j and 2j+1 of every node; shared: every rank of node 0 to its right neighbour.
        pairs = [(n[j], n[j + 1]) for n in groups for j in range(0, len(n) - 1, 2)]
        plans.append(("intra", g[0], g[1], g, g[1:] + g[:1], pairs))
    if len(groups) >= 2:
        a, b = groups[0], groups[1]
        k = min(len(a), len(b))
        # α: local rank i of node 2m with local rank i of node 2m+1.
        pairs = [(x[i], y[i]) for x, y in zip(groups[0::2], groups[1::2]) for i in range(min(len(x), len(y)))]
        plans.append(("inter", a[0], b[0], a[:k], b[:k], pairs))
    for name, lead, partner, senders, receivers, pairs in plans:
        alphas, betas, shared = [], [], []
        found = 0
        for _ in range(repeats):
            alphas.append(_alpha(link, me, pairs))
            if me in (lead, partner):
                beta, found = _pair(link, partner if me == lead else lead, me == lead, target_s, found)
                betas.append(beta)
            # The shared step moves what one pair moves in about 2 x target_s; the lead
            # tells every other rank of the step that size.
            guess = betas[-1] * target_s * 2 if me == lead else 0
            size = torch.tensor([int(min(_MAX_BYTES, max(_MIN_BYTES, guess))) if me == lead else 0],
                                dtype=torch.int64)
            if me == lead:
                for r in sorted(set(senders + receivers) - {lead}):
                    link.send(r, size, _TAG_SIZE)
            elif me in senders or me in receivers:
                link.recv_idle(lead, size, _TAG_SIZE)
            if me in senders or me in receivers:
                # The slope between S and 2S, as for β: a shaper's burst allowance cancels.
                n = int(size.item())
                seconds = [_shared(link, transport, senders, receivers, k * n) for k in (1, 2)]
                if me == lead:
                    slope = seconds[1] - seconds[0]
                    shared.append(len(senders) * n / slope if slope > 0 else len(senders) * 2 * n / seconds[1])
        results[name] = (alphas, betas, shared)
    reduce_rates, copy_rates = _kernel_rates(kernel_bytes, repeats)
    codec_rates = _codec_rates(kernel_bytes, repeats)
    # Rank 0 leads every plan; its figures (and each rank's kernel rates) go to everyone.
    vector = []
    for name in ("intra", "inter"):
        alphas, betas, shared = results.get(name, ([], [], []))
        if me == 0 and alphas:
            vector += [*_summary(alphas), *_summary(betas), *_summary(shared)]
        else:
            vector += [0.0] * 6
    vector.append(time.perf_counter() - started if me == 0 else 0.0)  # rank 0's clock, so every rank says the same
    figures = _share(transport, vector, timeout)
    per_rank = [reduce_rates, copy_rates] + [r for family, _ in CODEC_SPECS for r in codec_rates[family]]
    # The slowest rank's median (max of the negated), with its spread.
    slowest = _share(transport, [x for rates in per_rank for x in (-statistics.median(rates), _summary(rates)[1])],
                     timeout, "max")
    took = figures[-1]
    levels = []
    for i, name in enumerate(("intra", "inter")):
        a, a_sp, b, b_sp, s, s_sp = figures[6 * i:6 * i + 6]
        if b == 0:
            continue  # no pair of ranks for this level in this job
        how = f"fmcomm topo --probe, {repeats} repeats, median; spread (max-min)/median"
        levels.append(Level(name,
                            Figure(a, "measured", f"half the round trip of 8 bytes, every rank of the job ping-ponging "
                                                  f"with a partner on this level at once; {how}", a_sp),
                            Figure(b, "measured", f"slope of one-way time between S and 2S bytes (S taking >= "
                                                  f"{target_s * 1e3:g} ms), or 2S/t(2S) where noise made it <= 0; "
                                                  f"{how}", b_sp),
                            Figure(s, "measured", f"{'every rank of node 0 to its neighbour' if name == 'intra' else 'every local rank of node 0 to node 1'} "
                                                  f"at once; {how}", s_sp)))
    mib = kernel_bytes >> 20

    def measured(i: int, what: str) -> Figure:
        return Figure(-slowest[2 * i], "measured", f"{what} of {mib} MiB float32 on every rank at once, the "
                                                    f"slowest rank's median of {repeats}", slowest[2 * i + 1])
    kernels = Kernels(measured(0, "sum (bytes written per second)"), measured(1, "copy"))
    codecs = tuple(CodecRates(family, measured(2 + 2 * k, f"{text} encode with error feedback"),
                              measured(3 + 2 * k, f"{text} decode"))
                   for k, (family, text) in enumerate(CODEC_SPECS))
    out = dataclasses.replace(topo.with_figures(tuple(levels), kernels), codecs=codecs)
    return dataclasses.replace(out, description=(topo.description + "; " if topo.description else "")
                               + f"probed in {took:.2f} s")
