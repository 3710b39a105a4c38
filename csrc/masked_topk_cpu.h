// Internal to the CPU masked top-k (masked_topk*.cpp): the MaskedTopK class template over the
// order-preserving integer keys of one float type (key_traits.h), and what both of its paths
// share: the write passes (fill_zero, copy_mask, write_above, write_exact) and the constants.
// run() tries the sample-bracketed one-pass path bracketed() (masked_topk_bracket.cpp) and falls
// back to the exact radix select radix() (masked_topk_radix.cpp); each of those files defines
// its path's members and explicitly instantiates them for the four key types (HalfBits,
// BFloat16Bits, Float32Bits, Float64Bits).
//
// Contract of run(n_keep) (see masked_topk.h): returns the status; when it is ok, out holds the
// selection; otherwise out is all False (out-of-place) or the mask is unchanged (in place,
// out == mask). Nothing is thrown.
#pragma once

#include "cpu_chunks.h"
#include "key_traits.h"
#include "masked_topk.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__)
#define NTKSAP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NTKSAP_ALWAYS_INLINE inline
#endif

namespace ntksap_fast {
namespace detail {

// Fresh buffers of many MiB (the out-of-place op's output, the in-place op's saved mask bits)
// are first touched by one pass: with 4 KiB pages the kernel takes a fault, and zeroes a page,
// every 4 KiB. Where the system gives transparent huge pages on request (Linux's default
// "madvise" mode), ask for them on the buffer's 2 MiB-aligned interior: 512x fewer faults
// (138M entries out of place: 4.4-7.6 -> 2.6-3.2 reads of the scores). Advice only; an error
// changes nothing.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

constexpr int kDigitBits = 16;
constexpr int64_t kBins = int64_t(1) << kDigitBits;
constexpr int64_t kGuessMinN = int64_t(1) << 16;  // sample-bracketed path from here on

// Native floating type of a key type, for comparisons in the float domain (void* if none).
template <typename Bits>
struct FloatOf {
  using type = void*;
};
template <>
struct FloatOf<Float32Bits> {
  using type = float;
};
template <>
struct FloatOf<Float64Bits> {
  using type = double;
};

template <typename Key>
struct Candidate {
  Key key;
  int64_t idx;
};

// Whether a comes before b in the selection order: larger key first, then lower index.
template <typename Key>
inline bool better(const Candidate<Key>& a, const Candidate<Key>& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

template <typename Bits>
class MaskedTopK {
  using Key = typename Bits::key_t;
  static constexpr int kKeyBits = Bits::kBits;
  static constexpr int kLevels = kKeyBits / kDigitBits;
  using Cand = Candidate<Key>;

 public:
  // s: raw bits of n scores; m: n mask bytes (0/1); out: n bytes, may be m itself (in place).
  MaskedTopK(const Key* s, const uint8_t* m, uint8_t* out, int64_t n)
      : s_(s), m_(m), out_(out), n_(n), ch_(n) {}

  TopKStatus run(int64_t n_keep) {
    TopKStatus st;
    if (n_ >= kGuessMinN && bracketed(n_keep, st)) return st;
    return radix(n_keep);
  }

 private:
  // One-pass path (masked_topk_bracket.cpp). Returns true when it settled the call (result or
  // error, status in st); false (mask intact) when the radix path must run.
  bool bracketed(int64_t n_keep, TopKStatus& st);

  // General path (masked_topk_radix.cpp): radix select with 16-bit digits, exact for any data.
  TopKStatus radix(int64_t n_keep);
  uint32_t* chunk_hist(int64_t c) const;
  void histogram(int level, Key prefix, uint8_t* nan_flags);
  int64_t reduce();
  std::vector<uint64_t> chunk_offsets(int64_t d) const;
  void collect(Key prefix, int shift, int64_t d, uint64_t k);

  // Write passes shared by both paths.
  void fill_zero() {
    uint8_t* const out = out_;
    for_each_chunk(ch_, [&](int64_t c) {
      const int64_t b = ch_.begin(c), e = ch_.end(c);
      if (e > b) std::memset(out + b, 0, static_cast<size_t>(e - b));
    });
  }

  void copy_mask() {
    if (out_ == m_) return;
    for_each_chunk(ch_, [&](int64_t c) {
      const int64_t b = ch_.begin(c), e = ch_.end(c);
      if (e > b) std::memcpy(out_ + b, m_ + b, static_cast<size_t>(e - b));
    });
  }

  // out[i] = mask[i] && (key[i] >> shift) > t. Everything the loops read is in locals: stores
  // through uint8_t* may alias anything, so members would be reloaded and the loops would not
  // vectorise.
  void write_above(Key t, int shift) {
    const Key* const s = s_;
    const uint8_t* const m = m_;
    uint8_t* const out = out_;
    const Chunks ch = ch_;
    for_each_chunk(ch, [=](int64_t c) {
      for (int64_t i = ch.begin(c); i < ch.end(c); ++i) {
        const Key top = static_cast<Key>(Bits::to_key(s[i]) >> shift);
        out[i] = static_cast<uint8_t>(m[i] & static_cast<uint8_t>(top > t));
      }
    });
  }

  // Threshold key t is exact: keep key > t and the first k entries (by index) with key == t;
  // off[c] is the number of unpruned entries with key == t before chunk c.
  void write_exact(Key t, uint64_t k, const std::vector<uint64_t>& off) {
    const Key* const s = s_;
    const uint8_t* const m = m_;
    uint8_t* const out = out_;
    const Chunks ch = ch_;
    const uint64_t* const offp = off.data();
    for_each_chunk(ch, [=](int64_t c) {
      const int64_t b = ch.begin(c), e = ch.end(c);
      uint64_t rank = offp[c];
      for (int64_t i = b; i < e; ++i) {
        const Key key = Bits::to_key(s[i]);
        const uint32_t mi = m[i];
        const uint32_t eq = mi & static_cast<uint32_t>(key == t);
        const uint32_t keep =
            mi & (static_cast<uint32_t>(key > t) | (eq & static_cast<uint32_t>(rank < k)));
        rank += eq;
        out[i] = static_cast<uint8_t>(keep);
      }
    });
  }

  const Key* s_;
  const uint8_t* m_;
  uint8_t* out_;
  int64_t n_;
  Chunks ch_;
  std::unique_ptr<uint32_t[]> hist_;
  std::vector<uint64_t> total_;
};

}  // namespace detail
}  // namespace ntksap_fast
