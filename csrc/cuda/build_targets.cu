// What GPU code this library holds, as its build recorded it: ntksap_fast_cuda_targets() returns
// e.g. "sm_75/sm_80/sm_90/sm_100/sm_120/compute_120" (SASS sm_XY, PTX compute_XY). Every build
// path passes -DNTKSAP_FAST_CUDA_TARGETS=... together with the matching -gencode flags (both from
// ntksap_fast/_build_config.py); ntksap_fast/_ext.py reads it (ctypes) to use the CUDA ops only on
// devices they have code for. A plain C symbol, no torch headers: this file is compiled once per
// target, and parsing torch's headers that often would cost minutes.
#ifndef NTKSAP_FAST_CUDA_TARGETS
#error "build with the flags of ntksap_fast/_build_config.py (nvcc_flags), which define NTKSAP_FAST_CUDA_TARGETS"
#endif

#define NTKSAP_FAST_STRINGIFY_(...) #__VA_ARGS__
#define NTKSAP_FAST_STRINGIFY(x) NTKSAP_FAST_STRINGIFY_(x)

extern "C" __attribute__((visibility("default"))) const char* ntksap_fast_cuda_targets() {
  return NTKSAP_FAST_STRINGIFY(NTKSAP_FAST_CUDA_TARGETS);
}
