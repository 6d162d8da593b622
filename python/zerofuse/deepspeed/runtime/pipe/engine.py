"""deepspeed.runtime.pipe.engine: the pipeline engine (zerofuse.pipe.engine)."""
from ....pipe.engine import PipelineEngine  # noqa: F401
from ....pipe.module import PipelineError  # noqa: F401
