"""Compressed all-reduce on this rank's world: every family, flat and @inter.

``--nodes K`` splits the ranks into K emulated nodes through FMCOMM_NODE_ID (set here,
from the launcher's rank, before fmcomm starts), so ``@inter`` runs its two-level
form without root; tests/emulated runs it on real namespaces with ``--nodes 0``
(nodes from the hostnames).

Per case every rank reports a hash of its result bytes (the test requires them all
equal) and rank 0 checks the result:

* casts and fp8: within the element-wise bound of :func:`cast_tolerance` of the
  float64 sum;
* flat onebit / top-k (first call, zero residuals): bit for bit equal to
  :func:`protocol_reference`, which runs the same codecs for every rank in one
  process; that checks chunking, exchange and accumulation order exactly, the codecs
  being checked against their definitions in tests/unit;
* error feedback over 100 steps (onebit, top-k; flat and @inter): the running sum of
  results equals the running sum of true sums minus the residuals every rank still
  holds, up to float32 rounding (bound in :func:`feedback_case`).
"""
import hashlib
import math
import traceback
import zlib

import torch

from common import launcher_rank_world, parse, report_and_exit, split_into_nodes  # noqa: E402

RANK, WORLD = launcher_rank_world()

ARGS = parse({"--nodes": {"type": int, "default": 1}, "--feedback": {"action": "store_true"},
              "--piece-elements": {"type": int, "default": 0}})
if ARGS.nodes:
    split_into_nodes(ARGS.nodes)

import fmcomm  # noqa: E402
import fmcomm.compressed  # noqa: E402
from fmcomm.algorithms import compressed_plan  # noqa: E402
from fmcomm import compression  # noqa: E402
from fmcomm.compression.base import round_up  # noqa: E402
from fmcomm.compression.fp8 import FMAX  # noqa: E402
from fmcomm.errors import NonFiniteError  # noqa: E402
from fmcomm.schedule import chunk_bounds  # noqa: E402

FAMILIES = ("fp16", "bf16", "fp8", "fp8:e5m2", "fp8:block=64", "onebit", "onebit:block=64", "topk:0.01", "topk:0.3")
SIZES = (0, 1, 7, 10_007)
STEPS = 100


