// CUDA versions of fmcomm's gradient-compression kernels (contract: csrc/cpu/COMPRESS_CONTRACT.md).
//
// Built by setup.py into fmcomm/_cuda_kernels.so (a plain shared library, CUDA runtime
// linked statically) and loaded with ctypes by fmcomm/compression/cuda_kernels.py, which
// checks every argument before calling in. Each launcher takes device addresses, sizes,
// the device index and a cudaStream_t (as an integer), enqueues its kernels on that stream
// and returns a cudaError_t code (0: success); nothing here synchronizes.
//
// Besides the launchers, fmcomm_cuda_host_* run the same element arithmetic
// (compress_math.cuh) and the same top-k selection logic on the CPU, touching no CUDA API,
// so the tests can check them bit for bit against torch on a machine without a GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "compress_math.cuh"

#define FMC_API extern "C" __attribute__((visibility("default")))

namespace fmcomm_cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxGrid = 4096;  // grid-stride kernels: at most this many blocks

// onebit_encode: a block covers kRounds * kThreads bytes of output (8 inputs each).
constexpr int kOnebitRounds = 8;
constexpr int64_t kOnebitGroupsPerBlock = int64_t(kOnebitRounds) * kThreads;
constexpr int kFinalThreads = 1024;

// top-k compaction tiles: kThreads threads, kTileItems consecutive elements each.
constexpr int kTileItems = 16;
constexpr int64_t kTile = int64_t(kThreads) * kTileItems;
constexpr unsigned kHistMaxGrid = 1024;

inline unsigned grid_for(int64_t items, int64_t per_block, unsigned cap) {
  int64_t g = (items + per_block - 1) / per_block;
  if (g < 1) g = 1;
  return g > cap ? cap : static_cast<unsigned>(g);
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// Launch on `device`, leaving the calling thread's current device as it was.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    err_ = cudaGetDevice(&old_);
    if (err_ == cudaSuccess && old_ != device_) {
      err_ = cudaSetDevice(device_);
      switched_ = err_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(old_);
  }
  cudaError_t error() const { return err_; }

 private:
  int device_;
  int old_ = -1;
  bool switched_ = false;
  cudaError_t err_;
};

#define FMC_GUARD(device)                       \
  DeviceGuard guard_(device);                   \
  if (guard_.error() != cudaSuccess) return guard_.error()
#define FMC_TRY(expr)                           \
  do {                                          \
    cudaError_t e_ = (expr);                    \
    if (e_ != cudaSuccess) return e_;           \
  } while (0)

// The scale block of element i, carried along consecutive elements without dividing again.
struct BlockCursor {
  int64_t b, off, block;
  __device__ BlockCursor(int64_t i, int64_t blk, bool narrow) : block(blk) {
    if (narrow) {
      const uint32_t q = static_cast<uint32_t>(i) / static_cast<uint32_t>(blk);
      b = q;
      off = i - int64_t(q) * blk;
    } else {
      b = i / blk;
      off = i - b * blk;
    }
  }
  __device__ void next() {
    if (++off == block) {
      off = 0;
      ++b;
    }
  }
};

// ---------------------------------------------------------------------------------- fp8

template <int FMT, bool RES, bool VEC>
__global__ void __launch_bounds__(kThreads)
fp8_encode_kernel(const float* x, float* r, uint8_t* q, const float* __restrict__ scale, int64_t n,
                  int64_t block) {
  const int64_t groups = (n + 3) / 4;
  const bool narrow = n <= int64_t(UINT32_MAX);
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const int64_t i0 = g * 4;
    BlockCursor cur(i0, block, narrow);
    if (VEC && i0 + 4 <= n) {
      const float4 xv = reinterpret_cast<const float4*>(x)[g];
      float xs[4] = {xv.x, xv.y, xv.z, xv.w};
      float rs[4] = {0.f, 0.f, 0.f, 0.f};
      if (RES) {
        const float4 rv = reinterpret_cast<const float4*>(r)[g];
        rs[0] = rv.x, rs[1] = rv.y, rs[2] = rv.z, rs[3] = rv.w;
      }
      uint32_t packed = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint8_t v = fp8_encode_element<FMT, RES>(xs[j], &rs[j], __ldg(scale + cur.b));
        packed |= uint32_t(v) << (8 * j);
        cur.next();
      }
      reinterpret_cast<uint32_t*>(q)[g] = packed;
      if (RES) reinterpret_cast<float4*>(r)[g] = make_float4(rs[0], rs[1], rs[2], rs[3]);
    } else {
      for (int j = 0; j < 4 && i0 + j < n; ++j) {
        const int64_t i = i0 + j;
        float rr = RES ? r[i] : 0.f;
        q[i] = fp8_encode_element<FMT, RES>(x[i], &rr, __ldg(scale + cur.b));
        if (RES) r[i] = rr;
        cur.next();
      }
    }
  }
}

template <int FMT, bool ACC, bool VEC>
__global__ void __launch_bounds__(kThreads)
fp8_decode_kernel(const uint8_t* q, float* out, const float* __restrict__ scale, int64_t n, int64_t block) {
  const int64_t groups = (n + 3) / 4;
  const bool narrow = n <= int64_t(UINT32_MAX);
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const int64_t i0 = g * 4;
    BlockCursor cur(i0, block, narrow);
    if (VEC && i0 + 4 <= n) {
      const uint32_t packed = reinterpret_cast<const uint32_t*>(q)[g];
      float o[4] = {0.f, 0.f, 0.f, 0.f};
      if (ACC) {
        const float4 ov = reinterpret_cast<const float4*>(out)[g];
        o[0] = ov.x, o[1] = ov.y, o[2] = ov.z, o[3] = ov.w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        o[j] = fp8_decode_element<FMT, ACC>(static_cast<uint8_t>(packed >> (8 * j)), o[j], __ldg(scale + cur.b));
        cur.next();
      }
      reinterpret_cast<float4*>(out)[g] = make_float4(o[0], o[1], o[2], o[3]);
    } else {
      for (int j = 0; j < 4 && i0 + j < n; ++j) {
        const int64_t i = i0 + j;
        out[i] = fp8_decode_element<FMT, ACC>(q[i], ACC ? out[i] : 0.f, __ldg(scale + cur.b));
        cur.next();
      }
    }
  }
}

template <int FMT, bool RES>
cudaError_t launch_fp8_encode_t(const float* x, float* r, uint8_t* q, const float* scale, int64_t n, int64_t block,
                                cudaStream_t stream) {
  const unsigned grid = grid_for((n + 3) / 4, kThreads, kMaxGrid);
  const bool vec = aligned(x, 16) && aligned(q, 4) && (!RES || aligned(r, 16));
  if (vec)
    fp8_encode_kernel<FMT, RES, true><<<grid, kThreads, 0, stream>>>(x, r, q, scale, n, block);
  else
    fp8_encode_kernel<FMT, RES, false><<<grid, kThreads, 0, stream>>>(x, r, q, scale, n, block);
  return cudaGetLastError();
}

template <int FMT, bool ACC>
cudaError_t launch_fp8_decode_t(const uint8_t* q, float* out, const float* scale, int64_t n, int64_t block,
                                cudaStream_t stream) {
  const unsigned grid = grid_for((n + 3) / 4, kThreads, kMaxGrid);
  if (aligned(q, 4) && aligned(out, 16))
    fp8_decode_kernel<FMT, ACC, true><<<grid, kThreads, 0, stream>>>(q, out, scale, n, block);
  else
    fp8_decode_kernel<FMT, ACC, false><<<grid, kThreads, 0, stream>>>(q, out, scale, n, block);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------- onebit

// Sign bits of c = x (+ r), one output byte per thread per round; with SUM, the block's
// float64 sum of |c| in a fixed order (each thread its elements in increasing index, then
// cub's fixed block tree) into partials[blockIdx.x].
template <bool RES, bool SUM, bool VEC>
__global__ void __launch_bounds__(kThreads)
onebit_bits_kernel(const float* x, const float* r, uint8_t* bits, int64_t n, double* partials) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t ngroups = (n + 7) / 8;
  const int64_t base = int64_t(blockIdx.x) * kOnebitGroupsPerBlock;
  double sum = 0.0;
  for (int round = 0; round < kOnebitRounds; ++round) {
    const int64_t g = base + int64_t(round) * kThreads + threadIdx.x;
    if (g >= ngroups) break;
    const int64_t i0 = g * 8;
    const int cnt = n - i0 < 8 ? static_cast<int>(n - i0) : 8;
    float c[8];
    if (VEC && cnt == 8) {
      const float4 a = reinterpret_cast<const float4*>(x)[2 * g];
      const float4 b = reinterpret_cast<const float4*>(x)[2 * g + 1];
      c[0] = a.x, c[1] = a.y, c[2] = a.z, c[3] = a.w, c[4] = b.x, c[5] = b.y, c[6] = b.z, c[7] = b.w;
      if (RES) {
        const float4 ra = reinterpret_cast<const float4*>(r)[2 * g];
        const float4 rb = reinterpret_cast<const float4*>(r)[2 * g + 1];
        const float rs[8] = {ra.x, ra.y, ra.z, ra.w, rb.x, rb.y, rb.z, rb.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) c[j] = add_rn(c[j], rs[j]);
      }
    } else {
      for (int j = 0; j < 8; ++j) c[j] = j < cnt ? (RES ? add_rn(x[i0 + j], r[i0 + j]) : x[i0 + j]) : 0.f;
    }
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < cnt) {
        if (c[j] < 0.0f) byte |= 1u << j;
        if (SUM) sum = __dadd_rn(sum, static_cast<double>(fabsf(c[j])));
      }
    }
    bits[g] = static_cast<uint8_t>(byte);
  }
  if (SUM) {
    const double total = Reduce(tmp).Sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  }
}

__global__ void __launch_bounds__(kFinalThreads)
onebit_finalize_kernel(const double* partials, int64_t nparts, int64_t n, float* scale_out) {
  using Reduce = cub::BlockReduce<double, kFinalThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < nparts; i += kFinalThreads) s = __dadd_rn(s, partials[i]);
  const double total = Reduce(tmp).Sum(s);
  if (threadIdx.x == 0) *scale_out = n > 0 ? __double2float_rn(__ddiv_rn(total, static_cast<double>(n))) : 0.0f;
}

