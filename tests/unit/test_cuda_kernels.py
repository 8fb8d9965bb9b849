"""fmcomm.compression.cuda_kernels: the CUDA compression kernels (csrc/cuda/compress.cu).

Without a GPU: the library is built wherever nvcc is (setup.py) and exports every
launcher; its host emulation (the kernels' own element arithmetic and top-k selection
logic, run on the CPU) equals the torch fallback bit for bit; arguments are checked; and
``import fmcomm`` does not load the library.

With a GPU (``-m gpu``; skipped unless torch sees a GPU and the kernels run on it): every
kernel equals the torch fallback on the same device bit for bit, on the contract's edge
cases, except onebit_encode's scale, which is a deterministic GPU reduction within 1e-6
of the CPU's (the module docstring says why).

Float results are compared as raw bits; where both are NaN only that is required (NaN
payloads are not part of the contract). fp8 codes are compared exactly.
"""
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmcomm.compression import cuda_kernels as ck
from fmcomm.errors import InvalidArgument, UnsupportedError

try:
    from fmcomm.compression import kernels as K
except ImportError:  # pragma: no cover - the fallback module is another part of the tree
    K = None

ROOT = Path(__file__).resolve().parents[2]
LIB = ck.library_path()
FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0, 0), "e5m2": (torch.float8_e5m2, 57344.0, 1)}
LAUNCHERS = ("fmcomm_cuda_fp8_encode", "fmcomm_cuda_fp8_decode", "fmcomm_cuda_onebit_encode",
             "fmcomm_cuda_onebit_encode_with_scale", "fmcomm_cuda_onebit_decode", "fmcomm_cuda_topk_select",
             "fmcomm_cuda_scatter_add", "fmcomm_cuda_onebit_workspace_bytes", "fmcomm_cuda_topk_workspace_bytes",
             "fmcomm_cuda_probe", "fmcomm_cuda_abi_version", "fmcomm_cuda_error_string", "fmcomm_cuda_build_info")


