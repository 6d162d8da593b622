"""Tensor parallelism (AutoTP) against data parallelism and one process; see zerofuse/benchmarks/tp.py."""
import os
import sys

# This directory holds kernels.py, which would shadow the `kernels` package transformers imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from zerofuse.benchmarks.tp import main  # noqa: E402

if __name__ == "__main__":
    main()
