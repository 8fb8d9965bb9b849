#include "compress.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string_view>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Every hot loop is an always-inline "body", compiled twice (FMCOMM_DEFINE_BUILD below):
// for baseline x86-64 (SSE2) and with target("avx2"), picked at load time from the CPU's
// features (the extension is built with plain -O3, for any x86-64). GCC vectorizes the
// bodies in both builds. Both perform exactly the contract's IEEE operations, so they agree
// bit for bit (the unit tests run both): no contract step is a product that feeds a sum,
// so there is nothing to contract into an FMA even where FMA is enabled (it is not, in
// either build), and the one reduction keeps its order. Off x86-64 only the portable build
// exists.
#define FMCOMM_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define FMCOMM_HAVE_AVX2_BUILD 1
#define FMCOMM_AVX2 __attribute__((target("avx2")))
#endif

namespace fmcomm {
namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;

FMCOMM_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

FMCOMM_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr uint32_t float_bits_of_power_of_two(int exponent) { return static_cast<uint32_t>(127 + exponent) << 23; }

// cond ? yes : no, written as arithmetic. Given ?: (or std::min), GCC may turn the choice
// into a branch -- sinking work that only one side needs (a float addition or conversion)
// under it, or folding the whole saturated case to a constant -- and then cannot if-convert
// the float operations back (they might raise an exception), so the loop stays scalar.
FMCOMM_INLINE uint32_t choose(bool cond, uint32_t yes, uint32_t no) {
  return no + ((yes - no) & (0u - static_cast<uint32_t>(cond)));
}

// ---------------------------------------------------------------------------------------
// fp8 formats. Codes are sign | exponent | mantissa like IEEE; what differs is the layout
// and which codes are special (e4m3fn: only S.1111.111 is NaN, no infinity; e5m2: IEEE-like).

struct E4M3 {
  static constexpr int kMantissaBits = 3;
  static constexpr int kBias = 7;
  static constexpr float kMax = 448.0f;
  // torch's decoded float32 for the NaN code (sign added separately).
  static FMCOMM_INLINE uint32_t special_or(uint32_t magnitude_code, uint32_t decoded) {
    return choose(magnitude_code == 0x7f, 0x7ff00000u, decoded);
  }
};

struct E5M2 {
  static constexpr int kMantissaBits = 2;
  static constexpr int kBias = 15;
  static constexpr float kMax = 57344.0f;
  // Exponent field all ones: mantissa 0 is infinity, others NaN, decoded as torch does
  // (the float16 pattern widened, with the quiet bit set).
  static FMCOMM_INLINE uint32_t special_or(uint32_t magnitude_code, uint32_t decoded) {
    const uint32_t quiet = choose(magnitude_code != 0x7c, 0x00400000u, 0u);
    const uint32_t special = kInfBits | ((magnitude_code & 3u) << 21) | quiet;
    return choose(magnitude_code >= 0x7c, special, decoded);
  }
};

// float32 -> fp8 code: saturate to +-max (infinity too), keep NaN as the all-ones code,
// round to nearest, ties to even. Branch free so the loops around it vectorize.
template <class Fmt>
FMCOMM_INLINE uint32_t fp8_code(float v) {
  constexpr int kDroppedBits = 23 - Fmt::kMantissaBits;
  // float32 exponent bias minus the fp8 one: subtracting it from the bits of a normal value
  // leaves the fp8 exponent field in place.
  constexpr uint32_t kRebias = static_cast<uint32_t>(127 - Fmt::kBias) << 23;
  constexpr uint32_t kMinNormal = float_bits_of_power_of_two(1 - Fmt::kBias);
  // Below the smallest normal, fp8 values are multiples of 2^(1 - bias - mantissa bits).
  // A float32 at 2^kAnchorExp has exactly that spacing between neighbours, so adding it
  // rounds the value to the nearest such multiple (IEEE round to nearest even) and the
  // multiple shows in the sum's low mantissa bits.
  constexpr int kAnchorExp = 23 + 1 - Fmt::kBias - Fmt::kMantissaBits;
  constexpr uint32_t kAnchor = float_bits_of_power_of_two(kAnchorExp);
  const int32_t max_bits = static_cast<int32_t>(bits_of(Fmt::kMax));

  const uint32_t u = bits_of(v);
  const uint32_t sign = (u >> 24) & 0x80u;
  // The magnitude's bits, as a signed integer: never negative, so signed comparisons (one
  // instruction each in SSE2 and AVX2, unlike unsigned ones) order them like the magnitudes.
  int32_t magnitude = static_cast<int32_t>(u & kAbsMask);
  const bool is_nan = magnitude > static_cast<int32_t>(kInfBits);
  magnitude = static_cast<int32_t>(choose(magnitude > max_bits, max_bits, magnitude));  // saturate
  const uint32_t a = static_cast<uint32_t>(magnitude);
  // Normal: drop mantissa bits rounding to nearest even (add just under half, plus the
  // lowest kept bit); a carry out of the mantissa correctly bumps the exponent.
  const uint32_t round_up = ((1u << (kDroppedBits - 1)) - 1u) + ((a >> kDroppedBits) & 1u);
  const uint32_t normal = (a - kRebias + round_up) >> kDroppedBits;
  const uint32_t subnormal = bits_of(float_of(a) + float_of(kAnchor)) - kAnchor;
  const uint32_t code = choose(magnitude < static_cast<int32_t>(kMinNormal), subnormal, normal);
  // NaN: all seven magnitude bits set (OR-ing them into any code gives exactly that).
  return code | (0x7fu & (0u - static_cast<uint32_t>(is_nan))) | sign;
}

// fp8 code -> float32, bit for bit what torch's conversion gives (NaN payloads included).
template <class Fmt>
FMCOMM_INLINE float fp8_value(uint32_t q) {
  constexpr int kDroppedBits = 23 - Fmt::kMantissaBits;
  constexpr uint32_t kRebias = static_cast<uint32_t>(127 - Fmt::kBias) << 23;
  constexpr uint32_t kFirstNormalCode = 1u << Fmt::kMantissaBits;

  const uint32_t sign = (q & 0x80u) << 24;
  const uint32_t a = q & 0x7fu;
  const uint32_t normal = (a << kDroppedBits) + kRebias;
  // A subnormal code's value is its mantissa times the spacing, a power of two: both the
  // conversion and the product are exact, and the product is a float32 normal (no
  // flush-to-zero mode can touch it). Code 0 gives +0.
  const float spacing = float_of(float_bits_of_power_of_two(1 - Fmt::kBias - Fmt::kMantissaBits));
  const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(a)) * spacing);
  const bool is_subnormal = static_cast<int32_t>(a) < static_cast<int32_t>(kFirstNormalCode);
  const uint32_t magnitude = Fmt::special_or(a, choose(is_subnormal, subnormal, normal));
  return float_of(magnitude | sign);
}