def find_nvcc():
    """The nvcc setup.py would use: $CUDA_HOME/bin (or $CUDA_PATH/bin), else PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidate = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def _gpu_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    why = ck.why_unavailable()
    return f"CUDA kernels unavailable: {why}" if why else ""


_GPU_SKIP = _gpu_reason()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(bool(_GPU_SKIP), reason=_GPU_SKIP or "-")
needs_lib = pytest.mark.skipif(not LIB.exists(), reason=f"{LIB.name} not built (no nvcc?)")


def _host_lib():
    lib = ck._load_library()
    assert lib is not None, ck._load_error
    return lib


# ---------------------------------------------------------------------------------------
# References: the torch fallback of fmcomm.compression.kernels (impl="torch"), or, where
# that module lacks a function, the contract's torch expressions written out here.


def ref_fp8_encode(x, out, scale, block, fmt, residual=None):
    if K is not None and hasattr(K, "fp8_encode"):
        return K.fp8_encode(x, out, scale, block, fmt, residual=residual, impl="torch")
    dtype, mx, _ = FORMATS[fmt]
    n = x.numel()
    c = x if residual is None else x + residual
    s = scale.repeat_interleave(block)[:n]
    q = torch.clamp(c * s, -mx, mx).to(dtype)
    out.copy_(q.view(torch.uint8))
    if residual is not None:
        residual.copy_(c - q.to(torch.float32) / s)


def ref_fp8_decode(q, out, scale, block, fmt, accumulate=False):
    if K is not None and hasattr(K, "fp8_decode"):
        return K.fp8_decode(q, out, scale, block, fmt, accumulate=accumulate, impl="torch")
    d = q.view(FORMATS[fmt][0]).to(torch.float32) / scale.repeat_interleave(block)[:q.numel()]
    out.copy_(out + d if accumulate else d)


def ref_onebit_encode(x, out, residual=None) -> float:
    if K is not None and hasattr(K, "onebit_encode"):
        return K.onebit_encode(x, out, residual=residual, impl="torch")
    n = x.numel()
    if n == 0:
        return 0.0
    c = x if residual is None else x + residual
    signs = np.zeros(n + (-n) % 8, dtype=np.uint8)
    signs[:n] = (c < 0).cpu().numpy()
    out.copy_(torch.from_numpy(np.packbits(signs, bitorder="little")))
    mags = np.zeros(n + (-n) % 8)
    mags[:n] = c.abs().double().cpu().numpy()
    lanes = mags.reshape(-1, 8).cumsum(0)[-1].tolist()
    total = lanes[0]
    for lane in lanes[1:]:
        total += lane
    scale = float(np.float32(total / n))
    if residual is not None:
        s = torch.tensor(scale, dtype=torch.float32, device=c.device)
        residual.copy_(c - torch.where(c < 0, -s, s))
    return scale


def ref_onebit_decode(bits, out, scale, accumulate=False):
    if K is not None and hasattr(K, "onebit_decode"):
        return K.onebit_decode(bits, out, scale, accumulate=accumulate, impl="torch")
    n = out.numel()
    b = torch.from_numpy(np.unpackbits(bits.cpu().numpy(), bitorder="little")[:n].astype(bool)).to(out.device)
    s = torch.tensor(float(np.float32(scale)), dtype=torch.float32, device=out.device)
    d = torch.where(b, -s, s)
    out.copy_(out + d if accumulate else d)


def ref_topk_select(x, k, idx_out, val_out, residual=None):
    if K is not None and hasattr(K, "topk_select"):
        return K.topk_select(x, k, idx_out, val_out, residual=residual, impl="torch")
    c = x if residual is None else x + residual
    idx = torch.sort(torch.sort(c.abs(), descending=True, stable=True).indices[:k]).values
    idx_out.copy_(idx)
    val_out.copy_(c[idx])
    if residual is not None:
        residual.copy_(c)
        residual[idx] = 0.0


def ref_scatter_add(idx, val, out):
    if K is not None and hasattr(K, "scatter_add"):
        return K.scatter_add(idx, val, out, impl="torch")
    out.index_add_(0, idx.long(), val)


# ---------------------------------------------------------------------------------------
# Comparison and inputs


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = ""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    got, want = got.cpu(), want.cpu()
    if got.is_floating_point():
        differ = (got.view(torch.int32) != want.view(torch.int32)) & ~(got.isnan() & want.isnan())
    else:
        differ = got != want
    idx = differ.nonzero().flatten()[:5].tolist()
    assert not idx, (f"{what}: {int(differ.sum())} of {got.numel()} differ, first at {idx}: "
                     f"{got[idx].tolist()} vs {want[idx].tolist()}")


def fp8_nan(q: torch.Tensor, fmt: str) -> torch.Tensor:
    low = q & 0x7F
    return low == 0x7F if fmt == "e4m3" else low > 0x7C


def assert_same_codes(got: torch.Tensor, want: torch.Tensor, fmt: str, what: str = ""):
    """fp8 codes equal, except that any NaN code matches any other: the sign of a NaN that
    float arithmetic produced is the hardware's choice (a GPU returns its canonical NaN)."""
    got, want = got.cpu(), want.cpu()
    nan = fp8_nan(got, fmt) & fp8_nan(want, fmt)
    assert_same_bits(torch.where(nan, 0, got), torch.where(nan, 0, want), what)


SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 1e-45, -1e-45, 1e-40, 1.17549435e-38,
            3.4028235e38, -3.4028235e38, 448.0, -448.0, 464.0, 479.9, 480.0, 57344.0, 61439.0, 61440.0, 2.0**-6,
            2.0**-9, 2.0**-10, 3 * 2.0**-11, 2.0**-14, 2.0**-16, 2.0**-17, 3 * 2.0**-18, 1.0, -1.0, 0.5]


