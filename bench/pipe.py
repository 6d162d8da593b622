"""Pipeline parallelism against data parallelism and one process; see zerofuse/benchmarks/pipe.py."""
from zerofuse.benchmarks.pipe import main

if __name__ == "__main__":
    main()