// Codes are made in 32-bit lanes, a tile at a time, and narrowed to bytes by a loop of
// their own: narrowed inside the arithmetic loop, GCC packs intermediate results down to
// 16 and 8 bits along the way and the loop runs at half the speed.
constexpr std::size_t kCodeTile = 256;

// Outputs at least this large are written with non-temporal stores: they outgrow the
// caches anyway, and a plain store first reads every line it is about to overwrite
// whole (a decode into 64 MiB reads 64 MiB it never uses). Smaller outputs stay cached
// for the step that reads them next.
constexpr std::size_t kStreamBytes = std::size_t{4} << 20;

// dst[0..len) = tile[0..len), bypassing the caches where the target allows. The caller
// ends a streaming kernel with stream_fence().
template <class T>
FMCOMM_INLINE void stream_out(T* __restrict dst, const T* __restrict tile, std::size_t len) {
  std::size_t i = 0;
#if defined(__SSE2__)
  constexpr std::size_t kPer = 16 / sizeof(T);
  for (; i < len && (reinterpret_cast<std::uintptr_t>(dst + i) & 15u); ++i) dst[i] = tile[i];
  for (; i + kPer <= len; i += kPer) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + i)));
  }
#endif
  for (; i < len; ++i) dst[i] = tile[i];
}

FMCOMM_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // streamed stores become visible before the kernel returns
#endif
}

