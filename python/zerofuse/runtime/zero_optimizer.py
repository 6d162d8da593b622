"""Adam/AdamW over flat, partitioned buffers: ZeRO stages 0, 1 and 2.

Per rank (Psi parameters, N ranks, ZeRO-1/2; ZeRO-0 keeps everything whole):
  flat_params   model dtype, Psi        what forward and backward see (params are views)
  master        fp32, Psi/N             only with fp16/bf16; in fp32 the params are the master
  exp_avg(_sq)  fp32, 2 Psi/N
  gradients     ZeRO-0/1: model dtype, Psi (flat_grads); ZeRO-2: Psi/N (shard_grads) + buckets
A step: local gradient statistics over this rank's shard, one all-reduce of
them (ZeRO-1/2), the step decision on the device (skip on inf/NaN, unscale,
clip, loss scale), one fused Adam pass per param group that also writes the
new model-dtype params, and an all-gather of the updated params per bucket.
"""
import math
from typing import Dict, List

import torch
import torch.distributed as dist

from .. import _C
from . import collectives
from ..ops._library import stream_of
from .grad_reducer import GradReducer
from .layout import FlatLayout

# Entries of the step-control state (cpp/include/zerofuse/step_control.h).
STATE_LOSS_SCALE, STATE_CUR_ITER, STATE_LAST_OVERFLOW, STATE_HYSTERESIS = 0, 1, 2, 3
STATE_APPLIED, STATE_SKIPPED, STATE_AT_MINIMUM = 4, 5, 6
OUT_MULTIPLIER, OUT_SKIP, OUT_GRAD_NORM = 0, 1, 2

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction")


