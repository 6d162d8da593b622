"""GPU fused loss / element-wise kernels against PyTorch; see zerofuse/benchmarks/fused_ops.py."""
from zerofuse.benchmarks.fused_ops import main

if __name__ == "__main__":
    main()