template <class Fmt, bool kResidual>
FMCOMM_INLINE void fp8_encode_span(const float* __restrict x, float* __restrict residual, uint8_t* __restrict out,
                                   float s, std::size_t n) {
  uint32_t codes[kCodeTile];
  for (std::size_t begin = 0; begin < n; begin += kCodeTile) {
    const std::size_t len = std::min(kCodeTile, n - begin);
    for (std::size_t i = 0; i < len; ++i) {
      const float c = kResidual ? x[begin + i] + residual[begin + i] : x[begin + i];
      codes[i] = fp8_code<Fmt>(c * s);
    }
    if (kResidual) {  // c formed again (the same addition) from the tile, still in L1
      for (std::size_t i = 0; i < len; ++i) {
        const float c = x[begin + i] + residual[begin + i];
        residual[begin + i] = c - fp8_value<Fmt>(codes[i]) / s;
      }
    }
    for (std::size_t i = 0; i < len; ++i) out[begin + i] = static_cast<uint8_t>(codes[i]);
  }
}

template <class Fmt, bool kResidual>
FMCOMM_INLINE void fp8_encode_blocks(const float* x, float* residual, uint8_t* out, const float* scale,
                                     std::size_t n, std::size_t block) {
  // Codes are written with plain stores: streaming them measured no faster (a quarter
  // of the bytes of the values, and the payload is sent next, from the cache).
  for (std::size_t begin = 0, b = 0; begin < n; begin += block, ++b) {
    const std::size_t len = std::min(block, n - begin);
    fp8_encode_span<Fmt, kResidual>(x + begin, kResidual ? residual + begin : nullptr, out + begin, scale[b], len);
  }
}

FMCOMM_INLINE void fp8_encode_body(const float* x, float* residual, uint8_t* out, const float* scale,
                                   std::size_t n, std::size_t block, Fp8Format fmt) {
  if (fmt == Fp8Format::e4m3) {
    if (residual) fp8_encode_blocks<E4M3, true>(x, residual, out, scale, n, block);
    else fp8_encode_blocks<E4M3, false>(x, residual, out, scale, n, block);
  } else {
    if (residual) fp8_encode_blocks<E5M2, true>(x, residual, out, scale, n, block);
    else fp8_encode_blocks<E5M2, false>(x, residual, out, scale, n, block);
  }
}

template <class Fmt, bool kAccumulate>
FMCOMM_INLINE void fp8_decode_blocks(const uint8_t* q, float* out, const float* scale, std::size_t n,
                                     std::size_t block) {
  // Accumulating reads every output line anyway; only a plain decode streams.
  const bool stream = !kAccumulate && n * sizeof(float) >= kStreamBytes;
  for (std::size_t begin = 0, b = 0; begin < n; begin += block, ++b) {
    const std::size_t len = std::min(block, n - begin);
    const float s = scale[b];
    // Widened to 32 bits first, a tile at a time, for the reason fp8_encode_span narrows last.
    uint32_t codes[kCodeTile];
    alignas(16) float values[kCodeTile];
    for (std::size_t tile = 0; tile < len; tile += kCodeTile) {
      const std::size_t tile_len = std::min(kCodeTile, len - tile);
      const uint8_t* __restrict src = q + begin + tile;
      float* __restrict dst = out + begin + tile;
      for (std::size_t i = 0; i < tile_len; ++i) codes[i] = src[i];
      if (stream) {
        // True division, as the contract fixes: a multiply by 1/s would round differently.
        for (std::size_t i = 0; i < tile_len; ++i) values[i] = fp8_value<Fmt>(codes[i]) / s;
        stream_out(dst, values, tile_len);
        continue;
      }
      for (std::size_t i = 0; i < tile_len; ++i) {
        const float d = fp8_value<Fmt>(codes[i]) / s;
        dst[i] = kAccumulate ? dst[i] + d : d;
      }
    }
  }
  if (stream) stream_fence();
}

FMCOMM_INLINE void fp8_decode_body(const uint8_t* q, float* out, const float* scale, std::size_t n,
                                   std::size_t block, Fp8Format fmt, bool accumulate) {
  if (fmt == Fp8Format::e4m3) {
    if (accumulate) fp8_decode_blocks<E4M3, true>(q, out, scale, n, block);
    else fp8_decode_blocks<E4M3, false>(q, out, scale, n, block);
  } else {
    if (accumulate) fp8_decode_blocks<E5M2, true>(q, out, scale, n, block);
    else fp8_decode_blocks<E5M2, false>(q, out, scale, n, block);
  }
}

