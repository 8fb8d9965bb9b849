"""Every dtype x op x size x algorithm x call style of all_reduce on this rank's world
(at 5 and more ranks, three dtypes take every op and the others sum and max).

Inputs come from seeds, so rank 0 regenerates every rank's input and checks its
result against the float64 (or exact integer) reference, and ring results against
the schedule simulator bit for bit. Every rank reports a hash of its result bytes;
the test requires all hashes equal, which carries rank 0's check to every rank.
"""
import hashlib
import traceback
import zlib

import numpy as np
import torch

import fmcomm
from common import parse, report_and_exit
from fmcomm import schedule
from fmcomm.algorithms import REGISTRY
from fmcomm.dtypes import DTYPES
from fmcomm.simulator import simulate, storage

BIG = 1_000_003  # about a million, divisible by none of the world sizes tested
# At 5 and 8 ranks rank 0 simulates every rank's schedule for its bit-for-bit check,
# which costs most of those runs' time at a million; this size keeps several
# segments' worth of data per rank at 5 and is divisible by neither 5 nor 8.
BIG_AT_LARGE_WORLDS = 262_147
SMALL = (0, 1, 7)
OPS = ("sum", "avg", "min", "max", "prod")
OTHER_SCHEDULES = ("tree", "recursive_doubling", "halving_doubling", "hierarchical")
# At 5 and 8 ranks (more than twice the cores of a CI box) the whole matrix runs on
# one dtype of each kind: float32 (rounding), bfloat16 (16-bit storage) and int64
# (wrapping). float64, float16 and int32 take the same code paths as one of those
# and run the whole matrix at 1-4 ranks; at 5 and 8 they run sum and max. There, too,
# the empty and one-element calls run in place only: the call styles' own paths do
# not depend on the world size, and they run on every size at 1-4 ranks.
FULL_MATRIX_DTYPES_AT_LARGE_WORLDS = ("float32", "bfloat16", "int64")
LARGE_WORLD = 5


def make_input(rank, count, dtype, op, case):
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}/{rank}".encode()))
    if not dtype.is_float:
        info = torch.iinfo(dtype.torch)
        if op in ("sum", "avg", "prod", "min", "max"):
            # The whole range: integer sums and products must wrap exactly as torch's do.
            return torch.randint(info.min, info.max, (count,), generator=g, dtype=torch.int64).to(dtype.torch)
    x = torch.rand(count, generator=g, dtype=torch.float64) * 2 - 1
    if op == "prod":
        # Magnitudes in [0.5, 1.5): a product of 8 neither underflows nor overflows.
        x = torch.sign(x) * (0.5 + x.abs())
    return x.to(dtype.torch)


def reference(inputs, dtype, op, world):
    if not dtype.is_float:
        acc = inputs[0].to(torch.int64)
        for x in inputs[1:]:
            x = x.to(torch.int64)
            acc = {"sum": torch.add, "avg": torch.add, "prod": torch.mul,
                   "min": torch.minimum, "max": torch.maximum}[op](acc, x)
        acc = acc.to(dtype.torch)  # wraps modulo 2^bits, as the collective's arithmetic
        if op == "avg" and world > 1:
            acc = acc.div(world, rounding_mode="trunc")
        return acc, None
    xs = torch.stack([x.double() for x in inputs])
    # For float64 data the float64 reference rounds as much as the result does, so its
    # own error bound is added (a factor of two on the bounds below).
    ref_err = 2.0 if dtype.name == "float64" else 1.0
    if op in ("sum", "avg"):
        ref = xs.sum(0)
        # Summing `world` terms in any order with correct rounding per step errs by at
        # most (world-1)·u·Σ|x|; the final cast and avg's division add u·|ref| each.
        u = dtype.unit_roundoff
        tol = (world - 1) * u * xs.abs().sum(0) + 2 * u * ref.abs()
        if op == "avg":
            ref, tol = ref / world, tol / world + u * (ref / world).abs()
        tol = tol + (2.0 ** -24 if dtype.name == "float16" else 0.0)  # float16 subnormal spacing
        return ref, tol * ref_err
    if op == "prod":
        ref = xs.prod(0)
        u = dtype.unit_roundoff
        # world-1 multiplications plus the final cast, each off by at most u relative:
        # |error| <= γ_world·|ref| with γ_n = n·u / (1 - n·u).
        return ref, world * u / (1 - world * u) * ref_err * ref.abs()
    ref = xs.min(0).values if op == "min" else xs.max(0).values
    return ref, torch.zeros_like(ref)  # min/max pick an input: exact


def check(out, ref, tol, dtype):
    if tol is None:
        return torch.equal(out, ref)
    if dtype.is_float and tol is not None and float(tol.max() if tol.numel() else 0) == 0:
        return torch.equal(out.double(), ref)
    return bool(((out.double() - ref).abs() <= tol).all())


