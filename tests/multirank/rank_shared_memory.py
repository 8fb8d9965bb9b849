"""fmcomm.transport.shared_memory on this rank's world (4 or 5), split into two
emulated nodes through FMCOMM_NODE_ID (2 + 2 or 3 + 2 ranks).

Segment collectives on groups of every size from 1 to the world: the node groups,
world-1 + 1, and the whole world. Per size (0, 1, 7, 1000, 250,001 elements per rank,
growing, so the segment re-attaches) every rank checks its reduce-scatter bit for bit
against the float32 sum in local-rank order ((x_0 + x_1) + x_2 ...), out of place and
as its own input block, and at two ranks against the transport's reduce-scatter too;
its all-gather against the concatenation, reporting a hash (the test requires it
equal on every rank of the group). The node groups run with a 512 KiB segment cap, so
their big calls take dozens of rounds and alternate halves. On the whole world:
attaching fails on every rank when one rank cannot map the file (local rank 0 or
another), a refused size is not tried again, ranks that call with different sizes
raise MismatchError, a segment closed by that raises FmcommError.

Where the nodes are even (world 4): fp8@inter and onebit@inter with FMCOMM_SHM=auto
and off give the same bytes (nodes of 2: the transport's ring adds x_0 + x_1 too),
the same inter-node bytes, and fewer wire bytes on the big size; with off nothing
attaches; a node where one rank cannot map the segment falls back to the transport
with the same result (the other node keeps its segment); async_op calls alike.

Every rank reports its pid: the test checks that /dev/shm holds no fmcomm-<pid>-*
afterwards.
"""
import hashlib
import os
import traceback
import zlib

import torch

from common import launcher_rank_world, parse, report_and_exit, split_into_nodes  # noqa: E402

RANK, WORLD = launcher_rank_world()

ARGS = parse()
split_into_nodes(2)

import fmcomm  # noqa: E402
from fmcomm import compression  # noqa: E402
from fmcomm.topology import group_by_node  # noqa: E402
from fmcomm.errors import FmcommError, MismatchError  # noqa: E402
from fmcomm.transport import shared_memory  # noqa: E402
from fmcomm.transport.shared_memory import NodeSharedMemory, SharedMemoryCache  # noqa: E402

SIZES = (0, 1, 7, 1000, 250_001)
MISSING_DIR = "/nonexistent-fmcomm-shm"
DEFAULT_CAP = shared_memory.SEGMENT_BYTES_MAX


def make_input(n, *case):
    g = torch.Generator().manual_seed(zlib.crc32("/".join(map(str, case)).encode()))
    return (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).float()


def digest(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def left_to_right_sum(blocks):
    acc = blocks[0].clone()
    for b in blocks[1:]:
        acc += b
    return acc


def run_case(report, key, fn):
    try:
        report[key] = fn()
    except Exception:  # noqa: BLE001 - reported, and the test fails on it
        report[key] = {"ok": False, "error": traceback.format_exc()}


def partitions(comm):
    """(name, groups, segment cap) covering every group size from 1 to the world."""
    everyone = list(range(comm.world))
    return (("nodes", group_by_node(comm.topology.node_of), 512 << 10),
            ("all_but_last", [everyone[:-1], everyone[-1:]], DEFAULT_CAP),
            ("all", [everyone], DEFAULT_CAP))


def collectives_on(group, name, report):
    local, me = group.world, group.rank
    cache = group.shared_memory
    for k in SIZES:
        def reduce_scatter():
            inputs = [make_input(local * k, name, "rs", k, r) for r in range(local)]
            expected = left_to_right_sum([x[me * k:(me + 1) * k] for x in inputs])
            shm = cache.get(local * k * 4)
            out = torch.full((k,), float("nan"))
            shm.reduce_scatter(out, inputs[me])
            entry = {"ok": torch.equal(out, expected)}
            if local <= 2:
                # The transport's ring adds x_b + x_{b+1} at two ranks: the same sum.
                over_transport = torch.empty(k)
                group.reduce_scatter(over_transport, inputs[me])
                entry["ok"] = entry["ok"] and torch.equal(out, over_transport)
            in_place = inputs[me].clone()
            shm.reduce_scatter(in_place[me * k:(me + 1) * k], in_place)  # output as its own input block
            entry["ok"] = entry["ok"] and torch.equal(in_place[me * k:(me + 1) * k], expected)
            return entry

        def all_gather():
            inputs = [make_input(k, name, "ag", k, r) for r in range(local)]
            shm = cache.get(k * 4)
            out = torch.full((local * k,), float("nan"))
            shm.all_gather(out, inputs[me])
            return {"ok": torch.equal(out, torch.cat(inputs)), "hash": digest(out)}
        run_case(report, f"{name}/reduce_scatter/{k}", reduce_scatter)
        run_case(report, f"{name}/all_gather/{k}", all_gather)
    segment = cache.segment
    report[f"{name}/growth"] = {"ok": cache.attaches >= 2 and segment is not None
                                and segment.slot_bytes >= min(local * SIZES[-1] * 4,
                                                              shared_memory._max_slot_bytes(local)),
                                "attaches": cache.attaches}


def failures_on(group, report):
    """Attaching where one rank cannot map the file, refusal memo, mismatched calls, closed segments."""
    for failing in (0, 2):
        def refused():
            shared_memory.SHM_DIR = MISSING_DIR if group.rank == failing else "/dev/shm"
            try:
                return {"ok": NodeSharedMemory.attach(group, 4096) is None}
            finally:
                shared_memory.SHM_DIR = "/dev/shm"
        run_case(report, f"refused/rank{failing}", refused)

    def memo():
        cache = SharedMemoryCache(group)
        shared_memory.SHM_DIR = MISSING_DIR if group.rank == 1 else "/dev/shm"
        try:
            first = cache.get(1 << 20)
        finally:
            shared_memory.SHM_DIR = "/dev/shm"
        tried = cache.attaches  # 1 MiB, then 256 KiB and 64 KiB slots: each refused
        again = cache.get(1 << 20)  # refused before: not tried again
        smaller = cache.get(1 << 15)  # below every refused size: tried, and maps
        ok = (first is None and again is None and tried == 3 and smaller is not None and cache.attaches == 4)
        cache.close()
        return {"ok": ok}
    run_case(report, "refused/memo", memo)

    def mismatch():
        shm = NodeSharedMemory.attach(group, 4096)
        k = 8 if group.rank == 0 else 7
        try:
            shm.all_gather(torch.empty(group.world * k), torch.ones(k))
            return {"ok": False, "error": "no MismatchError"}
        except MismatchError as e:
            entry = {"ok": e.op == "all_gather" and e.rank == group.rank}
        try:
            shm.all_gather(torch.empty(group.world), torch.ones(1))
            entry = {"ok": False, "error": "a segment closed by a mismatch was used again"}
        except FmcommError:
            pass
        return entry
    run_case(report, "mismatch", mismatch)


def collectives_case(comm, report):
    for name, groups, cap in partitions(comm):
        mine = [g for g in (comm.new_group(members) for members in groups) if g is not None]
        shared_memory.SEGMENT_BYTES_MAX = cap
        try:
            collectives_on(mine[0], f"{name}/{mine[0].world}", report)
        finally:
            shared_memory.SEGMENT_BYTES_MAX = DEFAULT_CAP
        if name == "all":
            failures_on(mine[0], report)
        mine[0].close()


def compressed_case(comm, report):
    off = fmcomm.Communicator(comm.transport, fmcomm.Config.from_env(dict(os.environ, FMCOMM_SHM="off")))
    assert comm.config.shm == "auto" and off.config.shm == "off"
    results = {}
    for spec in ("fp8@inter", "onebit@inter"):
        for n in (0, 1, 7, 1_000_003):
            def same_with_and_without():
                x = make_input(n, spec, n, comm.rank)
                traffic = {}
                for label, c in (("shm", comm), ("off", off)):
                    stats = c.executor.stats
                    before = stats.wire_bytes, stats.inter_node_bytes
                    t = x.clone()
                    c.all_reduce(t, compress=spec, state=compression.ErrorFeedback())
                    results[label] = t
                    traffic[label] = (stats.wire_bytes - before[0], stats.inter_node_bytes - before[1])
                ok = torch.equal(results["shm"], results["off"]) and traffic["shm"][1] == traffic["off"][1]
                if n == 1_000_003:
                    ok = ok and traffic["shm"][0] < traffic["off"][0]
                return {"ok": ok, "hash": digest(results["shm"]), "traffic": traffic}
            run_case(report, f"{spec}/{n}", same_with_and_without)

    def asynchronous():
        # async_op runs the composite on the communicator's worker thread, and the
        # node group's barriers from there.
        x = make_input(1_000_003, "async", comm.rank)
        got, want = x.clone(), x.clone()
        work = comm.all_reduce(got, compress="fp8@inter", async_op=True)
        off.all_reduce(want, compress="fp8@inter", async_op=True).wait()
        work.wait()
        return {"ok": torch.equal(got, want), "hash": digest(got)}
    run_case(report, "async", asynchronous)
    node, off_node = comm.levels()[0], off.levels()[0]
    report["attached"] = {"ok": node.shared_memory.segment is not None and off_node.shared_memory.attaches == 0
                          and off_node.shared_memory.segment is None}

    def fallback():
        failing = fmcomm.Communicator(comm.transport, comm.config)
        failing_node = failing.levels()[0]
        shared_memory.SHM_DIR = MISSING_DIR if comm.rank == 1 else "/dev/shm"
        try:
            x = make_input(1_000_003, "fallback", comm.rank)
            got, want = x.clone(), x.clone()
            failing.all_reduce(got, compress="onebit@inter", state=compression.ErrorFeedback())
        finally:
            shared_memory.SHM_DIR = "/dev/shm"
        off.all_reduce(want, compress="onebit@inter", state=compression.ErrorFeedback())
        again = x.clone()
        failing.all_reduce(again, compress="onebit@inter", state=compression.ErrorFeedback())
        # Only the node of the failing rank falls back; the other node attaches.
        cache = failing_node.shared_memory
        attached = cache.segment is not None
        # The failing node retries smaller slots within the first call, never after it.
        return {"ok": torch.equal(got, want) and torch.equal(again, want)
                and (cache.attaches == 1 if attached else cache.attaches >= 1)
                and attached == (comm.topology.node_of[comm.rank] != comm.topology.node_of[1]),
                "hash": digest(got)}
    run_case(report, "fallback", fallback)


def main():
    comm = fmcomm.init(transport=ARGS.transport)
    assert comm.rank == RANK and comm.world == WORLD
    report = {"pid": os.getpid()}
    collectives_case(comm, report)
    if comm.levels() is not None:
        compressed_case(comm, report)
    left = [f for f in os.listdir("/dev/shm") if f.startswith(f"fmcomm-{os.getpid()}-")]
    report["no_files_left"] = {"ok": not left, "left": left}
    report_and_exit(ARGS, comm.rank, report)


if __name__ == "__main__":
    main()
