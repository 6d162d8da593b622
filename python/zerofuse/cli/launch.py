"""`zerofuse launch [options] script.py [args...]`: the `deepspeed` launcher's
command line, starting the processes with torchrun (torch.distributed.run),
each running the script unmodified on zerofuse (`import deepspeed` resolves
to zerofuse's compatibility package; python -m zerofuse.deepspeed).

Resources, as DeepSpeed's launcher reads them: a hostfile ("worker-0
slots=4" lines; default /job/hostfile, else this machine alone), filtered by
--include / --exclude ("worker-0@worker-1:0,2") and trimmed by --num_nodes and
--num_gpus. This machine alone: torchrun here, one process per slot (slots =
GPUs; on a machine without one, --num_gpus processes, default 1). Several
hosts: the same torchrun command on each, through pdsh (%n is the node rank),
ssh or slurm's srun; or with --no_ssh, this node's share only (--node_rank).
Like DeepSpeed's launcher it passes --local_rank=N to the script unless
--no_local_rank. The exit status is the first failed process's (2 for a
configuration error, said once by rank 0).
"""
import argparse
import collections
import os
import re
import shlex
import subprocess
import sys

DEFAULT_HOSTFILE = "/job/hostfile"
LAUNCHERS = ("pdsh", "ssh", "slurm")


class LaunchError(ValueError):
    """A bad launcher option or hostfile, said in one line."""


def build_parser():
    p = argparse.ArgumentParser(prog="zerofuse launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-H", "--hostfile", default=DEFAULT_HOSTFILE, help="MPI-style hostfile: 'worker-0 slots=4' lines")
    p.add_argument("-i", "--include", default="", help="resources to use: NODE[:SLOT[,SLOT...]][@NODE...]")
    p.add_argument("-e", "--exclude", default="", help="resources not to use (same format)")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts")
    p.add_argument("--num_gpus", "--num_accelerators", type=int, default=-1,
                   help="processes per node (GPU ids 0..N-1; on the CPU: N processes)")
    p.add_argument("--master_port", type=int, default=29500)
    p.add_argument("--master_addr", default="", help="node 0's address (default: the first host, or 127.0.0.1)")
    p.add_argument("--node_rank", type=int, default=-1, help="this node's rank, with --no_ssh")
    p.add_argument("--launcher", default="pdsh", help=f"multi-node backend: {', '.join(LAUNCHERS)}")
    p.add_argument("--launcher_args", default="", help="extra arguments for the multi-node backend")
    p.add_argument("--module", action="store_true", help="the script is a module name (python -m)")
    p.add_argument("--no_python", action="store_true",
                   help="run the script as an executable (not on the DeepSpeed alias)")
    p.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank to the script")
    p.add_argument("--no_ssh", action="store_true", help="start only this node's processes (with --node_rank)")
    p.add_argument("--no_ssh_check", action="store_true", help="accepted (no ssh check is made)")
    p.add_argument("--force_multi", action="store_true", help="use the multi-node backend even for one host")
    p.add_argument("--save_pid", action="store_true", help="write this launcher's pid to /tmp/<pid>.ds")
    p.add_argument("--enable_each_rank_log", default="None", help="a directory for each rank's stdout and stderr")
    p.add_argument("--bind_cores_to_rank", action="store_true", help="accepted; cores are not bound")
    p.add_argument("--bind_core_list", default=None, help="accepted; cores are not bound")
    p.add_argument("--ssh_port", type=int, default=None)
    p.add_argument("--venv_script", default=None, help="a script to source on each node before starting")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--autotuning", default="", help="not supported")
    p.add_argument("user_script", help="the training script (or module, with --module)")
    p.add_argument("user_args", nargs=argparse.REMAINDER)
    return p


# --- resources ---------------------------------------------------------------------------------------


def parse_hostfile(lines):
    pool = collections.OrderedDict()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+)\s+slots=(\d+)", line)
        if not match:
            raise LaunchError(f"hostfile: bad entry {line!r} (expected 'hostname slots=N')")
        host, slots = match.group(1), int(match.group(2))
        if host in pool:
            raise LaunchError(f"hostfile: {host} appears twice")
        pool[host] = slots
    if not pool:
        raise LaunchError("hostfile: no hosts in it")
    return pool


def _parse_specs(text):
    specs = collections.OrderedDict()
    for node in text.split("@"):
        name, _, slots = node.partition(":")
        if not name:
            raise LaunchError(f"bad resource filter {text!r}")
        try:
            specs[name] = [int(s) for s in slots.split(",")] if slots else None
        except ValueError:
            raise LaunchError(f"bad resource filter {text!r}: slots must be integers") from None
    return specs


def filter_resources(pool, include="", exclude=""):
    """host -> [slot ids], after --include / --exclude (DeepSpeed's format)."""
    if include and exclude:
        raise LaunchError("--include and --exclude are mutually exclusive")
    active = collections.OrderedDict((h, list(range(n))) for h, n in pool.items())
    if include:
        chosen = collections.OrderedDict()
        for host, slots in _parse_specs(include).items():
            if host not in active:
                raise LaunchError(f"--include: unknown host {host!r}")
            for s in slots or []:
                if s not in active[host]:
                    raise LaunchError(f"--include: host {host!r} has no slot {s}")
            chosen[host] = sorted(slots) if slots else active[host]
        return chosen
    if exclude:
        for host, slots in _parse_specs(exclude).items():
            if host not in active:
                raise LaunchError(f"--exclude: unknown host {host!r}")
            if slots is None:
                del active[host]
            else:
                active[host] = [s for s in active[host] if s not in slots]
        active = collections.OrderedDict((h, s) for h, s in active.items() if s)
    return active


