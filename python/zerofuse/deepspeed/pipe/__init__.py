"""deepspeed.pipe: zerofuse's pipeline parallelism (zerofuse.pipe)."""
from ...pipe import (LayerSpec, PipeDataParallelTopology, PipelineModule, PipeModelDataParallelTopology,  # noqa: F401
                     ProcessTopology, TiedLayerSpec)
