"""python -m zerofuse.deepspeed SCRIPT [ARGS...]: run an unmodified DeepSpeed
training script on zerofuse (`import deepspeed` resolves to zerofuse's
compatibility package). `zerofuse launch` starts one of these per process.

A configuration error (or another of zerofuse's user-input errors) is said
once, by rank 0, as one line, and every rank exits with status 2.
"""
import os
import runpy
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    as_module = argv[0] == "-m"
    if as_module:
        argv = argv[1:]
        if not argv:
            print("python -m zerofuse.deepspeed -m: give the module to run", file=sys.stderr)
            return 2
    target, args = argv[0], argv[1:]
    if os.environ.pop("ZEROFUSE_PASS_LOCAL_RANK", "") == "1":
        # What DeepSpeed's launcher does: scripts parse --local_rank.
        args = args + [f"--local_rank={os.environ.get('LOCAL_RANK', '0')}"]

    from . import _alias
    _alias.install()
    from ..runtime.checkpoint_files import CheckpointError
    from ..runtime.config import ConfigError

    sys.argv = [target, *args]
    try:
        if as_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            if not os.path.isfile(target):
                print(f"zerofuse: {target}: no such script", file=sys.stderr)
                return 2
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except (ConfigError, CheckpointError) as e:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"zerofuse: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