def mixed_values(n: int, g: torch.Generator, finite: bool = False) -> torch.Tensor:
    """Ordinary values over many magnitudes, random bit patterns and the specials above."""
    if n == 0:
        return torch.empty(0)
    mag = torch.pow(10.0, torch.randint(-12, 6, (n,), generator=g).float())
    x = torch.randn(n, generator=g) * mag
    raw = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(torch.float32)
    pick = torch.rand(n, generator=g) < 0.15
    x = torch.where(pick, raw, x)
    sp = torch.tensor(SPECIALS, dtype=torch.float32)
    where = torch.randint(0, n, (max(1, n // 10),), generator=g)
    x[where] = sp[torch.randint(0, len(SPECIALS), (where.numel(),), generator=g)]
    if finite:
        x = torch.where(torch.isfinite(x), x, torch.ones_like(x))
    return x


def fp8_patterns() -> torch.Tensor:
    """Every upper half-word of a float32 with 9 lower half-words: all signs and exponents,
    and each rounding boundary of both fp8 formats (exact ties, one above, one below)."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x5555, 0xAAAA, 0x1234], dtype=np.uint32)
    return torch.from_numpy((hi[:, None] | lows[None, :]).ravel().view(np.float32).copy())


def scales_for(n: int, block: int, g: torch.Generator) -> torch.Tensor:
    nb = -(-n // block)
    return torch.pow(2.0, torch.randint(-8, 12, (nb,), generator=g).float()) * (1 + torch.rand(nb, generator=g))


# ---------------------------------------------------------------------------------------
# Without a GPU: the build, the host emulation, the argument checks


def test_library_built_and_exports_every_launcher():
    if os.environ.get("BUILD_FMCOMM_CUDA", "").strip().lower() == "off":
        pytest.skip("BUILD_FMCOMM_CUDA=off")
    nvcc = find_nvcc()
    if nvcc is None and not LIB.exists():
        pytest.skip("no nvcc ($CUDA_HOME/bin or PATH): the CUDA kernels are not built")
    assert LIB.exists(), f"nvcc is at {nvcc} but {LIB} is missing: `python setup.py build_ext --inplace` builds it"
    lib = ctypes.CDLL(str(LIB), mode=ctypes.RTLD_LOCAL)  # loading it starts no CUDA
    missing = [name for name in (*LAUNCHERS, *ck.SIGNATURES) if not hasattr(lib, name)]
    assert not missing, f"{LIB.name} lacks {missing}"
    lib.fmcomm_cuda_build_info.restype = ctypes.c_char_p
    info = lib.fmcomm_cuda_build_info().decode()
    assert "sm_80" in info and "sm_90" in info, info
    assert lib.fmcomm_cuda_abi_version() == ck.ABI_VERSION
    nm = shutil.which("nm")
    if nm:  # only fmcomm's entry points are exported: the static CUDA runtime stays private
        out = subprocess.run([nm, "-D", "--defined-only", str(LIB)], capture_output=True, text=True, check=True).stdout
        exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
        ours = {name for name in exported if name.startswith("fmcomm_cuda_")}
        assert ours == set(ck.SIGNATURES), ours ^ set(ck.SIGNATURES)
        assert not [name for name in exported if name.startswith("cuda")], "cudart symbols are exported"


def test_import_fmcomm_does_not_load_the_cuda_library():
    code = ("import sys, fmcomm, fmcomm.compression.kernels\n"
            "from fmcomm.compression import cuda_kernels\n"
            "maps = open('/proc/self/maps').read()\n"
            "print(cuda_kernels._lib is None, '_cuda_kernels.so' not in maps)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"], out.stdout


@needs_lib
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_host_fp8_encode_rounding_equals_torch(fmt):
    # The device's conversion code, run on the CPU, over every float32 exponent and sign
    # and every rounding boundary, at scale 1 (v = x exactly). All 2^32 patterns were
    # checked once when this was written; this is the lasting subset.
    lib = _host_lib()
    x = fp8_patterns()
    n = x.numel()
    one = torch.ones(1)
    got = torch.empty(n, dtype=torch.uint8)
    lib.fmcomm_cuda_host_fp8_encode(x.data_ptr(), None, got.data_ptr(), one.data_ptr(), n, n, FORMATS[fmt][2])
    want = torch.empty(n, dtype=torch.uint8)
    ref_fp8_encode(x, want, one, n, fmt)
    assert_same_bits(got, want, f"{fmt} codes")


@needs_lib
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n,block", [(1, 1), (13, 4), (4099, 128), (20000, 20000), (20000, 7)])
def test_host_fp8_encode_with_scales_and_residual(fmt, with_residual, n, block):
    lib = _host_lib()
    g = torch.Generator().manual_seed(n * 31 + block)
    x = mixed_values(n, g)
    scale = scales_for(n, block, g)
    r0 = mixed_values(n, g, finite=True) * 0.01 if with_residual else None
    got, want = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    r_got = None if r0 is None else r0.clone()
    r_want = None if r0 is None else r0.clone()
    lib.fmcomm_cuda_host_fp8_encode(x.data_ptr(), None if r_got is None else r_got.data_ptr(), got.data_ptr(),
                                    scale.data_ptr(), n, block, FORMATS[fmt][2])
    ref_fp8_encode(x, want, scale, block, fmt, residual=r_want)
    assert_same_bits(got, want, "codes")
    if with_residual:
        assert_same_bits(r_got, r_want, "residual")


@needs_lib
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("accumulate", [False, True])
def test_host_fp8_decode_equals_torch(fmt, accumulate):
    lib = _host_lib()
    g = torch.Generator().manual_seed(7)
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(40)
    n, block = q.numel(), 256
    scale = scales_for(n, block, g)
    base = torch.randn(n, generator=g)
    got, want = base.clone(), base.clone()
    lib.fmcomm_cuda_host_fp8_decode(q.data_ptr(), got.data_ptr(), scale.data_ptr(), n, block, FORMATS[fmt][2],
                                    int(accumulate))
    ref_fp8_decode(q, want, scale, block, fmt, accumulate=accumulate)
    assert_same_bits(got, want, "decoded")


@needs_lib
@pytest.mark.parametrize("n", [1, 8, 13, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_host_onebit_bits_and_residual_equal_torch(n, with_residual):
    lib = _host_lib()
    g = torch.Generator().manual_seed(n)
    x = mixed_values(n, g, finite=True)
    x[: min(n, 4)] = torch.tensor([0.0, -0.0, -1.0, 1.0])[: min(n, 4)]
    r0 = torch.randn(n, generator=g) if with_residual else None
    want = torch.empty(-(-n // 8), dtype=torch.uint8)
    r_want = None if r0 is None else r0.clone()
    scale = ref_onebit_encode(x, want, residual=r_want)
    got = torch.full_like(want, 0xFF)
    r_got = None if r0 is None else r0.clone()
    lib.fmcomm_cuda_host_onebit_encode_with_scale(x.data_ptr(), None if r_got is None else r_got.data_ptr(),
                                                  got.data_ptr(), n, scale)
    assert_same_bits(got, want, "bits")
    if with_residual:
        assert_same_bits(r_got, r_want, "residual")


def topk_cases():
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(-3, 4, (10000,), generator=g).float()  # long runs of equal |c| across tiles
    nan = torch.randn(5000, generator=g)
    nan[[7, 99, 4000]] = float("nan")
    nan[100] = -float("nan")
    denorm = torch.randint(1, 1 << 10, (3000,), generator=g, dtype=torch.int32).view(torch.float32)
    cases = [
        ("random", torch.randn(10000, generator=g), [0, 1, 100, 9999, 10000]),
        ("ties", ties, [1, 1500, 2857, 5000, 10000]),
        ("all_equal", torch.full((4097,), -2.5), [0, 1, 4096, 4097]),
        ("zeros", torch.tensor([0.0, -0.0] * 50), [0, 3, 100]),
        ("single", torch.tensor([-7.0]), [0, 1]),
        ("inf", torch.tensor([1.0, float("inf"), -float("inf"), 3.0, -3.0]), [1, 2, 3, 5]),
        ("nan", nan, [1, 3, 4, 5, 50, 5000]),
        ("denormals", denorm, [1, 10, 2999]),
        ("magnitudes", mixed_values(9000, g, finite=True), [90, 900]),
    ]
    return [(name, x, k) for name, x, ks in cases for k in ks]


@needs_lib
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("name,x,k", topk_cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_host_topk_selection_logic_equals_torch(name, x, k, with_residual):
    lib = _host_lib()
    n = x.numel()
    g = torch.Generator().manual_seed(k)
    r0 = torch.randn(n, generator=g) * 0.5 if with_residual else None
    if name in ("ties", "all_equal", "zeros") and with_residual:
        r0 = torch.zeros(n)  # keep the ties tied
    idx_w, val_w = torch.empty(k, dtype=torch.int32), torch.empty(k)
    r_w = None if r0 is None else r0.clone()
    ref_topk_select(x, k, idx_w, val_w, residual=r_w)
    idx_g, val_g = torch.full((k,), -1, dtype=torch.int32), torch.empty(k)
    r_g = None if r0 is None else r0.clone()
    found = lib.fmcomm_cuda_host_topk_select(x.data_ptr(), None if r_g is None else r_g.data_ptr(), n, k,
                                             idx_g.data_ptr(), val_g.data_ptr())
    assert found == (3 if k else 0)
    assert_same_bits(idx_g, idx_w, "indices")
    assert_same_bits(val_g, val_w, "values")
    if with_residual:
        assert_same_bits(r_g, r_w, "residual")


def test_arguments_are_checked_before_the_device():
    x = torch.zeros(10)
    out = torch.zeros(10, dtype=torch.uint8)
    scale = torch.ones(1)
    checks = [
        (lambda: ck.fp8_encode(x.int(), out, scale, 10, "e4m3"), "x"),
        (lambda: ck.fp8_encode(x, out, scale, 10, "e3m4"), "fmt"),
        (lambda: ck.fp8_encode(x, out, scale, 0, "e4m3"), "block"),
        (lambda: ck.fp8_encode(x, out, scale, True, "e4m3"), "block"),
        (lambda: ck.fp8_encode(x, out, torch.ones(2), 10, "e4m3"), "scale_f32"),
        (lambda: ck.fp8_encode(x, out[:9], scale, 10, "e4m3"), "out_u8"),
        (lambda: ck.fp8_encode(x, out, scale, 10, "e4m3", residual=torch.zeros(2, 5)), "residual"),
        (lambda: ck.fp8_encode(torch.zeros(20)[::2], out, scale, 10, "e4m3"), "x"),
        (lambda: ck.fp8_decode(out, x, torch.ones(4), 3, "e5m2", accumulate=1), "accumulate"),
        (lambda: ck.fp8_decode(out, x.double(), torch.ones(4), 3, "e5m2"), "out_f32"),
        (lambda: ck.onebit_encode(x, torch.zeros(1, dtype=torch.uint8)), "out_u8"),
        (lambda: ck.onebit_decode(torch.zeros(2, dtype=torch.uint8), x, "1.0"), "scale"),
        (lambda: ck.topk_select(x, 11, torch.zeros(11, dtype=torch.int32), torch.zeros(11)), "k"),
        (lambda: ck.topk_select(x, -1, torch.zeros(0, dtype=torch.int32), torch.zeros(0)), "k"),
        (lambda: ck.topk_select(x, 2, torch.zeros(2, dtype=torch.int64), torch.zeros(2)), "idx_out_i32"),
        (lambda: ck.topk_select(x, 2, torch.zeros(2, dtype=torch.int32), torch.zeros(3)), "val_out_f32"),
        (lambda: ck.scatter_add(torch.zeros(2, dtype=torch.int64), torch.zeros(2), x), "idx_i32"),
        (lambda: ck.scatter_add(torch.zeros(2, dtype=torch.int32), torch.zeros(3), x), "val_f32"),
        # everything else right, but on the CPU
        (lambda: ck.fp8_encode(x, out, scale, 10, "e4m3"), "x must be a CUDA tensor"),
        (lambda: ck.onebit_encode(x, torch.zeros(2, dtype=torch.uint8)), "x must be a CUDA tensor"),
        (lambda: ck.scatter_add(torch.zeros(2, dtype=torch.int32), torch.zeros(2), x), "must be a CUDA tensor"),
    ]
    for call, name in checks:
        with pytest.raises(InvalidArgument, match=name):
            call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_unavailable_without_a_gpu():
    assert not ck.available()
    assert ck.why_unavailable()
    with pytest.raises(UnsupportedError, match="not available"):
        ck._require(torch.device("cuda", 0), "fp8_encode")


# ---------------------------------------------------------------------------------------
# With a GPU: each kernel against the torch fallback on the same device


def cuda_vector(values: torch.Tensor, offset: int) -> torch.Tensor:
    """values on the GPU, starting `offset` elements into a larger buffer (offset 1: unaligned)."""
    buf = torch.empty(values.numel() + offset, dtype=values.dtype, device="cuda")
    v = buf[offset:]
    v.copy_(values)
    return v


SIZES = [0, 1, 3, 4, 5, 8, 9, 1000, 4099, 16384 * 3 + 5, 1 << 20]


@gpu
@needs_gpu
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_fp8_encode(fmt, with_residual, n, offset):
    g = torch.Generator().manual_seed(n + offset)
    x = cuda_vector(mixed_values(n, g), offset)
    for block in sorted({1, 3, 128, max(n, 1)}):
        scale = scales_for(n, block, g).cuda()
        r0 = cuda_vector(mixed_values(n, g, finite=True) * 0.01, offset) if with_residual else None
        got = cuda_vector(torch.zeros(n, dtype=torch.uint8), offset)
        want = torch.zeros(n, dtype=torch.uint8, device="cuda")
        r_got = None if r0 is None else cuda_vector(r0, offset)
        r_want = None if r0 is None else r0.clone()
        ck.fp8_encode(x, got, scale, block, fmt, residual=r_got)
        ref_fp8_encode(x, want, scale, block, fmt, residual=r_want)
        assert_same_codes(got, want, fmt, f"codes block={block}")
        if with_residual:
            assert_same_bits(r_got, r_want, f"residual block={block}")
        # and the CPU's bits
        cpu = torch.zeros(n, dtype=torch.uint8)
        r_cpu = None if r0 is None else r0.cpu().clone()
        ref_fp8_encode(x.cpu(), cpu, scale.cpu(), block, fmt, residual=r_cpu)
        assert_same_codes(got, cpu, fmt, f"codes vs CPU block={block}")
        if with_residual:
            assert_same_bits(r_got, r_cpu, f"residual vs CPU block={block}")


@gpu
@needs_gpu
def test_gpu_fp8_encode_every_rounding_boundary():
    x = fp8_patterns().cuda()
    n = x.numel()
    one = torch.ones(1, device="cuda")
    for fmt in FORMATS:
        got, want = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
        ck.fp8_encode(x, got, one, n, fmt)
        ref_fp8_encode(x, want, one, n, fmt)
        assert_same_codes(got, want, fmt, fmt)
        cpu = torch.empty(n, dtype=torch.uint8)
        ref_fp8_encode(x.cpu(), cpu, one.cpu(), n, fmt)
        assert_same_codes(got, cpu, fmt, f"{fmt} vs CPU")


@gpu
@needs_gpu
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_fp8_decode(fmt, accumulate, n, offset):
    g = torch.Generator().manual_seed(n + 7 * offset)
    q = cuda_vector(torch.randint(0, 256, (n,), generator=g, dtype=torch.int32).to(torch.uint8), offset)
    base = mixed_values(n, g, finite=True)
    for block in sorted({1, 3, 128, max(n, 1)}):
        scale = scales_for(n, block, g).cuda()
        got = cuda_vector(base, offset)
        want = base.cuda()
        ck.fp8_decode(q, got, scale, block, fmt, accumulate=accumulate)
        ref_fp8_decode(q, want, scale, block, fmt, accumulate=accumulate)
        assert_same_bits(got, want, f"block={block}")


@gpu
@needs_gpu
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_onebit_encode(with_residual, n, offset):
    g = torch.Generator().manual_seed(n + 3 * offset)
    x = cuda_vector(mixed_values(n, g, finite=True), offset)
    if n >= 4:
        x[:4] = torch.tensor([0.0, -0.0, -1.0, 1.0], device="cuda")
    r0 = cuda_vector(torch.randn(n, generator=g), offset) if with_residual else None
    nbytes = -(-n // 8)
    want = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    r_want = None if r0 is None else r0.clone()
    cpu_scale = ref_onebit_encode(x, want, residual=r_want)
    # sign bits and residual given the CPU's scale: exact
    got = cuda_vector(torch.full((nbytes,), 0xFF, dtype=torch.uint8), offset)
    r_got = None if r0 is None else cuda_vector(r0, offset)
    ck._onebit_encode_with_scale(x, got, cpu_scale, residual=r_got)
    assert_same_bits(got, want, "bits")
    if with_residual:
        assert_same_bits(r_got, r_want, "residual")
    # the full kernel: same bits, its own scale (deterministic, close to the CPU's), and
    # the residual that scale gives
    got2 = cuda_vector(torch.full((nbytes,), 0xFF, dtype=torch.uint8), offset)
    r_got2 = None if r0 is None else cuda_vector(r0, offset)
    scale = ck.onebit_encode(x, got2, residual=r_got2)
    assert isinstance(scale, float) and float(np.float32(scale)) == scale
    assert_same_bits(got2, want, "bits (full kernel)")
    if n == 0:
        assert scale == 0.0
    else:
        assert abs(scale - cpu_scale) <= 1e-6 * abs(cpu_scale), (scale, cpu_scale)
    if with_residual:
        c = x + r0
        s = torch.tensor(scale, dtype=torch.float32, device="cuda")
        assert_same_bits(r_got2, c - torch.where(c < 0, -s, s), "residual (full kernel)")
    if not with_residual:  # deterministic: the same bits again
        assert np.float32(ck.onebit_encode(x, got2)).tobytes() == np.float32(scale).tobytes()


@gpu
@needs_gpu
def test_gpu_onebit_scale_deterministic_and_close_at_scale():
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(1 << 24, generator=g) * torch.pow(10.0, torch.randint(-3, 3, (1 << 24,), generator=g))).cuda()
    bits = torch.empty((1 << 24) // 8, dtype=torch.uint8, device="cuda")
    scales = {np.float32(ck.onebit_encode(x, bits)).tobytes() for _ in range(3)}
    assert len(scales) == 1
    cpu_scale = ref_onebit_encode(x.cpu(), torch.empty_like(bits, device="cpu"))
    scale = ck.onebit_encode(x, bits)
    assert abs(scale - cpu_scale) <= 1e-6 * cpu_scale, (scale, cpu_scale)


@gpu
@needs_gpu
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_onebit_decode(accumulate, n, offset):
    g = torch.Generator().manual_seed(n + 5 * offset)
    bits = cuda_vector(torch.randint(0, 256, (-(-n // 8),), generator=g, dtype=torch.int32).to(torch.uint8), offset)
    base = torch.randn(n, generator=g)
    for scale in (0.3, 1e-30, 3.0e38, 1.0000001):
        got, want = cuda_vector(base, offset), base.cuda()
        ck.onebit_decode(bits, got, scale, accumulate=accumulate)
        ref_onebit_decode(bits, want, scale, accumulate=accumulate)
        assert_same_bits(got, want, f"scale={scale}")


@gpu
@needs_gpu
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("name,x,k", topk_cases(), ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_topk_select(name, x, k, with_residual, offset):
    n = x.numel()
    g = torch.Generator().manual_seed(k + offset)
    r0 = torch.randn(n, generator=g) * 0.5 if with_residual else None
    if name in ("ties", "all_equal", "zeros") and with_residual:
        r0 = torch.zeros(n)
    xc = cuda_vector(x, offset)
    idx_w = torch.empty(k, dtype=torch.int32, device="cuda")
    val_w = torch.empty(k, device="cuda")
    r_w = None if r0 is None else r0.cuda()
    ref_topk_select(xc, k, idx_w, val_w, residual=r_w)
    idx_g = cuda_vector(torch.full((k,), -1, dtype=torch.int32), offset)
    val_g = cuda_vector(torch.zeros(k), offset)
    r_g = None if r0 is None else cuda_vector(r0, offset)
    ck.topk_select(xc, k, idx_g, val_g, residual=r_g)
    assert_same_bits(idx_g, idx_w, "indices")
    assert_same_bits(val_g, val_w, "values")
    if with_residual:
        assert_same_bits(r_g, r_w, "residual")


@gpu
@needs_gpu
@pytest.mark.parametrize("n,k", [(1 << 20, 1 << 13), ((1 << 22) + 17, 41943), (3 * 4096 + 1, 1)])
def test_gpu_topk_select_large(n, k):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.pow(10.0, torch.randint(-4, 4, (n,), generator=g))).cuda()
    x[:: 97] = x[5]  # ties across many tiles
    r0 = (torch.randn(n, generator=g) * 1e-3).cuda()
    idx_w, val_w, r_w = torch.empty(k, dtype=torch.int32, device="cuda"), torch.empty(k, device="cuda"), r0.clone()
    ref_topk_select(x, k, idx_w, val_w, residual=r_w)
    idx_g, val_g, r_g = torch.empty(k, dtype=torch.int32, device="cuda"), torch.empty(k, device="cuda"), r0.clone()
    ck.topk_select(x, k, idx_g, val_g, residual=r_g)
    assert_same_bits(idx_g, idx_w, "indices")
    assert_same_bits(val_g, val_w, "values")
    assert_same_bits(r_g, r_w, "residual")


@gpu
@needs_gpu
@pytest.mark.parametrize("m,n", [(0, 10), (1, 1), (7, 100), (5000, 5000), (100000, 1 << 20)])
def test_gpu_scatter_add(m, n):
    g = torch.Generator().manual_seed(m)
    idx = torch.randperm(n, generator=g)[:m].to(torch.int32).cuda()
    val = mixed_values(m, g, finite=True).cuda()
    base = torch.randn(n, generator=g).cuda()
    got, want = base.clone(), base.clone()
    ck.scatter_add(idx, val, got)
    ref_scatter_add(idx, val, want)
    assert_same_bits(got, want, "out")


@gpu
@needs_gpu
def test_gpu_scatter_add_checks_the_indices():
    out = torch.zeros(10, device="cuda")
    for bad in (-1, 10):
        with pytest.raises(InvalidArgument, match="idx_i32"):
            ck.scatter_add(torch.tensor([0, bad], dtype=torch.int32, device="cuda"), torch.ones(2, device="cuda"), out)
    assert not out.any()
    ck._scatter_add_unchecked(torch.tensor([3, 99, -5], dtype=torch.int32, device="cuda"),
                              torch.ones(3, device="cuda"), out)  # the kernel skips what is out of range
    assert out.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]


@gpu
@needs_gpu
def test_gpu_runs_on_the_current_stream_and_checks_devices_and_overlap():
    g = torch.Generator().manual_seed(1)
    n = 1 << 20
    x = torch.randn(n, generator=g).cuda()
    scale = torch.ones(1, device="cuda")
    want = torch.empty(n, dtype=torch.uint8, device="cuda")
    ref_fp8_encode(x, want, scale, n, "e4m3")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = torch.empty(n, dtype=torch.uint8, device="cuda")
        ck.fp8_encode(x, got, scale, n, "e4m3")
        idx = torch.empty(10, dtype=torch.int32, device="cuda")
        val = torch.empty(10, device="cuda")
        ck.topk_select(x, 10, idx, val)
    side.synchronize()
    assert_same_bits(got, want, "codes on a side stream")
    with pytest.raises(InvalidArgument, match="CUDA tensor|is on"):
        ck.fp8_encode(x, want.cpu(), scale, n, "e4m3")
    with pytest.raises(InvalidArgument, match="overlaps"):
        ck.fp8_encode(x, want, scale, n, "e4m3", residual=x)


@gpu
@needs_gpu
def test_gpu_dispatch_from_the_kernels_module():
    if K is None or not hasattr(K, "fp8_encode"):
        pytest.skip("fmcomm.compression.kernels has no fp8_encode")
    x = torch.randn(1000, device="cuda")
    scale = torch.full((8,), 3.0, device="cuda")
    via, direct = torch.empty(1000, dtype=torch.uint8, device="cuda"), torch.empty(1000, dtype=torch.uint8, device="cuda")
    K.fp8_encode(x, via, scale, 128, "e5m2", impl="native")  # CUDA tensors: these kernels
    ck.fp8_encode(x, direct, scale, 128, "e5m2")
    assert_same_bits(via, direct, "dispatched")
