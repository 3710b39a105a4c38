// Internal to the CPU masked top-k (masked_topk*.cpp): the MaskedTopK class template over the
// order-preserving integer keys of one float type (key_traits.h), and what both of its paths
// share: the write passes (fill_zero, copy_mask, write_above, write_exact) with their
// vectorised loops, and the constants. run() tries the sample-bracketed fast path guess()
// (masked_topk_bracket.cpp) and falls back to the exact radix select radix()
// (masked_topk_radix.cpp); each of those files defines its path's members and explicitly
// instantiates it for the four key types (HalfBits, BFloat16Bits, Float32Bits, Float64Bits).
#pragma once

#include "cpu_chunks.h"
#include "key_traits.h"
#include "masked_topk.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace ntksap_fast {
namespace detail {

constexpr int kDigitBits = 16;
constexpr int64_t kBins = int64_t(1) << kDigitBits;
constexpr int64_t kGuessMinN = int64_t(1) << 16;    // sample-bracketed fast path from here on

// Hot write loops as free functions with restrict pointers, so that GCC vectorises them.
template <typename Bits>
void above_inplace(const typename Bits::key_t* __restrict s, uint8_t* __restrict mo, int64_t b,
                   int64_t e, typename Bits::key_t t, int shift) {
  using Key = typename Bits::key_t;
  for (int64_t i = b; i < e; ++i) {
    const Key top = static_cast<Key>(Bits::to_key(s[i]) >> shift);
    mo[i] = static_cast<uint8_t>(mo[i] & static_cast<uint8_t>(top > t));
  }
}

template <typename Bits>
void above_out(const typename Bits::key_t* __restrict s, const uint8_t* __restrict m,
               uint8_t* __restrict o, int64_t b, int64_t e, typename Bits::key_t t, int shift) {
  using Key = typename Bits::key_t;
  for (int64_t i = b; i < e; ++i) {
    const Key top = static_cast<Key>(Bits::to_key(s[i]) >> shift);
    o[i] = static_cast<uint8_t>(m[i] & static_cast<uint8_t>(top > t));
  }
}

// Same as above with shift == 0, comparing as floats (float32/float64: cheaper than keys and
// equal to them for non-NaN values; t is the value of a non-NaN key).
template <typename Float>
void above_inplace_f(const Float* __restrict s, uint8_t* __restrict mo, int64_t b, int64_t e,
                     Float t) {
  for (int64_t i = b; i < e; ++i) mo[i] = static_cast<uint8_t>(mo[i] & static_cast<uint8_t>(s[i] > t));
}

template <typename Float>
void above_out_f(const Float* __restrict s, const uint8_t* __restrict m, uint8_t* __restrict o,
                 int64_t b, int64_t e, Float t) {
  for (int64_t i = b; i < e; ++i) o[i] = static_cast<uint8_t>(m[i] & static_cast<uint8_t>(s[i] > t));
}

template <typename Key>
struct Candidate {
  Key key;
  int64_t idx;
};

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

template <typename Bits>
class MaskedTopK {
  using Key = typename Bits::key_t;
  static constexpr int kKeyBits = Bits::kBits;
  static constexpr int kLevels = kKeyBits / kDigitBits;

  using Cand = Candidate<Key>;
  static bool better(const Cand& a, const Cand& b) {
    return a.key > b.key || (a.key == b.key && a.idx < b.idx);
  }

 public:
  MaskedTopK(const Key* s, const uint8_t* m, uint8_t* out, int64_t n)
      : s_(s), m_(m), out_(out), n_(n), ch_(n), cap_(std::clamp<int64_t>(n / 32, int64_t(1) << 20, int64_t(1) << 24)) {}

  void run(int64_t n_keep) {
    if (n_ >= kGuessMinN && guess(n_keep)) return;
    radix(n_keep);
  }

 private:
  // Fast path (masked_topk_bracket.cpp): bracket the threshold from a sample, then one
  // read-only pass and one write pass. Returns false (nothing written) when the bracket missed.
  bool guess(int64_t n_keep);

  // General path (masked_topk_radix.cpp): radix select with 16-bit digits, exact for any data.
  void radix(int64_t n_keep);
  uint32_t* chunk_hist(int64_t c) const;
  void histogram(int level, Key prefix, uint8_t* nan_flags);
  int64_t reduce();
  std::vector<uint64_t> chunk_offsets(int64_t d) const;
  void collect(Key prefix, int shift, int64_t d, uint64_t k);

  // Write passes shared by both paths.
  void fill_zero() {
    for_each_chunk(ch_, [&](int64_t c) {
      const int64_t b = ch_.begin(c), e = ch_.end(c);
      if (e > b) std::memset(out_ + b, 0, static_cast<size_t>(e - b));
    });
  }

  void copy_mask() {
    if (out_ == m_) return;
    for_each_chunk(ch_, [&](int64_t c) {
      const int64_t b = ch_.begin(c), e = ch_.end(c);
      if (e > b) std::memcpy(out_ + b, m_ + b, static_cast<size_t>(e - b));
    });
  }

  // out[i] = mask[i] && (key[i] >> shift) > t (shift = 0: key > t; t = prefix - 1 and shift
  // > 0: top bits >= prefix). Everything the loops read is in locals: stores through uint8_t*
  // may alias anything, so members would be reloaded and the loops would not vectorise.
  // Separate loops in place (one pointer) and out of place (restrict pointers).
  void write_above(Key t, int shift) {
    const Key* const s = s_;
    const uint8_t* const m = m_;
    uint8_t* const out = out_;
    const Chunks ch = ch_;
    using Float = typename FloatOf<Bits>::type;
    if constexpr (!std::is_same_v<Float, void*>) {
      if (shift == 0 && t >= Bits::kKeyMin && t <= Bits::kKeyMax) {
        const Key tb = Bits::from_key(t);
        Float tf;
        std::memcpy(&tf, &tb, sizeof(Float));
        const Float* sf = reinterpret_cast<const Float*>(s);
        for_each_chunk(ch, [=](int64_t c) {
          if (out == m)
            above_inplace_f<Float>(sf, out, ch.begin(c), ch.end(c), tf);
          else
            above_out_f<Float>(sf, m, out, ch.begin(c), ch.end(c), tf);
        });
        return;
      }
    }
    for_each_chunk(ch, [=](int64_t c) {
      if (out == m)
        above_inplace<Bits>(s, out, ch.begin(c), ch.end(c), t, shift);
      else
        above_out<Bits>(s, m, out, ch.begin(c), ch.end(c), t, shift);
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
  int64_t cap_;  // most candidates collected before falling back to another pass
  std::unique_ptr<uint32_t[]> hist_;
  std::vector<uint64_t> total_;
};

}  // namespace detail
}  // namespace ntksap_fast
