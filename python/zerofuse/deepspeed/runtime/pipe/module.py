"""deepspeed.runtime.pipe.module: PipelineModule and its layer specs (zerofuse.pipe.module)."""
from ....pipe.module import LayerSpec, PipelineError, PipelineModule, TiedLayerSpec  # noqa: F401
