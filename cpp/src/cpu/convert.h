// Element types as the CPU kernels see them, and their conversion to and from
// float (all kernel math is float32). Included by the per-ISA kernel sources:
// with F16C (the avx2 variant) fp16 conversion is one instruction.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "zerofuse/half.h"
#include "zerofuse/tensor.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef ZF_CPU_ISA
#error "included only by CPU kernel sources, which are compiled once per instruction set"
#endif

// In the variant's own namespace: an inline function that gcc emits out of
// line would otherwise be one weak symbol for every variant, and the linker
// would keep one copy -- possibly built for an instruction set the processor
// lacks.
namespace zerofuse::cpu::ZF_CPU_ISA {

struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }  // float64 stays float64 (CPU only)
inline float to_float(BFloat16 x) { return bf16_to_float(x.bits); }
inline float to_float(Half x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  return fp16_to_float(x.bits);
#endif
}

template <typename T>
T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline BFloat16 from_float<BFloat16>(float x) { return {float_to_bf16(x)}; }
template <>
inline Half from_float<Half>(float x) {
#if defined(__F16C__)
  return {static_cast<std::uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
#else
  return {float_to_fp16(x)};
#endif
}

// The type kernels compute in: double for float64 data, float otherwise.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Stores a computed value (float or double) as T.
template <typename T, typename A>
inline T store_as(A x) {
  if constexpr (std::is_same_v<T, double>) return x;
  else return from_float<T>(float(x));
}

// The d elements at p as A (float or double), or d copies of `absent` when p
// is null: per-row parameters (LayerNorm's weight and bias, a GELU bias)
// converted once per thread range, so the row loops see one element type.
template <typename A, typename W>
std::vector<A> vector_as(const W* p, std::int64_t d, A absent) {
  std::vector<A> out(static_cast<std::size_t>(d), absent);
  if (p)
    for (std::int64_t j = 0; j < d; ++j) out[static_cast<std::size_t>(j)] = A(to_float(p[j]));
  return out;
}

// A run of n elements to float and back. Kernels that read a 16-bit row more
// than once convert it once into a float buffer with these; on AVX2 they move
// 8 elements per instruction (the per-element forms above do not vectorise for
// float16, and the rounding branch keeps bfloat16 stores scalar).
template <typename T>
inline void to_float_row(const T* __restrict src, float* __restrict dst, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<T, Half>) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    for (; i + 8 <= n; i += 8) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void from_float_row(const float* __restrict src, T* __restrict dst, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<T, Half>) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    // float_to_bf16 on 8 lanes: round to nearest even, NaN kept quiet.
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x0040);
    for (; i + 8 <= n; i += 8) {
      const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(src + i));
      const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, abs_mask), inf);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, lsb)), 16);
      const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(bits, 16), quiet);
      const __m256i result = _mm256_blendv_epi8(rounded, nan, is_nan);
      // 8 x 32-bit -> 8 x 16-bit: pack within lanes, then put the two halves in order.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(result, result), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

// Calls fn(T{}) with T the element type of `dtype` (float32/float16/bfloat16).
template <typename Fn>
decltype(auto) dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float16: return fn(Half{});
    case DType::BFloat16: return fn(BFloat16{});
    default: return fn(float{});
  }
}

// The same, with float64 too (the ops that run float64 on the CPU, so
// torch.autograd.gradcheck can check them in full precision).
template <typename Fn>
decltype(auto) dispatch_float_or_double(DType dtype, Fn&& fn) {
  if (dtype == DType::Float64) return fn(double{});
  return dispatch_float(dtype, std::forward<Fn>(fn));
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA
