// Element types as the CPU kernels see them, and their conversion to and from
// float (all kernel math is float32). Included by the per-ISA kernel sources:
// with F16C (the avx2 variant) fp16 conversion is one instruction.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "zerofuse/half.h"
#include "zerofuse/tensor.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace zerofuse::cpu {

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

}  // namespace zerofuse::cpu