def make_input(rank, n, case, dtype=torch.float32):
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}/{rank}".encode()))
    return (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def digest(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def cast_tolerance(family, inputs, world, ref):
    """Element-wise bound on |result - sum| for the casting families.

    Each contribution is rounded once (relative u) and the sum once more: |err| <=
    u·(Σ|x_r| + |sum|) plus float32 accumulation, plus an absolute term for the
    narrow type's smallest spacing (subnormals), scaled as the codec scales.
    fp16/bf16 divide by the world size first, so their spacing is multiplied back.
    """
    xs = torch.stack([x.double() for x in inputs])
    mag = xs.abs().sum(0) + ref.abs()
    b = float(xs.abs().max()) if xs.numel() else 0.0
    if family == "fp16":
        u, floor = 2.0 ** -11, world * 2.0 ** -25 * (world + 1)
    elif family == "bf16":
        u, floor = 2.0 ** -8, world * 2.0 ** -134 * (world + 1)
    else:
        fmt = "e5m2" if "e5m2" in family else "e4m3"
        u = 2.0 ** -3 if fmt == "e5m2" else 2.0 ** -4
        tiny = 2.0 ** -17 if fmt == "e5m2" else 2.0 ** -10  # half the smallest subnormal
        scale = FMAX[fmt] / b if b > 0 else 1.0
        # contributions at scale s, the sum at s/world: world + world half-spacings
        floor = (world * tiny + world * tiny) / scale
    return u * mag + (world + 2) * 2.0 ** -24 * mag + floor


def protocol_reference(compressor, inputs, world):
    """The flat compressed all-reduce for every rank at once, residuals zero."""
    n = inputs[0].numel()
    chunks = chunk_bounds(n, world)
    codec = compressor.begin(world, max((float(x.abs().max()) for x in inputs if x.numel()), default=0.0))
    out = torch.empty(n, dtype=torch.float32)
    for j, (o, c) in enumerate(chunks):
        acc = torch.zeros(c, dtype=torch.float32)
        for r in range(world):
            if r == j:  # the chunk's owner adds its own values uncoded
                codec.add_own(inputs[r][o:o + c].clone(), acc, torch.zeros(c) if compressor.error_feedback else None)
                continue
            payload = torch.empty(round_up(compressor.payload_bytes(c)), dtype=torch.uint8)[:compressor.payload_bytes(c)]
            codec.encode_contribution(inputs[r][o:o + c].clone(), payload,
                                      torch.zeros(c) if compressor.error_feedback else None)
            codec.add_contribution(payload, acc)
        payload = torch.empty(round_up(compressor.payload_bytes(c)), dtype=torch.uint8)[:compressor.payload_bytes(c)]
        codec.encode_sum(acc, payload, torch.zeros(c) if compressor.error_feedback else None)
        codec.decode_sum(payload, out[o:o + c])
    return out


def residual_total(comm, state, key, level, n):
    """Σ over ranks of worker + server residuals, in the tensor's coordinates (every rank)."""
    total = torch.zeros(n, dtype=torch.float64)
    sd = state.state_dict()
    # Slots are named by compressor and level (fmcomm.compressed.slot_level): one
    # compressor per state here.
    (slot,) = {name.split("/")[1] for name in sd if name.endswith(f"@{level}/worker")}
    worker, server = sd[f"{key}/{slot}/worker"].double(), sd[f"{key}/{slot}/server"].double()
    if level == "all":
        total += worker
        o, c = chunk_bounds(n, comm.world)[comm.rank]
        total[o:o + c] += server
    else:
        # @inter: per piece of the tensor, this rank's worker residual covers its node
        # shard and its server residual the lane chunk it owns, piece after piece.
        node, lane = comm.levels()
        w_at = s_at = 0
        for o, c, shard in compressed_plan.pieces(n, node.world):
            full = torch.zeros(shard * node.world, dtype=torch.float64)
            base = node.rank * shard
            full[base:base + shard] += worker[w_at:w_at + shard]
            co, cc = chunk_bounds(shard, lane.world)[lane.rank]
            full[base + co:base + co + cc] += server[s_at:s_at + cc]
            w_at, s_at = w_at + shard, s_at + cc
            total[o:o + c] += full[:c]
    comm.all_reduce(total)
    return total


def feedback_case(comm, family, level, n=512):
    """STEPS steps with error feedback: Σ results == Σ true sums - residuals, to rounding.

    Bound: each step's exact identity is broken only by float32 rounding of the
    additions in the codec and the accumulation, a few ulps of values of magnitude
    <= world (inputs in [-1, 1]); over STEPS steps, |err| <= STEPS·(4·world + 8)·2^-24·world.
    """
    spec = f"{family}@inter" if level == "inter" else family
    level_used = level if comm.levels() is not None and level == "inter" else "all"
    state = compression.ErrorFeedback()
    got = torch.zeros(n, dtype=torch.float64)
    true = torch.zeros(n, dtype=torch.float64)
    for step in range(STEPS):
        if step == STEPS // 2:
            # Resume from a checkpoint whose worker residuals hold 0.25 more everywhere,
            # the chunks each rank owns included (a checkpoint from before owners kept
            # their own values uncoded): that is delivered once, like any residual.
            before = residual_total(comm, state, "bucket0", level_used, n)
            saved = {k: v + 0.25 if k.endswith("/worker") else v for k, v in state.state_dict().items()}
            state = compression.ErrorFeedback()
            state.load_state_dict(saved)
            true += residual_total(comm, state, "bucket0", level_used, n) - before
        xs = [make_input(r, n, f"fb/{family}/{step}") for r in range(comm.world)]
        t = xs[comm.rank].clone()
        comm.all_reduce(t, compress=spec, state=state, key="bucket0")
        got += t.double()
        true += torch.stack([x.double() for x in xs]).sum(0)
    resid = residual_total(comm, state, "bucket0", level_used, n)
    bound = STEPS * (4 * comm.world + 8) * 2.0 ** -24 * comm.world
    err = float((got - (true - resid)).abs().max())
    drift = float((got - true).norm() / true.norm())
    worker = state.state_dict()[f"bucket0/{compression.parse(spec).compressor.name}@{level_used}/worker"]
    owned_held = max((float(worker[o:o + c].abs().max()) for o, c in owned_worker_spans(comm, level_used, n) if c),
                     default=0.0)
    return {"ok": err <= bound and owned_held == 0.0, "identity_error": err, "bound": bound,
            "owned_residual_held": owned_held, "relative_drift": drift, "hash": digest(got)}


def owned_worker_spans(comm, level, n):
    """(offset, count) in this rank's worker residual of the values of chunks it owns."""
    if level == "all":
        return [chunk_bounds(n, comm.world)[comm.rank]]
    node, lane = comm.levels()
    spans, w_at = [], 0
    for _, _, shard in compressed_plan.pieces(n, node.world):
        co, cc = chunk_bounds(shard, lane.world)[lane.rank]
        spans.append((w_at + co, cc))
        w_at += shard
    return spans


def main():
    if ARGS.piece_elements:
        # Pieces of a few values, so that small tensors take the pipelined @inter
        # path with several pieces (and a padded last one).
        compressed_plan.PIECE_ELEMENTS = ARGS.piece_elements
    comm = fmcomm.init(transport=ARGS.transport)
    rank, world = comm.rank, comm.world
    assert rank == RANK and world == WORLD
    report = {"levels": comm.levels() is not None, "node_of": list(comm.topology.node_of)}
    for family in FAMILIES:
        compressor = compression.parse(family).compressor
        for level in ("all", "inter"):
            spec = family + ("@inter" if level == "inter" else "")
            for n in SIZES:
                key = f"{spec}/{n}"
                try:
                    inputs = [make_input(r, n, key) for r in range(world)]
                    t = inputs[rank].clone()
                    comm.all_reduce(t, compress=spec, state=compression.ErrorFeedback())
                    entry = {"ok": True, "hash": digest(t), "finite": bool(torch.isfinite(t).all())}
                    if rank == 0:
                        ref = torch.stack([x.double() for x in inputs]).sum(0)
                        if family in ("fp16", "bf16") or family.startswith("fp8"):
                            tol = cast_tolerance(family, inputs, world, ref)
                            entry["ok"] = bool(((t.double() - ref).abs() <= tol).all())
                        elif level == "all":
                            entry["ok"] = torch.equal(t, protocol_reference(compressor, inputs, world))
                        entry["relative_error"] = float((t.double() - ref).norm() / ref.norm()) if n else 0.0
                    report[key] = entry
                except Exception:  # noqa: BLE001 - reported, and the test fails on it
                    report[key] = {"ok": False, "error": traceback.format_exc()}
    # Other input dtypes, avg, out of place and async, on one family each.
    for dtype in (torch.float16, torch.bfloat16):
        key = f"dtype/{dtype}"
        try:
            inputs = [make_input(r, 1001, key, dtype) for r in range(world)]
            out = torch.empty_like(inputs[rank])
            work = comm.all_reduce(inputs[rank], op="avg", compress="fp8", output=out, async_op=True)
            work.wait()
            ref = torch.stack([x.double() for x in inputs]).mean(0)
            ok = out.dtype == dtype and bool(((out.double() - ref).abs() <= 0.1 + 0.02 * ref.abs()).all())
            report[key] = {"ok": ok, "hash": digest(out)}
        except Exception:  # noqa: BLE001
            report[key] = {"ok": False, "error": traceback.format_exc()}
    # Non-finite inputs: reach every output identically, or raise on every rank.
    for bad in (math.nan, math.inf):
        key = f"nonfinite/{bad}"
        try:
            t = make_input(rank, 999, key)
            if rank == world - 1:
                t[5] = bad
            comm.all_reduce(t, compress="onebit@inter", key="nonfinite")
            report[key] = {"ok": (math.isnan(t[5].item()) if math.isnan(bad) else t[5].item() == math.inf)
                           and bool(torch.isfinite(torch.cat([t[:5], t[6:]])).all()), "hash": digest(t)}
        except Exception:  # noqa: BLE001
            report[key] = {"ok": False, "error": traceback.format_exc()}
    raising = fmcomm.Communicator(comm.transport, comm.config.replace(nan="raise"))
    t = make_input(rank, 99, "raise")
    if rank == 0:
        t[3] = math.nan
    try:
        raising.all_reduce(t, compress="topk:0.1")
        report["nonfinite/raise"] = {"ok": False, "error": "no NonFiniteError"}
    except NonFiniteError:
        report["nonfinite/raise"] = {"ok": True}
    # Zeros stay zeros; huge finite values stay finite.
    for family in ("fp8", "onebit", "topk:0.1", "fp16"):
        key = f"zeros/{family}"
        t = torch.zeros(300)
        comm.all_reduce(t, compress=family, state=compression.ErrorFeedback())
        report[key] = {"ok": bool((t == 0).all()), "hash": digest(t)}
        key = f"huge/{family}"
        t = make_input(rank, 300, key) * 1e30
        comm.all_reduce(t, compress=family, state=compression.ErrorFeedback())
        report[key] = {"ok": bool(torch.isfinite(t).all()), "hash": digest(t)}
    for family in ("onebit", "topk:0.05") if ARGS.feedback else ():
        for level in ("all", "inter"):
            key = f"feedback/{family}/{level}"
            try:
                report[key] = feedback_case(comm, family, level)
            except Exception:  # noqa: BLE001
                report[key] = {"ok": False, "error": traceback.format_exc()}
    # Bytes that leave the node: fp8 is one byte per value, so per node 2(N-1)/N · n
    # for n float32 values over N nodes (a quarter of the uncompressed hierarchical's).
    n = 1 << 16
    if ARGS.piece_elements and comm.levels() is not None:
        n = 4 * ARGS.piece_elements * comm.levels()[0].world  # four whole pieces, not hundreds
    before = comm.executor.stats.inter_node_bytes
    fmcomm.compressed.phase_seconds = {}  # the phases the executor timed: the plan's (bound agreement and waits aside)
    comm.all_reduce(make_input(rank, n, "traffic"), compress="fp8@inter")
    timed = sorted(set(fmcomm.compressed.phase_seconds) - {"call", "agree", "lane_wait"})
    fmcomm.compressed.phase_seconds = None
    report["traffic"] = {"inter_node_bytes": comm.executor.stats.inter_node_bytes - before, "count": n,
                         "phases": timed,
                         "plan_phases": sorted(compressed_plan.plan(comm.topology.node_of, True, n).phase_names),
                         "pieces": len(compressed_plan.pieces(n, comm.levels()[0].world))
                         if comm.levels() is not None else 1}
    report_and_exit(ARGS, rank, report)


if __name__ == "__main__":
    main()