def resources(args):
    local = os.path.isfile(args.hostfile) is False
    if local:
        import torch
        slots = torch.cuda.device_count() if torch.cuda.is_available() else max(1, args.num_gpus)
        pool = collections.OrderedDict([("localhost", slots)])
    else:
        with open(args.hostfile) as f:
            pool = parse_hostfile(f.readlines())
    active = filter_resources(pool, args.include, args.exclude)
    if args.num_nodes > 0:
        active = collections.OrderedDict(list(active.items())[:args.num_nodes])
    if args.num_gpus > 0:
        active = collections.OrderedDict((h, list(range(args.num_gpus))) for h in active)
    if not active:
        raise LaunchError("no resources left to run on after --include/--exclude/--num_nodes/--num_gpus")
    return active


# --- commands ----------------------------------------------------------------------------------------


def worker_command(args):
    """What each process runs (after torchrun's own arguments)."""
    if args.no_python:
        return ["--no-python", args.user_script, *args.user_args]
    target = ["-m", args.user_script] if args.module else [args.user_script]
    return ["-m", "zerofuse.deepspeed", *target, *args.user_args]


def torchrun_args(args, nproc, nnodes, node_rank, master_addr):
    out = [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
           f"--master-addr={master_addr}", f"--master-port={args.master_port}"]
    if args.enable_each_rank_log not in ("None", "", None):
        out += [f"--log-dir={args.enable_each_rank_log}", "--redirects=3"]
    return out + worker_command(args)


def _environment(args, slots):
    env = {}
    if not args.no_local_rank and not args.no_python:
        env["ZEROFUSE_PASS_LOCAL_RANK"] = "1"
    import torch
    if torch.cuda.is_available() and slots:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))
    return env


def remote_commands(args, active):
    """The shell command to start on each host (multi-node)."""
    hosts = list(active)
    master = args.master_addr or hosts[0]
    commands = []
    for rank, host in enumerate(hosts):
        env = dict(_environment(args, active[host]), PYTHONUNBUFFERED="1")
        exports = " ".join(f"export {k}={shlex.quote(v)};" for k, v in env.items())
        venv = f"source {shlex.quote(args.venv_script)};" if args.venv_script else ""
        # pdsh replaces %n with the host's index, srun sets SLURM_NODEID; ssh gets the number.
        node_rank = "%n" if args.launcher == "pdsh" else ("$SLURM_NODEID" if args.launcher == "slurm" else str(rank))
        words = [sys.executable, "-m", "torch.distributed.run",
                 *torchrun_args(args, len(active[host]), len(hosts), node_rank, master)]
        run = " ".join(w if w == f"--node-rank={node_rank}" else shlex.quote(w) for w in words)
        commands.append((host, f"cd {shlex.quote(os.getcwd())}; {venv} {exports} {run}"))
    return commands


def _launcher_invocation(args, commands):
    hosts = [h for h, _ in commands]
    extra = shlex.split(args.launcher_args)
    if args.launcher == "pdsh":
        return [["pdsh", "-S", "-f", "1024", "-w", ",".join(hosts), *extra, commands[0][1]]]
    if args.launcher == "slurm":
        return [["srun", "-N", str(len(hosts)), "--ntasks-per-node=1", "-w", ",".join(hosts), *extra,
                 "bash", "-c", commands[0][1]]]
    port = ["-p", str(args.ssh_port)] if args.ssh_port else []
    return [["ssh", *port, *extra, host, command] for host, command in commands]


# --- running -----------------------------------------------------------------------------------------


def _run_torchrun_here(argv) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        print(f"zerofuse launch: rank {rank} failed (exit status {failure.exitcode}); "
              f"the launch ends with status {code}", file=sys.stderr, flush=True)
        return code
    return 0


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.autotuning:
        raise LaunchError("--autotuning: DeepSpeed's autotuner is not supported by zerofuse")
    if args.launcher.lower() not in LAUNCHERS:
        raise LaunchError(f"--launcher {args.launcher!r}: zerofuse starts nodes with {', '.join(LAUNCHERS)} "
                          "(or run it on each node with --no_ssh --node_rank)")
    args.launcher = args.launcher.lower()
    if args.save_pid:
        with open(f"/tmp/{os.getpid()}.ds", "w") as f:
            f.write(str(os.getpid()))
    active = resources(args)
    hosts = list(active)
    os.environ.update(_environment(args, active[hosts[0]]))
    if args.no_ssh:
        if args.node_rank < 0 or args.num_nodes < 1:
            raise LaunchError("--no_ssh needs --node_rank and --num_nodes (this node's share is started here)")
        if not args.master_addr:
            raise LaunchError("--no_ssh needs --master_addr (node 0's address)")
        return _run_torchrun_here(torchrun_args(args, len(active[hosts[0]]), args.num_nodes, args.node_rank,
                                                args.master_addr))
    if len(hosts) == 1 and not args.force_multi:
        return _run_torchrun_here(torchrun_args(args, len(active[hosts[0]]), 1, 0, args.master_addr or "127.0.0.1"))
    started = [subprocess.Popen(cmd) for cmd in _launcher_invocation(args, remote_commands(args, active))]
    codes = [p.wait() for p in started]
    return next((c for c in codes if c), 0)
