"""Imported by the torch-facing parts (ops, optim, runtime): from then on the
CPU kernels run their parallel work on torch's OpenMP team rather than on
zerofuse's own threads. torch's threads spin for a while after each of its ops;
zerofuse workers woken then share the cores with them, which made zerofuse's
ops 2-4x slower inside a training step than alone. ZEROFUSE_THREADING=pool
keeps zerofuse's own pool."""
import torch  # noqa: F401  (loads the OpenMP runtime, with global symbols, that is adopted)

from . import _C

USING_TORCH_OPENMP = _C.use_loaded_openmp()
