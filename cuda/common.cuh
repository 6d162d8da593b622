// What every CUDA kernel file shares: error checks that turn CUDA failures into
// zerofuse::Error naming the call, the caller's stream and device, and element
// loads/stores that convert float16/bfloat16 to and from float, 1 or 4 at a time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "zerofuse/error.h"
#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"

namespace zerofuse::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it, so the next call does not report it again
    runtime_error("CUDA call ", what, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  }
}
#define ZF_CUDA_CHECK(call) ::zerofuse::cuda::check((call), #call)
// After a kernel launch: launch-configuration errors surface here.
#define ZF_CUDA_CHECK_LAUNCH(kernel) ::zerofuse::cuda::check(cudaGetLastError(), "launch of " kernel)

inline cudaStream_t stream_of(Stream s) { return static_cast<cudaStream_t>(s.handle); }

// Runs on the tensors' device, whatever the current device is, and restores it.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device d) {
    ZF_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != d.index) ZF_CUDA_CHECK(cudaSetDevice(d.index));
    changed_ = previous_ != d.index;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

inline int num_sms(int device) {
  int n = 0;
  ZF_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// Scratch memory ordered on a stream (cudaMallocAsync: pooled, graph-capturable).
class StreamBuffer {
 public:
  StreamBuffer(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    ZF_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~StreamBuffer() { cudaFreeAsync(ptr_, stream_); }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// --- element types ------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Four consecutive elements as floats: one 16-byte (float) or 8-byte (16-bit) access.
// The caller guarantees the address is aligned to 4 elements.
template <typename T>
__device__ __forceinline__ void load4(const T* p, float out[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = to_float(h[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float in[4]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
    uint2 raw;
    T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint2*>(p) = raw;
  }
}

inline bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Calls fn(T{}) for the CUDA element type of a float dtype.
template <typename Fn>
decltype(auto) dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float16: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
    default: return fn(float{});
  }
}

// --- multi-tensor launches ------------------------------------------------------------------

// Blocks of a launch cover several tensors; first_block[i] is tensor i's first
// block. Returns the tensor of this block: the last i with first_block[i] <= blockIdx.x.
__device__ __forceinline__ int segment_of_block(const std::int64_t* first_block, int count) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= std::int64_t(blockIdx.x)) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// --- reductions -------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace zerofuse::cuda
