"""Gradients, from autograd to the rank that updates them.

A post-accumulate-grad hook on every trainable parameter moves its gradient
into the flat gradient buffers and frees it:
  ZeRO-0/1: into the full flat gradient buffer (accumulated over micro-steps);
            at the accumulation boundary each bucket is all-reduced (ZeRO-0) or
            reduce-scattered in place (ZeRO-1: each rank receives its chunk).
  ZeRO-2:   into a bucket-sized staging buffer; every micro-step each bucket is
            reduce-scattered into this rank's gradient shard (the staging
            buffer is then reused), so no rank ever holds all gradients.
Buckets are reduced as soon as they and all before them are complete, strictly
in bucket order (the same on every rank). Without overlap_comm each reduction
is waited for at once; with it, it runs while backward goes on, at most
MAX_IN_FLIGHT at a time (so ZeRO-2 holds only a couple of staging buckets).

With one rank (world size 1) every reduction is the identity: the hook adds
each gradient straight into its final place (the flat buffer, or ZeRO-2's
shard, zeroed when a window begins) and nothing is staged, counted or
launched -- the per-parameter Python work was 3% of a small model's CPU step.

Averaging: bf16/fp32 reduce with AVG; fp16 is divided by sqrt(world) before
and after a SUM so the sum cannot overflow. DeepSpeed's prescale_gradients
(divide by the world size before a SUM) and gradient_predivide_factor f
(divide by f before, by world / f after) are honoured when set: they move the
divide, not the result.
"""
import math
import weakref
from typing import List, Optional

import torch
import torch.distributed as dist

from . import collectives
from .comms_log import COMMS_LOG


MAX_IN_FLIGHT = 2


class _Pending:
    """An in-flight collective, the buffers it uses, and what to do once it is done."""

    __slots__ = ("work", "buffers", "finish")

    def __init__(self, work, buffers, finish):
        self.work, self.buffers, self.finish = work, buffers, finish


