// Gradient compression kernels: fp8 with per-block scales, 1-bit signs with a mean-magnitude
// scale, and top-k sparsification, each optionally fused with the error-feedback update.
//
// Every arithmetic step is fixed by the contract in fmcomm/compression/kernels.py (also
// csrc/cpu/COMPRESS_CONTRACT.md) so that these kernels, the torch fallback and the CUDA
// kernels give identical bits. Consequences for this code:
//  - one IEEE float32 operation per contract step, in the contract's order; no step is a
//    product followed by a sum, so no compiler may contract two steps into an FMA;
//  - the only reduction (the 1-bit scale) keeps the contract's fixed summation order;
//  - the hot loops are compiled twice, for AVX2 and for baseline x86-64, and picked at run
//    time; both builds do the same operations, so their results are identical.
//
// All pointers are raw element addresses of buffers that fmcomm/compression/kernels.py has
// already checked (sizes, dtypes, no overlap between inputs and outputs). `residual` may be
// null: then c = x and nothing is written back. Nothing here allocates except topk_select.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fmcomm {

enum class Fp8Format : int { e4m3 = 0, e5m2 = 1 };

// out[i] = fp8(clamp(c[i] * scale[i / block], -max, max)), rounded to nearest even;
// with residual: c = x + residual, then residual[i] = c[i] - decode(out[i]).
void fp8_encode(const float* x, float* residual, uint8_t* out, const float* scale, std::size_t n,
                std::size_t block, Fp8Format fmt);

// d = float(q[i]) / scale[i / block]; out[i] = d, or out[i] += d when accumulate.
void fp8_decode(const uint8_t* q, float* out, const float* scale, std::size_t n, std::size_t block,
                Fp8Format fmt, bool accumulate);

// Bit i%8 of out[i/8] = (c[i] < 0); returns mean |c| (float64 sum in 8 interleaved lanes).
// With residual: residual[i] = c[i] - (c[i] < 0 ? -scale : scale).
float onebit_encode(const float* x, float* residual, uint8_t* out, std::size_t n);

// out[i] = bit i ? -scale : scale, or out[i] += that when accumulate.
void onebit_decode(const uint8_t* bits, float* out, float scale, std::size_t n, bool accumulate);

// The k elements of largest |c| (ties: lower index first), written in increasing index order
// to idx_out/val_out; with residual: residual = c with the selected elements zeroed.
// Requires k <= n <= INT32_MAX.
void topk_select(const float* x, float* residual, std::size_t n, std::size_t k, int32_t* idx_out,
                 float* val_out);

// out[idx[j]] += val[j] for j = 0..count-1, in order (indices are in range: checked by the caller).
void scatter_add(const int32_t* idx, const float* val, std::size_t count, float* out);

// Which build of the hot loops runs: "avx2" or "default". set_compress_isa lets tests run
// both on one machine; it returns false (and changes nothing) for a build this CPU lacks.
const char* compress_isa();
bool set_compress_isa(const char* name);

}  // namespace fmcomm
