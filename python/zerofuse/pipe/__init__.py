"""Pipeline parallelism (DeepSpeed's deepspeed.pipe): PipelineModule and its
layer specs, process topologies, and the engine zerofuse.initialize returns
for a PipelineModule."""
from .engine import PipelineEngine
from .module import LayerSpec, PipelineError, PipelineModule, TiedLayerSpec
from .schedule import ideal_bubble_fraction, train_schedule
from .topology import (PipeDataParallelTopology, PipelineParallelGrid, PipeModelDataParallelTopology,
                       ProcessTopology)


__all__ = ["LayerSpec", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineEngine",
           "PipelineError", "PipelineModule", "PipelineParallelGrid", "ProcessTopology", "TiedLayerSpec",
           "ideal_bubble_fraction", "train_schedule"]
