// Masked global top-k, CPU: the exact radix-select path MaskedTopK<Bits>::radix(), taken when
// the sample-bracketed path (masked_topk_bracket.cpp) does not apply (small N, bracket missed,
// too many candidates, mostly pruned):
//  1. Histogram pass over the top 16-bit digit of the unpruned keys (one 2^16-bin histogram per
//     chunk), NaN flags and count. A NaN or n_keep > count ends the call here (status only,
//     out-of-place result all False, nothing written in place).
//  2. Select the digit d holding the n_keep-th largest key (scan the summed histogram from the
//     top) and the number k still to keep inside that bin. Prefix P = digits chosen so far.
//  3. Then, whichever applies first: last digit: P is the exact threshold key T, one write pass
//     keeps key > T and the first k entries equal to T (starting ranks per chunk from the
//     per-chunk histograms); k == bin count: keep top bits >= P; bin small (<= max(2^20, N/32)
//     entries): one pass decides the entries outside the bin and collects those inside, then
//     nth_element with (key desc, index asc) picks k of them; else the next digit's histogram
//     among entries whose top bits == P.
#include "masked_topk_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace ntksap_fast {
namespace detail {

template <typename Bits>
TopKStatus MaskedTopK<Bits>::radix(int64_t n_keep) {
  hist_.reset(new uint32_t[static_cast<size_t>(ch_.count * kBins)]);
  total_.assign(static_cast<size_t>(kBins), 0);
  // Level 0: histogram of the top digit, NaN flags, count of unpruned entries.
  std::vector<uint8_t> nan_flags(static_cast<size_t>(ch_.count), 0);
  histogram(0, Key(0), nan_flags.data());
  TopKStatus st;
  st.count = reduce();
  st.nan = std::any_of(nan_flags.begin(), nan_flags.end(), [](uint8_t f) { return f != 0; });
  if (!st.ok(n_keep)) {
    if (out_ != m_) fill_zero();
    return st;
  }
  if (n_keep == 0) {
    fill_zero();
    return st;
  }
  if (n_keep == st.count) {
    copy_mask();
    return st;
  }
  // Largest bin gathered for a final nth_element instead of another histogram pass.
  const int64_t cap = std::clamp<int64_t>(n_ / 32, int64_t(1) << 20, int64_t(1) << 24);
  uint64_t k = static_cast<uint64_t>(n_keep);
  uint64_t prefix = 0;
  for (int level = 0;; ++level) {
    if (level > 0) {
      histogram(level, static_cast<Key>(prefix), nullptr);
      reduce();
    }
    // Scan bins from the top for the one holding the k-th largest key.
    uint64_t above = 0;
    int64_t d = kBins - 1;
    for (; d > 0; --d) {
      if (above + total_[static_cast<size_t>(d)] >= k) break;
      above += total_[static_cast<size_t>(d)];
    }
    k -= above;
    const uint64_t in_bin = total_[static_cast<size_t>(d)];
    prefix = (prefix << kDigitBits) | static_cast<uint64_t>(d);
    const int shift = kKeyBits - kDigitBits * (level + 1);
    if (level == kLevels - 1) {
      write_exact(static_cast<Key>(prefix), k, chunk_offsets(d));
      return st;
    }
    if (k == in_bin) {  // keep every entry with top bits >= prefix
      if (prefix == 0)
        copy_mask();
      else
        write_above(static_cast<Key>(prefix - 1), shift);
      return st;
    }
    if (static_cast<int64_t>(in_bin) <= cap) {
      collect(static_cast<Key>(prefix), shift, d, k);
      return st;
    }
  }
}

template <typename Bits>
uint32_t* MaskedTopK<Bits>::chunk_hist(int64_t c) const { return hist_.get() + c * kBins; }

// Histogram of digit `level` over unpruned entries whose key has top bits == prefix.
template <typename Bits>
void MaskedTopK<Bits>::histogram(int level, Key prefix, uint8_t* nan_flags) {
  const int shift = kKeyBits - kDigitBits * (level + 1);
  for_each_chunk(ch_, [&](int64_t c) {
    uint32_t* h = chunk_hist(c);
    std::memset(h, 0, sizeof(uint32_t) * kBins);
    const int64_t b = ch_.begin(c), e = ch_.end(c);
    const Key* s = s_;
    const uint8_t* m = m_;
    if (level == 0) {
      uint32_t nan = 0;
      for (int64_t i = b; i < e; ++i) {
        const Key bits = s[i];
        const uint32_t mi = m[i];
        h[static_cast<uint32_t>(Bits::to_key(bits) >> shift)] += mi;
        nan |= mi & static_cast<uint32_t>(Bits::is_nan(bits));
      }
      nan_flags[c] = static_cast<uint8_t>(nan != 0);
    } else {
      const int pshift = shift + kDigitBits;
      for (int64_t i = b; i < e; ++i) {
        const Key key = Bits::to_key(s[i]);
        const uint32_t hit =
            m[i] & static_cast<uint32_t>(static_cast<Key>(key >> pshift) == prefix);
        h[static_cast<uint32_t>(key >> shift) & static_cast<uint32_t>(kBins - 1)] += hit;
      }
    }
  });
}

// Sum the per-chunk histograms into total_; returns the grand total.
template <typename Bits>
int64_t MaskedTopK<Bits>::reduce() {
  uint64_t sum = 0;
  for (int64_t d = 0; d < kBins; ++d) {
    uint64_t t = 0;
    for (int64_t c = 0; c < ch_.count; ++c) t += chunk_hist(c)[d];
    total_[static_cast<size_t>(d)] = t;
    sum += t;
  }
  return static_cast<int64_t>(sum);
}

// Exclusive prefix over chunks of each chunk's count in bin d of the last histogram.
template <typename Bits>
std::vector<uint64_t> MaskedTopK<Bits>::chunk_offsets(int64_t d) const {
  std::vector<uint64_t> off(static_cast<size_t>(ch_.count));
  uint64_t run = 0;
  for (int64_t c = 0; c < ch_.count; ++c) {
    off[static_cast<size_t>(c)] = run;
    run += chunk_hist(c)[d];
  }
  return off;
}

// Decide every entry outside bin d (top bits != prefix) and collect those inside it, then
// keep the k best of the collected ones (key descending, index ascending).
template <typename Bits>
void MaskedTopK<Bits>::collect(Key prefix, int shift, int64_t d, uint64_t k) {
  const std::vector<uint64_t> off = chunk_offsets(d);
  const uint64_t total = total_[static_cast<size_t>(d)];
  std::unique_ptr<Cand[]> buf(new Cand[static_cast<size_t>(total) + 1]);
  const Key* const s = s_;
  const uint8_t* const m = m_;
  uint8_t* const out = out_;
  const Chunks ch = ch_;
  const uint64_t* const offp = off.data();
  Cand* const bufp = buf.get();
  for_each_chunk(ch, [=](int64_t c) {
    const int64_t b = ch.begin(c), e = ch.end(c);
    Cand* dst = bufp + offp[c];
    for (int64_t i = b; i < e; ++i) {
      const Key key = Bits::to_key(s[i]);
      const uint32_t mi = m[i];
      const Key top = static_cast<Key>(key >> shift);
      out[i] = static_cast<uint8_t>(mi & static_cast<uint32_t>(top > prefix));
      if (mi & static_cast<uint32_t>(top == prefix)) *dst++ = Cand{key, i};
    }
  });
  Cand* first = bufp;
  Cand* last = first + total;
  Cand* nth = first + k;
  if (nth < last) std::nth_element(first, nth, last, better<Key>);
  for (Cand* q = first; q < nth; ++q) out[q->idx] = 1;
}

template TopKStatus MaskedTopK<HalfBits>::radix(int64_t);
template TopKStatus MaskedTopK<BFloat16Bits>::radix(int64_t);
template TopKStatus MaskedTopK<Float32Bits>::radix(int64_t);
template TopKStatus MaskedTopK<Float64Bits>::radix(int64_t);

}  // namespace detail
}  // namespace ntksap_fast
