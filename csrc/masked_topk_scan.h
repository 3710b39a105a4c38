// Internal to the CPU masked top-k: the fused pass of the sample-bracketed path (step 1 of
// masked_topk_bracket.cpp), defined in masked_topk_scan.cpp: one read of a chunk that counts,
// flags NaNs, writes out = mask && key > hi, saves the mask bits (in place) and stores the
// candidates lo <= key <= hi in index order, counting them in a histogram.
#pragma once

#include "masked_topk_cpu.h"

#include <cstdint>

namespace ntksap_fast {
namespace detail {

constexpr int64_t kBlock = 32;  // entries per vectorised block (one word of mask bits)

struct ChunkScan {
  uint64_t count = 0, above = 0, inr = 0;  // unpruned; key > hi; lo <= key <= hi
  int64_t ncand = 0;                       // candidates stored (all of them unless overflow)
  bool nan = false, overflow = false;
};

template <typename Key>
struct PassArgs {
  const Key* s;
  const uint8_t* m;
  uint8_t* out;      // may be m (in place)
  uint32_t* backup;  // in place: word i / 32 receives the mask bits of entries i..i+31
  int64_t b, e;      // b a multiple of kBlock
  Key lo, hi;
  Key* kbuf;         // candidates: keys and indices, room for cap
  int64_t* ibuf;
  int64_t cap;
  uint32_t* hist;    // histogram of the candidate keys: bin (key - lo) >> cshift
  int cshift;
};

// Step 1 over [a.b, a.e) (vectorised; AVX2 code chosen at run time where the CPU has it).
template <typename Bits>
ChunkScan fused_pass(const PassArgs<typename Bits::key_t>& a, bool in_place);

}  // namespace detail
}  // namespace ntksap_fast
