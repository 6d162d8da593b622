// exp() that vectorises: the CPU attention kernels take one per score, and
// the C library's expf is a call per element that no loop around it can turn
// into SIMD. Range reduction to e^r * 2^n with |r| <= ln2/2 and a degree-6
// polynomial: within 2 ulp of expf over the range softmax uses. Arguments
// below -87 (including -inf, a masked score) give exactly 0. The selects
// vectorise because the kernels build with -fno-trapping-math.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifndef ZF_CPU_ISA
#error "included only by CPU kernel sources, which are compiled once per instruction set"
#endif

// In the variant's own namespace: an inline function that gcc emits out of
// line would otherwise be one weak symbol for every variant, and the linker
// would keep one copy -- possibly built for an instruction set the processor
// lacks.
namespace zerofuse::cpu::ZF_CPU_ISA {

inline float exp_approx(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(clamped * log2e + 0.5f);
  const float r = clamped - n * ln2_hi - n * ln2_lo;
  // Taylor-like minimax coefficients of e^r on [-ln2/2, ln2/2] (Cephes expf).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  const float result = p * __builtin_bit_cast(float, bits);
  return x < -87.0f ? 0.0f : result;
}

inline double exp_approx(double x) { return std::exp(x); }  // float64 is for reference work: exact

// tanh that vectorises: a 13/6 rational minimax form on [-7.905, 7.905] (the
// one Eigen uses), clamped outside it where tanh is +-1 in float. Within 7 ulp
// of tanh, 4e-7 absolute, and relative-accurate near 0 (no 1 - 2/(e^2z + 1)
// cancellation).
inline float tanh_approx(float x) {
  const float limit = 7.90531110763549805f;
  x = x < -limit ? -limit : (x > limit ? limit : x);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

// floats per SIMD register in this variant (the portable one uses GCC's
// generic vectors, split into what the target has).
#if defined(__AVX512F__)
constexpr int kVectorFloats = 16;
#else
constexpr int kVectorFloats = 8;
#endif
typedef float vfloat __attribute__((vector_size(kVectorFloats * sizeof(float))));

// The largest of x[0, n) (-inf for n = 0; NaNs are passed over, as
// std::max(m, NaN) passes them). gcc will not vectorise a max reduction
// written as a loop -- it stays one dependent vmaxss per element, 4 cycles
// each -- so this keeps two vector accumulators by hand.
inline float max_of(const float* x, std::int64_t n) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  vfloat a0 = vfloat{} + neg_inf, a1 = a0;
  std::int64_t j = 0;
  for (; j + 2 * kVectorFloats <= n; j += 2 * kVectorFloats) {
    vfloat x0, x1;
    std::memcpy(&x0, x + j, sizeof x0);
    std::memcpy(&x1, x + j + kVectorFloats, sizeof x1);
    a0 = x0 > a0 ? x0 : a0;
    a1 = x1 > a1 ? x1 : a1;
  }
  if (j < n) {  // the last, partial vectors: padded with -inf, not a scalar loop
    float tail[2 * kVectorFloats];
    std::fill(tail, tail + 2 * kVectorFloats, neg_inf);
    std::memcpy(tail, x + j, sizeof(float) * std::size_t(n - j));
    vfloat x0, x1;
    std::memcpy(&x0, tail, sizeof x0);
    std::memcpy(&x1, tail + kVectorFloats, sizeof x1);
    a0 = x0 > a0 ? x0 : a0;
    a1 = x1 > a1 ? x1 : a1;
  }
  a0 = a1 > a0 ? a1 : a0;
  float m = neg_inf;
  for (int lane = 0; lane < kVectorFloats; ++lane) m = a0[lane] > m ? a0[lane] : m;
  return m;
}

inline double max_of(const double* x, std::int64_t n) {  // float64: reference work
  double m = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA
