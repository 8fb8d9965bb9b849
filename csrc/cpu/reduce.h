// Element-wise reduction kernels: dst[i] = a[i] (op) b[i].
//
// These are the kernels the executor runs when a received segment is combined with
// local data. Results must equal torch's CPU ops bit for bit (the Python fallback), so:
//  - float16 and bfloat16 are widened to float, combined, and rounded back to nearest
//    even once (what torch's CPU kernels do);
//  - integer sum/prod wrap around in two's complement (as torch), computed in
//    unsigned arithmetic because signed overflow is undefined in C++;
//  - min/max propagate NaN (torch.minimum/maximum) and return an operand's own bits.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fmcomm {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3, i32 = 4, i64 = 5 };
// avg (code 1) reduces as sum; the division by the world size happens once at the end.
enum class RedOp : int { sum = 0, avg = 1, min = 2, max = 3, prod = 4 };

// dst may alias a or b exactly (same pointer); partial overlap is not allowed.
// Returns false when this build has no kernel for the dtype (the caller falls back).
bool reduce(void* dst, const void* a, const void* b, std::size_t count, DType dtype, RedOp op);

bool has_float16();

}  // namespace fmcomm
