// Masked global top-k, CUDA: the exact paths behind the bracketed fast path
// (masked_topk_cuda.cu), used for small N and whenever the bracket cannot settle a call.
//
// exact_select: multi-block radix select over order-preserving integer keys, state on the
// device in one small int64 tensor:
//  1. histogram kernel, digit 0 (8-bit digits, 256 bins): per-block shared-memory histogram of
//     the top digit of the unpruned keys (warp-aggregated atomics), merged into the global
//     histogram; the same pass counts the unpruned entries and flags NaNs.
//  2. one small device-to-host read of (count, NaN flag): the status; nothing is written when
//     it is not ok (or n_keep is 0 or the count).
//  3. for each digit: select kernel (one block: scan of the 256 bins from the top, picks the bin
//     holding the k-th largest key, updates the prefix and k on the device, clears the
//     histogram), then the histogram kernel of the next digit among keys matching the prefix.
//     After the last digit the prefix is the exact threshold key T and k the number of entries
//     equal to T to keep (the lowest indices).
//  4. tie_write: tie-count kernel (each block counts its contiguous segment's entries == T),
//     then the write kernel: each block sums the tie counts of the blocks before it (its
//     starting rank), walks its segment in tiles with a warp-ballot / block prefix count of the
//     ties, and writes keep = unpruned && (key > T || (key == T && rank < k)).
// restore_mask: the mask bits saved by the fast path written back, 32 entries per thread.
#include "topk_cuda.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace ntksap_fast {
namespace cuda {
namespace {

constexpr int kRadixBits = 8;
constexpr int kRadix = 1 << kRadixBits;

// Layout of the exact path's state tensor (int64 words, used as unsigned long long).
constexpr int kXCount = 0;   // unpruned entries
constexpr int kXNan = 1;     // non-zero if a NaN was seen at an unpruned entry
constexpr int kXPrefix = 2;  // key digits chosen so far (the full threshold key at the end)
constexpr int kXK = 3;       // entries still to keep inside the current prefix
constexpr int kXHist = 8;    // kRadix bins
constexpr int kXWords = kXHist + kRadix;

template <typename Bits>
__global__ void histogram_kernel(const typename Bits::key_t* __restrict__ s,
                                 const bool* __restrict__ m, int64_t n, ull* __restrict__ state,
                                 int level) {
  using Key = typename Bits::key_t;
  __shared__ unsigned int hist[kRadix];
  __shared__ unsigned int block_count;
  __shared__ unsigned int block_nan;
  for (int d = threadIdx.x; d < kRadix; d += blockDim.x) hist[d] = 0;
  if (threadIdx.x == 0) {
    block_count = 0;
    block_nan = 0;
  }
  __syncthreads();

  const int shift = Bits::kBits - kRadixBits * (level + 1);
  const int pshift = shift + kRadixBits;  // < kBits whenever level > 0
  const Key prefix = static_cast<Key>(state[kXPrefix]);
  const int lane = threadIdx.x & 31;
  unsigned int count = 0, nan = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Uniform trip count per block (base, not i, bounds the loop) so that whole warps take part
  // in the warp-aggregated atomics below.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    bool hit = i < n && m[i];
    unsigned int bin = 0;
    if (hit) {
      const Key bits = s[i];
      const Key key = Bits::to_key(bits);
      if (level == 0) {
        ++count;
        nan |= static_cast<unsigned int>(Bits::is_nan(bits));
      } else {
        hit = static_cast<Key>(key >> pshift) == prefix;
      }
      bin = static_cast<unsigned int>(key >> shift) & (kRadix - 1);
    }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
    // Lanes with the same bin add once (scores often share their top digits: contention).
    const unsigned int peers = __match_any_sync(0xffffffffu, hit ? bin : kRadix);
    if (hit && lane == __ffs(peers) - 1)
      atomicAdd(&hist[bin], static_cast<unsigned int>(__popc(peers)));
#else
    (void)lane;
    if (hit) atomicAdd(&hist[bin], 1u);
#endif
  }
  if (level == 0) {
    if (count) atomicAdd(&block_count, count);
    if (nan) atomicOr(&block_nan, 1u);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kRadix; d += blockDim.x)
    if (hist[d]) atomicAdd(&state[kXHist + d], static_cast<ull>(hist[d]));
  if (level == 0 && threadIdx.x == 0) {
    if (block_count) atomicAdd(&state[kXCount], static_cast<ull>(block_count));
    if (block_nan) atomicOr(&state[kXNan], 1ull);
  }
}

// One block of kRadix threads: thread t looks at digit kRadix - 1 - t (largest first).
__global__ void select_kernel(ull* __restrict__ state) {
  __shared__ ull cum[kRadix];
  const int t = threadIdx.x;
  const int d = kRadix - 1 - t;
  const ull c = state[kXHist + d];
  const ull k = state[kXK];
  cum[t] = c;
  __syncthreads();
  for (int off = 1; off < kRadix; off <<= 1) {  // inclusive scan over t
    const ull v = t >= off ? cum[t - off] : 0ull;
    __syncthreads();
    cum[t] += v;
    __syncthreads();
  }
  const ull incl = cum[t];
  const ull excl = incl - c;
  // Every thread has read state[kXK] and state[kXPrefix] is only read below by the chosen one.
  if (excl < k && k <= incl) {  // exactly one thread: 1 <= k <= total
    state[kXK] = k - excl;
    state[kXPrefix] = (state[kXPrefix] << kRadixBits) | static_cast<ull>(d);
  }
  state[kXHist + d] = 0;  // ready for the next digit
}

// Count unpruned entries equal to the threshold key t[0] in each block's contiguous segment.
template <typename Bits>
__global__ void tie_count_kernel(const typename Bits::key_t* __restrict__ s,
                                 const bool* __restrict__ m, int64_t n, int64_t seg,
                                 const ull* __restrict__ t, ull* __restrict__ block_ties) {
  using Key = typename Bits::key_t;
  __shared__ ull scratch[kWarps];
  const Key key_t = static_cast<Key>(t[0]);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * seg;
  const int64_t end = begin + seg < n ? begin + seg : n;
  ull local = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    local += (m[i] && Bits::to_key(s[i]) == key_t) ? 1ull : 0ull;
  const ull total = block_sum(local, scratch);
  if (threadIdx.x == 0) block_ties[blockIdx.x] = total;
}

// out may alias m (in-place op): each entry is read and written by the same thread only.
template <typename Bits>
__global__ void write_kernel(const typename Bits::key_t* __restrict__ s, const bool* m, bool* out,
                             int64_t n, int64_t seg, const ull* __restrict__ t,
                             const ull* __restrict__ block_ties) {
  using Key = typename Bits::key_t;
  __shared__ ull scratch[kWarps];
  __shared__ unsigned int warp_ties[kWarps];
  const Key key_t = static_cast<Key>(t[0]);
  const ull k = t[1];
  // Starting tie rank of this block: ties in all earlier segments.
  ull part = 0;
  for (unsigned int j = threadIdx.x; j < blockIdx.x; j += blockDim.x) part += block_ties[j];
  ull running = block_sum(part, scratch);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * seg;
  const int64_t end = begin + seg < n ? begin + seg : n;
  for (int64_t base = begin; base < end; base += blockDim.x) {  // uniform trip count
    const int64_t i = base + threadIdx.x;
    const bool valid = i < end;
    const bool mi = valid && m[i];
    const Key key = mi ? Bits::to_key(s[i]) : Key(0);
    const bool eq = mi && key == key_t;
    const unsigned int ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    unsigned int before = __popc(ballot & ((1u << lane) - 1u)), tile = 0;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned int c = warp_ties[w];
      before += w < warp ? c : 0u;
      tile += c;
    }
    const ull rank = running + before;
    if (valid) out[i] = mi && (key > key_t || (eq && rank < k));
    running += tile;
    __syncthreads();  // warp_ties is rewritten by the next tile
  }
}

