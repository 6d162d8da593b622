// The layout of a model's parameters (and, mirrored, their gradients and
// optimizer state) in one flat buffer, partitioned across data-parallel ranks.
//
// Parameters are placed in order, each at an offset aligned to `alignment_bytes`.
// The buffer is cut into buckets; bucket b covers [begin, end) and is split into
// world_size equal chunks of `chunk` elements, chunk r belonging to rank r. A
// rank's shard is the concatenation of its chunks, in bucket order, so:
//   - every bucket is contiguous in the flat buffer: reduce-scatter reads it and
//     all-gather writes it directly, with no copies;
//   - every rank's chunk of a bucket is contiguous in its shard: reduce-scatter
//     writes it and all-gather reads it directly;
//   - every shard has the same size, and every chunk is aligned.
// Padding (after parameters and at the end) is owned like any element and is
// kept at zero by the users of the plan.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace zerofuse {

struct FlatPlanOptions {
  int world_size = 1;
  std::int64_t element_size = 2;        // bytes per element of the flat buffer
  std::int64_t alignment_bytes = 256;   // every param offset and chunk is a multiple
  std::int64_t bucket_bytes = 500'000'000;  // target bucket size (all ranks together)
  // Consecutive runs of parameters (counts, summing to the number of
  // parameters) that no bucket spans: ZeRO-3 gathers a module's parameters
  // as whole buckets. Empty: one run of all parameters.
  std::vector<std::int64_t> unit_sizes;
};

struct ParamSlot {
  std::int64_t offset = 0;   // element offset in the flat buffer
  std::int64_t numel = 0;
  std::int64_t padding = 0;  // elements between this param's end and the next offset
};

struct Bucket {
  std::int64_t begin = 0;         // flat [begin, end), end - begin == world_size * chunk
  std::int64_t end = 0;
  std::int64_t chunk = 0;         // elements per rank
  std::int64_t shard_offset = 0;  // where every rank's chunk lives in its shard
};

// One rank's piece of one parameter.
struct ShardSlice {
  std::int64_t param_index = 0;
  std::int64_t param_begin = 0;   // first element within the parameter
  std::int64_t shard_offset = 0;  // where it lives in the rank's shard
  std::int64_t length = 0;
};

class FlatPlan {
 public:
  FlatPlan(const std::vector<std::int64_t>& numels, const FlatPlanOptions& options);

  const FlatPlanOptions& options() const { return options_; }
  int world_size() const { return options_.world_size; }
  std::int64_t alignment() const { return alignment_; }  // in elements
  std::int64_t total() const { return total_; }          // padded flat size, elements
  std::int64_t shard_size() const { return shard_size_; }
  std::int64_t num_params() const { return std::int64_t(params_.size()); }
  const std::vector<ParamSlot>& params() const { return params_; }
  const std::vector<Bucket>& buckets() const { return buckets_; }

  // Flat element -> (owning rank, position in that rank's shard).
  std::pair<int, std::int64_t> owner(std::int64_t flat_index) const;
  // The buckets [first, last] a parameter's elements fall in; (-1, -1) if empty.
  std::pair<int, int> buckets_of_param(std::int64_t param_index) const;
  // The pieces of every parameter that rank `rank` owns, in shard order.
  std::vector<ShardSlice> shard_slices(int rank) const;

 private:
  FlatPlanOptions options_;
  std::int64_t alignment_ = 1;
  std::int64_t total_ = 0;
  std::int64_t shard_size_ = 0;
  std::vector<ParamSlot> params_;
  std::vector<Bucket> buckets_;
};

}  // namespace zerofuse
