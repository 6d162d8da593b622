"""deepspeed.runtime.pipe: zerofuse's pipeline parallelism under DeepSpeed's module paths."""
from . import engine, module, topology  # noqa: F401
from .module import LayerSpec, PipelineModule, TiedLayerSpec  # noqa: F401
from .topology import ProcessTopology  # noqa: F401
