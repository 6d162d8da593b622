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
from typing import Dict, List, NamedTuple

import torch

from .. import _C
from ..ops._library import stream_of
from . import collectives
from .grad_reducer import GradReducer
from .layout import FlatLayout
from .step_control import StepControl, StepControlSettings

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction")
_MOMENTS = ("master", "exp_avg", "exp_avg_sq")


class OwnedPiece(NamedTuple):
    """A piece of a parameter this rank updates: elements [first, first + length)
    of the flattened parameter `name`."""

    name: str
    first: int
    length: int


class ZeroOptimizer(torch.optim.Optimizer):
    """The engine's optimizer. A torch.optim.Optimizer as far as param_groups
    go (so learning-rate schedulers work on it); the state lives in flat shards."""

    def __init__(self, param_groups: List[dict], named_params, placement, *, stage: int, model_dtype: torch.dtype,
                 comm_dtype: torch.dtype, bucket_elements: int, overlap_comm: bool, reduce_scatter: bool,
                 step_control: StepControlSettings):
        super().__init__(param_groups, {})
        self.placement = placement
        self.stage = stage
        self.model_dtype = model_dtype
        self.mixed = model_dtype != torch.float32
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
                self._copy_own_chunks(flat32, self.master)
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

        self.step_control = StepControl(step_control, device)
        self._build_run_views()

    def _copy_own_chunks(self, flat: torch.Tensor, shard: torch.Tensor):
        """This rank's chunk of every bucket of `flat`, into its place in `shard`."""
        for b, bucket in enumerate(self.layout.buckets):
            lo, hi = self.layout.chunk_range(b)
            shard[bucket.shard_offset:bucket.shard_offset + bucket.chunk].copy_(flat[lo:hi])

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
        device whether to apply it; the host learns the outcome later
        (self.step_control)."""
        if closure is not None:
            raise RuntimeError("zerofuse's optimizer is stepped by the engine (engine.step()); closures are not supported")
        self.reducer.wait()
        control = self.step_control
        control.decide(self.all_grad_views, self.placement.group if self.partition_world > 1 else None)
        # Adam's step count, multiplier and skip flag are read on the device, where
        # the decision was just written: nothing here waits for the device.
        stream = stream_of(control.stats)
        for group, views in zip(self.param_groups, self.group_views):
            if not views["params"]:
                continue
            beta1, beta2 = group["betas"]
            _C.adam_step_multi(
                views["params"], views["grads"], views["exp_avgs"], views["exp_avg_sqs"],
                views["copies"] if self.mixed else None,
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), adam_w_mode=bool(group["adam_w_mode"]),
                bias_correction=bool(group["bias_correction"]), step=1, step_tensor=control.applied_count,
                grad_multiplier=control.grad_multiplier, skip_if_nonzero=control.skip_flag, stream=stream)
        self._all_gather_params()
        if self.flat_grads is not None:
            self.flat_grads.zero_()  # the next accumulation window starts from zero
        control.publish()

    def _all_gather_params(self):
        """Every rank updated its chunk of each bucket; gather the rest (in place)."""
        if self.partition_world == 1:
            return
        works = []
        for b, bucket in enumerate(self.layout.buckets):
            lo, hi = self.layout.chunk_range(b)
            works.append(collectives.all_gather(self.flat_params[bucket.begin:bucket.end], self.flat_params[lo:hi],
                                                group=self.placement.group, async_op=True))
        for w in works:
            w.wait()

    # --- what the engine reads ----------------------------------------------------------------

    @property
    def applied_steps(self) -> int:
        return self.step_control.applied_steps

    @property
    def skipped_steps(self) -> int:
        return self.step_control.skipped_steps

    @property
    def loss_scale_tensor(self) -> torch.Tensor:
        """The current loss scale, on the device (no host round trip)."""
        return self.step_control.loss_scale_tensor

    def memory_report(self) -> Dict[str, int]:
        """Bytes this rank holds for each part of the training state."""
        el = self.flat_params.element_size()
        if self.stage < 2:
            grads = self.flat_grads.numel() * el
        else:
            bucket = max((b.end - b.begin for b in self.layout.buckets), default=0)
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

    # --- Stateful: this rank's share, named by parameter ------------------------------------------

    def named_trainable_parameters(self):
        """[(name, parameter)] in this optimizer's order (the index a state_dict's slices use)."""
        return [(slot.name, slot.param) for slot in self.layout.slots]

    def owned_pieces(self) -> List[OwnedPiece]:
        """The pieces of parameters this rank updates, in the order state_dict()
        and load_state_dict() lay their values out."""
        slots = self.layout.slots
        return [OwnedPiece(slots[s.param_index].name, s.param_begin, s.length)
                for s in self.layout.plan.shard_slices(self.layout.rank)]

    def _piece_views(self):
        """(fp32 master, exp_avg, exp_avg_sq, model-dtype param) views of each owned piece."""
        slots = self.layout.slots
        for s in self.layout.plan.shard_slices(self.layout.rank):
            shard = slice(s.shard_offset, s.shard_offset + s.length)
            flat_begin = slots[s.param_index].offset + s.param_begin
            flat = self.flat_params[flat_begin:flat_begin + s.length]
            yield (self.master[shard] if self.mixed else flat), self.exp_avg[shard], self.exp_avg_sq[shard], flat

    def state_dict(self) -> dict:
        """This rank's fp32 master values and Adam moments, the owned pieces
        concatenated (on the CPU), with the table that names them; the param
        groups' hyper-parameters; the step control's state."""
        pieces = self.owned_pieces()
        index_of = {name: i for i, (name, _) in enumerate(self.named_trainable_parameters())}
        values = {k: [] for k in _MOMENTS}
        for views in self._piece_views():
            for k, v in zip(_MOMENTS, views):
                values[k].append(v)
        state = {k: (torch.cat(v).float().cpu() if v else torch.zeros(0)) for k, v in values.items()}
        state["slices"] = torch.tensor([(index_of[p.name], p.first, p.length) for p in pieces],
                                       dtype=torch.int64).reshape(-1, 3)
        state["param_names"] = [name for name, _ in self.named_trainable_parameters()]
        state["param_groups"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                                 for g in self.param_groups]
        state["step_control"] = self.step_control.state_dict()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        """The inverse of state_dict() for this rank's owned_pieces() (a
        checkpoint of another world size is resharded into that order by the
        checkpoint module); then every rank's params are rebuilt from the
        masters. "param_groups" and "step_control" are optional."""
        total = sum(p.length for p in self.owned_pieces())
        for k in _MOMENTS:
            if k not in state or state[k].numel() != total:
                raise ValueError(f"ZeroOptimizer.load_state_dict: '{k}' must hold {total} values (this rank's pieces), "
                                 f"got {tuple(state[k].shape) if k in state else 'none'}")
        device = self.exp_avg.device
        values = [state[k].to(device, torch.float32) for k in _MOMENTS]
        cursor = 0
        for master, exp_avg, exp_avg_sq, param in self._piece_views():
            piece = slice(cursor, cursor + master.numel())
            master.copy_(values[0][piece])
            exp_avg.copy_(values[1][piece])
            exp_avg_sq.copy_(values[2][piece])
            if self.mixed:
                param.copy_(values[0][piece])
            cursor += master.numel()
        self._all_gather_params()
        saved_groups = state.get("param_groups")
        if saved_groups is not None:
            if len(saved_groups) != len(self.param_groups):
                raise ValueError(f"ZeroOptimizer.load_state_dict: {len(saved_groups)} param groups saved, "
                                 f"{len(self.param_groups)} here")
            for group, saved in zip(self.param_groups, saved_groups):
                group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                              if k in HYPERPARAMETERS or k == "initial_lr"})
        if state.get("step_control") is not None:
            self.step_control.load_state_dict(state["step_control"])

    @torch.no_grad()
    def reset_from_params(self):
        """A fresh optimizer for the current params: master = the params'
        values, zero moments, a new step state (load_module_only)."""
        if self.mixed:
            self._copy_own_chunks(self.flat_params, self.master)
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.step_control.reset()
