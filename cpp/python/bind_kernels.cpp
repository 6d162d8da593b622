// Python entry points of the kernels. Each converts and checks its arguments
// with the GIL held, then releases the GIL while the kernel runs. These are the
// low-level calls; zerofuse.ops / nn / optim wrap them for users.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tensor_args.h"
#include "zerofuse/error.h"
#include "zerofuse/adam.h"
#include "zerofuse/attention.h"
#include "zerofuse/bias_gelu.h"
#include "zerofuse/cross_entropy.h"
#include "zerofuse/grad_stats.h"
#include "zerofuse/layernorm.h"
#include "zerofuse/masked_softmax.h"
#include "zerofuse/step_control.h"

namespace zerofuse::python {
namespace {

using py::arg;

const TensorView* ptr(const std::optional<TensorView>& v) { return v ? &*v : nullptr; }

AdamConfig adam_config(Args& a, double lr, double beta1, double beta2, double eps, double weight_decay,
                       bool adam_w_mode, bool bias_correction, std::int64_t step, double inv_scale, double clip_coef,
                       py::handle grad_multiplier, py::handle skip_if_nonzero, py::handle step_tensor,
                       py::handle lr_tensor) {
  AdamConfig c;
  c.lr = lr;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.eps = eps;
  c.weight_decay = weight_decay;
  c.adam_w_mode = adam_w_mode;
  c.bias_correction = bias_correction;
  c.step = step;
  c.inv_scale = inv_scale;
  c.clip_coef = clip_coef;
  if (auto v = a.optional(grad_multiplier, "grad_multiplier")) c.grad_multiplier = *v;
  if (auto v = a.optional(skip_if_nonzero, "skip_if_nonzero")) c.skip_if_nonzero = *v;
  if (auto v = a.optional(step_tensor, "step_tensor")) c.step_tensor = *v;
  if (auto v = a.optional(lr_tensor, "lr_tensor")) c.lr_tensor = *v;
  return c;
}

GeluApproximation gelu_approximation(const std::string& name) {
  if (name == "tanh") return GeluApproximation::Tanh;
  if (name == "none") return GeluApproximation::None;
  zerofuse::value_error("zerofuse.bias_gelu: 'approximate' must be \"none\" or \"tanh\", got \"", name, "\"");
}

StepControlConfig step_control_config(bool dynamic_loss_scale, int initial_scale_power,
                                      std::int64_t loss_scale_window, int hysteresis, bool consecutive_hysteresis,
                                      double min_loss_scale, double max_grad_norm) {
  StepControlConfig c;
  c.dynamic_loss_scale = dynamic_loss_scale;
  c.scaler = DynamicLossScaleConfig{initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis,
                                    min_loss_scale};
  c.max_grad_norm = max_grad_norm;
  return c;
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.attr("STEP_STATE_SIZE") = int(kStepStateSize);
  m.attr("STEP_OUTPUT_SIZE") = int(kStepOutputSize);
  // The entries by name (zerofuse/step_control.h), so Python never retypes an index.
  py::dict state_fields, output_fields;
  state_fields["loss_scale"] = int(kStateLossScale);
  state_fields["cur_iter"] = int(kStateCurIter);
  state_fields["last_overflow_iter"] = int(kStateLastOverflowIter);
  state_fields["cur_hysteresis"] = int(kStateCurHysteresis);
  state_fields["applied_steps"] = int(kStateAppliedSteps);
  state_fields["skipped_steps"] = int(kStateSkippedSteps);
  state_fields["at_minimum"] = int(kStateAtMinimum);
  output_fields["grad_multiplier"] = int(kOutGradMultiplier);
  output_fields["skip"] = int(kOutSkip);
  output_fields["grad_norm"] = int(kOutGradNorm);
  m.attr("STEP_STATE_FIELDS") = state_fields;
  m.attr("STEP_OUTPUT_FIELDS") = output_fields;
  m.def(
      "step_control_init",
      [](py::handle state, bool dynamic_loss_scale, int initial_scale_power, std::int64_t loss_scale_window,
         int hysteresis, bool consecutive_hysteresis, double min_loss_scale, double max_grad_norm,
         double static_scale, py::handle stream) {
        Args a("zerofuse.step_control_init");
        const TensorView st = a.tensor(state, "state", true);
        const StepControlConfig c = step_control_config(dynamic_loss_scale, initial_scale_power, loss_scale_window,
                                                        hysteresis, consecutive_hysteresis, min_loss_scale,
                                                        max_grad_norm);
        const Stream s = a.stream(stream, st.device);
        py::gil_scoped_release nogil;
        step_control_init(st, c, static_scale, s);
      },
      arg("state"), py::kw_only(), arg("dynamic_loss_scale"), arg("initial_scale_power"), arg("loss_scale_window"),
      arg("hysteresis"), arg("consecutive_hysteresis"), arg("min_loss_scale"), arg("max_grad_norm"),
      arg("static_scale"), arg("stream") = py::none(),
      "Write a fresh step-control state (see zerofuse/step_control.h).");
  m.def(
      "step_control",
      [](py::handle stats, py::handle state, py::handle out, bool dynamic_loss_scale, int initial_scale_power,
         std::int64_t loss_scale_window, int hysteresis, bool consecutive_hysteresis, double min_loss_scale,
         double max_grad_norm, py::handle stream) {
        Args a("zerofuse.step_control");
        const TensorView sv = a.tensor(stats, "stats"), st = a.tensor(state, "state", true),
                         o = a.tensor(out, "out", true);
        const StepControlConfig c = step_control_config(dynamic_loss_scale, initial_scale_power, loss_scale_window,
                                                        hysteresis, consecutive_hysteresis, min_loss_scale,
                                                        max_grad_norm);
        const Stream s = a.stream(stream, sv.device);
        py::gil_scoped_release nogil;
        step_control(sv, st, o, c, s);
      },
      arg("stats"), arg("state"), arg("out"), py::kw_only(), arg("dynamic_loss_scale"), arg("initial_scale_power"),
      arg("loss_scale_window"), arg("hysteresis"), arg("consecutive_hysteresis"), arg("min_loss_scale"),
      arg("max_grad_norm"), arg("stream") = py::none(),
      "Decide one optimizer step on the device (see zerofuse/step_control.h).");

  m.def(
      "adam_step",
      [](py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq, py::handle param_copy,
         double lr, double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode,
         bool bias_correction, std::int64_t step, double inv_scale, double clip_coef, py::handle grad_multiplier,
         py::handle skip_if_nonzero, py::handle step_tensor, py::handle lr_tensor, py::handle stream) {
        Args a("zerofuse.adam_step");
        const TensorView p = a.tensor(param, "param", true), g = a.tensor(grad, "grad"),
                         m1 = a.tensor(exp_avg, "exp_avg", true), m2 = a.tensor(exp_avg_sq, "exp_avg_sq", true);
        const auto copy = a.optional(param_copy, "param_copy", true);
        const AdamConfig c = adam_config(a, lr, beta1, beta2, eps, weight_decay, adam_w_mode, bias_correction, step,
                                         inv_scale, clip_coef, grad_multiplier, skip_if_nonzero, step_tensor,
                                         lr_tensor);
        const Stream s = a.stream(stream, p.device);
        py::gil_scoped_release nogil;
        adam_step(p, g, m1, m2, ptr(copy), c, s);
      },
      arg("param"), arg("grad"), arg("exp_avg"), arg("exp_avg_sq"), arg("param_copy") = py::none(), py::kw_only(),
      arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"), arg("adam_w_mode"),
      arg("bias_correction"), arg("step"), arg("inv_scale") = 1.0, arg("clip_coef") = 1.0,
      arg("grad_multiplier") = py::none(), arg("skip_if_nonzero") = py::none(), arg("step_tensor") = py::none(),
      arg("lr_tensor") = py::none(), arg("stream") = py::none(),
      "Fused Adam/AdamW update of one flat float32 buffer (see zerofuse/adam.h).");

  m.def(
      "adam_step_multi",
      [](py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs, py::handle param_copies,
         double lr, double beta1, double beta2, double eps, double weight_decay, bool adam_w_mode,
         bool bias_correction, std::int64_t step, double inv_scale, double clip_coef, py::handle grad_multiplier,
         py::handle skip_if_nonzero, py::handle step_tensor, py::handle lr_tensor, py::handle stream) {
        Args a("zerofuse.adam_step_multi");
        AdamTensorLists t;
        t.params = a.list(params, "params", true);
        t.grads = a.list(grads, "grads");
        t.exp_avgs = a.list(exp_avgs, "exp_avgs", true);
        t.exp_avg_sqs = a.list(exp_avg_sqs, "exp_avg_sqs", true);
        if (!param_copies.is_none()) t.param_copies = a.list(param_copies, "param_copies", true);
        const AdamConfig c = adam_config(a, lr, beta1, beta2, eps, weight_decay, adam_w_mode, bias_correction, step,
                                         inv_scale, clip_coef, grad_multiplier, skip_if_nonzero, step_tensor,
                                         lr_tensor);
        const Stream s = a.stream(stream, t.params.empty() ? Device::cpu() : t.params[0].device);
        py::gil_scoped_release nogil;
        adam_step_multi(t, c, s);
      },
      arg("params"), arg("grads"), arg("exp_avgs"), arg("exp_avg_sqs"), arg("param_copies") = py::none(),
      py::kw_only(), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"), arg("adam_w_mode"),
      arg("bias_correction"), arg("step"), arg("inv_scale") = 1.0, arg("clip_coef") = 1.0,
      arg("grad_multiplier") = py::none(), arg("skip_if_nonzero") = py::none(), arg("step_tensor") = py::none(),
      arg("lr_tensor") = py::none(), arg("stream") = py::none(),
      "Fused Adam/AdamW update of lists of tensors (see zerofuse/adam.h).");

  m.def(
      "grad_stats",
      [](py::handle grads, py::handle out, py::handle stream) {
        Args a("zerofuse.grad_stats");
        const std::vector<TensorView> g = a.list(grads, "grads");
        const TensorView o = a.tensor(out, "out", true);
        const Stream s = a.stream(stream, o.device);
        py::gil_scoped_release nogil;
        grad_stats(g, o, s);
      },
      arg("grads"), arg("out"), arg("stream") = py::none(),
      "out[0] = sum of squares of all grads, out[1] = 1 if any is inf/NaN (see zerofuse/grad_stats.h).");

  m.def(
      "layer_norm_forward",
      [](py::handle x, py::handle weight, py::handle bias, float eps, py::handle out, py::handle mean,
         py::handle rstd, py::handle stream) {
        Args a("zerofuse.layer_norm");
        const TensorView xv = a.tensor(x, "input");
        const auto w = a.optional(weight, "weight"), b = a.optional(bias, "bias");
        const TensorView y = a.tensor(out, "out", true), mu = a.tensor(mean, "mean", true),
                         rs = a.tensor(rstd, "rstd", true);
        const Stream s = a.stream(stream, xv.device);
        py::gil_scoped_release nogil;
        layernorm_forward(xv, ptr(w), ptr(b), eps, y, mu, rs, s);
      },
      arg("input"), arg("weight"), arg("bias"), arg("eps"), arg("out"), arg("mean"), arg("rstd"),
      arg("stream") = py::none(), "LayerNorm forward of a [rows, D] input (see zerofuse/layernorm.h).");

  m.def(
      "layer_norm_backward",
      [](py::handle grad_out, py::handle x, py::handle weight, py::handle mean, py::handle rstd,
         py::handle grad_input, py::handle grad_weight, py::handle grad_bias, py::handle stream) {
        Args a("zerofuse.layer_norm_backward");
        const TensorView dy = a.tensor(grad_out, "grad_out"), xv = a.tensor(x, "input");
        const auto w = a.optional(weight, "weight");
        const TensorView mu = a.tensor(mean, "mean"), rs = a.tensor(rstd, "rstd");
        const TensorView dx = a.tensor(grad_input, "grad_input", true);
        const auto dw = a.optional(grad_weight, "grad_weight", true), db = a.optional(grad_bias, "grad_bias", true);
        const Stream s = a.stream(stream, xv.device);
        py::gil_scoped_release nogil;
        layernorm_backward(dy, xv, ptr(w), mu, rs, dx, ptr(dw), ptr(db), s);
      },
      arg("grad_out"), arg("input"), arg("weight"), arg("mean"), arg("rstd"), arg("grad_input"),
      arg("grad_weight"), arg("grad_bias"), arg("stream") = py::none(),
      "LayerNorm backward (see zerofuse/layernorm.h).");

  m.def(
      "attention_forward",
      [](py::handle q, py::handle k, py::handle v, py::handle key_padding_mask, bool causal, float scale,
         py::handle out, py::handle lse, py::handle stream) {
        Args a("zerofuse.attention");
        const TensorView qv = a.tensor(q, "q"), kv = a.tensor(k, "k"), vv = a.tensor(v, "v");
        const auto mask = a.optional(key_padding_mask, "key_padding_mask");
        const TensorView o = a.tensor(out, "out", true), l = a.tensor(lse, "lse", true);
        const Stream s = a.stream(stream, qv.device);
        py::gil_scoped_release nogil;
        attention_forward(qv, kv, vv, ptr(mask), AttentionConfig{causal, scale}, o, l, s);
      },
      arg("q"), arg("k"), arg("v"), arg("key_padding_mask"), arg("causal"), arg("scale"), arg("out"), arg("lse"),
      arg("stream") = py::none(), "Blocked softmax attention forward (see zerofuse/attention.h).");

  m.def(
      "attention_backward",
      [](py::handle grad_out, py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
         py::handle key_padding_mask, bool causal, float scale, py::handle grad_q, py::handle grad_k,
         py::handle grad_v, py::handle stream) {
        Args a("zerofuse.attention_backward");
        const TensorView dout = a.tensor(grad_out, "grad_out"), qv = a.tensor(q, "q"), kv = a.tensor(k, "k"),
                         vv = a.tensor(v, "v"), o = a.tensor(out, "out"), l = a.tensor(lse, "lse");
        const auto mask = a.optional(key_padding_mask, "key_padding_mask");
        const TensorView dq = a.tensor(grad_q, "grad_q", true), dk = a.tensor(grad_k, "grad_k", true),
                         dv = a.tensor(grad_v, "grad_v", true);
        const Stream s = a.stream(stream, qv.device);
        py::gil_scoped_release nogil;
        attention_backward(dout, qv, kv, vv, o, l, ptr(mask), AttentionConfig{causal, scale}, dq, dk, dv, s);
      },
      arg("grad_out"), arg("q"), arg("k"), arg("v"), arg("out"), arg("lse"), arg("key_padding_mask"),
      arg("causal"), arg("scale"), arg("grad_q"), arg("grad_k"), arg("grad_v"), arg("stream") = py::none(),
      "Blocked softmax attention backward (see zerofuse/attention.h).");

  m.def(
      "cross_entropy_forward",
      [](py::handle logits, py::handle target, std::int64_t ignore_index, double label_smoothing, py::handle loss,
         py::handle lse, py::handle stream, std::int64_t vocab_start, std::int64_t vocab_total) {
        Args a("zerofuse.cross_entropy");
        const TensorView x = a.tensor(logits, "logits"), t = a.tensor(target, "target"),
                         l = a.tensor(loss, "loss", true), z = a.tensor(lse, "lse", true);
        const Stream s = a.stream(stream, x.device);
        py::gil_scoped_release nogil;
        cross_entropy_forward(x, t, CrossEntropyConfig{ignore_index, label_smoothing, vocab_start, vocab_total}, l, z,
                              s);
      },
      arg("logits"), arg("target"), arg("ignore_index"), arg("label_smoothing"), arg("loss"), arg("lse"),
      arg("stream") = py::none(), arg("vocab_start") = 0, arg("vocab_total") = 0,
      "Per-row softmax cross-entropy and logsumexp, of whole rows or of a vocabulary slice "
      "(see zerofuse/cross_entropy.h).");
  m.def(
      "cross_entropy_backward",
      [](py::handle logits, py::handle target, py::handle lse, py::handle grad, std::int64_t ignore_index,
         double label_smoothing, py::handle grad_logits, py::handle stream, std::int64_t vocab_start,
         std::int64_t vocab_total) {
        Args a("zerofuse.cross_entropy_backward");
        const TensorView x = a.tensor(logits, "logits"), t = a.tensor(target, "target"), z = a.tensor(lse, "lse"),
                         g = a.tensor(grad, "grad"), dx = a.tensor(grad_logits, "grad_logits", true);
        const Stream s = a.stream(stream, x.device);
        py::gil_scoped_release nogil;
        cross_entropy_backward(x, t, z, g, CrossEntropyConfig{ignore_index, label_smoothing, vocab_start, vocab_total},
                               dx, s);
      },
      arg("logits"), arg("target"), arg("lse"), arg("grad"), arg("ignore_index"), arg("label_smoothing"),
      arg("grad_logits"), arg("stream") = py::none(), arg("vocab_start") = 0, arg("vocab_total") = 0,
      "Gradient of the per-row losses; grad_logits may be the logits tensor itself.");
  m.def(
      "bias_gelu_forward",
      [](py::handle x, py::handle bias, const std::string& approximate, py::handle out, py::handle stream) {
        Args a("zerofuse.bias_gelu");
        const GeluApproximation approx = gelu_approximation(approximate);
        const TensorView xv = a.tensor(x, "input"), b = a.tensor(bias, "bias"), y = a.tensor(out, "out", true);
        const Stream s = a.stream(stream, xv.device);
        py::gil_scoped_release nogil;
        bias_gelu_forward(xv, b, approx, y, s);
      },
      arg("input"), arg("bias"), arg("approximate"), arg("out"), arg("stream") = py::none());
  m.def(
      "bias_gelu_backward",
      [](py::handle grad_out, py::handle x, py::handle bias, const std::string& approximate, py::handle grad_input,
         py::handle grad_bias, py::handle stream) {
        Args a("zerofuse.bias_gelu_backward");
        const GeluApproximation approx = gelu_approximation(approximate);
        const TensorView dy = a.tensor(grad_out, "grad_out"), xv = a.tensor(x, "input"), b = a.tensor(bias, "bias"),
                         dx = a.tensor(grad_input, "grad_input", true);
        const auto db = a.optional(grad_bias, "grad_bias", true);
        const Stream s = a.stream(stream, xv.device);
        py::gil_scoped_release nogil;
        bias_gelu_backward(dy, xv, b, approx, dx, ptr(db), s);
      },
      arg("grad_out"), arg("input"), arg("bias"), arg("approximate"), arg("grad_input"), arg("grad_bias"),
      arg("stream") = py::none());
  m.def(
      "masked_softmax_forward",
      [](py::handle x, py::handle mask, float scale, bool causal, py::handle out, py::handle stream) {
        Args a("zerofuse.masked_softmax");
        const TensorView xv = a.tensor(x, "input"), y = a.tensor(out, "out", true);
        const auto mv = a.optional(mask, "mask");
        const Stream s = a.stream(stream, xv.device);
        MaskedSoftmaxConfig config;
        config.scale = scale;
        config.causal = causal;
        py::gil_scoped_release nogil;
        masked_softmax_forward(xv, ptr(mv), config, y, s);
      },
      arg("input"), arg("mask"), arg("scale"), arg("causal"), arg("out"), arg("stream") = py::none());
  m.def(
      "masked_softmax_backward",
      [](py::handle grad_out, py::handle out, float scale, py::handle grad_input, py::handle stream) {
        Args a("zerofuse.masked_softmax_backward");
        const TensorView dy = a.tensor(grad_out, "grad_out"), y = a.tensor(out, "out"),
                         dx = a.tensor(grad_input, "grad_input", true);
        const Stream s = a.stream(stream, y.device);
        py::gil_scoped_release nogil;
        masked_softmax_backward(dy, y, scale, dx, s);
      },
      arg("grad_out"), arg("out"), arg("scale"), arg("grad_input"), arg("stream") = py::none());
  m.def(
      "add_layer_norm_forward",
      [](py::handle x, py::handle residual, py::handle weight, py::handle bias, float eps, py::handle sum,
         py::handle out, py::handle mean, py::handle rstd, py::handle stream) {
        Args a("zerofuse.add_layer_norm");
        const TensorView xv = a.tensor(x, "input"), r = a.tensor(residual, "residual");
        const auto w = a.optional(weight, "weight"), b = a.optional(bias, "bias");
        const TensorView sv = a.tensor(sum, "sum", true), y = a.tensor(out, "out", true),
                         mu = a.tensor(mean, "mean", true), rs = a.tensor(rstd, "rstd", true);
        const Stream s = a.stream(stream, xv.device);
        py::gil_scoped_release nogil;
        add_layernorm_forward(xv, r, ptr(w), ptr(b), eps, sv, y, mu, rs, s);
      },
      arg("input"), arg("residual"), arg("weight"), arg("bias"), arg("eps"), arg("sum"), arg("out"), arg("mean"),
      arg("rstd"), arg("stream") = py::none(), "sum = input + residual and LayerNorm(sum) in one pass.");
  m.def(
      "add_layer_norm_backward",
      [](py::handle grad_out, py::handle grad_sum, py::handle sum, py::handle weight, py::handle mean,
         py::handle rstd, py::handle grad_input, py::handle grad_weight, py::handle grad_bias, py::handle stream) {
        Args a("zerofuse.add_layer_norm_backward");
        const TensorView dy = a.tensor(grad_out, "grad_out"), gs = a.tensor(grad_sum, "grad_sum"),
                         sv = a.tensor(sum, "sum");
        const auto w = a.optional(weight, "weight");
        const TensorView mu = a.tensor(mean, "mean"), rs = a.tensor(rstd, "rstd"),
                         dx = a.tensor(grad_input, "grad_input", true);
        const auto dw = a.optional(grad_weight, "grad_weight", true), db = a.optional(grad_bias, "grad_bias", true);
        const Stream s = a.stream(stream, sv.device);
        py::gil_scoped_release nogil;
        add_layernorm_backward(dy, gs, sv, ptr(w), mu, rs, dx, ptr(dw), ptr(db), s);
      },
      arg("grad_out"), arg("grad_sum"), arg("sum"), arg("weight"), arg("mean"), arg("rstd"), arg("grad_input"),
      arg("grad_weight"), arg("grad_bias"), arg("stream") = py::none());
}

}  // namespace zerofuse::python
