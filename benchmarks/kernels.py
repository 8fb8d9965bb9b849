"""Time the CPU compression kernels, native (fmcomm._C) against the torch way of doing the same.

    python benchmarks/kernels.py [--size 64M] [--iters N] [--block B] [--json FILE]

For each kernel the native call and its torch counterpart (the fallback of
fmcomm/compression/kernels.py; for top-k also plain ``torch.topk(c.abs(), k)``) run in
alternating order in one process, on one thread (``torch.set_num_threads(1)``), on the same
inputs, after one warm-up call each whose outputs are compared bit for bit (the "same"
column). Times are medians over ``--iters`` calls, wall clock; "cpu GB/s" uses this thread's
CPU time instead, which leaves out time spent descheduled on a shared machine (not time
waiting for memory that other processes keep busy).

GB/s counts the float32 tensor being compressed or rebuilt, 4 bytes per element, whatever
the kernel actually reads or writes (fp8 codes are 1 byte, sign bits 1/8). scatter_add,
which adds a 1% top-k selection into a dense tensor, counts the 8 bytes of each (index,
value) pair it reads. A plain copy of the input is timed alongside as a memory-bandwidth
reference. ``--json`` writes one row per kernel and implementation with keys ``kernel,
impl, bytes, GBps`` (impl "native" or "torch"), plus ``variant``, ``elements``,
``seconds`` (median), ``seconds_min``, ``cpu_seconds``, ``cpu_GBps``, ``same`` and, on
native rows, ``ratio`` (the torch fallback's time over native's).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmcomm.compression import kernels  # noqa: E402

K = kernels
TOPK_FRACTION = 0.01


def parse_size(text: str) -> int:
    """Bytes from "64M", "4K", "1G" or a plain number (binary multiples)."""
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4K, 64M, 1G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


class Case:
    """One kernel: a native and one or more torch callables over shared inputs.

    ``outputs(impl)`` returns the tensors (and numbers) whose bits must agree after a call;
    ``reset`` restores inputs a call modifies (residuals), so every call sees the same data."""

    def __init__(self, name: str, nbytes: int, elements: int):
        self.name, self.nbytes, self.elements = name, nbytes, elements
        self.calls: dict[str, callable] = {}
        self.results: dict[str, object] = {}
        self.resets: list = []

    def add(self, variant: str, call, outputs=None):
        self.calls[variant] = (call, outputs)
        return self


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        size = {1: torch.uint8, 4: torch.int32}[a.element_size()]
        return torch.equal(a.view(size), b.view(size))
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b))
    return a == b


def build_cases(n: int, block: int, seed: int = 0) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    residual0 = torch.randn(n, generator=g) * 0.01
    nb = -(-n // block)
    scale = torch.full((nb,), 448.0 / 5.0)  # |x| < 5: no saturation, no lost precision at the top
    k = max(1, int(n * TOPK_FRACTION))
    nbytes = 4 * n
    cases = []

    def per_impl(make):
        """make(impl) -> (call, outputs) with buffers of its own, so the two never share outputs."""
        return {impl: make(impl) for impl in ("native", "torch")}

    def residual_pair():
        return {"native": residual0.clone(), "torch": residual0.clone()}

    copy_out = torch.empty_like(x)
    cases.append(Case("copy (reference)", nbytes, n).add("copy", lambda: copy_out.copy_(x)))

    def fp8_encode(ef: bool):
        res = residual_pair() if ef else {"native": None, "torch": None}
        case = Case("fp8_encode_ef" if ef else "fp8_encode", nbytes, n)
        for impl in ("native", "torch"):
            q = torch.empty(n, dtype=torch.uint8)
            r = res[impl]
            case.add(impl, lambda q=q, r=r, impl=impl: K.fp8_encode(x, q, scale, block, "e4m3", residual=r, impl=impl),
                     lambda q=q, r=r: (q, r) if r is not None else q)
            if ef:
                case.resets.append(lambda r=r: r.copy_(residual0))
        return case

    cases += [fp8_encode(False), fp8_encode(True)]

    codes = torch.empty(n, dtype=torch.uint8)
    K.fp8_encode(x, codes, scale, block, "e4m3", impl="torch")
    case = Case("fp8_decode", nbytes, n)
    for impl in ("native", "torch"):
        out = torch.empty(n)
        case.add(impl, lambda out=out, impl=impl: K.fp8_decode(codes, out, scale, block, "e4m3", impl=impl),
                 lambda out=out: out)
    cases.append(case)

    case = Case("fp8_encode_decode", nbytes, n)
    for impl in ("native", "torch"):
        q, out = torch.empty(n, dtype=torch.uint8), torch.empty(n)

        def both(q=q, out=out, impl=impl):
            K.fp8_encode(x, q, scale, block, "e4m3", impl=impl)
            K.fp8_decode(q, out, scale, block, "e4m3", impl=impl)
        case.add(impl, both, lambda out=out: out)
    cases.append(case)

    def onebit_encode(ef: bool):
        res = residual_pair() if ef else {"native": None, "torch": None}
        case = Case("onebit_encode_ef" if ef else "onebit_encode", nbytes, n)
        for impl in ("native", "torch"):
            out, r = torch.empty(-(-n // 8), dtype=torch.uint8), res[impl]
            box = {}

            def call(out=out, r=r, impl=impl, box=box):
                box["scale"] = K.onebit_encode(x, out, residual=r, impl=impl)
            case.add(impl, call, lambda out=out, r=r, box=box: (out, box["scale"]) + ((r,) if r is not None else ()))
            if ef:
                case.resets.append(lambda r=r: r.copy_(residual0))
        return case

    cases += [onebit_encode(False), onebit_encode(True)]

    signs = torch.empty(-(-n // 8), dtype=torch.uint8)
    onebit_scale = K.onebit_encode(x, signs, impl="torch")
    case = Case("onebit_decode", nbytes, n)
    for impl in ("native", "torch"):
        out = torch.empty(n)
        case.add(impl, lambda out=out, impl=impl: K.onebit_decode(signs, out, onebit_scale, impl=impl),
                 lambda out=out: out)
    cases.append(case)

    def topk(ef: bool):
        res = residual_pair() if ef else {"native": None, "torch": None}
        case = Case(f"topk_{TOPK_FRACTION:g}" + ("_ef" if ef else ""), nbytes, n)
        for impl in ("native", "torch"):
            idx, val, r = torch.empty(k, dtype=torch.int32), torch.empty(k), res[impl]
            case.add(impl, lambda idx=idx, val=val, r=r, impl=impl: K.topk_select(x, k, idx, val, residual=r,
                                                                                    impl=impl),
                     lambda idx=idx, val=val, r=r: (idx, val) + ((r,) if r is not None else ()))
            if ef:
                case.resets.append(lambda r=r: r.copy_(residual0))
        if not ef:  # what one would write without the kernel: unordered indices, no tie rule
            case.add("torch.topk", lambda: torch.topk(x.abs(), k))
        return case

    cases += [topk(False), topk(True)]

    chosen = torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32)
    values = torch.randn(k, generator=g)
    dense0 = torch.randn(n, generator=g)
    case = Case("scatter_add", 8 * k, k)
    for impl in ("native", "torch"):
        dense = dense0.clone()
        case.add(impl, lambda dense=dense, impl=impl: K.scatter_add(chosen, values, dense, impl=impl),
                 lambda dense=dense: dense)
        case.resets.append(lambda dense=dense: dense.copy_(dense0))
    cases.append(case)
    return cases


def run_case(case: Case, iters: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU (this thread's) seconds of each call, by variant."""
    variants = list(case.calls)
    for reset in case.resets:
        reset()
    for v in variants:  # warm-up, and the bit comparison of the results
        case.calls[v][0]()
    outputs = {v: case.calls[v][1]() for v in variants if case.calls[v][1] is not None}
    if "native" in outputs and "torch" in outputs:
        case.results["same"] = same(outputs["native"], outputs["torch"])
    times = {v: [] for v in variants}
    cpu_times = {v: [] for v in variants}
    for i in range(iters):
        order = variants if i % 2 == 0 else variants[::-1]  # alternate who goes first
        for v in order:
            for reset in case.resets:  # untimed: every call sees the same residual
                reset()
            t0, c0 = time.perf_counter(), time.thread_time()
            case.calls[v][0]()
            times[v].append(time.perf_counter() - t0)
            cpu_times[v].append(time.thread_time() - c0)
    return times, cpu_times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default="64M", help="bytes of float32 input (default 64M)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per implementation (default 5)")
    p.add_argument("--block", type=int, default=0, help="fp8 scale block (default: one scale for all)")
    p.add_argument("--json", type=Path, help="write the rows here, one JSON object per line")
    a = p.parse_args(argv)
    if not K.native_available():
        print(f"fmcomm._C compression kernels are not built: {K.NATIVE_IMPORT_ERROR}", file=sys.stderr)
        return 1
    from fmcomm import _C
    torch.set_num_threads(1)
    n = max(1, a.size // 4)
    block = a.block or n
    print(f"# fmcomm compression kernels: {n} float32 elements ({4 * n / 2**20:.0f} MiB), 1 thread, "
          f"native build {_C.compress_isa()}, fp8 e4m3 block {block}, median of {a.iters}")
    print(f"{'kernel':<18} {'impl':<20} {'GB/s':>8} {'ms':>9} {'native/torch':>13} {'same':>5} {'cpu GB/s':>9}")
    rows = []
    for case in build_cases(n, block):
        times, cpu_times = run_case(case, a.iters)
        median = {v: statistics.median(t) for v, t in times.items()}
        cpu_median = {v: statistics.median(t) for v, t in cpu_times.items()}
        for v, t in times.items():
            impl = "native" if v == "native" else "torch"
            label = {"native": "native", "torch": "torch (fallback)"}.get(v, v)
            row = {"kernel": case.name, "impl": impl, "variant": v if v != "torch" else "fallback",
                   "bytes": case.nbytes, "elements": case.elements, "GBps": case.nbytes / median[v] / 1e9,
                   "seconds": median[v], "seconds_min": min(t), "cpu_seconds": cpu_median[v],
                   "cpu_GBps": case.nbytes / cpu_median[v] / 1e9 if cpu_median[v] > 0 else None}
            ratio = ""
            if v == "native" and "torch" in median:
                row["ratio"] = median["torch"] / median["native"]
                ratio = f"{row['ratio']:.1f}x"
            elif v == "torch.topk":
                ratio = f"({median[v] / median['native']:.1f}x)"
            if "same" in case.results and v in ("native", "torch"):
                row["same"] = case.results["same"]
            rows.append(row)
            same_text = {True: "yes", False: "NO"}.get(row.get("same"), "")
            cpu = f"{row['cpu_GBps']:.2f}" if row["cpu_GBps"] else "-"
            print(f"{case.name:<18} {label:<20} {row['GBps']:>8.2f} {1e3 * median[v]:>9.2f} {ratio:>13} "
                  f"{same_text:>5} {cpu:>9}", flush=True)
    if any(r.get("same") is False for r in rows):
        print("# native and torch results differ (see 'same')", file=sys.stderr)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        with a.json.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0 if all(r.get("same", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