// residual = c - (c < 0 ? -scale : scale) with c = x + residual; the scale from device
// memory (scale_ptr) or, when that is null, the value passed.
template <bool VEC>
__global__ void __launch_bounds__(kThreads)
onebit_residual_kernel(const float* x, float* r, int64_t n, const float* scale_ptr, float scale_val) {
  const float s = scale_ptr ? *scale_ptr : scale_val;
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const int64_t i0 = g * 4;
    if (VEC && i0 + 4 <= n) {
      const float4 xv = reinterpret_cast<const float4*>(x)[g];
      const float4 rv = reinterpret_cast<const float4*>(r)[g];
      reinterpret_cast<float4*>(r)[g] = make_float4(
          onebit_residual(add_rn(xv.x, rv.x), s), onebit_residual(add_rn(xv.y, rv.y), s),
          onebit_residual(add_rn(xv.z, rv.z), s), onebit_residual(add_rn(xv.w, rv.w), s));
    } else {
      for (int64_t i = i0; i < i0 + 4 && i < n; ++i) r[i] = onebit_residual(add_rn(x[i], r[i]), s);
    }
  }
}

template <bool ACC, bool VEC>
__global__ void __launch_bounds__(kThreads)
onebit_decode_kernel(const uint8_t* bits, float* out, int64_t n, float scale) {
  const int64_t groups = (n + 7) / 8;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += int64_t(gridDim.x) * kThreads) {
    const uint32_t byte = bits[g];
    const int64_t i0 = g * 8;
    float d[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) d[j] = ((byte >> j) & 1u) ? -scale : scale;
    if (VEC && i0 + 8 <= n) {
      float4* o = reinterpret_cast<float4*>(out) + 2 * g;
      float4 a = make_float4(d[0], d[1], d[2], d[3]), b = make_float4(d[4], d[5], d[6], d[7]);
      if (ACC) {
        const float4 oa = o[0], ob = o[1];
        a = make_float4(add_rn(oa.x, a.x), add_rn(oa.y, a.y), add_rn(oa.z, a.z), add_rn(oa.w, a.w));
        b = make_float4(add_rn(ob.x, b.x), add_rn(ob.y, b.y), add_rn(ob.z, b.z), add_rn(ob.w, b.w));
      }
      o[0] = a;
      o[1] = b;
    } else {
      for (int j = 0; j < 8 && i0 + j < n; ++j) out[i0 + j] = ACC ? add_rn(out[i0 + j], d[j]) : d[j];
    }
  }
}

// -------------------------------------------------------------------------------- top-k
//
// Radix select of the k-th largest key t (three digit passes over the keys, each a
// histogram of the keys that match the digits found so far and a one-block search for
// the digit holding the k-th), then a stable compaction in index order of keys > t plus
// the first (k - count(> t)) keys == t: per-tile counts, their exclusive scan, and a
// per-tile block scan that gives each selected element its output position. No loop
// depends on the data, so a NaN can change the selection but never the control flow.

struct TopkWorkspace {
  uint32_t* hist;         // kTopkPasses * kTopkMaxBins
  TopkState* state;
  uint64_t* tile_counts;  // per tile: (count > t) << 32 | count == t
  uint64_t* tile_offsets;
};

constexpr size_t kTopkHistBytes = sizeof(uint32_t) * kTopkPasses * kTopkMaxBins;
constexpr size_t kTopkStateOffset = kTopkHistBytes;
constexpr size_t kTopkTilesOffset = kTopkStateOffset + 256;

inline int64_t topk_tiles(int64_t n) { return (n + kTile - 1) / kTile; }
inline int64_t topk_workspace_bytes(int64_t n) { return int64_t(kTopkTilesOffset) + 16 * topk_tiles(n); }

inline TopkWorkspace topk_workspace(void* base, int64_t n) {
  char* p = static_cast<char*>(base);
  TopkWorkspace w;
  w.hist = reinterpret_cast<uint32_t*>(p);
  w.state = reinterpret_cast<TopkState*>(p + kTopkStateOffset);
  w.tile_counts = reinterpret_cast<uint64_t*>(p + kTopkTilesOffset);
  w.tile_offsets = w.tile_counts + topk_tiles(n);
  return w;
}

__global__ void __launch_bounds__(1024) topk_init_kernel(uint32_t* hist, TopkState* state, uint32_t k) {
  for (int i = threadIdx.x; i < kTopkPasses * kTopkMaxBins; i += 1024) hist[i] = 0;
  if (threadIdx.x == 0) *state = TopkState{0u, k, 0u, 0u};
}

