"""The `zerofuse` command (also `python -m zerofuse`).

    zerofuse launch    run an unmodified DeepSpeed script (the deepspeed launcher's options)
    zerofuse train     train a byte-level GPT on the Python standard library (or --data)
    zerofuse sample    generate text from a training run
    zerofuse bench     kernel benchmarks against PyTorch (--train: the training loop end to end)
    zerofuse env       what this build contains and what the machine offers
    zerofuse to-fp32   a checkpoint as one fp32 state_dict file
"""
import argparse
import json
import os
import sys


def _env(args) -> int:
    from .._build import build_info, format_build_info

    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_build_info(info))
    return 0


def _cmake_prefix(args) -> int:
    from .._build import cmake_prefix_path

    print(cmake_prefix_path())
    return 0


def _train(args) -> int:
    from .train import run

    return run(args)


def _sample(args) -> int:
    from .sample import run

    return run(args)


def _bench(args) -> int:
    import torch

    if args.train:  # zerofuse train's model end to end against plain torch (CPU)
        from ..benchmarks import train_cpu
        quick = ["--steps", "4", "--warmup", "1", "--rounds", "1"] if args.quick else []
        return train_cpu.main((["--out", args.out] if args.out else []) + quick) or 0
    argv = (["--out", args.out] if args.out else []) + (["--quick"] if args.quick else [])
    if torch.cuda.is_available():
        from ..benchmarks import kernels
        return kernels.main(argv) or 0
    from ..benchmarks import cpu_kernels
    return cpu_kernels.main(argv) or 0


def _to_fp32(args) -> int:
    import torch

    from ..checkpoint import to_fp32_state_dict

    state = to_fp32_state_dict(args.checkpoint, args.tag)
    tmp = args.output + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {len(state)} tensors, "
          f"{sum(t.numel() for t in state.values() if hasattr(t, 'numel')):,} values")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerofuse", description="zerofuse: ZeRO-1/2/3 training on a compiled core")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a byte-level GPT (default data: the Python standard library)")
    from .train import add_arguments as train_arguments
    train_arguments(train)
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="generate text from a `zerofuse train` run")
    from .sample import add_arguments as sample_arguments
    sample_arguments(sample)
    sample.set_defaults(func=_sample)

    bench = sub.add_parser("bench", help="kernel benchmarks against PyTorch (GPU when there is one)")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    bench.add_argument("--out", help="results directory")
    bench.add_argument("--train", action="store_true",
                       help="instead: zerofuse train's model end to end against plain torch on the CPU "
                            "(bench/train_cpu.py for its options)")
    bench.set_defaults(func=_bench)

    env = sub.add_parser("env", help="what this build contains and what it sees (CUDA, torch, CPU)")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(func=_env)

    fp32 = sub.add_parser("to-fp32", help="consolidate a checkpoint into one fp32 state_dict file")
    fp32.add_argument("checkpoint", help="the checkpoint directory (holding `latest` and the tag directories)")
    fp32.add_argument("output", help="the .pt file to write (torch.load(..., weights_only=True) reads it)")
    fp32.add_argument("--tag", help="which checkpoint (default: the one `latest` names)")
    fp32.set_defaults(func=_to_fp32)

    sub.add_parser("launch", help="run an unmodified DeepSpeed script on zerofuse (the deepspeed launcher's "
                                  "options; see zerofuse launch --help)", add_help=False)

    prefix = sub.add_parser("cmake-prefix", help="print the CMAKE_PREFIX_PATH entry for find_package(zerofuse)")
    prefix.set_defaults(func=_cmake_prefix)
    return parser


def _user_errors():
    """Errors that come from the user's input: one line, no traceback."""
    from ..runtime.checkpoint import CheckpointError
    from ..runtime.config import ConfigError
    from .data import DataError
    from .sample import SampleError
    from .train import TrainError

    return (ConfigError, CheckpointError, DataError, TrainError, SampleError, OSError)


def _launch_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # its own parser: everything after the script belongs to the script
        from .launch import LaunchError, run
        try:
            return run(argv[1:])
        except LaunchError as e:
            print(f"zerofuse launch: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:
        # Every process of a torchrun job meets the same error; one line says it.
        if _launch_rank() == 0:
            message = f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)
            print(f"zerofuse {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zerofuse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
