"""The order units are fetched in, learnt from one iteration and used by the
next: what to prefetch, and how far away a unit's next use is.

An iteration is one forward and its backward (or one forward without
gradients: evaluation and generation have a trace of their own). The first
iteration records; later ones follow. When one departs from the record
(different control flow), it stops predicting for the rest of that iteration
and the next iteration records afresh. Distances are in elements fetched in
between, as DeepSpeed's stage3_max_reuse_distance.
"""
from typing import Dict, List, Optional

FAR = float("inf")


class _Trace:
    def __init__(self, units: List[int], numels: List[int]):
        self.units = units
        n = len(units)
        self.elements_before = [0] * (n + 1)  # elements fetched at positions < i
        for i, u in enumerate(units):
            self.elements_before[i + 1] = self.elements_before[i] + numels[u]
        self.next_use: List[Optional[int]] = [None] * n  # next position of the same unit
        last: Dict[int, int] = {}
        for i in range(n - 1, -1, -1):
            self.next_use[i] = last.get(units[i])
            last[units[i]] = i


class FetchTrace:
    def __init__(self, unit_numels: List[int]):
        self.numels = unit_numels
        self.traces: Dict[str, _Trace] = {}
        self.mode: Optional[str] = None
        self.recording: Optional[List[int]] = None
        self.position = 0       # in the followed trace: the next fetch expected
        self.following = False
        self.last_seen: Dict[int, int] = {}  # unit -> its latest position in the followed trace

    def begin(self, mode: str):
        """An iteration starts ('train' or 'eval')."""
        self.mode = mode
        self.position = 0
        self.last_seen = {}
        self.following = mode in self.traces
        self.recording = None if self.following else []

    def end(self):
        if self.recording is not None and self.mode is not None:
            self.traces[self.mode] = _Trace(self.recording, self.numels)
        elif not self.following and self.mode in self.traces:
            del self.traces[self.mode]  # departed from it: record again next time
        self.mode, self.recording, self.following = None, None, False

    def fetched(self, unit: int):
        """Unit `unit` is fetched now."""
        if self.mode is None:
            return
        if self.recording is not None:
            self.recording.append(unit)
            return
        if self.following:
            trace = self.traces[self.mode]
            if self.position < len(trace.units) and trace.units[self.position] == unit:
                self.last_seen[unit] = self.position
                self.position += 1
            else:
                self.following = False

    # --- predictions (only while following) -------------------------------------------------------------

    def upcoming(self):
        """Units expected next, in order (empty when not following)."""
        if not self.following:
            return []
        trace = self.traces[self.mode]
        return trace.units[self.position:]

    def reuse_distance(self, unit: int) -> float:
        """Elements fetched before `unit` is fetched again (inf: not again, or unknown)."""
        if not self.following:
            return FAR
        trace = self.traces[self.mode]
        i = self.last_seen.get(unit)
        if i is None or trace.next_use[i] is None:
            return FAR
        return trace.elements_before[trace.next_use[i]] - trace.elements_before[self.position]
