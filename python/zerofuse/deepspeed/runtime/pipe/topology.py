"""deepspeed.runtime.pipe.topology: process grids (zerofuse.pipe.topology)."""
from ....pipe.topology import (PipeDataParallelTopology, PipelineParallelGrid,  # noqa: F401
                               PipeModelDataParallelTopology, ProcessTopology)
