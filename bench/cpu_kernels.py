"""CPU kernels against torch's in the same run; see zerofuse/benchmarks/cpu_kernels.py."""
from zerofuse.benchmarks.cpu_kernels import main

if __name__ == "__main__":
    main()