// ---------------------------------------------------------------------------------------
// 1-bit signs. The scale's sum has eight lanes, lane j taking elements i with i % 8 == j in
// increasing i: that order is the contract, and it is also what vectorizes (two 4-double
// accumulators in the AVX2 build), since each lane's additions stay sequential.

constexpr std::size_t kLanes = 8;

// lanes[i % 8] += |c[i]| over c[0, n), each lane in increasing i (c starts at a multiple of 8).
FMCOMM_INLINE void add_magnitudes_to_lanes(const float* __restrict c, std::size_t n, double* __restrict lanes) {
  const std::size_t whole = n / kLanes * kLanes;
  for (std::size_t g = 0; g < whole; g += kLanes) {
    for (std::size_t j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(std::fabs(c[g + j]));
  }
  for (std::size_t j = 0; whole + j < n; ++j) lanes[j] += static_cast<double>(std::fabs(c[whole + j]));
}

// Bit i % 8 of out[i / 8] = (c[i] < 0), for c[0, n); the last byte's unused bits are 0.
// 32 signs at a time become one mask (vector code in the AVX2 build; branch-free scalar code
// in the baseline one, where a branch per sign would be mispredicted half the time),
// stored as 4 bytes, lowest bits first.
constexpr std::size_t kSignChunk = 32;

FMCOMM_INLINE void pack_signs(const float* __restrict c, std::size_t n, uint8_t* __restrict out) {
  std::size_t i = 0;
  for (; i + kSignChunk <= n; i += kSignChunk) {
    uint32_t mask = 0;
    for (std::size_t j = 0; j < kSignChunk; ++j) mask |= static_cast<uint32_t>(c[i + j] < 0.0f) << j;
    uint8_t* dst = out + i / 8;
    dst[0] = static_cast<uint8_t>(mask);
    dst[1] = static_cast<uint8_t>(mask >> 8);
    dst[2] = static_cast<uint8_t>(mask >> 16);
    dst[3] = static_cast<uint8_t>(mask >> 24);
  }
  for (; i < n; i += 8) {
    uint32_t byte = 0;
    for (std::size_t j = 0; j < 8 && i + j < n; ++j) byte |= static_cast<uint32_t>(c[i + j] < 0.0f) << j;
    out[i / 8] = static_cast<uint8_t>(byte);
  }
}

// Elements formed into a buffer and read back while in L1 (here and in top-k's scan);
// a multiple of kSignChunk and kLanes.
constexpr std::size_t kBlock = 2048;

// One pass: signs and lane sums, a block at a time; with a residual, c = x + residual is
// first formed into a stack buffer (a plain loop, which vectorizes) and read from L1.

template <bool kResidual>
FMCOMM_INLINE void onebit_pack_span(const float* __restrict x, const float* __restrict residual,
                                    uint8_t* __restrict out, std::size_t n, double* lanes_out) {
  double lanes[kLanes] = {};
  float formed[kResidual ? kBlock : 1];
  for (std::size_t begin = 0; begin < n; begin += kBlock) {
    const std::size_t len = std::min(kBlock, n - begin);
    const float* c = x + begin;
    if (kResidual) {
      for (std::size_t i = 0; i < len; ++i) formed[i] = x[begin + i] + residual[begin + i];
      c = formed;
    }
    add_magnitudes_to_lanes(c, len, lanes);
    pack_signs(c, len, out + begin / 8);
  }
  for (std::size_t j = 0; j < kLanes; ++j) lanes_out[j] = lanes[j];
}

FMCOMM_INLINE void onebit_pack_body(const float* x, const float* residual, uint8_t* out, std::size_t n,
                                    double* lanes) {
  if (residual) onebit_pack_span<true>(x, residual, out, n, lanes);
  else onebit_pack_span<false>(x, residual, out, n, lanes);
}

// Second pass of the error-feedback form: the residual needs the scale, which needs every
// element. c is formed again from x and the old residual (the same float addition).
FMCOMM_INLINE void onebit_residual_body(const float* __restrict x, float* __restrict residual, std::size_t n,
                                        float scale) {
  const float minus = -scale;
  for (std::size_t i = 0; i < n; ++i) {
    const float c = x[i] + residual[i];
    residual[i] = c - (c < 0.0f ? minus : scale);
  }
}

// d = -scale where the bit is set: -scale is scale with its sign bit flipped, so d is made
// by XOR-ing the bit into the sign position -- integer work without a branch, which
// vectorizes in the AVX2 build and stays branch free in the baseline one.
template <bool kAccumulate>
FMCOMM_INLINE void onebit_decode_span(const uint8_t* __restrict bits, float* __restrict out, float scale,
                                      std::size_t n) {
  const uint32_t scale_bits = bits_of(scale);
  std::size_t i = 0;
  for (; i + kSignChunk <= n; i += kSignChunk) {  // 32 elements per 4 bytes of signs
    const uint8_t* src = bits + i / 8;
    const uint32_t mask = static_cast<uint32_t>(src[0]) | static_cast<uint32_t>(src[1]) << 8 |
                          static_cast<uint32_t>(src[2]) << 16 | static_cast<uint32_t>(src[3]) << 24;
    for (std::size_t j = 0; j < kSignChunk; ++j) {
      const float d = float_of(scale_bits ^ (((mask >> j) & 1u) << 31));
      out[i + j] = kAccumulate ? out[i + j] + d : d;
    }
  }
  for (; i < n; ++i) {
    const float d = float_of(scale_bits ^ (((bits[i / 8] >> (i % 8)) & 1u) << 31));
    out[i] = kAccumulate ? out[i] + d : d;
  }
}

FMCOMM_INLINE void onebit_decode_body(const uint8_t* bits, float* out, float scale, std::size_t n,
                                      bool accumulate) {
  if (accumulate) {
    onebit_decode_span<true>(bits, out, scale, n);
  } else if (n * sizeof(float) >= kStreamBytes) {
    alignas(16) float values[kCodeTile];  // kCodeTile is a multiple of 8: tiles start on a byte of bits
    for (std::size_t begin = 0; begin < n; begin += kCodeTile) {
      const std::size_t len = std::min(kCodeTile, n - begin);
      onebit_decode_span<false>(bits + begin / 8, values, scale, len);
      stream_out(out + begin, values, len);
    }
    stream_fence();
  } else {
    onebit_decode_span<false>(bits, out, scale, n);
  }
}

// ---------------------------------------------------------------------------------------
// Top-k. Elements are ranked by a key: the bits of |c|, which order like |c| for every
// non-NaN value (+0 and -0 tie), with every NaN mapped to one key above +inf -- torch's
// sort also ranks NaN above everything and keeps NaNs in index order among themselves.

constexpr uint32_t kNanKey = kInfBits + 1;

FMCOMM_INLINE uint32_t magnitude_key(float c) {
  const uint32_t a = bits_of(c) & kAbsMask;
  return a < kNanKey ? a : kNanKey;
}

// Appends every element of c[0, n) whose key is >= threshold, index (plus first_index)
// and value, in increasing index order; returns how many, or kOverflow as soon as they might
// not fit in capacity. The values are kept so that nothing later has to gather them back:
// candidates are ~1 in 80 elements, so each gather would be a cache miss. Each chunk of 32
// gets a bit mask of its candidates from vector code, and only the set bits are visited: a
// chunk holds one candidate or none most of the time, so this keeps the scan at memory
// speed where a walk over the chunk would not.
constexpr std::size_t kScanChunk = 32;
constexpr std::size_t kOverflow = SIZE_MAX;

FMCOMM_INLINE std::size_t collect_span(const float* __restrict c, std::size_t n, std::size_t first_index,
                                       uint32_t threshold, std::size_t capacity, uint32_t* __restrict cand_index,
                                       float* __restrict cand_value) {
  std::size_t count = 0, i = 0;
  for (; i + kScanChunk <= n; i += kScanChunk) {
    uint32_t mask = 0;
    for (std::size_t j = 0; j < kScanChunk; ++j) {
      mask |= static_cast<uint32_t>(magnitude_key(c[i + j]) >= threshold) << j;
    }
    if (mask && capacity - count < kScanChunk) return kOverflow;
    while (mask) {
      const unsigned j = static_cast<unsigned>(__builtin_ctz(mask));
      mask &= mask - 1;  // clear the lowest set bit
      cand_index[count] = static_cast<uint32_t>(first_index + i + j);
      cand_value[count] = c[i + j];
      ++count;
    }
  }
  if (capacity - count < n - i) return kOverflow;
  for (; i < n; ++i) {  // the last < 32 elements: every slot written, the count advanced by the test
    cand_index[count] = static_cast<uint32_t>(first_index + i);
    cand_value[count] = c[i];
    count += magnitude_key(c[i]) >= threshold;
  }
  return count;
}

// With residual_to_form, c = x + residual is first formed into residual, a block at a time
// (a plain loop, which vectorizes; fused into the chunk test, GCC leaves the addition
// scalar), and each block is scanned while it is still in L1. Forming goes on to the end
// after an overflow: the caller relies on residual holding c afterwards.
FMCOMM_INLINE std::size_t collect_body(const float* x, float* residual_to_form, std::size_t n, uint32_t threshold,
                                       std::size_t capacity, uint32_t* cand_index, float* cand_value) {
  if (!residual_to_form) return collect_span(x, n, 0, threshold, capacity, cand_index, cand_value);
  std::size_t count = 0;
  for (std::size_t begin = 0; begin < n; begin += kBlock) {
    const std::size_t len = std::min(kBlock, n - begin);
    const float* __restrict xs = x + begin;
    float* __restrict rs = residual_to_form + begin;
    for (std::size_t i = 0; i < len; ++i) rs[i] = xs[i] + rs[i];
    if (count != kOverflow) {
      const std::size_t more =
          collect_span(rs, len, begin, threshold, capacity - count, cand_index + count, cand_value + count);
      count = more == kOverflow ? kOverflow : count + more;
    }
  }
  return count;
}

// ---------------------------------------------------------------------------------------
// The two builds and the run-time choice between them.

struct HotLoops {
  const char* name;
  void (*fp8_encode)(const float*, float*, uint8_t*, const float*, std::size_t, std::size_t, Fp8Format);
  void (*fp8_decode)(const uint8_t*, float*, const float*, std::size_t, std::size_t, Fp8Format, bool);
  void (*onebit_pack)(const float*, const float*, uint8_t*, std::size_t, double*);
  void (*onebit_residual)(const float*, float*, std::size_t, float);
  void (*onebit_decode)(const uint8_t*, float*, float, std::size_t, bool);
  std::size_t (*collect)(const float*, float*, std::size_t, uint32_t, std::size_t, uint32_t*, float*);
};

// Instantiates every body under one target (ATTR is empty or a target attribute).
#define FMCOMM_DEFINE_BUILD(SUFFIX, ATTR)                                                                     \
  ATTR void fp8_encode_##SUFFIX(const float* x, float* r, uint8_t* out, const float* scale, std::size_t n,    \
                                std::size_t block, Fp8Format fmt) {                                           \
    fp8_encode_body(x, r, out, scale, n, block, fmt);                                                         \
  }                                                                                                           \
  ATTR void fp8_decode_##SUFFIX(const uint8_t* q, float* out, const float* scale, std::size_t n,              \
                                std::size_t block, Fp8Format fmt, bool acc) {                                 \
    fp8_decode_body(q, out, scale, n, block, fmt, acc);                                                       \
  }                                                                                                           \
  ATTR void onebit_pack_##SUFFIX(const float* x, const float* r, uint8_t* out, std::size_t n, double* lanes) { \
    onebit_pack_body(x, r, out, n, lanes);                                                                    \
  }                                                                                                           \
  ATTR void onebit_residual_##SUFFIX(const float* x, float* r, std::size_t n, float scale) {                  \
    onebit_residual_body(x, r, n, scale);                                                                     \
  }                                                                                                           \
  ATTR void onebit_decode_##SUFFIX(const uint8_t* bits, float* out, float scale, std::size_t n, bool acc) {   \
    onebit_decode_body(bits, out, scale, n, acc);                                                             \
  }                                                                                                           \
  ATTR std::size_t collect_##SUFFIX(const float* x, float* r, std::size_t n, uint32_t threshold,              \
                                    std::size_t capacity, uint32_t* cand_index, float* cand_value) {          \
    return collect_body(x, r, n, threshold, capacity, cand_index, cand_value);                                \
  }                                                                                                           \
  constexpr HotLoops k##SUFFIX##Loops{#SUFFIX,           fp8_encode_##SUFFIX,      fp8_decode_##SUFFIX,        \
                                      onebit_pack_##SUFFIX, onebit_residual_##SUFFIX, onebit_decode_##SUFFIX, \
                                      collect_##SUFFIX};