// One digit pass. With ADD_RES (pass 0 only), c = x + r is formed here and stored into r,
// where the later passes read it; without, c is read from x. Lanes of a warp walk the
// data in step, so __match_any_sync can merge equal digits into one shared atomic.
template <bool ADD_RES, bool VEC>
__global__ void __launch_bounds__(kThreads)
topk_hist_kernel(const float* x, float* r, int64_t n, int pass, const TopkState* state, uint32_t* hist, int do_hist) {
  __shared__ uint32_t sh[kTopkMaxBins];
  const int shift = topk_shift(pass);
  const uint32_t nbins = 1u << topk_width(pass);
  const uint32_t high = topk_high_mask(pass);
  const uint32_t prefix = pass == 0 ? 0u : state->prefix;
  for (uint32_t i = threadIdx.x; i < nbins; i += kThreads) sh[i] = 0;
  __syncthreads();
  constexpr int E = VEC ? 4 : 1;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * kThreads) >> 5;
  for (int64_t base = warp * 32 * E; base < n; base += warps * 32 * E) {
    const int64_t i0 = base + int64_t(lane) * E;
    float c[E];
    bool valid[E];
    bool full = false;
    if constexpr (VEC) {
      if (i0 + E <= n) {
        full = true;
        const float4 xv = reinterpret_cast<const float4*>(x)[i0 / 4];
        float cv[4] = {xv.x, xv.y, xv.z, xv.w};
        if constexpr (ADD_RES) {
          const float4 rv = reinterpret_cast<const float4*>(r)[i0 / 4];
          cv[0] = add_rn(cv[0], rv.x), cv[1] = add_rn(cv[1], rv.y), cv[2] = add_rn(cv[2], rv.z),
          cv[3] = add_rn(cv[3], rv.w);
          reinterpret_cast<float4*>(r)[i0 / 4] = make_float4(cv[0], cv[1], cv[2], cv[3]);
        }
#pragma unroll
        for (int j = 0; j < E; ++j) c[j] = cv[j], valid[j] = true;
      }
    }
    if (!full) {
#pragma unroll
      for (int j = 0; j < E; ++j) {
        const int64_t i = i0 + j;
        valid[j] = i < n;
        c[j] = 0.f;
        if (valid[j]) {
          if (ADD_RES) {
            c[j] = add_rn(x[i], r[i]);
            r[i] = c[j];
          } else {
            c[j] = x[i];
          }
        }
      }
    }
    if (do_hist) {
#pragma unroll
      for (int j = 0; j < E; ++j) {
        uint32_t digit = 0xFFFFFFFFu;
        if (valid[j]) {
          const uint32_t key = topk_key(c[j]);
          if ((key & high) == prefix) digit = (key >> shift) & (nbins - 1u);
        }
        const uint32_t peers = __match_any_sync(0xFFFFFFFFu, digit);
        if (digit != 0xFFFFFFFFu && lane == __ffs(peers) - 1) atomicAdd(&sh[digit], uint32_t(__popc(peers)));
      }
    }
  }
  if (!do_hist) return;
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < nbins; i += kThreads)
    if (sh[i]) atomicAdd(&hist[pass * kTopkMaxBins + i], sh[i]);
}

// Find the digit d holding the k_rem-th largest among the matching keys: with the bins
// taken from the highest digit down, before(d) < k_rem <= before(d) + hist[d].
__global__ void __launch_bounds__(1024) topk_find_kernel(const uint32_t* hist, int pass, TopkState* state) {
  using Scan = cub::BlockScan<uint32_t, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  const uint32_t nbins = 1u << topk_width(pass);
  const uint32_t k_rem = state->k_rem;
  const uint32_t prefix = state->prefix;
  uint32_t h[2], before[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint32_t pos = 2u * threadIdx.x + j;  // position from the top digit
    h[j] = pos < nbins ? hist[pass * kTopkMaxBins + (nbins - 1u - pos)] : 0u;
  }
  __syncthreads();  // every thread has read the state before it is rewritten
  Scan(tmp).ExclusiveSum(h, before);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint32_t pos = 2u * threadIdx.x + j;
    if (pos < nbins && h[j] > 0 && before[j] < k_rem && k_rem <= before[j] + h[j]) {
      const uint32_t digit = nbins - 1u - pos;
      state->prefix = prefix | (digit << topk_shift(pass));
      state->k_rem = k_rem - before[j];
      state->found += 1;
    }
  }
}

__device__ __forceinline__ uint64_t topk_class(uint32_t key, uint32_t t) {
  return key > t ? (uint64_t(1) << 32) : (key == t ? uint64_t(1) : uint64_t(0));
}

__global__ void __launch_bounds__(kThreads)
topk_count_kernel(const float* c, int64_t n, const TopkState* state, uint64_t* tile_counts) {
  using Reduce = cub::BlockReduce<uint64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const uint32_t t = state->prefix;
  const int64_t tile0 = int64_t(blockIdx.x) * kTile;
  uint64_t cnt = 0;
#pragma unroll 4
  for (int j = 0; j < kTileItems; ++j) {
    const int64_t i = tile0 + int64_t(j) * kThreads + threadIdx.x;
    if (i < n) cnt += topk_class(topk_key(c[i]), t);
  }
  const uint64_t total = Reduce(tmp).Sum(cnt);
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = total;
}

constexpr int kScanThreads = 512;

__global__ void __launch_bounds__(kScanThreads)
topk_scan_kernel(const uint64_t* tile_counts, uint64_t* tile_offsets, int64_t ntiles) {
  using Scan = cub::BlockScan<uint64_t, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ uint64_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < ntiles; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const uint64_t v = i < ntiles ? tile_counts[i] : 0;
    uint64_t excl, agg;
    Scan(tmp).ExclusiveSum(v, excl, agg);
    if (i < ntiles) tile_offsets[i] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += agg;
    __syncthreads();
  }
}

