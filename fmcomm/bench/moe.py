"""``fmcomm bench moe``: MoE dispatch + combine beside the same exchange written on MPI and torch.

Every rank holds ``tokens`` tokens of ``hidden`` float32 values and routes each to K
experts drawn uniformly (seeded; E = experts_per_rank · world). One iteration is a
dispatch and a combine with identity experts. Peers do the same exchange the way a
user of the engine would: sort the slots by expert, exchange per-expert counts
(``MPI_Alltoall`` / ``all_to_all_single``), send the rows (``MPI_Alltoallv`` /
gloo ``all_to_all_single``), regroup them by local expert, and back, then sum each
token's K results. Timing follows the harness: every rank between barriers, the median
over iterations of the slowest rank, implementations on one engine interleaved.

Columns: time of dispatch + combine and, separately, of the dispatch alone (the same
iterations, each a median of the slowest rank); bytes = T·K·H·4, what one dispatch carries per rank at float32 (fp8 rows carry
about a quarter: its ``wire`` column); algbw = 2·bytes / time (dispatch and combine);
#wrong = values of the combined result that differ from K·x (fp8 rows: the largest
error relative to the stated bound, ≤ 1 is within it).
"""
from __future__ import annotations

import dataclasses
import json
import socket
import statistics
import sys
import time

import numpy as np
import torch

from .. import api
from .. import moe
from ..moe import fp8_rows
from .harness import Control


@dataclasses.dataclass
class MoEBenchArgs:
    tokens: tuple[int, ...]
    hidden: tuple[int, ...]
    top_k: int = 2
    experts_per_rank: int = 2
    algos: tuple[str, ...] = ("direct",)
    compress: tuple[str, ...] = ("none",)
    peers: tuple[str, ...] = ()
    transport: str = "mpi"
    iters: int = 20
    warmup: int = 5
    json_path: str | None = None


def routing(rank: int, tokens: int, k: int, num_experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * rank + tokens)
    return torch.rand(tokens, num_experts, generator=g).topk(k, dim=1).indices


def _local_layout(idx: torch.Tensor, num_experts: int, world: int):
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=num_experts)
    return order, per_expert


def _regroup_index(received_per_expert: torch.Tensor, world: int, local: int) -> torch.Tensor:
    experts = torch.arange(local).repeat(world)
    return torch.argsort(torch.repeat_interleave(experts, received_per_expert.reshape(-1)), stable=True)


def _finish(back_rows: torch.Tensor, order: torch.Tensor, tokens: int, k: int) -> torch.Tensor:
    slots = torch.empty_like(back_rows)
    slots[order] = back_rows
    return slots.view(tokens, k, -1).sum(1)


