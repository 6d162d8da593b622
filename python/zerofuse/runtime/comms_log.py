"""What the engine's collectives move: DeepSpeed's comms_logger.

Every collective the engine issues (the gradient reductions, the parameter
gathers of ZeRO-1/2's step and of ZeRO-3) is recorded by kind with the bytes
of the whole tensor it fills or reduces -- DeepSpeed's message size. Counts
are kept in total and per optimizer step; the engine closes a step at each
boundary. Off unless the config's comms_logger section enables it.
"""
from collections import defaultdict
from typing import Dict, List


class CommsLog:
    def __init__(self):
        self.enabled = False
        self.verbose = False
        self.prof_ops = None  # None: every kind
        self.reset()

    def reset(self):
        self.totals: Dict[str, List[int]] = defaultdict(lambda: [0, 0])  # kind -> [count, bytes]
        self.window: Dict[str, int] = defaultdict(int)                   # bytes since the last step closed
        self.steps: List[Dict[str, int]] = []                            # bytes per kind of each closed step

    def configure(self, enabled=None, verbose=None, prof_all=None, prof_ops=None):
        if enabled is not None:
            self.enabled = bool(enabled)
        if verbose is not None:
            self.verbose = bool(verbose)
        if prof_all:
            self.prof_ops = None
        elif prof_ops is not None:
            self.prof_ops = set(prof_ops)

    def record(self, kind: str, nbytes: int):
        if not self.enabled or (self.prof_ops is not None and kind not in self.prof_ops):
            return
        entry = self.totals[kind]
        entry[0] += 1
        entry[1] += int(nbytes)
        self.window[kind] += int(nbytes)
        if self.verbose:
            print(f"[zerofuse] comm op: {kind} | msg size: {int(nbytes)} bytes", flush=True)

    def end_step(self):
        if self.enabled:
            self.steps.append(dict(self.window))
            self.window.clear()

    def summary(self) -> Dict[str, Dict[str, int]]:
        return {kind: {"count": count, "bytes": nbytes} for kind, (count, nbytes) in sorted(self.totals.items())}


COMMS_LOG = CommsLog()  # one per process, as DeepSpeed's deepspeed.comm.comms_logger
