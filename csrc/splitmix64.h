// SplitMix64 (Steele, Lea, Flood 2014), the hash behind the masked top-k's sample positions: the
// CPU op (masked_topk_bracket.cpp) and the CUDA op (cuda/masked_topk_fast.cu) sample the same
// entries, so both include this one definition.
#pragma once

#include "key_traits.h"  // NTKSAP_HD: __host__ __device__ under nvcc, inline otherwise

#include <cstdint>

namespace ntksap_fast {

NTKSAP_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace ntksap_fast