def torch_peer(world: int, num_experts: int, k: int):
    import torch.distributed as dist
    local = num_experts // world

    def run(x, idx):
        t0 = time.perf_counter()
        order, per_expert = _local_layout(idx, num_experts, world)
        received = torch.empty_like(per_expert)
        dist.all_to_all_single(received, per_expert)
        send = per_expert.view(world, local).sum(1).tolist()
        recv = received.view(world, local).sum(1).tolist()
        rows = x[order // k]
        arrived = rows.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(arrived, rows, recv, send)
        regroup = _regroup_index(received, world, local)
        expert_rows = arrived[regroup]
        dispatched = time.perf_counter() - t0
        outputs = torch.empty_like(expert_rows)
        outputs[regroup] = expert_rows  # identity experts, back to source order
        back = rows.new_empty(rows.shape)
        dist.all_to_all_single(back, outputs, send, recv)
        return _finish(back, order, x.shape[0], k), dispatched
    return run


def mpi_peer(ctl: Control, world: int, num_experts: int, k: int):
    MPI = ctl.MPI
    local = num_experts // world

    def run(x, idx):
        t0 = time.perf_counter()
        order, per_expert = _local_layout(idx, num_experts, world)
        counts = per_expert.numpy()
        received_np = np.empty_like(counts)
        ctl.comm.Alltoall(counts, received_np)
        received = torch.from_numpy(received_np)
        h = x.shape[1]
        send = (per_expert.view(world, local).sum(1) * h).tolist()
        recv = (received.view(world, local).sum(1) * h).tolist()
        rows = x[order // k]
        arrived = rows.new_empty(sum(recv) // h, h)
        ctl.comm.Alltoallv([rows.numpy(), (send, None), MPI.FLOAT], [arrived.numpy(), (recv, None), MPI.FLOAT])
        regroup = _regroup_index(received, world, local)
        expert_rows = arrived[regroup]
        dispatched = time.perf_counter() - t0
        outputs = torch.empty_like(expert_rows)
        outputs[regroup] = expert_rows
        back = rows.new_empty(rows.shape)
        ctl.comm.Alltoallv([outputs.numpy(), (recv, None), MPI.FLOAT], [back.numpy(), (send, None), MPI.FLOAT])
        return _finish(back, order, x.shape[0], k), dispatched
    return run


def fmcomm_run(comm, num_experts: int, algo: str, compress):
    def run(x, idx):
        t0 = time.perf_counter()
        expert_tokens, handle = moe.dispatch(x, idx, num_experts, group=comm, algo=algo, compress=compress)
        dispatched = time.perf_counter() - t0
        run.route = handle.algo
        return moe.combine(expert_tokens, handle), dispatched
    run.route = algo
    return run


def run_moe_bench(a: MoEBenchArgs, out=sys.stdout) -> list[dict]:
    ctl = Control()
    comm = api.init(transport=a.transport)
    world = comm.world
    num_experts = a.experts_per_rank * world
    impls = []  # (impl, name, engine, run, compress)
    for algo in a.algos:
        for spec in a.compress:
            compress = None if spec == "none" else spec
            impls.append(("fmcomm", algo + ("+fp8" if compress else ""), a.transport,
                          fmcomm_run(comm, num_experts, algo, compress), compress))
    created_pg = False
    for peer in a.peers:
        if peer == "mpi":
            impls.append(("mpi", "MPI_Alltoallv", "mpi", mpi_peer(ctl, world, num_experts, a.top_k), None))
        elif peer == "torch":
            import torch.distributed as dist
            if not dist.is_initialized():
                from ..transport.torch_dist import init_default_group
                init_default_group(ctl.rank, ctl.world, mpi_comm=ctl.comm)
                created_pg = True
            impls.append(("torch", f"{dist.get_backend()}.all_to_all_single", "torch",
                          torch_peer(world, num_experts, a.top_k), None))
        else:
            raise ValueError(f"unknown peer {peer!r}; peers are mpi, torch")
    if ctl.rank == 0:
        print(f"# fmcomm bench moe: {world} ranks on {socket.gethostname()} ({len(set(comm.topology.node_of))} "
              f"nodes), K {a.top_k}, {num_experts} experts, float32, iters {a.iters}, warmup {a.warmup}, "
              f"fmcomm transport {a.transport}", file=out)
        print("# one iteration = dispatch + combine (identity experts); time: median over iterations of the "
              "slowest rank (dispatch: its first half, to the tokens grouped by expert); bytes = T*K*H*4 per rank per "
              "dispatch; algbw = 2*bytes/time", file=out)
        print(f"#{'impl':>7} {'algo':>26} {'tokens':>7} {'hidden':>6} {'bytes':>11} {'wire':>11} {'time(us)':>11} "
              f"{'algbw':>7} {'dispatch(us)':>12} {'#wrong':>8}", file=out)
        out.flush()
    rows = []
    for hidden in a.hidden:
        for tokens in a.tokens:
            g = torch.Generator().manual_seed(ctl.rank * 1000003 + tokens)
            # Small integers: every exchange and the K-sum are exact, so #wrong counts real errors.
            x = torch.randint(-8, 8, (tokens, hidden), generator=g).to(torch.float32)
            idx = routing(ctl.rank, tokens, a.top_k, num_experts)
            results = _measure(ctl, impls, x, idx, a)
            for (impl, name, _, run, compress), (t, t_dispatch, wrong) in zip(impls, results):
                nbytes = tokens * a.top_k * hidden * 4
                wire = tokens * a.top_k * 4 * fp8_rows.words_per_row(hidden) if compress else nbytes
                algo = name if impl != "fmcomm" else f"{name}({run.route})" if run.route != name.split("+")[0] else name
                row = {"collective": "moe", "impl": impl, "algo": algo, "tokens": tokens, "hidden": hidden,
                       "top_k": a.top_k, "experts": num_experts, "world": world, "bytes": nbytes,
                       "wire_bytes": wire, "time_us": t, "dispatch_us": t_dispatch,
                       "algbw_GBps": 2 * nbytes / (t * 1e-6) / 1e9,
                       "wrong": wrong, "transport": a.transport if impl == "fmcomm" else impl}
                rows.append(row)
                if ctl.rank == 0:
                    shown = f"{wrong:.2f}" if isinstance(wrong, float) else str(wrong)
                    print(f" {impl:>7} {algo:>26} {tokens:>7} {hidden:>6} {nbytes:>11} {wire:>11} {t:>11.1f} "
                          f"{row['algbw_GBps']:>7.3f} {t_dispatch:>12.1f} {shown:>8}", file=out)
                    out.flush()
                    if a.json_path:
                        with open(a.json_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
    api.finalize()
    import torch.distributed as dist
    if dist.is_initialized() and (created_pg or a.transport == "torch"):
        dist.destroy_process_group()
    return rows


def _judge(result: torch.Tensor, x: torch.Tensor, k: int, compress) -> float | int:
    if compress:
        # Each of the K terms is within the row bound; their sum within K times it.
        bound = k * fp8_rows.error_bound(x)
        return float(((result - k * x).abs() / bound.clamp_min(1e-30)).max()) if x.numel() else 0.0
    return int((result != k * x).sum())


def _measure(ctl: Control, impls, x, idx, a: MoEBenchArgs):
    """(median slowest-rank time of dispatch+combine and of the dispatch alone in us, #wrong) per
    implementation; engines one after another."""
    times = {i: [] for i in range(len(impls))}
    dispatch_times = {i: [] for i in range(len(impls))}
    wrong = {}
    for engine in sorted({e for _, _, e, _, _ in impls}):
        mine = [i for i, imp in enumerate(impls) if imp[2] == engine]
        for it in range(a.warmup + a.iters):
            for i in [mine[(it + j) % len(mine)] for j in range(len(mine))]:
                run = impls[i][3]
                ctl.barrier()
                t0 = time.perf_counter()
                result, dispatched = run(x, idx)
                dt = time.perf_counter() - t0
                if it >= a.warmup:
                    times[i].append(dt)
                    dispatch_times[i].append(dispatched)
                if it == a.warmup + a.iters - 1:
                    wrong[i] = _judge(result, x, a.top_k, impls[i][4])
    results = []
    for i in range(len(impls)):
        slow = ctl.slowest(times[i])
        w = wrong[i]
        w = ctl.maximum(w) if isinstance(w, float) else ctl.total(w)
        results.append((statistics.median(slow) * 1e6, statistics.median(ctl.slowest(dispatch_times[i])) * 1e6, w))
    return results
