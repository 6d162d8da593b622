"""GPU attention against SDPA flash; see zerofuse/benchmarks/attention.py."""
from zerofuse.benchmarks.attention import main

if __name__ == "__main__":
    main()
