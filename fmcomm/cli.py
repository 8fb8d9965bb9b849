"""``fmcomm`` command line: ``fmcomm bench ...``, ``fmcomm topo``, ``fmcomm simulate`` and ``fmcomm info``.

The commands only parse arguments and call the library; all logic lives in the
package. ``fmcomm bench -n N`` outside a launcher starts N local ranks itself through
the ``mpiexec`` installed beside this Python (the mpich wheel puts it in the venv's
bin/) or on PATH.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

from . import launch
from .config import ConfigError, parse_size
from .errors import FmcommError


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def find_mpiexec() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _relaunch(n: int, argv: list[str]) -> int:
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("fmcomm: -n needs mpiexec (pip install mpi4py mpich), or start the ranks with your launcher",
              file=sys.stderr)
        return 2
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "fmcomm.cli", *argv]
    env = dict(os.environ)
    # Open MPI refuses root and busy-polls when ranks outnumber cores unless told;
    # MPICH ignores these variables.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    # One compute thread per rank's share of the cores: torch's OpenMP threads spin
    # after each op and, with ranks already filling the cores, steal them from the
    # peers a collective is waiting for (measured: a 1 MiB ring all-reduce at np=2
    # went from 524 to 364 us with OMP_NUM_THREADS=1).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _strip_n(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("-n", "--nranks"):
            skip = True
            continue
        if a.startswith("--nranks=") or (a.startswith("-n") and a[2:].isdigit()):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="fmcomm", description="fmcomm collective communication")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="benchmark a collective beside MPI and torch.distributed (nccl-tests columns)")
    from .bench.collectives import COLLECTIVES
    b.add_argument("collective", choices=sorted(COLLECTIVES) + ["moe"])
    b.add_argument("-n", "--nranks", type=int, default=None, help="start this many local ranks through mpiexec")
    b.add_argument("-b", "--minbytes", type=_size, default=_size("4K"))
    b.add_argument("-e", "--maxbytes", type=_size, default=_size("64M"))
    b.add_argument("-f", "--stepfactor", type=int, default=4)
    b.add_argument("--dtype", default="float32")
    b.add_argument("--op", default="sum", choices=["sum", "avg", "min", "max", "prod"])
    b.add_argument("--algo", type=_list, default=("auto",), help="comma list, each measured in the same run")
    b.add_argument("--peer", type=_list, default=(), help="comma list of mpi, torch")
    b.add_argument("--transport", default="mpi", choices=["mpi", "torch"], help="engine under fmcomm's rows")
    b.add_argument("--check", action="store_true", help="verify every result (#wrong)")
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--json", default=None, help="append one JSON object per row to this file")
    b.add_argument("--plot", default=None, metavar="F.png", help="bus bandwidth against size, one line per "
                                                                "implementation, peers included (needs matplotlib)")
    b.add_argument("--compress", type=_list, default=("none",),
                   help="all_reduce only: comma list of none, fp16, bf16, fp8, onebit, topk:R (each also NAME@inter), "
                        "each measured in the same run; rows report the relative error instead of #wrong")

    # moe only: MoE dispatch + combine (fmcomm/bench/moe.py); --algo takes auto, direct, hierarchical
    # and --compress none, fp8 there.
    b.add_argument("--tokens", type=_list, default=("128", "512", "2048", "8192", "16384"),
                   help="moe: comma list of tokens per rank")
    b.add_argument("--hidden", type=_list, default=("1024",), help="moe: comma list of hidden sizes")
    b.add_argument("--topk", type=int, default=2, help="moe: experts per token")
    b.add_argument("--experts-per-rank", type=int, default=2, help="moe: experts each rank holds")

    sub.add_parser("info", help="what this installation has: native kernels, MPI, gloo/NCCL, launcher")

    tu = sub.add_parser("tune", help="measure the fastest algorithm per collective and size here and write the "
                                     "tuning table auto follows")
    tu.add_argument("-n", "--nranks", type=int, default=None, help="start this many local ranks through mpiexec")
    tu.add_argument("-b", "--minbytes", type=_size, default=_size("4"))
    tu.add_argument("-e", "--maxbytes", type=_size, default=_size("64M"))
    tu.add_argument("-f", "--stepfactor", type=int, default=4)
    tu.add_argument("--collectives", type=_list, default=None, help="comma list (default: every collective)")
    tu.add_argument("--dtype", default="float32")
    tu.add_argument("--transport", default="mpi", choices=["mpi", "torch"])
    tu.add_argument("--out", default=None, help="the table's path (default: the per-user cache for this machine's "
                                               "topology fingerprint, which init() reads)")
    tu.add_argument("--show", default=None, metavar="FILE", help="print a tuning table and exit")
    tu.add_argument("--plot", default=None, metavar="F.png", help="time against size per candidate, the choice "
                                                                 "marked (with --show: of that table; needs matplotlib)")
    tu.add_argument("--compress", type=_list, default=None,
                    help="compressors measured for compress='auto' (default: fp16, bf16, fp8, onebit, topk:0.01, "
                         "also @inter across nodes; 'none' measures none)")
    tu.add_argument("--compress-from", type=_size, default=_size("64K"),
                    help="measure compressed all-reduces from this size up")
    tu.add_argument("--no-probe", action="store_true", help="do not measure latency and bandwidth first (the cost "
                                                            "model then prunes nothing unless FMCOMM_TOPO_FILE has them)")

    sm = sub.add_parser("simulate", help="predict every candidate algorithm's time on a preset or machine file "
                                         "(the cost model over the real schedules), nccl-tests columns")
    sm.add_argument("--topology", default=None, help="a preset name (e.g. dgx-h100) or a machine file; "
                                                     "default: FMCOMM_TOPO_FILE")
    sm.add_argument("--nodes", type=int, default=None, help="this many of the topology's nodes")
    sm.add_argument("--op", default="all_reduce", help="the collective (all_reduce, all_gather, reduce_scatter, "
                                                       "broadcast, reduce, all_to_all, barrier)")
    sm.add_argument("-b", "--minbytes", type=_size, default=_size("1K"))
    sm.add_argument("-e", "--maxbytes", type=_size, default=_size("4G"))
    sm.add_argument("-f", "--stepfactor", type=int, default=2)
    sm.add_argument("--dtype", default="float32")
    sm.add_argument("--algo", type=_list, default=(), help="comma list of schedules (default: every one of --op)")
    sm.add_argument("--compress", type=_list, default=(),
                    help="all_reduce: also the compressed all-reduce with each of these specs (fp8, onebit, topk:R, "
                         "each also NAME@inter), priced from its plan of phases")
    sm.add_argument("--json", default=None, help="write every row as one JSON object per line to this file")
    sm.add_argument("--plot", default=None, help="busbw against size, one line per algorithm, to this PNG "
                                                 "(needs matplotlib)")

    t = sub.add_parser("topo", help="the detected topology (or a preset/machine file): levels, ranks per node, "
                                    "alpha/beta per level, NICs, GPUs")
    t.add_argument("-n", "--nranks", type=int, default=None, help="start this many local ranks through mpiexec")
    t.add_argument("--topology", default=None,
                   help="describe this preset (e.g. dgx-h100) or machine file instead of detecting; no job")
    t.add_argument("--nodes", type=int, default=None, help="with --topology: this many of its nodes")
    t.add_argument("--probe", action="store_true", help="measure alpha/beta per level and the kernel rates "
                                                        "(a collective: a second or so)")
    t.add_argument("--repeats", type=int, default=5, help="probe repeats (the spread is over them)")
    t.add_argument("--dump", default=None, metavar="FILE", help="write the topology as a machine file")
    t.add_argument("--notes", action="store_true", help="print where each figure came from")
    t.add_argument("--explain", nargs=2, default=None, metavar=("OP", "SIZE"),
                   help="what the cost model predicts for each candidate algorithm of OP at SIZE bytes")

    args = p.parse_args(argv)
    try:
        if args.cmd == "topo":
            return _topo(args, argv)
        if args.cmd == "simulate":
            return _simulate(args)
        if args.cmd == "info":
            from .api import info
            print(json.dumps(info(), indent=2))
            return 0
        if args.cmd == "tune":
            return _tune(args, argv)
        if args.cmd == "bench":
            here = launch.detect()
            if args.nranks is not None and here.launcher == "none" and args.nranks > 1:
                return _relaunch(args.nranks, _strip_n(argv))
            if args.nranks is not None and here.launcher != "none" and args.nranks != here.world:
                print(f"fmcomm: -n {args.nranks} but the launcher started {here.world} ranks", file=sys.stderr)
                return 2
            if args.minbytes > args.maxbytes:
                print("fmcomm: -b must not exceed -e", file=sys.stderr)
                return 2
            if args.collective == "moe":
                from .bench.moe import MoEBenchArgs, run_moe_bench
                run_moe_bench(MoEBenchArgs(
                    tokens=tuple(int(t) for t in args.tokens), hidden=tuple(int(h) for h in args.hidden),
                    top_k=args.topk, experts_per_rank=args.experts_per_rank, algos=args.algo,
                    compress=args.compress, peers=args.peer, transport=args.transport, iters=args.iters,
                    warmup=args.warmup, json_path=args.json))
                return 0
            from .bench.harness import BenchArgs, run_bench
            run_bench(BenchArgs(
                collective=args.collective, min_bytes=args.minbytes, max_bytes=args.maxbytes,
                factor=args.stepfactor, dtype=args.dtype, op=args.op, algos=args.algo, peers=args.peer,
                transport=args.transport, check=args.check, iters=args.iters, warmup=args.warmup,
                json_path=args.json, compress=args.compress, plot=args.plot))
            return 0
    except FmcommError as e:
        print(f"fmcomm: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _tune(args, argv: list[str]) -> int:
    from .tuning import sweep, table
    if args.show:
        shown = table.load(args.show)
        print(sweep.describe(shown))
        if args.plot:
            sweep.plot(shown, args.plot)
        return 0
    here = launch.detect()
    if args.nranks is not None and here.launcher == "none" and args.nranks > 1:
        return _relaunch(args.nranks, _strip_n(argv))
    if args.minbytes > args.maxbytes:
        print("fmcomm: -b must not exceed -e", file=sys.stderr)
        return 2
    sweep.run_tune(sweep.TuneArgs(
        collectives=args.collectives or sweep.COLLECTIVES, min_bytes=args.minbytes, max_bytes=args.maxbytes,
        factor=args.stepfactor, dtype=args.dtype, transport=args.transport, out=args.out, plot=args.plot,
        probe=not args.no_probe,
        compress=(() if args.compress == ("none",) else args.compress), compress_from=args.compress_from))
    return 0


def _native_paths() -> dict[str, str]:
    from .api import info
    from .compression import cuda_kernels
    d = info()
    return {"cpu kernels": "built" if d["native_kernels"] else "torch fallback",
            "cuda kernels": "loaded" if cuda_kernels.available() else "no",
            "mpi": "yes" if d["mpi4py"] else "no", "gloo": "yes" if d["gloo"] else "no",
            "nccl": "yes" if d["nccl"] else "no"}


def _simulate(args) -> int:
    import time

    from . import simulator
    from .dtypes import DTYPES
    from .topology import presets
    from .topology.detect import topo_file_setting
    source = args.topology or topo_file_setting()
    if not source:
        print("fmcomm simulate: name a machine with --topology (a preset: " + ", ".join(presets.names())
              + "; or a machine file), or set FMCOMM_TOPO_FILE", file=sys.stderr)
        return 2
    if args.dtype not in DTYPES:
        print(f"fmcomm simulate: unknown dtype {args.dtype}; choose from {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    topo = presets.load(source)
    if args.nodes:
        topo = presets.resize(topo, args.nodes)
    started = time.perf_counter()
    rows = simulator.predict(topo, args.op, simulator.sizes(args.minbytes, args.maxbytes, args.stepfactor),
                             DTYPES[args.dtype], list(args.algo) or None, compress=list(args.compress))
    took = time.perf_counter() - started
    print(simulator.table(rows, topo, f"fmcomm simulate {args.op} --topology {source}"
                                      + (f" --nodes {args.nodes}" if args.nodes else "")))
    print(f"# priced in {took:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps({**dataclasses.asdict(r), "topology": topo.name, "ranks": topo.world,
                                    "nodes": topo.nodes}) + "\n")
    if args.plot:
        simulator.plot(rows, topo, args.plot)
    return 0


def _topo(args, argv: list[str]) -> int:
    from . import topology
    from .topology import describe, presets
    if args.topology is not None:
        topo = presets.load(args.topology)
        if args.nodes:
            topo = presets.resize(topo, args.nodes)
        is_root = True
    else:
        here = launch.detect()
        if args.nranks is not None and here.launcher == "none" and args.nranks > 1:
            return _relaunch(args.nranks, _strip_n(argv))
        import torch.distributed as dist

        from .api import finalize, init
        had_group = dist.is_available() and dist.is_initialized()
        comm = init()
        topo = comm.topology
        if args.probe:
            from .topology.probe import probe
            topo = probe(comm.transport, topo, repeats=args.repeats, timeout=comm.config.timeout)
        is_root = comm.rank == 0
        finalize()
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # gloo aborts at exit if its group is still up
    if not is_root:
        return 0
    print(describe.describe(topo, _native_paths() if args.topology is None else None, notes=args.notes))
    if args.explain:
        from .tuning import table as tables
        from .tuning.explain import explain
        op, size = args.explain
        from .config import Config
        print(explain(topo, op, _size(size), table=tables.active(Config.from_env().tuning_file, topo.fingerprint())))
    if args.dump:
        source = "preset" if args.topology is not None else "detected"
        topology.dump(topo, args.dump, node_source=source)
        print(f"written: {args.dump}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