class GradReducer:
    def __init__(self, layout, stage: int, placement, grad_dtype: torch.dtype, comm_dtype: torch.dtype,
                 overlap_comm: bool, use_reduce_scatter: bool, flat_grads: Optional[torch.Tensor],
                 shard_grads: Optional[torch.Tensor], divide_before: Optional[float] = None):
        """divide_before: None for the default averaging above, else the factor
        gradients are divided by before a SUM (the rest of the world size after)."""
        self.layout = layout
        self.stage = stage
        self.placement = placement  # its group is looked up at each use (see Placement.group)
        self.world = placement.world_size
        self.device = placement.device
        self.grad_dtype = grad_dtype
        self.comm_dtype = comm_dtype
        self.overlap = overlap_comm
        self.use_reduce_scatter = use_reduce_scatter
        self.flat_grads = flat_grads    # ZeRO-0/1
        self.shard_grads = shard_grads  # ZeRO-2
        if divide_before is None:
            divide_before = math.sqrt(self.world) if comm_dtype == torch.float16 else None
        # (before, after) a SUM; None: reduce with AVG.
        self.divides = None if divide_before is None else (divide_before, self.world / divide_before)

        nb = len(layout.buckets)
        self.bucket_slots: List[List[int]] = [[] for _ in range(nb)]
        for i, slot in enumerate(layout.slots):
            for b in range(slot.first_bucket, slot.last_bucket + 1):
                self.bucket_slots[b].append(i)
        self.remaining = [0] * nb
        self.staging = [None] * nb   # ZeRO-2: the buffer (a pool tensor) each open bucket fills
        self.free_staging: List[torch.Tensor] = []
        self.peak_staging = 0        # most staging buffers alive at once (memory report)
        self.next_bucket = 0         # buckets launch in order: the first not yet launched
        self.pending: List[_Pending] = []
        self.active = False
        self.communicate = False
        self.first_in_window = True
        self.after_grad = None  # ZeRO-3: told each slot whose gradient is in (its unit may go)
        self.local_shard = self._local_shard_ranges() if self.world == 1 and stage == 2 else None
        self.local = self.world == 1 and (stage < 2 or self.local_shard is not None)
        self.hooks = [slot.param.register_post_accumulate_grad_hook(self._hook(i))
                      for i, slot in enumerate(layout.slots)]

    def _local_shard_ranges(self):
        """At world size 1 each bucket's chunk is the whole bucket: a slot's
        place in the shard is its flat range moved by a constant. Returns
        (shard_lo, shard_hi) per slot, or None if some slot does not map to one
        contiguous range (then gradients are staged as with more ranks)."""
        ranges = []
        for slot in self.layout.slots:
            pieces = []
            for b in range(slot.first_bucket, slot.last_bucket + 1):
                begin, end, _, shard_offset = self.layout.buckets[b]
                lo, hi = max(begin, slot.offset), min(end, slot.offset + slot.numel)
                c_lo, c_hi = self.layout.chunk_range(b)
                if c_hi - c_lo < end - begin:
                    return None
                pieces.append((shard_offset + lo - begin, shard_offset + hi - begin))
            if any(a[1] != b[0] for a, b in zip(pieces, pieces[1:])):
                return None
            ranges.append((pieces[0][0], pieces[-1][1]))
        return ranges

    # --- the micro-step's life cycle -----------------------------------------------------------

    def begin_backward(self, boundary: bool, first_in_window: bool):
        """Before a backward: is this the last micro-step of the window (the
        one whose gradients are reduced in ZeRO-0/1), the first (ZeRO-2 writes
        its shard rather than adding to it)?"""
        self.wait()  # ZeRO-2: the previous micro-step's reductions own the staging buffers
        self.active = True
        self.communicate = boundary or self.stage == 2
        self.first_in_window = first_in_window
        self.remaining = [len(s) for s in self.bucket_slots]
        self.next_bucket = 0
        if self.local and self.stage == 2 and first_in_window:
            self.shard_grads.zero_()  # the window's gradients are added into it

    def end_backward(self):
        """After backward: buckets whose parameters got no gradient (unused in
        this forward) are complete as they are; reduce whatever is left."""
        self.active = False
        if self.local:
            return
        if self.communicate:
            for b in range(len(self.remaining)):
                self.remaining[b] = 0
            self._launch_ready()

    def wait(self):
        """Finish every in-flight reduction (on CUDA: make the current stream wait)."""
        while self.pending:
            self._finish_oldest()

    def remove_hooks(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    # --- gradients arrive ------------------------------------------------------------------------

    def _hook(self, slot_index):
        # A weak reference: parameters must not keep the reducer (and through it
        # the process group) alive after the engine is gone -- a process group
        # destroyed during interpreter shutdown aborts the process.
        me = weakref.ref(self)

        def hook(param):
            reducer = me()
            if reducer is not None:
                reducer._on_grad(slot_index, param)

        return hook

    def _on_grad(self, slot_index, param):
        if not self.active:
            raise RuntimeError("zerofuse: gradients reached a parameter outside engine.backward(); "
                               "call engine.backward(loss) instead of loss.backward()")
        slot = self.layout.slots[slot_index]
        grad = param.grad.reshape(-1)
        param.grad = None  # the flat buffers hold it now
        if self.local:
            # No no_grad() here (it costs as much as the copy): neither side of
            # the copy requires grad, so nothing is recorded either way.
            self._place_locally(slot_index, slot, grad)
        else:
            self._reduce_later(slot_index, slot, grad)

    @torch.no_grad()
    def _reduce_later(self, slot_index, slot, grad):
        if self.stage < 2:
            self.flat_grads[slot.offset:slot.offset + slot.numel].add_(grad)
        # Bucket by bucket, reducing each as soon as it completes: a parameter
        # spanning many buckets never has them all staged at once.
        for b in range(slot.first_bucket, slot.last_bucket + 1):
            if self.stage == 2:
                begin, end = self.layout.buckets[b][0], self.layout.buckets[b][1]
                lo, hi = max(begin, slot.offset), min(end, slot.offset + slot.numel)
                self._staging(b)[lo - begin:hi - begin].copy_(grad[lo - slot.offset:hi - slot.offset])
            self.remaining[b] -= 1
            if self.communicate:
                self._launch_ready()
        if self.after_grad is not None:
            self.after_grad(slot_index)

    def _place_locally(self, slot_index, slot, grad):
        if self.stage < 2:
            self.flat_grads[slot.offset:slot.offset + slot.numel].add_(grad)
        else:
            lo, hi = self.local_shard[slot_index]
            self.shard_grads[lo:hi].add_(grad)
        if self.after_grad is not None:
            self.after_grad(slot_index)

    def _staging(self, b):
        if self.staging[b] is None:
            size = self.layout.buckets[b][1] - self.layout.buckets[b][0]
            buf = self.free_staging.pop() if self.free_staging else None
            if buf is None or buf.numel() < size:
                buf = torch.empty(max(bk[1] - bk[0] for bk in self.layout.buckets), dtype=self.comm_dtype,
                                  device=self.device)
            buf[:size].zero_()  # padding and unused parameters reduce as zeros
            self.staging[b] = buf
            self.peak_staging = max(self.peak_staging, sum(s is not None for s in self.staging))
        return self.staging[b][:self.layout.buckets[b][1] - self.layout.buckets[b][0]]

    # --- reductions --------------------------------------------------------------------------------

    def _launch_ready(self):
        while self.next_bucket < len(self.remaining) and self.remaining[self.next_bucket] == 0:
            self._launch(self.next_bucket)
            self.next_bucket += 1
            # Synchronous without overlap_comm; with it, a bounded number in flight.
            limit = MAX_IN_FLIGHT if self.overlap else 0
            while len(self.pending) > limit:
                self._finish_oldest()

    def _finish_oldest(self):
        p = self.pending.pop(0)
        if p.work is not None:
            p.work.wait()
        if p.finish is not None:
            p.finish()

    def _launch(self, b):
        begin, end, _, shard_offset = self.layout.buckets[b]
        lo, hi = self.layout.chunk_range(b)
        lo, hi = lo - begin, hi - begin  # this rank's chunk, relative to the bucket
        if self.stage < 2:
            bucket = self.flat_grads[begin:end]
            if self.stage == 0:  # every rank needs every gradient
                lo, hi = 0, end - begin
            self._reduce(bucket, lo, hi, dest=bucket[lo:hi], accumulate=False)
        else:
            chunk = hi - lo
            self._reduce(self._staging(b), lo, hi, dest=self.shard_grads[shard_offset:shard_offset + chunk],
                         accumulate=not self.first_in_window, release=b)

    def _reduce(self, buf, lo, hi, dest, accumulate, release=None):
        """Reduce `buf` over ranks so that buf[lo:hi] (in the communication
        dtype) holds this rank's reduced part -- in place: a reduce-scatter
        writes its output into the rank's own chunk of the input, or an
        all-reduce when reduce_scatter is off or every rank needs the whole
        bucket -- then write or add that part into `dest`."""
        src = buf if buf.dtype == self.comm_dtype else buf.to(self.comm_dtype)
        part = src[lo:hi]
        divides = self.divides if self.world > 1 else None
        work = None
        if self.world > 1:
            if divides is not None and divides[0] != 1.0:
                src.div_(divides[0])
            op = dist.ReduceOp.AVG if divides is None else dist.ReduceOp.SUM
            whole = hi - lo == src.numel()
            nbytes = src.numel() * src.element_size()
            if whole or not self.use_reduce_scatter:
                COMMS_LOG.record("all_reduce", nbytes)
                work = dist.all_reduce(src, op=op, group=self.placement.group, async_op=True)
            else:
                COMMS_LOG.record("reduce_scatter", nbytes)
                work = collectives.reduce_scatter(part, src, op=op, group=self.placement.group, async_op=True)

        def finish():
            if divides is not None and divides[1] != 1.0:
                part.div_(divides[1])
            if accumulate:
                dest.add_(part)
            elif part.data_ptr() != dest.data_ptr() or part.dtype != dest.dtype:
                dest.copy_(part)
            if release is not None:
                self.free_staging.append(self.staging[release])
                self.staging[release] = None

        # The buffers stay referenced until the reduction is finished.
        self.pending.append(_Pending(work, (buf, src, dest), finish))