// Thread t of tile b owns elements [b*kTile + t*kTileItems, +kTileItems); the block scan of
// the packed (gt, eq) counts plus the tile's offset gives the counts before each element.
template <bool VEC>
__global__ void __launch_bounds__(kThreads)
topk_write_kernel(const float* c, float* r, int64_t n, int64_t k, const TopkState* state,
                  const uint64_t* tile_offsets, int32_t* idx_out, float* val_out) {
  using Scan = cub::BlockScan<uint64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const uint32_t t = state->prefix;
  const uint32_t k_eq = state->k_rem;
  const int64_t i0 = int64_t(blockIdx.x) * kTile + int64_t(threadIdx.x) * kTileItems;
  float v[kTileItems];
  if (VEC && i0 + kTileItems <= n) {
    const float4* p = reinterpret_cast<const float4*>(c + i0);
#pragma unroll
    for (int j = 0; j < kTileItems / 4; ++j) {
      const float4 a = p[j];
      v[4 * j] = a.x, v[4 * j + 1] = a.y, v[4 * j + 2] = a.z, v[4 * j + 3] = a.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kTileItems; ++j) v[j] = i0 + j < n ? c[i0 + j] : 0.f;
  }
  uint64_t mine = 0;
#pragma unroll
  for (int j = 0; j < kTileItems; ++j)
    if (i0 + j < n) mine += topk_class(topk_key(v[j]), t);
  uint64_t excl;
  Scan(tmp).ExclusiveSum(mine, excl);
  excl += tile_offsets[blockIdx.x];
  uint32_t gt_before = static_cast<uint32_t>(excl >> 32);
  uint32_t eq_before = static_cast<uint32_t>(excl);
  for (int j = 0; j < kTileItems; ++j) {
    const int64_t i = i0 + j;
    if (i >= n) break;
    const uint32_t key = topk_key(v[j]);
    int64_t pos = -1;
    if (key > t) {
      pos = int64_t(gt_before) + (eq_before < k_eq ? eq_before : k_eq);
      ++gt_before;
    } else if (key == t) {
      if (eq_before < k_eq) pos = int64_t(gt_before) + eq_before;
      ++eq_before;
    }
    if (pos >= 0 && pos < k) {
      idx_out[pos] = static_cast<int32_t>(i);
      val_out[pos] = v[j];
      if (r) r[i] = 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------- scatter

__global__ void __launch_bounds__(kThreads)
scatter_add_kernel(const int32_t* idx, const float* val, float* out, int64_t m, int64_t n_out) {
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < m; j += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx[j];
    if (i >= 0 && i < n_out) out[i] = add_rn(out[i], val[j]);  // bounds were checked in Python too
  }
}

}  // namespace
}  // namespace fmcomm_cuda

using namespace fmcomm_cuda;

#define FMC_PTR(T, p) reinterpret_cast<T>(static_cast<uintptr_t>(p))
#define FMC_STREAM(s) reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s))

// ------------------------------------------------------------------------------ the ABI

FMC_API int fmcomm_cuda_abi_version(void) { return 1; }

#ifndef FMCOMM_CUDA_ARCHS
#define FMCOMM_CUDA_ARCHS "unknown"
#endif
// setup.py looks for this literal in the built file to tell whether it was built for the
// architectures asked for now.
#define FMC_ARCH_MARKER "fmcomm-cuda-archs=" FMCOMM_CUDA_ARCHS ";"

FMC_API const char* fmcomm_cuda_build_info(void) {
  static char info[200];
  std::snprintf(info, sizeof info, "%s cudart %d.%d (static)", FMC_ARCH_MARKER, CUDART_VERSION / 1000,
                (CUDART_VERSION % 1000) / 10);
  return info;
}

FMC_API const char* fmcomm_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// 0 when `device` can run these kernels (a driver new enough for this runtime, and machine
// code or PTX in this library that the device accepts), else the CUDA error.
FMC_API int fmcomm_cuda_probe(int device) {
  int count = 0;
  FMC_TRY(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) return cudaErrorInvalidDevice;
  FMC_GUARD(device);
  cudaFuncAttributes attr;
  FMC_TRY(cudaFuncGetAttributes(&attr, topk_find_kernel));
  FMC_TRY(cudaFuncGetAttributes(&attr, fp8_encode_kernel<kE4M3, true, true>));
  return cudaSuccess;
}

