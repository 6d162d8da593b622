"""GPT-2 124M step: the engine against plain PyTorch; see zerofuse/benchmarks/train_gpt2.py."""
from zerofuse.benchmarks.train_gpt2 import main

if __name__ == "__main__":
    main()