class ZeroOptimizer(torch.optim.Optimizer):
    """The engine's optimizer. A torch.optim.Optimizer as far as param_groups
    go (so learning-rate schedulers work on it); the state lives in flat shards."""

    def __init__(self, param_groups: List[dict], named_params, placement, *, stage: int, model_dtype: torch.dtype,
                 comm_dtype: torch.dtype, bucket_elements: int, overlap_comm: bool, reduce_scatter: bool,
                 step_control: dict):
        super().__init__(param_groups, {})
        self.placement = placement
        self.stage = stage
        self.model_dtype = model_dtype
        self.mixed = model_dtype != torch.float32
        self.step_control_config = step_control
        device = placement.device
        partition_world = 1 if stage == 0 else placement.world_size
        self.partition_world = partition_world

        group_of = {id(p): g for g, group in enumerate(self.param_groups) for p in group["params"]}
        for name, p in named_params:
            if id(p) not in group_of:
                raise ValueError(f"zerofuse: parameter {name!r} requires grad but is in no optimizer param group")
        # ZeRO-0: one partition that every rank holds whole.
        self.layout = FlatLayout(named_params, group_of, partition_world, placement.rank if partition_world > 1 else 0,
                                 torch.empty(0, dtype=model_dtype).element_size(), bucket_elements)
        L = self.layout

        # The parameters' values, fp32, laid out flat; then the model-dtype buffer
        # the parameters become views of, and (mixed precision) this rank's fp32 master.
        with torch.no_grad():
            flat32 = torch.zeros(L.total, dtype=torch.float32, device=device)
            for slot in L.slots:
                flat32[slot.offset:slot.offset + slot.numel].copy_(slot.param.detach().reshape(-1))
            self.flat_params = flat32.to(model_dtype) if self.mixed else flat32
            self.master = None
            if self.mixed:
                self.master = torch.empty(L.shard_size, dtype=torch.float32, device=device)
                for b, (_, _, chunk, shard_offset) in enumerate(L.buckets):
                    lo, hi = L.chunk_range(b)
                    self.master[shard_offset:shard_offset + chunk].copy_(flat32[lo:hi])
            del flat32
            for slot in L.slots:
                slot.param.data = self.flat_params[slot.offset:slot.offset + slot.numel].view(slot.shape)
                slot.param.grad = None
            self.exp_avg = torch.zeros(L.shard_size, dtype=torch.float32, device=device)
            self.exp_avg_sq = torch.zeros(L.shard_size, dtype=torch.float32, device=device)
            self.flat_grads = torch.zeros(L.total, dtype=model_dtype, device=device) if stage < 2 else None
            self.shard_grads = torch.zeros(L.shard_size, dtype=model_dtype, device=device) if stage == 2 else None

        self.reducer = GradReducer(L, stage, placement, model_dtype, comm_dtype, overlap_comm, reduce_scatter,
                                   self.flat_grads, self.shard_grads)

        # Step decision state, on the device.
        self.stats = torch.zeros(2, dtype=torch.float32, device=device)
        self.step_state = torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64, device=device)
        self.step_out = torch.zeros(_C.STEP_OUTPUT_SIZE, dtype=torch.float32, device=device)
        sc = dict(step_control)
        static_scale = sc.pop("static_scale")
        _C.step_control_init(self.step_state, static_scale=static_scale, stream=stream_of(self.step_state), **sc)

        # Host mirror of the step state, refreshed by sync_host() (a copy even on
        # the CPU: the step reads the state as it was before step_control).
        self.host_state = self.step_state.detach().to("cpu", copy=True)
        self.host_out = self.step_out.detach().to("cpu", copy=True)
        self._copy_event = None
        self._build_run_views()

    # --- views the kernels take ---------------------------------------------------------------

    def _build_run_views(self):
        """Per param group, the lists of contiguous views one Adam call takes."""
        L = self.layout
        grads_flat = self.flat_grads if self.stage < 2 else None
        self.group_views: List[Dict[str, list]] = []
        for runs in L.groups_of_runs(len(self.param_groups)):
            v = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "copies": []}
            for r in runs:
                flat = slice(r.flat_begin, r.flat_end)
                shard = slice(r.shard_begin, r.shard_end)
                v["params"].append(self.master[shard] if self.mixed else self.flat_params[flat])
                v["grads"].append(grads_flat[flat] if grads_flat is not None else self.shard_grads[shard])
                v["exp_avgs"].append(self.exp_avg[shard])
                v["exp_avg_sqs"].append(self.exp_avg_sq[shard])
                if self.mixed:
                    v["copies"].append(self.flat_params[flat])
            self.group_views.append(v)
        self.all_grad_views = [g for v in self.group_views for g in v["grads"]]

    # --- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step at an accumulation boundary. Decides on the
        device whether to apply it; the host learns the outcome in sync_host()."""
        if closure is not None:
            raise RuntimeError("zerofuse's optimizer is stepped by the engine (engine.step()); closures are not supported")
        self.reducer.wait()
        stream = stream_of(self.stats)
        _C.grad_stats(self.all_grad_views, self.stats, stream)
        if self.partition_world > 1:
            dist.all_reduce(self.stats, op=dist.ReduceOp.SUM, group=self.placement.group)
        _C.step_control(self.stats, self.step_state, self.step_out, stream=stream, **self._control_kwargs())
        # Adam's step count, multiplier and skip flag are read on the device, where
        # step_control just wrote them: nothing here waits for the device.
        multiplier, skip = self.step_out[OUT_MULTIPLIER:OUT_MULTIPLIER + 1], self.step_out[OUT_SKIP:OUT_SKIP + 1]
        step_count = self.step_state[STATE_APPLIED:STATE_APPLIED + 1]
        for group, views in zip(self.param_groups, self.group_views):
            if not views["params"]:
                continue
            beta1, beta2 = group["betas"]
            _C.adam_step_multi(
                views["params"], views["grads"], views["exp_avgs"], views["exp_avg_sqs"],
                views["copies"] if self.mixed else None,
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), adam_w_mode=bool(group["adam_w_mode"]),
                bias_correction=bool(group["bias_correction"]), step=1, step_tensor=step_count,
                grad_multiplier=multiplier, skip_if_nonzero=skip, stream=stream)
        self._all_gather_params()
        if self.flat_grads is not None:
            self.flat_grads.zero_()  # the next accumulation window starts from zero
        self._start_host_copy()

    def _control_kwargs(self):
        c = dict(self.step_control_config)
        c.pop("static_scale")
        return c

    def _all_gather_params(self):
        """Every rank updated its chunk of each bucket; gather the rest (in place)."""
        if self.partition_world == 1:
            return
        works = []
        for b, (begin, end, _, _) in enumerate(self.layout.buckets):
            lo, hi = self.layout.chunk_range(b)
            works.append(collectives.all_gather(self.flat_params[begin:end], self.flat_params[lo:hi],
                                                     group=self.placement.group, async_op=True))
        for w in works:
            w.wait()

    # --- the host's view of the outcome --------------------------------------------------------

    def _start_host_copy(self):
        if self.step_state.is_cuda:
            # Copied in the background; read at the next step (or when asked), by which
            # time the device is normally long done: no stall on the hot path.
            if not hasattr(self, "_pinned"):
                self._pinned = (torch.empty_like(self.host_state).pin_memory(),
                                torch.empty_like(self.host_out).pin_memory())
            self._pinned[0].copy_(self.step_state, non_blocking=True)
            self._pinned[1].copy_(self.step_out, non_blocking=True)
            self._copy_event = torch.cuda.Event()
            self._copy_event.record()
        else:
            self.host_state.copy_(self.step_state)
            self.host_out.copy_(self.step_out)

    def sync_host(self):
        """Make host_state/host_out current (waits for the last step's copy)."""
        if self._copy_event is not None:
            self._copy_event.synchronize()
            self.host_state.copy_(self._pinned[0])
            self.host_out.copy_(self._pinned[1])
            self._copy_event = None

    # --- what the engine and checkpoints read --------------------------------------------------

    @property
    def applied_steps(self) -> int:
        self.sync_host()
        return int(self.host_state[STATE_APPLIED].item())

    @property
    def skipped_steps(self) -> int:
        self.sync_host()
        return int(self.host_state[STATE_SKIPPED].item())

    @property
    def loss_scale_tensor(self) -> torch.Tensor:
        """The current loss scale, on the device (no host round trip)."""
        return self.step_state[STATE_LOSS_SCALE:STATE_LOSS_SCALE + 1]

    def memory_report(self) -> Dict[str, int]:
        """Bytes this rank holds for each part of the training state."""
        el = self.flat_params.element_size()
        if self.stage < 2:
            grads = self.flat_grads.numel() * el
        else:
            bucket = max((e - b for b, e, _, _ in self.layout.buckets), default=0)
            comm_el = torch.empty(0, dtype=self.reducer.comm_dtype).element_size()
            grads = self.shard_grads.numel() * el + self.reducer.peak_staging * bucket * comm_el
        return {
            "params": self.flat_params.numel() * el,
            "grads": grads,
            "master_params": 0 if self.master is None else self.master.numel() * 4,
            "optimizer_state": (self.exp_avg.numel() + self.exp_avg_sq.numel()) * 4,
        }

    def zero_grad(self, set_to_none: bool = True):
        """Gradients live in the flat buffers the engine manages; parameters
        never hold a .grad between steps, so there is nothing to clear."""
        for slot in self.layout.slots:
            slot.param.grad = None

    # --- checkpoints: this rank's state as pieces of parameters ---------------------------------

    def shard_pieces(self):
        """(slices, master, exp_avg, exp_avg_sq): slices is an int64 [k, 3] table
        of (param index in layout order, first element, length); the tensors are
        the matching pieces concatenated, fp32, on the CPU."""
        slices, master, m, v = [], [], [], []
        for param_index, param_begin, shard_offset, length in self.layout.plan.shard_slices(self.layout.rank):
            slot = self.layout.slots[param_index]
            shard = slice(shard_offset, shard_offset + length)
            flat = slice(slot.offset + param_begin, slot.offset + param_begin + length)
            slices.append((param_index, param_begin, length))
            master.append(self.master[shard] if self.mixed else self.flat_params[flat])
            m.append(self.exp_avg[shard])
            v.append(self.exp_avg_sq[shard])

        def cat(xs):
            return torch.cat(xs).float().cpu() if xs else torch.zeros(0)

        table = torch.tensor(slices, dtype=torch.int64).reshape(-1, 3)
        return table, cat(master), cat(m), cat(v)

    @torch.no_grad()
    def load_shard_pieces(self, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor):
        """The inverse of shard_pieces() for this rank's own slice order; then
        every rank's params are rebuilt from the masters."""
        cursor = 0
        for param_index, param_begin, shard_offset, length in self.layout.plan.shard_slices(self.layout.rank):
            slot = self.layout.slots[param_index]
            shard = slice(shard_offset, shard_offset + length)
            flat = slice(slot.offset + param_begin, slot.offset + param_begin + length)
            piece = slice(cursor, cursor + length)
            if self.mixed:
                self.master[shard].copy_(master[piece])
            self.flat_params[flat].copy_(master[piece])
            self.exp_avg[shard].copy_(exp_avg[piece])
            self.exp_avg_sq[shard].copy_(exp_avg_sq[piece])
            cursor += length
        self._all_gather_params()

    @torch.no_grad()
    def reset_from_params(self):
        """A fresh optimizer for the current params: master = the params'
        values, zero moments, a new step state (load_module_only)."""
        if self.mixed:
            for b, (_, _, chunk, shard_offset) in enumerate(self.layout.buckets):
                lo, hi = self.layout.chunk_range(b)
                self.master[shard_offset:shard_offset + chunk].copy_(self.flat_params[lo:hi])
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        sc = dict(self.step_control_config)
        static_scale = sc.pop("static_scale")
        self.sync_host()
        _C.step_control_init(self.step_state, static_scale=static_scale, stream=stream_of(self.step_state), **sc)
        self.host_state.copy_(self.step_state)

    def step_state_dict(self) -> dict:
        self.sync_host()
        s = self.host_state
        return {
            "cur_scale": float(s[STATE_LOSS_SCALE]),
            "cur_iter": int(s[STATE_CUR_ITER]),
            "last_overflow_iter": int(s[STATE_LAST_OVERFLOW]),
            "cur_hysteresis": int(s[STATE_HYSTERESIS]),
            "applied_steps": int(s[STATE_APPLIED]),
            "skipped_steps": int(s[STATE_SKIPPED]),
        }

    @torch.no_grad()
    def load_step_state_dict(self, state: dict):
        values = torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64)
        values[STATE_LOSS_SCALE] = float(state["cur_scale"])
        values[STATE_CUR_ITER] = int(state["cur_iter"])
        values[STATE_LAST_OVERFLOW] = int(state["last_overflow_iter"])
        values[STATE_HYSTERESIS] = int(state["cur_hysteresis"])
        values[STATE_APPLIED] = int(state["applied_steps"])
        values[STATE_SKIPPED] = int(state["skipped_steps"])
        if not (math.isfinite(values[STATE_LOSS_SCALE]) and values[STATE_LOSS_SCALE] > 0):
            raise ValueError(f"checkpoint: loss scale {state['cur_scale']} is not a positive number")
        self.sync_host()
        self.step_state.copy_(values)
        self.host_state.copy_(values)
