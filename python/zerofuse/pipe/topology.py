"""Process grids: which global rank holds which (pipe, data, model) coordinate,
and the torch.distributed groups along each axis.

DeepSpeed's ProcessTopology semantics: ranks enumerate the Cartesian product
of the axes with the last axis varying fastest, so with axes ['pipe', 'data']
the data-parallel ranks of one stage are consecutive (cheap links inside a
node carry the gradient all-reduce; only activations cross stages).
"""
import itertools
from collections import namedtuple
from typing import Dict, List

import torch.distributed as dist


class ProcessTopology:
    """Maps global ranks to coordinates on named axes and back."""

    def __init__(self, axes: List[str], dims: List[int]):
        axes, dims = list(axes), [int(d) for d in dims]
        if len(axes) != len(dims) or len(set(axes)) != len(axes):
            raise ValueError(f"ProcessTopology: 'axes' must be distinct names, one per entry of 'dims'; got "
                             f"axes={axes}, dims={dims}")
        if any(d < 1 for d in dims):
            raise ValueError(f"ProcessTopology: every dimension must be >= 1, got dims={dims}")
        self.axes, self.dims = axes, dims
        self.ProcessCoord = namedtuple("ProcessCoord", axes)
        self.mapping: Dict[tuple, int] = {}
        for rank, coord in enumerate(itertools.product(*[range(d) for d in dims])):
            self.mapping[self.ProcessCoord(*coord)] = rank

    def world_size(self) -> int:
        return len(self.mapping)

    def get_axis_names(self) -> List[str]:
        return list(self.axes)

    def get_dim(self, axis: str) -> int:
        """The size of `axis` (0 when the topology has no such axis, as DeepSpeed)."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_rank(self, **coord) -> int:
        if set(coord) != set(self.axes):
            raise ValueError(f"ProcessTopology.get_rank: give every axis {self.axes}, got {sorted(coord)}")
        key = self.ProcessCoord(**coord)
        if key not in self.mapping:
            raise ValueError(f"ProcessTopology.get_rank: {coord} is outside dims {dict(zip(self.axes, self.dims))}")
        return self.mapping[key]

    def get_coord(self, rank: int):
        for coord, r in self.mapping.items():
            if r == rank:
                return coord
        raise ValueError(f"ProcessTopology.get_coord: rank {rank} is not in a topology of {self.world_size()} ranks")

    def get_rank_repr(self, rank, omit_axes=("data", "pipe"), inner_sep="_", outer_sep="-") -> str:
        coord = self.get_coord(rank)
        return outer_sep.join(f"{a}{inner_sep}{getattr(coord, a):02d}" for a in self.axes if a not in omit_axes)

    def get_axis_list(self, axis: str, idx: int) -> List[int]:
        """Ranks whose coordinate on `axis` is idx."""
        if axis not in self.axes:
            return []
        i = self.axes.index(axis)
        return sorted(r for c, r in self.mapping.items() if c[i] == idx)

    def filter_match(self, **filters) -> List[int]:
        """Ranks whose coordinates match every axis=value given."""
        return sorted(r for c, r in self.mapping.items()
                      if all(getattr(c, a) == v for a, v in filters.items()))

    def get_axis_comm_lists(self, axis: str) -> List[List[int]]:
        """The groups of ranks that differ only in `axis` (one list per
        combination of the other axes), each sorted."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for fixed in itertools.product(*[range(self.get_dim(a)) for a in others]):
            lists.append(self.filter_match(**dict(zip(others, fixed))))
        return lists

    def __str__(self):
        return str(self.mapping)


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallel: axes ['pipe', 'data']."""

    def __init__(self, num_pp: int, num_dp: int):
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline x data x model (tensor) parallel: axes ['pipe', 'data', 'model']."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int):
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])


class PipelineParallelGrid:
    """This rank's place in a topology and the process groups along its axes;
    also the Megatron-style `mpu` interface (get_data_parallel_group(), ...).
    Every rank must build it (group creation is collective)."""

    def __init__(self, topology: ProcessTopology = None, process_group=None):
        """process_group: accepted for DeepSpeed's signature; the groups are always made over the world."""
        initialized = dist.is_initialized()
        self.global_rank = dist.get_rank() if initialized else 0
        self.world_size = dist.get_world_size() if initialized else 1  # one process, no groups at all
        if topology is None:
            topology = PipeDataParallelTopology(num_pp=self.world_size, num_dp=1)
        if topology.world_size() != self.world_size:
            raise ValueError(f"the pipeline topology holds {topology.world_size()} ranks "
                             f"({dict(zip(topology.axes, topology.dims))}) but the world size is {self.world_size}")
        self._topo = topology
        coord = topology.get_coord(self.global_rank)
        self.stage_id = coord.pipe
        self.data_parallel_id = getattr(coord, "data", 0)
        self.model_parallel_id = getattr(coord, "model", 0)
        self.pipe_parallel_size = max(topology.get_dim("pipe"), 1)
        self.data_parallel_size = max(topology.get_dim("data"), 1)
        self.model_parallel_size = max(topology.get_dim("model"), 1)
        # 'data' always has groups (of one rank when the topology lacks the axis): the engine reduces over it.
        self.groups = {axis: self._groups_along(axis) for axis in dict.fromkeys([*topology.axes, "data"])}
        # The stage-to-stage neighbours of this rank (same data and model coordinates).
        self.pipe_ranks = topology.filter_match(**{a: getattr(coord, a) for a in topology.axes if a != "pipe"})

    def _groups_along(self, axis):
        mine = None
        if not dist.is_initialized():
            return None
        lists = self._topo.get_axis_comm_lists(axis) or [[r] for r in range(self.world_size)]
        for ranks in lists:
            group = dist.new_group(ranks=ranks)  # collective: every rank creates every group
            if self.global_rank in ranks:
                mine = group
        return mine

    # --- coordinates -------------------------------------------------------------------------------

    def get_stage_id(self) -> int:
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        return self.data_parallel_id

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.pipe_parallel_size - 1

    def stage_to_global(self, stage_id: int, **kwargs) -> int:
        """The global rank of `stage_id` with this rank's other coordinates (overridden by kwargs)."""
        coord = self._topo.get_coord(self.global_rank)._asdict()
        coord.update(pipe=stage_id, **kwargs)
        return self._topo.get_rank(**coord)

    def topology(self) -> ProcessTopology:
        return self._topo

    # --- the mpu interface -------------------------------------------------------------------------

    def get_pipe_parallel_group(self):
        return self.groups["pipe"]

    def get_pipe_parallel_rank(self) -> int:
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        return self.pipe_parallel_size

    def get_data_parallel_group(self):
        return self.groups.get("data")

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_model_parallel_group(self):
        return self.groups.get("model")

    def get_model_parallel_rank(self) -> int:
        return self.model_parallel_id

    def get_model_parallel_world_size(self) -> int:
        return self.model_parallel_size

    # Megatron's names for the same groups.
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size

    # DeepSpeed's names for the model-parallel slice within a stage.
    get_slice_parallel_group = get_model_parallel_group
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size


_GRIDS = {}  # (axes, dims) -> the grid built for that topology in this process


def grid_for(topology: ProcessTopology) -> PipelineParallelGrid:
    """The grid of `topology`, built once per process: a PipelineModule given
    the topology of a grid the script already made (zerofuse.tp.tensor_parallel_grid)
    shares its groups, so tensor-parallel layers built with that grid's
    group run inside the pipeline's stages."""
    key = (tuple(topology.axes), tuple(topology.dims), dist.group.WORLD if dist.is_initialized() else None)
    if key not in _GRIDS:
        _GRIDS[key] = PipelineParallelGrid(topology=topology)
    return _GRIDS[key]