FMC_API int fmcomm_cuda_fp8_encode(uint64_t x, uint64_t residual, uint64_t out, uint64_t scale, int64_t n,
                                   int64_t block, int fmt, int device, uint64_t stream) {
  if (n < 0 || block < 1 || (fmt != kE4M3 && fmt != kE5M2)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FMC_GUARD(device);
  const float* xp = FMC_PTR(const float*, x);
  float* rp = FMC_PTR(float*, residual);
  uint8_t* qp = FMC_PTR(uint8_t*, out);
  const float* sp = FMC_PTR(const float*, scale);
  cudaStream_t s = FMC_STREAM(stream);
  if (fmt == kE4M3)
    return rp ? launch_fp8_encode_t<kE4M3, true>(xp, rp, qp, sp, n, block, s)
              : launch_fp8_encode_t<kE4M3, false>(xp, rp, qp, sp, n, block, s);
  return rp ? launch_fp8_encode_t<kE5M2, true>(xp, rp, qp, sp, n, block, s)
            : launch_fp8_encode_t<kE5M2, false>(xp, rp, qp, sp, n, block, s);
}

FMC_API int fmcomm_cuda_fp8_decode(uint64_t q, uint64_t out, uint64_t scale, int64_t n, int64_t block, int fmt,
                                   int accumulate, int device, uint64_t stream) {
  if (n < 0 || block < 1 || (fmt != kE4M3 && fmt != kE5M2)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FMC_GUARD(device);
  const uint8_t* qp = FMC_PTR(const uint8_t*, q);
  float* op = FMC_PTR(float*, out);
  const float* sp = FMC_PTR(const float*, scale);
  cudaStream_t s = FMC_STREAM(stream);
  if (fmt == kE4M3)
    return accumulate ? launch_fp8_decode_t<kE4M3, true>(qp, op, sp, n, block, s)
                      : launch_fp8_decode_t<kE4M3, false>(qp, op, sp, n, block, s);
  return accumulate ? launch_fp8_decode_t<kE5M2, true>(qp, op, sp, n, block, s)
                    : launch_fp8_decode_t<kE5M2, false>(qp, op, sp, n, block, s);
}

FMC_API int64_t fmcomm_cuda_onebit_workspace_bytes(int64_t n) {
  const int64_t groups = (n + 7) / 8;
  const int64_t blocks = (groups + kOnebitGroupsPerBlock - 1) / kOnebitGroupsPerBlock;
  return 8 * (blocks > 0 ? blocks : 1);
}

namespace {
template <bool RES, bool SUM>
void onebit_bits_pick(bool vec, const float* x, const float* r, uint8_t* bits, int64_t n, double* partials,
                      unsigned blocks, cudaStream_t s) {
  if (vec) onebit_bits_kernel<RES, SUM, true><<<blocks, kThreads, 0, s>>>(x, r, bits, n, partials);
  else onebit_bits_kernel<RES, SUM, false><<<blocks, kThreads, 0, s>>>(x, r, bits, n, partials);
}

cudaError_t onebit_bits_launch(const float* x, const float* r, uint8_t* bits, int64_t n, double* partials,
                               unsigned blocks, cudaStream_t s) {
  const bool vec = aligned(x, 16) && (!r || aligned(r, 16));
  if (r) {
    if (partials) onebit_bits_pick<true, true>(vec, x, r, bits, n, partials, blocks, s);
    else onebit_bits_pick<true, false>(vec, x, r, bits, n, partials, blocks, s);
  } else {
    if (partials) onebit_bits_pick<false, true>(vec, x, r, bits, n, partials, blocks, s);
    else onebit_bits_pick<false, false>(vec, x, r, bits, n, partials, blocks, s);
  }
  return cudaGetLastError();
}

cudaError_t onebit_residual_launch(const float* x, float* r, int64_t n, const float* scale_ptr, float scale_val,
                                   cudaStream_t s) {
  const unsigned grid = grid_for((n + 3) / 4, kThreads, kMaxGrid);
  if (aligned(x, 16) && aligned(r, 16))
    onebit_residual_kernel<true><<<grid, kThreads, 0, s>>>(x, r, n, scale_ptr, scale_val);
  else
    onebit_residual_kernel<false><<<grid, kThreads, 0, s>>>(x, r, n, scale_ptr, scale_val);
  return cudaGetLastError();
}
}  // namespace

// Sign bits into `bits`, the float32 scale (mean |c|, a fixed-order float64 reduction)
// into the device float at scale_out, and with a residual its update. The caller reads
// scale_out back after the stream has run. workspace: fmcomm_cuda_onebit_workspace_bytes(n).
FMC_API int fmcomm_cuda_onebit_encode(uint64_t x, uint64_t residual, uint64_t bits, int64_t n, uint64_t scale_out,
                                      uint64_t workspace, int64_t workspace_bytes, int device, uint64_t stream) {
  if (n < 0 || workspace_bytes < fmcomm_cuda_onebit_workspace_bytes(n)) return cudaErrorInvalidValue;
  FMC_GUARD(device);
  cudaStream_t s = FMC_STREAM(stream);
  float* scale_p = FMC_PTR(float*, scale_out);
  if (n == 0) return cudaMemsetAsync(scale_p, 0, sizeof(float), s);
  const float* xp = FMC_PTR(const float*, x);
  float* rp = FMC_PTR(float*, residual);
  double* partials = FMC_PTR(double*, workspace);
  const int64_t groups = (n + 7) / 8;
  const int64_t blocks = (groups + kOnebitGroupsPerBlock - 1) / kOnebitGroupsPerBlock;
  if (blocks > int64_t(INT32_MAX)) return cudaErrorInvalidValue;
  FMC_TRY(onebit_bits_launch(xp, rp, FMC_PTR(uint8_t*, bits), n, partials, static_cast<unsigned>(blocks), s));
  onebit_finalize_kernel<<<1, kFinalThreads, 0, s>>>(partials, blocks, n, scale_p);
  FMC_TRY(cudaGetLastError());
  if (rp) FMC_TRY(onebit_residual_launch(xp, rp, n, scale_p, 0.f, s));
  return cudaSuccess;
}

// The same sign bits and residual update for a scale given by the caller (no reduction).
FMC_API int fmcomm_cuda_onebit_encode_with_scale(uint64_t x, uint64_t residual, uint64_t bits, int64_t n, float scale,
                                                 int device, uint64_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FMC_GUARD(device);
  cudaStream_t s = FMC_STREAM(stream);
  const float* xp = FMC_PTR(const float*, x);
  float* rp = FMC_PTR(float*, residual);
  const int64_t groups = (n + 7) / 8;
  const int64_t blocks = (groups + kOnebitGroupsPerBlock - 1) / kOnebitGroupsPerBlock;
  if (blocks > int64_t(INT32_MAX)) return cudaErrorInvalidValue;
  FMC_TRY(onebit_bits_launch(xp, rp, FMC_PTR(uint8_t*, bits), n, nullptr, static_cast<unsigned>(blocks), s));
  if (rp) FMC_TRY(onebit_residual_launch(xp, rp, n, nullptr, scale, s));
  return cudaSuccess;
}

FMC_API int fmcomm_cuda_onebit_decode(uint64_t bits, uint64_t out, int64_t n, float scale, int accumulate, int device,
                                      uint64_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FMC_GUARD(device);
  cudaStream_t s = FMC_STREAM(stream);
  const uint8_t* bp = FMC_PTR(const uint8_t*, bits);
  float* op = FMC_PTR(float*, out);
  const unsigned grid = grid_for((n + 7) / 8, kThreads, kMaxGrid);
  const bool vec = aligned(op, 16);
  if (accumulate) {
    if (vec) onebit_decode_kernel<true, true><<<grid, kThreads, 0, s>>>(bp, op, n, scale);
    else onebit_decode_kernel<true, false><<<grid, kThreads, 0, s>>>(bp, op, n, scale);
  } else {
    if (vec) onebit_decode_kernel<false, true><<<grid, kThreads, 0, s>>>(bp, op, n, scale);
    else onebit_decode_kernel<false, false><<<grid, kThreads, 0, s>>>(bp, op, n, scale);
  }
  return cudaGetLastError();
}

FMC_API int64_t fmcomm_cuda_topk_workspace_bytes(int64_t n) { return topk_workspace_bytes(n < 0 ? 0 : n); }

FMC_API int fmcomm_cuda_topk_select(uint64_t x, uint64_t residual, int64_t n, int64_t k, uint64_t idx_out,
                                    uint64_t val_out, uint64_t workspace, int64_t workspace_bytes, int device,
                                    uint64_t stream) {
  if (n < 0 || n > int64_t(INT32_MAX) || k < 0 || k > n) return cudaErrorInvalidValue;
  if (workspace_bytes < topk_workspace_bytes(n)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FMC_GUARD(device);
  cudaStream_t s = FMC_STREAM(stream);
  const float* xp = FMC_PTR(const float*, x);
  float* rp = FMC_PTR(float*, residual);
  const float* cp = rp ? rp : xp;  // where c is once pass 0 has run
  TopkWorkspace w = topk_workspace(FMC_PTR(void*, workspace), n);
  const bool vec_x = aligned(xp, 16) && (!rp || aligned(rp, 16));
  const bool vec_c = aligned(cp, 16);
  const unsigned hgrid = grid_for(n, int64_t(kThreads) * 4, kHistMaxGrid);
  if (k == 0) {  // nothing selected: only residual = x + residual
    if (rp) {
      if (vec_x) topk_hist_kernel<true, true><<<hgrid, kThreads, 0, s>>>(xp, rp, n, 0, w.state, w.hist, 0);
      else topk_hist_kernel<true, false><<<hgrid, kThreads, 0, s>>>(xp, rp, n, 0, w.state, w.hist, 0);
    }
    return cudaGetLastError();
  }
  topk_init_kernel<<<1, 1024, 0, s>>>(w.hist, w.state, static_cast<uint32_t>(k));
  for (int pass = 0; pass < kTopkPasses; ++pass) {
    if (pass == 0 && rp) {
      if (vec_x) topk_hist_kernel<true, true><<<hgrid, kThreads, 0, s>>>(xp, rp, n, 0, w.state, w.hist, 1);
      else topk_hist_kernel<true, false><<<hgrid, kThreads, 0, s>>>(xp, rp, n, 0, w.state, w.hist, 1);
    } else {
      if (vec_c) topk_hist_kernel<false, true><<<hgrid, kThreads, 0, s>>>(cp, nullptr, n, pass, w.state, w.hist, 1);
      else topk_hist_kernel<false, false><<<hgrid, kThreads, 0, s>>>(cp, nullptr, n, pass, w.state, w.hist, 1);
    }
    topk_find_kernel<<<1, 1024, 0, s>>>(w.hist, pass, w.state);
  }
  const int64_t ntiles = topk_tiles(n);
  topk_count_kernel<<<static_cast<unsigned>(ntiles), kThreads, 0, s>>>(cp, n, w.state, w.tile_counts);
  topk_scan_kernel<<<1, kScanThreads, 0, s>>>(w.tile_counts, w.tile_offsets, ntiles);
  int32_t* ip = FMC_PTR(int32_t*, idx_out);
  float* vp = FMC_PTR(float*, val_out);
  if (vec_c)
    topk_write_kernel<true><<<static_cast<unsigned>(ntiles), kThreads, 0, s>>>(cp, rp, n, k, w.state, w.tile_offsets, ip, vp);
  else
    topk_write_kernel<false><<<static_cast<unsigned>(ntiles), kThreads, 0, s>>>(cp, rp, n, k, w.state, w.tile_offsets, ip, vp);
  return cudaGetLastError();
}

FMC_API int fmcomm_cuda_scatter_add(uint64_t idx, uint64_t val, uint64_t out, int64_t m, int64_t n_out, int device,
                                    uint64_t stream) {
  if (m < 0 || n_out < 0) return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  FMC_GUARD(device);
  const unsigned grid = grid_for(m, kThreads, kMaxGrid);
  scatter_add_kernel<<<grid, kThreads, 0, FMC_STREAM(stream)>>>(FMC_PTR(const int32_t*, idx),
                                                                FMC_PTR(const float*, val), FMC_PTR(float*, out), m,
                                                                n_out);
  return cudaGetLastError();
}

// ------------------------------------------------------------- host emulation (no CUDA)
//
// The device kernels' element arithmetic and selection logic run on the CPU, for tests on
// machines without a GPU. Pointers are host pointers.

FMC_API void fmcomm_cuda_host_fp8_encode(const float* x, float* residual, uint8_t* out, const float* scale, int64_t n,
                                         int64_t block, int fmt) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = scale[i / block];
    if (fmt == kE4M3)
      out[i] = residual ? fp8_encode_element<kE4M3, true>(x[i], residual + i, s)
                        : fp8_encode_element<kE4M3, false>(x[i], nullptr, s);
    else
      out[i] = residual ? fp8_encode_element<kE5M2, true>(x[i], residual + i, s)
                        : fp8_encode_element<kE5M2, false>(x[i], nullptr, s);
  }
}

FMC_API void fmcomm_cuda_host_fp8_decode(const uint8_t* q, float* out, const float* scale, int64_t n, int64_t block,
                                         int fmt, int accumulate) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = scale[i / block];
    if (fmt == kE4M3)
      out[i] = accumulate ? fp8_decode_element<kE4M3, true>(q[i], out[i], s)
                          : fp8_decode_element<kE4M3, false>(q[i], 0.f, s);
    else
      out[i] = accumulate ? fp8_decode_element<kE5M2, true>(q[i], out[i], s)
                          : fp8_decode_element<kE5M2, false>(q[i], 0.f, s);
  }
}

