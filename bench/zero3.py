"""ZeRO-3 against ZeRO-2 and FSDP2; see zerofuse/benchmarks/zero3.py."""
from zerofuse.benchmarks.zero3 import main

if __name__ == "__main__":
    main()
