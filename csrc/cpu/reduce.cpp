#include "reduce.h"

#include <cmath>
#include <cstring>
#include <type_traits>

namespace fmcomm {
namespace {

// bfloat16 is the upper half of a float32.
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // NaN stays a quiet NaN
  }
  // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit.
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

template <typename T>
inline T nan_min(T x, T y) { return (x < y || x != x) ? x : y; }
template <typename T>
inline T nan_max(T x, T y) { return (x > y || x != x) ? x : y; }

// Integers combine in unsigned arithmetic (wrap-around is defined there); floats as they are.
template <typename T, bool = std::is_integral_v<T>>
struct Arith { using type = T; };
template <typename T>
struct Arith<T, true> { using type = std::make_unsigned_t<T>; };

// Plain element types (float, double, int32, int64).
template <typename T>
void reduce_plain(T* dst, const T* a, const T* b, std::size_t n, RedOp op) {
  using U = typename Arith<T>::type;
  switch (op) {
    case RedOp::sum:
    case RedOp::avg:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<U>(a[i]) + static_cast<U>(b[i]));
      break;
    case RedOp::prod:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<U>(a[i]) * static_cast<U>(b[i]));
      break;
    case RedOp::min:
      for (std::size_t i = 0; i < n; ++i) dst[i] = nan_min(a[i], b[i]);
      break;
    case RedOp::max:
      for (std::size_t i = 0; i < n; ++i) dst[i] = nan_max(a[i], b[i]);
      break;
  }
}

// 16-bit floats: widen, combine in float, round once. For min/max the chosen
// operand's own bits are kept.
template <float (*Widen)(uint16_t), uint16_t (*Narrow)(float)>
void reduce_half(uint16_t* dst, const uint16_t* a, const uint16_t* b, std::size_t n, RedOp op) {
  switch (op) {
    case RedOp::sum:
    case RedOp::avg:
      for (std::size_t i = 0; i < n; ++i) dst[i] = Narrow(Widen(a[i]) + Widen(b[i]));
      break;
    case RedOp::prod:
      for (std::size_t i = 0; i < n; ++i) dst[i] = Narrow(Widen(a[i]) * Widen(b[i]));
      break;
    case RedOp::min:
      for (std::size_t i = 0; i < n; ++i) {
        float x = Widen(a[i]), y = Widen(b[i]);
        dst[i] = (x < y || x != x) ? a[i] : b[i];
      }
      break;
    case RedOp::max:
      for (std::size_t i = 0; i < n; ++i) {
        float x = Widen(a[i]), y = Widen(b[i]);
        dst[i] = (x > y || x != x) ? a[i] : b[i];
      }
      break;
  }
}

#ifdef __FLT16_MAX__
// The compiler's _Float16 conversions are correctly rounded (F16C where available).
inline float f16_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
}
inline uint16_t float_to_f16(float f) {
  _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, sizeof h);
  return h;
}
#endif

}  // namespace

bool has_float16() {
#ifdef __FLT16_MAX__
  return true;
#else
  return false;
#endif
}

bool reduce(void* dst, const void* a, const void* b, std::size_t n, DType dtype, RedOp op) {
  switch (dtype) {
    case DType::f32:
      reduce_plain<float>(static_cast<float*>(dst), static_cast<const float*>(a),
                          static_cast<const float*>(b), n, op);
      return true;
    case DType::f64:
      reduce_plain<double>(static_cast<double*>(dst), static_cast<const double*>(a),
                           static_cast<const double*>(b), n, op);
      return true;
    case DType::i32:
      reduce_plain<int32_t>(static_cast<int32_t*>(dst), static_cast<const int32_t*>(a),
                            static_cast<const int32_t*>(b), n, op);
      return true;
    case DType::i64:
      reduce_plain<int64_t>(static_cast<int64_t*>(dst), static_cast<const int64_t*>(a),
                            static_cast<const int64_t*>(b), n, op);
      return true;
    case DType::bf16:
      reduce_half<bf16_to_float, float_to_bf16>(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(a),
                                                static_cast<const uint16_t*>(b), n, op);
      return true;
    case DType::f16:
#ifdef __FLT16_MAX__
      reduce_half<f16_to_float, float_to_f16>(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(a),
                                              static_cast<const uint16_t*>(b), n, op);
      return true;
#else
      return false;
#endif
  }
  return false;
}

}  // namespace fmcomm