FMC_API void fmcomm_cuda_host_onebit_encode_with_scale(const float* x, float* residual, uint8_t* bits, int64_t n,
                                                       float scale) {
  for (int64_t g = 0; g < (n + 7) / 8; ++g) {
    uint32_t byte = 0;
    for (int64_t i = 8 * g; i < 8 * g + 8 && i < n; ++i) {
      const float c = residual ? add_rn(x[i], residual[i]) : x[i];
      if (c < 0.0f) byte |= 1u << (i - 8 * g);
      if (residual) residual[i] = onebit_residual(c, scale);
    }
    bits[g] = static_cast<uint8_t>(byte);
  }
}

// The device top-k's passes in order: digit histograms and searches, tile counts and
// offsets, then each element's output position from the counts before it. Returns the
// number of passes that found their digit (3), or 0 when k == 0 or n == 0.
FMC_API int fmcomm_cuda_host_topk_select(const float* x, float* residual, int64_t n, int64_t k, int32_t* idx_out,
                                         float* val_out) {
  if (n <= 0) return 0;
  std::vector<float> c(n);
  for (int64_t i = 0; i < n; ++i) {
    c[i] = residual ? add_rn(x[i], residual[i]) : x[i];
    if (residual) residual[i] = c[i];
  }
  if (k <= 0) return 0;
  TopkState st{0u, static_cast<uint32_t>(k), 0u, 0u};
  std::vector<uint32_t> hist(kTopkMaxBins);
  for (int pass = 0; pass < kTopkPasses; ++pass) {
    const int shift = topk_shift(pass);
    const uint32_t nbins = 1u << topk_width(pass);
    const uint32_t high = topk_high_mask(pass);
    std::fill(hist.begin(), hist.end(), 0u);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = topk_key(c[i]);
      if ((key & high) == st.prefix) ++hist[(key >> shift) & (nbins - 1u)];
    }
    uint32_t before = 0;
    for (uint32_t pos = 0; pos < nbins; ++pos) {
      const uint32_t d = nbins - 1u - pos, h = hist[d];
      if (h > 0 && before < st.k_rem && st.k_rem <= before + h) {
        st.prefix |= d << shift;
        st.k_rem -= before;
        ++st.found;
        break;
      }
      before += h;
    }
  }
  const uint32_t t = st.prefix;
  uint64_t counts = 0;  // the tile offsets and block scans, run as one running count
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = topk_key(c[i]);
    const uint32_t gt_before = static_cast<uint32_t>(counts >> 32), eq_before = static_cast<uint32_t>(counts);
    int64_t pos = -1;
    if (key > t) pos = int64_t(gt_before) + (eq_before < st.k_rem ? eq_before : st.k_rem);
    else if (key == t && eq_before < st.k_rem) pos = int64_t(gt_before) + eq_before;
    counts += key > t ? (uint64_t(1) << 32) : (key == t ? 1u : 0u);
    if (pos >= 0 && pos < k) {
      idx_out[pos] = static_cast<int32_t>(i);
      val_out[pos] = c[i];
      if (residual) residual[i] = 0.0f;
    }
  }
  return static_cast<int>(st.found);
}
