"""deepspeed.runtime.engine: DeepSpeedEngine is zerofuse's Engine."""
from typing import Callable, Iterable, Union

import torch

from ...runtime.engine import Engine as DeepSpeedEngine  # noqa: F401

DeepSpeedOptimizerCallable = Callable[[Union[Iterable[torch.nn.Parameter], dict]], torch.optim.Optimizer]
DeepSpeedSchedulerCallable = Callable[[torch.optim.Optimizer], object]