FMCOMM_DEFINE_BUILD(default, )
#ifdef FMCOMM_HAVE_AVX2_BUILD
FMCOMM_DEFINE_BUILD(avx2, FMCOMM_AVX2)
#endif

bool cpu_has_avx2() {
#ifdef FMCOMM_HAVE_AVX2_BUILD
  __builtin_cpu_init();  // needed when called during static initialization
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

const HotLoops* best_loops() {
#ifdef FMCOMM_HAVE_AVX2_BUILD
  if (cpu_has_avx2()) return &kavx2Loops;
#endif
  return &kdefaultLoops;
}

std::atomic<const HotLoops*> g_loops{best_loops()};

const HotLoops& loops() { return *g_loops.load(std::memory_order_relaxed); }

// ---------------------------------------------------------------------------------------
// Top-k driver (not performance critical beyond the scans it calls).

// A strided sample of keys estimates the threshold that about k elements reach. Its size
// bounds the estimate's noise: at k = 1% the sample holds ~650 elements above the true
// threshold, with a standard deviation of ~25.
constexpr std::size_t kSampleSize = 1 << 16;

class Sample {
 public:
  Sample(const float* x, const float* residual, std::size_t n)
      : size_(std::min(n, kSampleSize)), keys_(new uint32_t[size_]) {
    for (std::size_t j = 0; j < size_; ++j) {
      const std::size_t i = j * n / size_;  // n < 2^31 and j < 2^16: no overflow
      keys_[j] = magnitude_key(residual ? x[i] + residual[i] : x[i]);
    }
  }
  std::size_t size() const { return size_; }
  // The rank-th largest sampled key (rank counts from 1); 0, which every key reaches, past the end.
  uint32_t key_at_rank(std::size_t rank) {
    if (rank > size_) return 0;
    std::nth_element(keys_.get(), keys_.get() + (rank - 1), keys_.get() + size_, std::greater<uint32_t>());
    return keys_[rank - 1];
  }

 private:
  std::size_t size_;
  std::unique_ptr<uint32_t[]> keys_;
};

// Sample rank whose key lets at least k elements through with high probability: the
// expected rank of the k-th largest plus a margin of ~3 standard deviations.
std::size_t first_sample_rank(std::size_t k, std::size_t n, std::size_t sample_size) {
  const double expected = static_cast<double>(k) * static_cast<double>(sample_size) / static_cast<double>(n);
  return static_cast<std::size_t>(std::ceil(expected + 3.0 * std::sqrt(expected) + 16.0));
}

// The k (1 <= k <= count) candidates of largest key, ties to the earliest, written in
// candidate order (which is index order) to idx_out/val_out. Candidate j has index
// index_of(j) and value value_of(j). Finds the k-th largest key with nth_element on a copy
// of the keys, then takes every candidate above it and the first ones equal to it.
template <class IndexOf, class ValueOf>
void select_exactly(std::size_t count, std::size_t k, IndexOf index_of, ValueOf value_of, int32_t* idx_out,
                    float* val_out) {
  std::unique_ptr<uint32_t[]> keys(new uint32_t[count]);
  for (std::size_t j = 0; j < count; ++j) keys[j] = magnitude_key(value_of(j));
  std::nth_element(keys.get(), keys.get() + (k - 1), keys.get() + count, std::greater<uint32_t>());
  const uint32_t kth = keys[k - 1];
  std::size_t above = 0;  // after nth_element only positions before k - 1 can hold larger keys
  for (std::size_t j = 0; j + 1 < k; ++j) above += keys[j] > kth;
  std::size_t ties_left = k - above;
  std::size_t written = 0;
  for (std::size_t j = 0; j < count && written < k; ++j) {
    const float value = value_of(j);
    const uint32_t key = magnitude_key(value);
    const bool tie = key == kth;
    if (key > kth || (tie && ties_left > 0)) {
      ties_left -= tie;
      idx_out[written] = static_cast<int32_t>(index_of(j));
      val_out[written] = value;
      ++written;
    }
  }
}

}  // namespace

