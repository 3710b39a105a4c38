// Static split of a vector of n entries into contiguous chunks for the CPU ops, and a parallel
// loop over the chunks (at::parallel_for). Chunk c is always the same range in every pass, so
// per-chunk counts from one pass are valid offsets for the next (and the lower index wins every
// tie when chunks are visited in order). One chunk below kSmallN entries; chunks hold fewer than
// 2^31 entries, so uint32 per-chunk counters cannot overflow; chunk starts are multiples of
// kChunkAlign entries (whole 32-bit words of a bitmap of the entries).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace ntksap_fast {
namespace detail {

constexpr int64_t kSmallN = int64_t(1) << 17;       // below this: one chunk (threads cost more)
constexpr int64_t kMaxChunk = int64_t(1) << 31;     // uint32 bin counters cannot overflow
constexpr int64_t kChunkAlign = 64;

struct Chunks {
  int64_t n = 0, count = 1, size = 0;
  explicit Chunks(int64_t n_) : n(n_) {
    int64_t threads = n < kSmallN ? 1 : std::max<int64_t>(1, at::get_num_threads());
    count = std::max<int64_t>(threads, (n + kMaxChunk - 1) / kMaxChunk);
    count = std::max<int64_t>(1, std::min<int64_t>(count, std::max<int64_t>(n, 1)));
    size = (n + count - 1) / count;
    size = (size + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  }
  int64_t begin(int64_t c) const { return std::min(n, c * size); }
  int64_t end(int64_t c) const { return std::min(n, (c + 1) * size); }
};

template <typename F>
void for_each_chunk(const Chunks& ch, const F& f) {
  if (ch.count == 1) {
    f(int64_t(0));
    return;
  }
  at::parallel_for(0, ch.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(c);
  });
}

}  // namespace detail
}  // namespace ntksap_fast
