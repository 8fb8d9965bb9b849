// Element-level arithmetic of fmcomm's compression kernels, shared by the CUDA kernels
// (csrc/cuda/compress.cu) and the host emulation exported next to them, so the exact
// rounding logic can be checked bit for bit against torch on a machine without a GPU.
//
// Everything here is __host__ __device__ and uses no CUDA runtime call. Floating-point
// operations go through add_rn/sub_rn/mul_rn/div_rn: on the device these are the
// __f*_rn intrinsics (IEEE round-to-nearest-even, never contracted into an FMA); on the
// host plain operators, compiled with -ffp-contract=off.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FMC_HD __host__ __device__ __forceinline__
#else
#define FMC_HD inline
#endif

namespace fmcomm_cuda {

enum Fp8Fmt : int { kE4M3 = 0, kE5M2 = 1 };

FMC_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FMC_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FMC_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FMC_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

FMC_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FMC_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FMC_HD int clz32(uint32_t v) {  // v != 0
#if defined(__CUDA_ARCH__)
  return __clz(v);
#else
  return __builtin_clz(v);
#endif
}

// Round the non-negative integer m / 2^shift to the nearest integer, ties to even.
FMC_HD uint32_t shift_rne(uint32_t m, int shift) {
  if (shift <= 0) return m;
  if (shift >= 32) return 0;  // m < 2^24 here, so m / 2^shift < 1/2
  uint32_t q = m >> shift;
  uint32_t rem = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return q;
}

// float32 -> fp8 bits, round to nearest even, |v| beyond the largest finite value
// (including +-inf) saturating to +-max finite, NaN to NaN with its sign kept. Equal bit
// for bit to torch.clamp(v, -MAX, MAX).to(torch.float8_*) (c10's fp8*_from_fp32_value),
// but in integer arithmetic only: c10 rounds subnormals with a float addition, which is
// exact here as shift_rne (same ties-to-even on the same unit 2^(1-bias-mbits)).
template <int FMT>
FMC_HD uint8_t fp8_from_float(float v) {
  constexpr int kMant = FMT == kE4M3 ? 3 : 2;
  constexpr int kBias = FMT == kE4M3 ? 7 : 15;
  constexpr uint32_t kMaxBits = FMT == kE4M3 ? 0x43E00000u : 0x47600000u;  // 448, 57344
  constexpr uint32_t kMaxCode = FMT == kE4M3 ? 0x7Eu : 0x7Bu;
  constexpr uint32_t kMinNormalBits = uint32_t(1 - kBias + 127) << 23;       // 2^-6, 2^-14
  const uint32_t bits = f2u(v);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  uint32_t r;
  if (a > 0x7F800000u) {
    r = 0x7Fu;  // NaN (e4m3fn's only NaN code; one of e5m2's)
  } else if (a >= kMaxBits) {
    r = kMaxCode;  // saturate, +-inf included
  } else if (a < kMinNormalBits) {
    // fp8 subnormal (or zero): a multiple of 2^(1 - bias - mant). The result may be
    // 1 << kMant, which is exactly the bit pattern of the smallest normal.
    const uint32_t e_field = a >> 23;
    const uint32_t m = (a & 0x7FFFFFu) | (e_field ? 0x800000u : 0u);
    const int e = e_field ? int(e_field) - 127 : -126;
    r = shift_rne(m, 24 - kBias - kMant - e);
  } else {
    // normal: c10's integer rounding (bias the dropped bits by half an ulp minus one,
    // plus the lowest kept bit, then truncate).
    constexpr int kDrop = 23 - kMant;
    uint32_t f = a;
    const uint32_t odd = (f >> kDrop) & 1u;
    f += (uint32_t(kBias - 127) << 23) + ((1u << (kDrop - 1)) - 1u) + odd;
    r = f >> kDrop;  // < 0x7F (e4m3) / < 0x7C (e5m2): |v| < max was checked above
  }
  return static_cast<uint8_t>(sign | r);
}

// fp8 bits -> float32 (exact). NaN codes give a quiet NaN of the same sign (payload as
// c10: 0x7FF00000 for e4m3fn, the fp16 widening's for e5m2; payloads are no part of the
// contract).
template <int FMT>
FMC_HD float fp8_to_float(uint8_t q) {
  constexpr int kMant = FMT == kE4M3 ? 3 : 2;
  constexpr int kBias = FMT == kE4M3 ? 7 : 15;
  constexpr uint32_t kExpMax = FMT == kE4M3 ? 15u : 31u;
  const uint32_t sign = uint32_t(q & 0x80u) << 24;
  const uint32_t e = (q & 0x7Fu) >> kMant;
  const uint32_t m = q & ((1u << kMant) - 1u);
  uint32_t bits;
  if (FMT == kE4M3 && e == kExpMax && m == 7u) {
    bits = 0x7FF00000u;
  } else if (FMT == kE5M2 && e == kExpMax) {
    bits = m == 0 ? 0x7F800000u : (0x7FC00000u | (m << 21));
  } else if (e == 0) {
    if (m == 0) {
      bits = 0;
    } else {  // subnormal m * 2^(1 - bias - mant): normalize
      const int p = 31 - clz32(m);  // leading bit position
      bits = (uint32_t(p + 1 - kBias - kMant + 127) << 23) | ((m - (1u << p)) << (23 - p));
    }
  } else {
    bits = ((e - kBias + 127) << 23) | (m << (23 - kMant));
  }
  return u2f(sign | bits);
}

// One element of fp8_encode: c = x (+ residual), q = fp8(c * s), residual = c - fp8(q) / s.
template <int FMT, bool RES>
FMC_HD uint8_t fp8_encode_element(float x, float* r, float s) {
  const float c = RES ? add_rn(x, *r) : x;
  const uint8_t q = fp8_from_float<FMT>(mul_rn(c, s));
  if (RES) *r = sub_rn(c, div_rn(fp8_to_float<FMT>(q), s));
  return q;
}

template <int FMT, bool ACC>
FMC_HD float fp8_decode_element(uint8_t q, float out, float s) {
  const float d = div_rn(fp8_to_float<FMT>(q), s);
  return ACC ? add_rn(out, d) : d;
}

// One-bit: the sign bit is c < 0 (NaN and -0.0 give 0); the residual is c -+ scale.
FMC_HD float onebit_residual(float c, float scale) {
  return sub_rn(c, c < 0.0f ? -scale : scale);
}

// Top-k key: |c| as its uint32 bit pattern (non-negative floats order like their bits),
// every NaN mapped to one key above +inf, so NaNs count as the largest and tie by index,
// as torch.sort(descending=True, stable=True) orders them.
FMC_HD uint32_t topk_key(float c) {
  const uint32_t a = f2u(c) & 0x7FFFFFFFu;
  return a > 0x7F800000u ? 0x7F800001u : a;
}

// Radix select over the 31-bit keys: three digits, bits 30..20, 19..10 and 9..0.
constexpr int kTopkPasses = 3;
constexpr int kTopkMaxBins = 2048;
FMC_HD int topk_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 10 : 0); }
FMC_HD int topk_width(int pass) { return pass == 0 ? 11 : 10; }
// Bits already decided before this pass (those above the pass's digit).
FMC_HD uint32_t topk_high_mask(int pass) {
  return pass == 0 ? 0u : (0x7FFFFFFFu & ~((1u << (topk_shift(pass) + topk_width(pass))) - 1u));
}

struct TopkState {
  uint32_t prefix;  // key bits decided so far; after the last pass, the k-th largest key t
  uint32_t k_rem;   // how many still to take among keys matching prefix; at the end, how many keys == t
  uint32_t found;   // passes that found their digit (3 when all went well)
  uint32_t pad;
};

}  // namespace fmcomm_cuda