__global__ void restore_kernel(bool* __restrict__ out, const uint32_t* __restrict__ backup,
                               int64_t n) {
  const int64_t words = (n + 31) / 32;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t bits = backup[w];
    const int64_t b = w * 32;
    const int64_t e = b + 32 < n ? b + 32 : n;
    for (int64_t i = b; i < e; ++i) out[i] = (bits >> (i - b)) & 1u;
  }
}

int64_t grid_for(int64_t n, int sms) {
  const int64_t want = (n + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 8));
}

}  // namespace

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

void restore_mask(bool* o, const uint32_t* backup, int64_t n, cudaStream_t stream) {
  const int64_t words = (n + 31) / 32;
  const int64_t blocks = std::min<int64_t>((words + kThreads - 1) / kThreads, 4096);
  restore_kernel<<<static_cast<unsigned int>(std::max<int64_t>(blocks, 1)), kThreads, 0, stream>>>(
      o, backup, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Bits>
void tie_write(const typename Bits::key_t* s, const bool* m, bool* o, int64_t n, const ull* t,
               const at::Tensor& like) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.get_device()).stream();
  // Contiguous segments, a multiple of kThreads long.
  int64_t wblocks = grid_for(n, sm_count(like.get_device()));
  int64_t seg = (n + wblocks - 1) / wblocks;
  seg = (seg + kThreads - 1) / kThreads * kThreads;
  wblocks = (n + seg - 1) / seg;
  at::Tensor ties = at::empty({wblocks}, like.options().dtype(at::kLong));
  ull* tp = reinterpret_cast<ull*>(ties.mutable_data_ptr<int64_t>());
  tie_count_kernel<Bits><<<static_cast<unsigned int>(wblocks), kThreads, 0, stream>>>(s, m, n, seg,
                                                                                      t, tp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_kernel<Bits><<<static_cast<unsigned int>(wblocks), kThreads, 0, stream>>>(s, m, o, n, seg,
                                                                                  t, tp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Bits>
TopKStatus exact_select(const typename Bits::key_t* s, const bool* m, bool* o, int64_t n,
                        int64_t n_keep, const at::Tensor& like) {
  constexpr int kLevels = Bits::kBits / kRadixBits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.get_device()).stream();
  // Histogram grid: enough blocks to fill the GPU, and < 2^31 entries per block (uint32 bins).
  int64_t hblocks = grid_for(n, sm_count(like.get_device()));
  hblocks = std::max<int64_t>(hblocks, (n + (int64_t(1) << 30) - 1) >> 30);

  at::Tensor state = at::zeros({kXWords}, like.options().dtype(at::kLong));
  ull* st = reinterpret_cast<ull*>(state.mutable_data_ptr<int64_t>());
  histogram_kernel<Bits><<<static_cast<unsigned int>(hblocks), kThreads, 0, stream>>>(s, m, n, st, 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The one host round-trip: count and NaN flag, the status.
  const at::Tensor head = state.narrow(0, 0, 2).cpu();
  TopKStatus status;
  status.count = head.const_data_ptr<int64_t>()[kXCount];
  status.nan = head.const_data_ptr<int64_t>()[kXNan] != 0;
  if (settle_without_selection(status, m, o, n, n_keep, stream)) return status;
  state.narrow(0, kXK, 1).fill_(n_keep);
  for (int level = 0; level < kLevels; ++level) {
    if (level > 0) {
      histogram_kernel<Bits><<<static_cast<unsigned int>(hblocks), kThreads, 0, stream>>>(
          s, m, n, st, level);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    select_kernel<<<1, kRadix, 0, stream>>>(st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // (kXPrefix, kXK) are adjacent: the threshold key and the number of its ties to keep.
  static_assert(kXK == kXPrefix + 1, "tie_write reads (key, k) from two adjacent words");
  tie_write<Bits>(s, m, o, n, st + kXPrefix, like);
  return status;
}

#define NTKSAP_INSTANTIATE(B)                                                                   \
  template TopKStatus exact_select<B>(const B::key_t*, const bool*, bool*, int64_t, int64_t,     \
                                      const at::Tensor&);                                        \
  template void tie_write<B>(const B::key_t*, const bool*, bool*, int64_t, const ull*,          \
                             const at::Tensor&);
NTKSAP_INSTANTIATE(HalfBits)
NTKSAP_INSTANTIATE(BFloat16Bits)
NTKSAP_INSTANTIATE(Float32Bits)
NTKSAP_INSTANTIATE(Float64Bits)
#undef NTKSAP_INSTANTIATE

}  // namespace cuda
}  // namespace ntksap_fast
