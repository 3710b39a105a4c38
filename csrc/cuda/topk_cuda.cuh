// Shared by the four CUDA files of the masked top-k: masked_topk_cuda.cu (the op entry points,
// the choice between the paths, registration), masked_topk_fast.cu (the bracketed fast path:
// sampling, bracket, the one read of the scores), masked_topk_select.cu (the exact cut among the
// fast path's candidates) and masked_topk_exact.cu (the exact radix path, the tie path and the
// mask put-back). The algorithms are described at the top of masked_topk_fast.cu and
// masked_topk_exact.cu; masked_topk_cuda.cu says which runs when.
#pragma once

#include "../key_traits.h"
#include "../masked_topk.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <cstdint>

namespace ntksap_fast {
namespace cuda {

using ull = unsigned long long;

constexpr int kThreads = 256;  // block size of the streaming kernels (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr int kSelThreads = 1024;  // block size of the one-block selection kernels

__device__ __forceinline__ ull block_sum(ull v, ull* scratch /* kWarps words */) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  ull total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += scratch[w];
  __syncthreads();
  return total;
}

int sm_count(int device);

// Workspace of the fast path (int64 words, zeroed per call, used as unsigned long long); the
// first kHead words are read back by the host.
constexpr int kGatherCap = 2048;  // most candidates of one histogram bin sorted in one block
constexpr int kCandBinBits = 12;  // candidate histogram: 4096 bins over [lo, hi]
enum : int {
  kCount, kNan, kAbove, kInside, kNCand, kMode, kLo, kHi, kCShift, kBin, kK2, kNGather,
  kCutKey, kCutIdx,  // mode kCut: last kept (key, index); mode kTies: (threshold key, ties to keep)
  kTicket,
  kHead = 16,
  kSampleHist = kHead,                   // 2^16 uint32
  kCandHist = kSampleHist + (1 << 15),   // 4096 uint32
  kGather = kCandHist + (1 << 11),       // kGatherCap (key, index) pairs
  kWords = kGather + 2 * kGatherCap
};
// What the device settled (word kMode); kModeHost: nothing, the host decides from the status.
enum : ull { kModeHost = 0, kModeDone, kModeGather, kModeCut, kModeTies, kModeExact };

// masked_topk_fast.cu: launches the fast path (sample, bracket, scan, candidate select, fixup)
// on the current stream; no host synchronisation. ws: kWords zeroed words; ckey/cidx: room for
// cap candidates; backup: (n + 31) / 32 words when o == m (in place), else unused.
template <typename Bits>
void fast_select(const typename Bits::key_t* s, const bool* m, bool* o, uint32_t* backup, int64_t n,
                 int64_t n_keep, ull* ws, typename Bits::key_t* ckey, int64_t* cidx, int64_t cap,
                 int sms, cudaStream_t stream);

// masked_topk_select.cu: steps 4-6 of the fast path (exact cut among the candidates, fixup).
template <typename Bits>
void select_candidates(ull* ws, const typename Bits::key_t* ckey, const int64_t* cidx, bool* o,
                       int64_t n_keep, int64_t cap, int sms, cudaStream_t stream);

// Launchers of masked_topk_exact.cu. s, m, o: device pointers to n entries (o may be m).
// Exact radix select from scratch (one device-to-host read of count and NaN flag); the result
// follows the op contract (masked_topk.h): on a non-ok status nothing is written in place and
// o is all False out of place.
template <typename Bits>
TopKStatus exact_select(const typename Bits::key_t* s, const bool* m, bool* o, int64_t n,
                        int64_t n_keep, const at::Tensor& like);

// Keeps the unpruned entries with key > t[0] and the first t[1] (by index) with key == t[0];
// t: two device words (threshold key, number of ties to keep).
template <typename Bits>
void tie_write(const typename Bits::key_t* s, const bool* m, bool* o, int64_t n, const ull* t,
               const at::Tensor& like);

// o[i] = bit i of backup (32 entries per word): puts back a mask saved by the fast path.
void restore_mask(bool* o, const uint32_t* backup, int64_t n, cudaStream_t stream);

// The op contract's cases that need no selection (masked_topk.h), once the status is known and
// nothing has been written (in place, o == m holds the mask): a non-ok status leaves the mask
// alone in place and makes o all False out of place; n_keep == 0 makes o all False; n_keep ==
// count keeps every unpruned entry (o = m). True when the call is settled by this.
inline bool settle_without_selection(const TopKStatus& status, const bool* m, bool* o, int64_t n, int64_t n_keep,
                                     cudaStream_t stream) {
  const bool in_place = o == m;
  if (!status.ok(n_keep) || n_keep == 0) {
    if (!in_place || status.ok(n_keep))
      C10_CUDA_CHECK(cudaMemsetAsync(o, 0, static_cast<size_t>(n), stream));
    return true;
  }
  if (n_keep == status.count) {
    if (!in_place)
      C10_CUDA_CHECK(cudaMemcpyAsync(o, m, static_cast<size_t>(n), cudaMemcpyDeviceToDevice, stream));
    return true;
  }
  return false;
}

}  // namespace cuda
}  // namespace ntksap_fast
