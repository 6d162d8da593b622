// Stream: where device work is queued. For CUDA it holds a cudaStream_t (nullptr
// is the legacy default stream); CPU kernels run synchronously and ignore it.
// The Python bindings pass the caller's current torch stream.
#pragma once

namespace zerofuse {

struct Stream {
  void* handle = nullptr;
};

}  // namespace zerofuse
