#include "zerofuse/flat_plan.h"

#include <algorithm>

#include "zerofuse/error.h"

namespace zerofuse {
namespace {

std::int64_t round_up(std::int64_t x, std::int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

}  // namespace

FlatPlan::FlatPlan(const std::vector<std::int64_t>& numels, const FlatPlanOptions& options) : options_(options) {
  const char* op = "zerofuse.FlatPlan";
  const FlatPlanOptions& o = options;
  if (o.world_size < 1) value_error(op, ": 'world_size' must be >= 1, got ", o.world_size);
  if (o.element_size != 1 && o.element_size != 2 && o.element_size != 4 && o.element_size != 8)
    value_error(op, ": 'element_size' must be 1, 2, 4 or 8 bytes, got ", o.element_size);
  if (o.alignment_bytes < 1 || o.alignment_bytes % o.element_size != 0)
    value_error(op, ": 'alignment_bytes' must be a positive multiple of element_size (", o.element_size,
                "), got ", o.alignment_bytes);
  if (o.bucket_bytes < 1) value_error(op, ": 'bucket_bytes' must be >= 1, got ", o.bucket_bytes);
  alignment_ = o.alignment_bytes / o.element_size;

  // 1. Units: where buckets must break (one unit of everything by default).
  std::vector<std::int64_t> unit_ends;  // exclusive parameter index of each unit's end
  if (o.unit_sizes.empty()) {
    unit_ends.push_back(std::int64_t(numels.size()));
  } else {
    std::int64_t end = 0;
    for (std::size_t u = 0; u < o.unit_sizes.size(); ++u) {
      if (o.unit_sizes[u] < 0) value_error(op, ": 'unit_sizes' must be >= 0, got ", o.unit_sizes[u], " at ", u);
      end += o.unit_sizes[u];
      unit_ends.push_back(end);
    }
    if (end != std::int64_t(numels.size()))
      value_error(op, ": 'unit_sizes' must add up to the number of parameters (", numels.size(), "), got ", end);
  }

  // 2. Per unit: its parameters, each at an aligned offset, then buckets of
  // world_size equal aligned chunks covering them. Full buckets take the
  // target chunk; a unit's last one takes just enough to cover what is left.
  // A unit starts at a bucket boundary, so gathering its buckets gathers it
  // and nothing of its neighbours (ZeRO-3 gathers module by module).
  const std::int64_t target_chunk =
      std::max(alignment_, o.bucket_bytes / o.element_size / o.world_size / alignment_ * alignment_);
  params_.resize(numels.size());
  std::int64_t begin = 0, shard_offset = 0;
  std::size_t i = 0;
  for (const std::int64_t unit_end : unit_ends) {
    std::int64_t cursor = begin;
    for (; i < std::size_t(unit_end); ++i) {
      if (numels[i] < 0) value_error(op, ": parameter ", i, " has a negative size ", numels[i]);
      params_[i].offset = cursor;
      params_[i].numel = numels[i];
      cursor = round_up(cursor + numels[i], alignment_);
    }
    while (begin < cursor) {
      const std::int64_t remaining = cursor - begin;
      const std::int64_t chunk = remaining >= target_chunk * o.world_size
                                     ? target_chunk
                                     : round_up((remaining + o.world_size - 1) / o.world_size, alignment_);
      buckets_.push_back(Bucket{begin, begin + chunk * o.world_size, chunk, shard_offset});
      begin += chunk * o.world_size;
      shard_offset += chunk;
    }
  }
  total_ = begin;
  shard_size_ = shard_offset;
  // Padding reaches the next parameter's offset; the last slot owns the tail.
  for (std::size_t k = 0; k < params_.size(); ++k) {
    const std::int64_t next = k + 1 < params_.size() ? params_[k + 1].offset : total_;
    params_[k].padding = next - (params_[k].offset + params_[k].numel);
  }
}

std::pair<int, std::int64_t> FlatPlan::owner(std::int64_t flat_index) const {
  if (flat_index < 0 || flat_index >= total_)
    value_error("zerofuse.FlatPlan.owner: 'flat_index' must be in [0, ", total_, "), got ", flat_index);
  auto it = std::upper_bound(buckets_.begin(), buckets_.end(), flat_index,
                             [](std::int64_t x, const Bucket& b) { return x < b.begin; });
  const Bucket& b = *(it - 1);
  const std::int64_t within = flat_index - b.begin;
  return {int(within / b.chunk), b.shard_offset + within % b.chunk};
}

std::pair<int, int> FlatPlan::buckets_of_param(std::int64_t param_index) const {
  if (param_index < 0 || param_index >= num_params())
    value_error("zerofuse.FlatPlan.buckets_of_param: 'param_index' must be in [0, ", num_params(), "), got ",
                param_index);
  const ParamSlot& p = params_[std::size_t(param_index)];
  if (p.numel == 0) return {-1, -1};
  auto bucket_of = [&](std::int64_t flat) {
    auto it = std::upper_bound(buckets_.begin(), buckets_.end(), flat,
                               [](std::int64_t x, const Bucket& b) { return x < b.begin; });
    return int(it - buckets_.begin()) - 1;
  };
  return {bucket_of(p.offset), bucket_of(p.offset + p.numel - 1)};
}

std::vector<ShardSlice> FlatPlan::shard_slices(int rank) const {
  if (rank < 0 || rank >= world_size())
    value_error("zerofuse.FlatPlan.shard_slices: 'rank' must be in [0, ", world_size(), "), got ", rank);
  std::vector<ShardSlice> slices;
  std::size_t p = 0;  // parameters and buckets both ascend: walk them together
  for (const Bucket& b : buckets_) {
    const std::int64_t lo = b.begin + rank * b.chunk, hi = lo + b.chunk;
    while (p < params_.size() && params_[p].offset + params_[p].numel <= lo) ++p;
    for (std::size_t i = p; i < params_.size() && params_[i].offset < hi; ++i) {
      const std::int64_t s = std::max(lo, params_[i].offset);
      const std::int64_t e = std::min(hi, params_[i].offset + params_[i].numel);
      if (s >= e) continue;
      slices.push_back(ShardSlice{std::int64_t(i), s - params_[i].offset, b.shard_offset + (s - lo), e - s});
    }
  }
  return slices;
}

}  // namespace zerofuse
