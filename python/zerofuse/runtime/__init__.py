"""The training engine: zerofuse.initialize and what it builds."""
from .. import _torch_threads  # noqa: F401  (CPU kernels on torch's OpenMP team)
from .config import ConfigError, parse_config
from .engine import Engine
from .initialize import initialize

__all__ = ["ConfigError", "Engine", "initialize", "parse_config"]
