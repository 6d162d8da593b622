"""zerofuse train's model end to end against plain torch on the CPU; see zerofuse/benchmarks/train_cpu.py."""
from zerofuse.benchmarks.train_cpu import main

if __name__ == "__main__":
    main()