def simulated(world, count, dtype, op, inputs, rank, algo, node_of):
    extra = {"node_of": node_of} if algo == "hierarchical" else {}
    sched = schedule.build("all_reduce", algo, REGISTRY[("all_reduce", algo)], world, count, count, count=count,
                           **extra)
    arrays = [x.view(torch.int16).numpy().view(np.uint16) if dtype.name == "bfloat16" else x.numpy() for x in inputs]
    out = simulate(sched, [a.astype(storage(dtype)) for a in arrays], dtype, op)[rank]
    return out.tobytes()


def main():
    args = parse()
    comm = fmcomm.init(transport=args.transport)
    rank, world = comm.rank, comm.world
    report = {}
    cases = []
    big = BIG if world < LARGE_WORLD else BIG_AT_LARGE_WORLDS
    for dname in DTYPES:
        full = world < LARGE_WORLD or dname in FULL_MATRIX_DTYPES_AT_LARGE_WORLDS
        for op in (OPS if full else ("sum", "max")):
            for count in SMALL:
                for algo in ("ring", "native", "auto"):
                    for style in ("inplace", "outofplace", "async") if count == SMALL[-1] or world < LARGE_WORLD \
                            else ("inplace",):
                        cases.append((dname, op, count, algo, style))
            cases += [(dname, op, big, "ring", "inplace"), (dname, op, big, "auto", "async"),
                      (dname, op, big, "native", "outofplace")]
            # The other schedules: every dtype, the ops whose rounding differs (sum) or
            # does not (max), small sizes in both placements and the big one in place.
            if op in ("sum", "max"):
                for algo in OTHER_SCHEDULES:
                    cases += [(dname, op, n, algo, style) for n in SMALL for style in ("inplace", "outofplace")]
                    if dname in ("float32", "bfloat16", "int64"):  # the big size: one of each kind, for time
                        cases.append((dname, op, big, algo, "inplace"))
    cached = (None, None, None)
    for dname, op, count, algo, style in cases:
        dtype = DTYPES[dname]
        key = f"{dname}/{op}/{count}/{algo}/{style}"
        if algo == "native" and not comm.transport.supports_native("all_reduce", dtype, op, "cpu"):
            report[key] = {"skipped": "no native support"}
            continue
        case = f"{dname}/{op}/{count}"
        if cached[0] != case:
            inputs = [make_input(r, count, dtype, op, case) if rank == 0 or r == rank else None
                      for r in range(world)]
            cached = (case, inputs, reference(inputs, dtype, op, world) if rank == 0 else None)
        inputs = cached[1]
        mine = inputs[rank].clone()
        try:
            if style == "inplace":
                fmcomm.all_reduce(mine, op=op, algo=algo)
                out = mine
            elif style == "outofplace":
                out = torch.full_like(mine, 0)
                fmcomm.all_reduce(mine, op=op, algo=algo, output=out)
                assert torch.equal(mine, inputs[rank]), "out-of-place call modified its input"
            else:
                work = fmcomm.all_reduce(mine, op=op, algo=algo, async_op=True)
                assert work.wait() is True
                out = mine
            entry = {"ok": check(out, *cached[2], dtype) if rank == 0 else True,
                     "hash": hashlib.sha256(out.view(torch.uint8).numpy().tobytes()).hexdigest()}
            # At 5 and 8 ranks only the dtypes of the whole matrix are simulated: rank 0
            # simulating every rank's schedule costs most of those runs' time.
            if rank == 0 and algo in ("ring", *OTHER_SCHEDULES) and style == "inplace" and (
                    world < LARGE_WORLD or dname in FULL_MATRIX_DTYPES_AT_LARGE_WORLDS):
                entry["matches_simulator"] = out.view(torch.uint8).numpy().tobytes() == simulated(
                    world, count, dtype, op, inputs, rank, algo, comm.topology.node_of)
            report[key] = entry
        except Exception:  # noqa: BLE001 - reported, and the test fails on it
            report[key] = {"ok": False, "error": traceback.format_exc()}
    # The same call twice gives the same bytes (reduction order is fixed, not timing-dependent).
    for algo in ("ring", "tree", "recursive_doubling", "halving_doubling", "hierarchical", "native", "auto"):
        x = make_input(rank, 100_003, DTYPES["float32"], "sum", "repeat")
        runs = []
        for _ in range(2):
            t = x.clone()
            fmcomm.all_reduce(t, algo=algo)
            runs.append(hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest())
        report[f"repeat/{algo}"] = {"ok": runs[0] == runs[1], "hash": runs[0]}
    report_and_exit(args, rank, report)


if __name__ == "__main__":
    main()