void fp8_encode(const float* x, float* residual, uint8_t* out, const float* scale, std::size_t n, std::size_t block,
                Fp8Format fmt) {
  loops().fp8_encode(x, residual, out, scale, n, block, fmt);
}

void fp8_decode(const uint8_t* q, float* out, const float* scale, std::size_t n, std::size_t block, Fp8Format fmt,
                bool accumulate) {
  loops().fp8_decode(q, out, scale, n, block, fmt, accumulate);
}

float onebit_encode(const float* x, float* residual, uint8_t* out, std::size_t n) {
  if (n == 0) return 0.0f;
  const HotLoops& hot = loops();
  double lanes[kLanes];
  hot.onebit_pack(x, residual, out, n, lanes);
  double total = lanes[0];
  for (std::size_t j = 1; j < kLanes; ++j) total += lanes[j];
  const float scale = static_cast<float>(total / static_cast<double>(n));
  if (residual) hot.onebit_residual(x, residual, n, scale);
  return scale;
}

void onebit_decode(const uint8_t* bits, float* out, float scale, std::size_t n, bool accumulate) {
  loops().onebit_decode(bits, out, scale, n, accumulate);
}

void topk_select(const float* x, float* residual, std::size_t n, std::size_t k, int32_t* idx_out, float* val_out) {
  if (k == 0) {  // nothing selected: the new residual is all of c
    if (residual) {
      for (std::size_t i = 0; i < n; ++i) residual[i] = x[i] + residual[i];
    }
    return;
  }
  if (k == n) {  // everything selected, in index order: no ranking needed
    for (std::size_t i = 0; i < n; ++i) {
      idx_out[i] = static_cast<int32_t>(i);
      val_out[i] = residual ? x[i] + residual[i] : x[i];
      if (residual) residual[i] = 0.0f;
    }
    return;
  }
  const HotLoops& hot = loops();
  Sample sample(x, residual, n);
  // c lives in x, or in residual once the first scan has formed x + residual there.
  const float* c = residual ? residual : x;
  float* residual_to_form = residual;
  for (std::size_t rank = first_sample_rank(k, n, sample.size()); rank <= sample.size(); rank = rank * 4 + 64) {
    // About rank * n / sample size elements reach the sample's rank-th key; twice that is
    // room enough unless the data has unusually many ties at the threshold.
    const std::size_t expected = rank * n / sample.size();
    const std::size_t capacity = std::min(n, 2 * expected + 4096);
    std::unique_ptr<uint32_t[]> cand_index(new uint32_t[capacity]);
    std::unique_ptr<float[]> cand_value(new float[capacity]);
    const std::size_t count =
        hot.collect(x, residual_to_form, n, sample.key_at_rank(rank), capacity, cand_index.get(), cand_value.get());
    residual_to_form = nullptr;
    if (count == kOverflow) break;  // rank every element instead
    // The k-th largest key reaches the threshold exactly when at least k keys do; if fewer
    // did, the next round lowers the threshold.
    if (count >= k) {
      select_exactly(
          count, k, [&](std::size_t j) { return cand_index[j]; }, [&](std::size_t j) { return cand_value[j]; },
          idx_out, val_out);
      if (residual) {
        for (std::size_t j = 0; j < k; ++j) residual[idx_out[j]] = 0.0f;
      }
      return;
    }
  }
  if (residual_to_form) {
    for (std::size_t i = 0; i < n; ++i) residual_to_form[i] = x[i] + residual_to_form[i];
  }
  select_exactly(
      n, k, [](std::size_t i) { return i; }, [&](std::size_t i) { return c[i]; }, idx_out, val_out);
  if (residual) {
    for (std::size_t j = 0; j < k; ++j) residual[idx_out[j]] = 0.0f;
  }
}

void scatter_add(const int32_t* idx, const float* val, std::size_t count, float* out) {
  for (std::size_t j = 0; j < count; ++j) out[idx[j]] += val[j];
}

const char* compress_isa() { return loops().name; }

bool set_compress_isa(const char* name) {
  const std::string_view want(name);
  if (want == "default") {
    g_loops.store(&kdefaultLoops);
    return true;
  }
#ifdef FMCOMM_HAVE_AVX2_BUILD
  if (want == "avx2" && cpu_has_avx2()) {
    g_loops.store(&kavx2Loops);
    return true;
  }
#endif
  return false;
}

}  // namespace fmcomm
