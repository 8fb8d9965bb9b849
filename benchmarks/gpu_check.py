"""One short check of the CUDA compression kernels on a GPU machine (about a minute on an H200).

    python benchmarks/gpu_check.py [--json FILE] [--iters 20]

Builds nothing: fmcomm/_cuda_kernels.so must already be there (``python setup.py
build_ext --inplace`` where nvcc is, or carried). First every CUDA kernel runs against the
torch fallback of fmcomm.compression.kernels on the same GPU at a few sizes and must give
the same bits (NaN payloads aside; onebit_encode's scale within 1e-6 relative, its bits
and residual exact for the fallback's scale). Then each kernel is timed at 64 MiB of
float32 (16M elements) against the torch fallback, with CUDA events (warm-up first, the
median of --iters runs). GB/s counts the float32 side: the 64 MiB that an encoder reads or
a decoder writes (for scatter_add, the 64 MiB it adds into). Prints a table and writes
one JSON object per row: kernel, impl ("cuda" or "torch"), bytes, GBps (and ms), to
--json (default $OUT/gpu_check.jsonl when $OUT is set, else
benchmarks/results/tmp/gpu_check.jsonl). Exits 1 if any check failed, 2 if the kernels
cannot run here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fmcomm.compression import cuda_kernels as ck  # noqa: E402
from fmcomm.compression import kernels as K  # noqa: E402

N_TIMED = 16 << 20  # 64 MiB of float32
CHECK_SIZES = [1, 13, 4099, (1 << 20) + 3, N_TIMED]
failures: list[str] = []


def same_bits(got: torch.Tensor, want: torch.Tensor) -> int:
    """How many elements differ (both-NaN floats count as equal)."""
    if got.shape != want.shape:
        return max(got.numel(), want.numel(), 1)
    if got.is_floating_point():
        differ = (got.view(torch.int32) != want.view(torch.int32)) & ~(got.isnan() & want.isnan())
    else:
        differ = got != want
    return int(differ.sum())


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    bad = same_bits(got, want)
    if bad:
        failures.append(f"{name}: {bad} of {want.numel()} differ")


def inputs(n: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mag = torch.pow(10.0, torch.randint(-6, 4, (n,), device="cuda", generator=g).float())
    x = torch.randn(n, device="cuda", generator=g) * mag
    if n > 3:
        x[::101] = x[3]  # ties for top-k
    r = torch.randn(n, device="cuda", generator=g) * 1e-3
    return x, r


def correctness() -> None:
    for n in CHECK_SIZES:
        x, r = inputs(n, n)
        for fmt in ("e4m3", "e5m2"):
            for block in (1, 128, n):
                scale = torch.rand(-(-n // block), device="cuda") * 100 + 0.5
                got, want = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
                rg, rw = r.clone(), r.clone()
                ck.fp8_encode(x, got, scale, block, fmt, residual=rg)
                K.fp8_encode(x, want, scale, block, fmt, residual=rw, impl="torch")
                check(f"fp8_encode {fmt} n={n} block={block} codes", got, want)
                check(f"fp8_encode {fmt} n={n} block={block} residual", rg, rw)
                dg, dw = r.clone(), r.clone()
                ck.fp8_decode(got, dg, scale, block, fmt, accumulate=True)
                K.fp8_decode(got, dw, scale, block, fmt, accumulate=True, impl="torch")
                check(f"fp8_decode {fmt} n={n} block={block}", dg, dw)
        bits_g = torch.empty(-(-n // 8), dtype=torch.uint8, device="cuda")
        bits_w = torch.empty_like(bits_g)
        rg, rw = r.clone(), r.clone()
        cpu_scale = K.onebit_encode(x, bits_w, residual=rw, impl="torch")
        ck._onebit_encode_with_scale(x, bits_g, cpu_scale, residual=rg)
        check(f"onebit_encode n={n} bits (given scale)", bits_g, bits_w)
        check(f"onebit_encode n={n} residual (given scale)", rg, rw)
        rg2 = r.clone()
        scale = ck.onebit_encode(x, bits_g, residual=rg2)
        check(f"onebit_encode n={n} bits", bits_g, bits_w)
        rel = abs(scale - cpu_scale) / abs(cpu_scale) if cpu_scale else abs(scale)
        if rel > 1e-6:
            failures.append(f"onebit_encode n={n}: scale {scale!r} vs CPU {cpu_scale!r} (rel {rel:.2e})")
        if ck.onebit_encode(x, torch.empty_like(bits_g)) != ck.onebit_encode(x, torch.empty_like(bits_g)):
            failures.append(f"onebit_encode n={n}: scale differs between two runs")
        og, ow = r.clone(), r.clone()
        ck.onebit_decode(bits_w, og, cpu_scale, accumulate=True)
        K.onebit_decode(bits_w, ow, cpu_scale, accumulate=True, impl="torch")
        check(f"onebit_decode n={n}", og, ow)
        for k in sorted({0, 1, max(1, n // 100), n}):
            ig, iw = torch.empty(k, dtype=torch.int32, device="cuda"), torch.empty(k, dtype=torch.int32, device="cuda")
            vg, vw = torch.empty(k, device="cuda"), torch.empty(k, device="cuda")
            rg, rw = r.clone(), r.clone()
            ck.topk_select(x, k, ig, vg, residual=rg)
            K.topk_select(x, k, iw, vw, residual=rw, impl="torch")
            check(f"topk_select n={n} k={k} indices", ig, iw)
            check(f"topk_select n={n} k={k} values", vg, vw)
            check(f"topk_select n={n} k={k} residual", rg, rw)
            sg, sw = r.clone(), r.clone()
            ck.scatter_add(iw, vw, sg)
            K.scatter_add(iw, vw, sw, impl="torch")
            check(f"scatter_add n={n} k={k}", sg, sw)
        torch.cuda.synchronize()
        print(f"  n={n}: checked ({len(failures)} failures so far)", flush=True)


def time_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timings(iters: int) -> list[dict]:
    n = N_TIMED
    nbytes = 4 * n
    k = n // 100
    x, r = inputs(n, 1)
    scale = torch.rand(-(-n // 4096), device="cuda") * 100 + 0.5
    q = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = torch.zeros(n, device="cuda")
    bits = torch.empty(n // 8, dtype=torch.uint8, device="cuda")
    idx = torch.empty(k, dtype=torch.int32, device="cuda")
    val = torch.empty(k, device="cuda")
    K.fp8_encode(x, q, scale, 4096, "e4m3", impl="torch")
    onebit_scale = K.onebit_encode(x, bits, impl="torch")
    K.topk_select(x, k, idx, val, impl="torch")
    cases = {
        "fp8_encode e4m3 +residual block=4096": {
            "cuda": lambda: ck.fp8_encode(x, q, scale, 4096, "e4m3", residual=r),
            "torch": lambda: K.fp8_encode(x, q, scale, 4096, "e4m3", residual=r, impl="torch")},
        "fp8_encode e5m2 block=n": {
            "cuda": lambda: ck.fp8_encode(x, q, scale[:1], n, "e5m2"),
            "torch": lambda: K.fp8_encode(x, q, scale[:1], n, "e5m2", impl="torch")},
        "fp8_decode e4m3 +=": {
            "cuda": lambda: ck.fp8_decode(q, out, scale, 4096, "e4m3", accumulate=True),
            "torch": lambda: K.fp8_decode(q, out, scale, 4096, "e4m3", accumulate=True, impl="torch")},
        "onebit_encode +residual": {
            "cuda": lambda: ck.onebit_encode(x, bits, residual=r),
            "torch": lambda: K.onebit_encode(x, bits, residual=r, impl="torch")},
        "onebit_decode +=": {
            "cuda": lambda: ck.onebit_decode(bits, out, onebit_scale, accumulate=True),
            "torch": lambda: K.onebit_decode(bits, out, onebit_scale, accumulate=True, impl="torch")},
        "topk_select k=1% +residual": {
            "cuda": lambda: ck.topk_select(x, k, idx, val, residual=r),
            "torch": lambda: K.topk_select(x, k, idx, val, residual=r, impl="torch")},
        "topk_select k=1%": {
            "cuda": lambda: ck.topk_select(x, k, idx, val),
            "torch": lambda: K.topk_select(x, k, idx, val, impl="torch")},
        "scatter_add k=1%": {
            "cuda": lambda: ck._scatter_add_unchecked(idx, val, out),
            "torch": lambda: out.index_add_(0, idx.long(), val)},
    }
    rows = []
    for kernel, impls in cases.items():
        for impl, fn in impls.items():
            slow = impl == "torch" and kernel.startswith(("onebit_encode", "topk"))
            ms = time_ms(fn, max(3, iters // 4) if slow else iters)
            rows.append({"kernel": kernel, "impl": impl, "bytes": nbytes, "GBps": round(nbytes / ms / 1e6, 2),
                         "ms": round(ms, 4)})
            r.normal_(0, 1e-3)  # keep the error-feedback state bounded between cases
            out.zero_()
            print(f"  {kernel:<40} {impl:<6} {ms:9.3f} ms", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    started = time.monotonic()
    if not torch.cuda.is_available() or not ck.available():
        print(f"gpu_check: CUDA kernels cannot run here: {ck.why_unavailable()}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}; "
          f"library: {ck.build_info()}")
    print("correctness against the torch fallback on this GPU:")
    try:
        correctness()
    except Exception as e:  # noqa: BLE001 - report and go on to the timings
        failures.append(f"correctness run raised {type(e).__name__}: {e}")
    print(f"timings at {N_TIMED * 4 >> 20} MiB of float32:")
    rows = timings(args.iters)
    path = Path(args.json) if args.json else (Path(os.environ["OUT"]) / "gpu_check.jsonl" if os.environ.get("OUT")
                                              else ROOT / "benchmarks" / "results" / "tmp" / "gpu_check.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    by_kernel: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_kernel.setdefault(row["kernel"], {})[row["impl"]] = row
    print(f"\n{'kernel':<40} {'cuda GB/s':>10} {'torch GB/s':>11} {'speedup':>8}")
    for kernel, impls in by_kernel.items():
        c, t = impls["cuda"], impls["torch"]
        print(f"{kernel:<40} {c['GBps']:>10.1f} {t['GBps']:>11.1f} {t['ms'] / c['ms']:>7.1f}x")
    print(f"\nrows written to {path}")
    if failures:
        print(f"\n{len(failures)} CHECKS FAILED:", *failures[:40], sep="\n  ")
    else:
        print("\nall correctness checks passed")
    print(f"gpu_check took {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
