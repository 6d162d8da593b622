// The step decision on the GPU: one thread runs the same rule as the CPU
// (cpp/src/loss_scale_rule.h), so an fp16 step never waits for the host.
#include "common.cuh"
#include "common/cuda_kernels.h"
#include "common/loss_scale_rule.h"

namespace zerofuse::cuda {
namespace {

__global__ void step_control_kernel(const float* stats, double* state, float* out, StepControlConfig config) {
  detail::apply_step_control(stats, state, out, config);
}

}  // namespace

void step_control_init(const TensorView& state, const double* values, Stream s) {
  DeviceGuard guard(state.device);
  ZF_CUDA_CHECK(cudaMemcpyAsync(state.data, values, sizeof(double) * kStepStateSize, cudaMemcpyHostToDevice,
                                stream_of(s)));
}

void step_control(const TensorView& stats, const TensorView& state, const TensorView& out,
                  const StepControlConfig& config, Stream s) {
  DeviceGuard guard(stats.device);
  step_control_kernel<<<1, 1, 0, stream_of(s)>>>(stats.data_as<const float>(), state.data_as<double>(),
                                                 out.data_as<float>(), config);
  ZF_CUDA_CHECK_LAUNCH("step_control_kernel");
}

}  // namespace zerofuse::cuda
