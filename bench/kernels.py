"""GPU kernels against PyTorch in the same run; see zerofuse/benchmarks/kernels.py."""
from zerofuse.benchmarks.kernels import main

if __name__ == "__main__":
    main()
