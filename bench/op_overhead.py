"""Per-call overhead of zerofuse's torch ops; see zerofuse/benchmarks/op_overhead.py."""
from zerofuse.benchmarks.op_overhead import main

if __name__ == "__main__":
    main()
