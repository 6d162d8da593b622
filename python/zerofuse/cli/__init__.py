"""The `zerofuse` command (also `python -m zerofuse`)."""
import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerofuse", description="zerofuse: ZeRO-1/2 training on a compiled core")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="what this build contains and what it sees (CUDA, torch, CPU)")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(func=_env)
    prefix = sub.add_parser("cmake-prefix", help="print the CMAKE_PREFIX_PATH entry for find_package(zerofuse)")
    prefix.set_defaults(func=_cmake_prefix)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
