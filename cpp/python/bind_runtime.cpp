// Python entry points of the non-kernel core: build report, threads, the loss
// scaler and the flat-buffer plan.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "zerofuse/build_info.h"
#include "zerofuse/flat_plan.h"
#include "zerofuse/loss_scaler.h"

namespace zerofuse::python {

namespace py = pybind11;
using py::arg;

void bind_runtime(py::module_& m) {
  m.def("build_info", [] {
    const BuildInfo b = build_info();
    py::dict d;
    d["version"] = b.version;
    d["cxx_compiler"] = b.cxx_compiler;
    d["cuda"] = b.cuda;
    d["cuda_archs"] = b.cuda_archs;
    d["cuda_compiler_version"] = b.cuda_compiler_version;
    d["cpu_isas"] = b.cpu_isas;
    d["cpu_isa"] = b.cpu_isa;
    return d;
  });
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_status", &cuda_status);
  m.def("num_threads", &num_threads, "Threads used by the CPU kernels.");
  m.def("set_num_threads", &set_num_threads, arg("threads"), "Set the threads used by the CPU kernels.");
  m.def("use_loaded_openmp", &use_loaded_openmp,
        "Run the CPU kernels' parallel work on the OpenMP runtime already loaded (torch's); returns whether found.");
  m.def("threading_backend", &threading_backend, "'openmp' or 'pool': what runs the CPU kernels' parallel work.");

  py::class_<LossScaler>(m, "LossScaler")
      .def_static(
          "dynamic",
          [](int initial_scale_power, std::int64_t loss_scale_window, int hysteresis, bool consecutive_hysteresis,
             double min_loss_scale) {
            return LossScaler::dynamic(DynamicLossScaleConfig{initial_scale_power, loss_scale_window, hysteresis,
                                                              consecutive_hysteresis, min_loss_scale});
          },
          arg("initial_scale_power"), arg("loss_scale_window"), arg("hysteresis"), arg("consecutive_hysteresis"),
          arg("min_loss_scale"))
      .def_static("fixed", &LossScaler::fixed, arg("loss_scale"))
      .def_property_readonly("loss_scale", &LossScaler::loss_scale)
      .def_property_readonly("is_dynamic", &LossScaler::is_dynamic)
      .def_property_readonly("at_minimum", &LossScaler::at_minimum)
      .def("update", &LossScaler::update, arg("overflow"))
      .def("get_state",
           [](const LossScaler& s) {
             const LossScalerState& st = s.state();
             py::dict d;
             d["cur_scale"] = st.scale;
             d["cur_iter"] = st.cur_iter;
             d["last_overflow_iter"] = st.last_overflow_iter;
             d["cur_hysteresis"] = st.cur_hysteresis;
             return d;
           })
      .def(
          "set_state",
          [](LossScaler& s, double cur_scale, std::int64_t cur_iter, std::int64_t last_overflow_iter,
             int cur_hysteresis) {
            s.set_state(LossScalerState{cur_scale, cur_iter, last_overflow_iter, cur_hysteresis});
          },
          arg("cur_scale"), arg("cur_iter"), arg("last_overflow_iter"), arg("cur_hysteresis"));

  py::class_<FlatPlan>(m, "FlatPlan")
      .def(py::init([](const std::vector<std::int64_t>& numels, int world_size, std::int64_t element_size,
                       std::int64_t alignment_bytes, std::int64_t bucket_bytes,
                       const std::vector<std::int64_t>& unit_sizes) {
             return FlatPlan(numels,
                             FlatPlanOptions{world_size, element_size, alignment_bytes, bucket_bytes, unit_sizes});
           }),
           arg("numels"), py::kw_only(), arg("world_size"), arg("element_size"), arg("alignment_bytes"),
           arg("bucket_bytes"), arg("unit_sizes") = std::vector<std::int64_t>{})
      .def_property_readonly("world_size", &FlatPlan::world_size)
      .def_property_readonly("alignment", &FlatPlan::alignment)
      .def_property_readonly("total", &FlatPlan::total)
      .def_property_readonly("shard_size", &FlatPlan::shard_size)
      .def_property_readonly("num_params", &FlatPlan::num_params)
      .def_property_readonly("params",
                             [](const FlatPlan& p) {
                               py::list out;
                               for (const ParamSlot& s : p.params()) out.append(py::make_tuple(s.offset, s.numel, s.padding));
                               return out;
                             })
      .def_property_readonly("buckets",
                             [](const FlatPlan& p) {
                               py::list out;
                               for (const Bucket& b : p.buckets())
                                 out.append(py::make_tuple(b.begin, b.end, b.chunk, b.shard_offset));
                               return out;
                             })
      .def("owner", &FlatPlan::owner, arg("flat_index"))
      .def("buckets_of_param", &FlatPlan::buckets_of_param, arg("param_index"))
      .def(
          "shard_slices",
          [](const FlatPlan& p, int rank) {
            py::list out;
            for (const ShardSlice& s : p.shard_slices(rank))
              out.append(py::make_tuple(s.param_index, s.param_begin, s.shard_offset, s.length));
            return out;
          },
          arg("rank"));
}

}  // namespace zerofuse::python
