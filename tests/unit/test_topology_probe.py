"""The α/β probes over an in-memory transport: ranks are threads, messages are queued copies."""
from __future__ import annotations

import queue
import threading

import pytest
import torch

from fmcomm.errors import CommTimeoutError
from fmcomm.topology import Topology
from fmcomm.topology.probe import probe


class _Recv:
    def __init__(self, q, buf):
        self.q, self.buf, self.done = q, buf, False


class QueueTransport:
    """Point-to-point through queues, all-reduce through a barrier: enough for the probes."""

    def __init__(self, shared, rank, world):
        self.shared, self.rank, self.world, self.name = shared, rank, world, "queues"

    def _q(self, src, dst, tag):
        with self.shared["lock"]:
            return self.shared["queues"].setdefault((src, dst, tag), queue.Queue())

    def byte_view(self, t):
        return t.reshape(-1).view(torch.uint8)

    def isend(self, peer, buf, tag):
        self._q(self.rank, peer, tag).put(buf.clone())
        return None

    def irecv(self, peer, buf, tag):
        return _Recv(self._q(peer, self.rank, tag), buf)

    def wait(self, reqs, deadline):
        import time
        for r in reqs:
            if r is None or r.done:
                continue
            try:
                data = r.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            assert data.numel() == r.buf.numel(), "a receive got a message of another size"
            r.buf.copy_(data)
            r.done = True
        return True

    def native_all_reduce(self, inp, out, dtype, op):
        sh = self.shared
        with sh["lock"]:
            sh["parts"][self.rank] = inp.clone()
        sh["barrier"].wait()
        parts = [sh["parts"][r] for r in range(self.world)]
        total = parts[0].clone()
        for p in parts[1:]:
            total = total + p if op == "sum" else torch.maximum(total, p)
        sh["barrier"].wait()
        out.copy_(total)
        return None


def run(world, fn):
    shared = {"lock": threading.Lock(), "queues": {}, "parts": {}, "barrier": threading.Barrier(world)}
    out, errors = [None] * world, []

    def body(r):
        try:
            out[r] = fn(QueueTransport(shared, r, world))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            shared["barrier"].abort()
    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out


SMALL = dict(repeats=2, target_s=0.0005, kernel_bytes=1 << 20, timeout=30)


def test_two_nodes_of_two_get_both_levels_the_same_everywhere():
    topo = Topology((0, 0, 1, 1))
    results = run(4, lambda t: probe(t, topo, **SMALL))
    assert all(r == results[0] for r in results)
    probed = results[0]
    assert [lv.name for lv in probed.levels] == ["intra", "inter"]
    for lv in probed.levels:
        for f in (lv.alpha, lv.bandwidth, lv.node_bandwidth):
            assert f.source == "measured" and f.value > 0 and f.spread is not None and f.spread >= 0
            assert "repeats" in f.note
    assert probed.kernels.reduce.value > 0 and probed.kernels.copy.source == "measured"
    assert [c.family for c in probed.codecs] == ["fp8", "onebit", "topk"]
    assert all(c.encode.value > 0 and c.decode.source == "measured" for c in probed.codecs)
    assert probed.node_of == topo.node_of


def test_one_node_has_no_inter_level_and_one_rank_only_kernels():
    assert [lv.name for lv in run(2, lambda t: probe(t, Topology((0, 0)), **SMALL))[0].levels] == ["intra"]
    alone = run(1, lambda t: probe(t, Topology((0,)), **SMALL))[0]
    assert alone.levels == () and alone.kernels is not None


def test_a_silent_peer_is_a_timeout_naming_the_probe():
    class Deaf(QueueTransport):
        def isend(self, peer, buf, tag):
            return None  # lost
    shared = {"lock": threading.Lock(), "queues": {}, "parts": {}, "barrier": threading.Barrier(1)}
    with pytest.raises(CommTimeoutError, match="rank 1.*probe.*peer 0"):
        probe(Deaf(shared, 1, 2), Topology((0, 1)), repeats=1, timeout=0.2)
