"""The engine's optimizer over flat, partitioned buffers: ZeRO stages 0-3.

Per rank (Psi parameters, N ranks, ZeRO-1/2; ZeRO-0 keeps everything whole):
  flat_params   model dtype, Psi        what forward and backward see (params are views)
                ZeRO-3: shard_params, model dtype, Psi/N; parameters are gathered
                module by module when used (stage3/partitioned_params.py)
  master        fp32, Psi/N             only with fp16/bf16; in fp32 the params are the master
  rule state    fp32, k Psi/N           Adam: exp_avg and exp_avg_sq (k = 2); see update_rules/
  gradients     ZeRO-0/1: model dtype, Psi (flat_grads); ZeRO-2/3: Psi/N (shard_grads) + buckets
A step: local gradient statistics over this rank's shard, one all-reduce of
them (ZeRO-1/2), the step decision on the device (skip on inf/NaN, unscale,
clip, loss scale), the update rule over the master shard (fused Adam: one pass
per param group that also writes the new model-dtype params), and an
all-gather of the updated params per bucket.
"""
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from . import collectives
from .comms_log import COMMS_LOG
from .grad_reducer import GradReducer
from .layout import FlatLayout
from .stage3.init_partition import full_values, stop_partitioning
from .step_control import StepControl, StepControlSettings
from .update_rules import AdamRule, TorchOptimizerRule


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
                 step_control: StepControlSettings, update_rule: Callable = AdamRule,
                 divide_before: Optional[float] = None, unit_of=None):
        """update_rule(optimizer) makes the rule that updates the master shard
        (update_rules/); divide_before: see GradReducer; unit_of: ZeRO-3's
        units (stage3/units.py)."""
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
                                 torch.empty(0, dtype=model_dtype).element_size(), bucket_elements,
                                 unit_of=unit_of if stage == 3 else None)
        L = self.layout
        self.flat_params = self.shard_params = self.master = None
        self.partitioned = None  # ZeRO-3: the PartitionedParameters the engine attaches
        if stage == 3:
            self._init_shards()
        else:
            self._init_flat()
        self.flat_grads = torch.zeros(L.total, dtype=model_dtype, device=device) if stage < 2 else None
        self.shard_grads = torch.zeros(L.shard_size, dtype=model_dtype, device=device) if stage >= 2 else None

        self.reducer = GradReducer(L, min(stage, 2), placement, model_dtype, comm_dtype, overlap_comm, reduce_scatter,
                                   self.flat_grads, self.shard_grads, divide_before=divide_before)

        self.step_control = StepControl(step_control, device)
        self._build_run_views()
        # Pipelines: the gradient statistics are also summed over the other
        # stages, and a tied copy whose primary is elsewhere is left out of them.
        self.extra_stat_groups: List = []
        self.norm_grad_views = self.all_grad_views
        self._not_counted = set()  # ids of parameters left out of the statistics (exclude_from_norm)
        self.rule = update_rule(self)

    @torch.no_grad()
    def _init_flat(self):
        """ZeRO-0/1/2: the parameters' values, fp32, laid out flat; then the
        model-dtype buffer the parameters become views of, and (mixed
        precision) this rank's fp32 master."""
        L, device, model_dtype = self.layout, self.placement.device, self.model_dtype
        flat32 = torch.zeros(L.total, dtype=torch.float32, device=device)
        for slot in L.slots:
            stop_partitioning(slot.param)  # zero.Init's (or an earlier ZeRO-3 engine's): whole again
            flat32[slot.offset:slot.offset + slot.numel].copy_(slot.param.detach().reshape(-1))
        self.flat_params = flat32.to(model_dtype) if self.mixed else flat32
        if self.mixed:
            self.master = torch.empty(L.shard_size, dtype=torch.float32, device=device)
            self._copy_own_chunks(flat32, self.master)
        del flat32
        for slot in L.slots:
            slot.param.data = self.flat_params[slot.offset:slot.offset + slot.numel].view(slot.shape)
            slot.param.grad = None

    @torch.no_grad()
    def _init_shards(self):
        """ZeRO-3: only this rank's pieces, taken from each parameter's values
        one parameter at a time (a parameter zero.Init partitioned is gathered
        for the copy, so no rank ever holds the whole model)."""
        L, device = self.layout, self.placement.device
        self.shard_params = torch.zeros(L.shard_size, dtype=self.model_dtype, device=device)
        if self.mixed:
            self.master = torch.zeros(L.shard_size, dtype=torch.float32, device=device)
        pieces = {}
        for s in L.plan.shard_slices(L.rank):
            pieces.setdefault(s.param_index, []).append(s)
        for i, slot in enumerate(L.slots):
            values = full_values(slot.param).to(device).reshape(-1)  # every rank takes part (zero.Init gathers)
            for s in pieces.get(i, ()):
                piece = values[s.param_begin:s.param_begin + s.length]
                self.shard_params[s.shard_offset:s.shard_offset + s.length].copy_(piece)
                if self.mixed:
                    self.master[s.shard_offset:s.shard_offset + s.length].copy_(piece)
            slot.param.grad = None

    def _copy_own_chunks(self, flat: torch.Tensor, shard: torch.Tensor):
        """This rank's chunk of every bucket of `flat`, into its place in `shard`."""
        for b, bucket in enumerate(self.layout.buckets):
            lo, hi = self.layout.chunk_range(b)
            shard[bucket.shard_offset:bucket.shard_offset + bucket.chunk].copy_(flat[lo:hi])

    # --- views the kernels take ---------------------------------------------------------------

    def _build_run_views(self):
        """Per param group, the runs of this rank's shard and the contiguous
        views of them that an update takes: fp32 master values, gradients, and
        (mixed precision) the model-dtype copies to write."""
        L = self.layout
        grads_flat = self.flat_grads if self.stage < 2 else None
        self.runs_of_group = L.groups_of_runs(len(self.param_groups))
        self.group_views: List[Dict[str, list]] = []
        for runs in self.runs_of_group:
            v = {"params": [], "grads": [], "copies": []}
            for r in runs:
                flat = slice(r.flat_begin, r.flat_end)
                shard = slice(r.shard_begin, r.shard_end)
                v["params"].append(self.master[shard] if self.mixed else self.values(shard, flat))
                v["grads"].append(grads_flat[flat] if grads_flat is not None else self.shard_grads[shard])
                if self.mixed:
                    v["copies"].append(self.values(shard, flat))
            self.group_views.append(v)
        self.all_grad_views = [g for v in self.group_views for g in v["grads"]]

    def exclude_from_norm(self, params):
        """Leave `params` out of the gradient statistics (norm and inf/NaN
        check): copies counted on another rank -- a pipeline's tied weight
        whose primary is on another stage, a tensor-parallel group's
        replicated parameters on all but its first rank. Calls add up. ZeRO
        stages 0-2."""
        if self.stage >= 3:
            raise ValueError("exclude_from_norm needs ZeRO stage 0, 1 or 2")
        self._not_counted.update(id(p) for p in params)
        excluded = sorted((slot.offset, slot.offset + slot.numel) for slot in self.layout.slots
                          if id(slot.param) in self._not_counted)
        views = []
        for runs in self.runs_of_group:
            for r in runs:
                # this run's gradients: flat_grads at its flat range (ZeRO-0/1), its shard range (ZeRO-2)
                grads, base = (self.flat_grads, r.flat_begin) if self.stage < 2 else (self.shard_grads,
                                                                                     r.shard_begin)
                lo = r.flat_begin
                for ex_lo, ex_hi in excluded:
                    if ex_hi <= lo or ex_lo >= r.flat_end:
                        continue
                    if ex_lo > lo:
                        views.append(grads[base + lo - r.flat_begin:base + ex_lo - r.flat_begin])
                    lo = max(lo, ex_hi)
                if lo < r.flat_end:
                    views.append(grads[base + lo - r.flat_begin:base + r.flat_end - r.flat_begin])
        self.norm_grad_views = views

    def values(self, shard: slice, flat: slice) -> torch.Tensor:
        """The model-dtype values of a piece this rank owns: at `flat` in the
        flat buffer (ZeRO-0/1/2), at `shard` in the parameter shard (ZeRO-3)."""
        return self.shard_params[shard] if self.stage == 3 else self.flat_params[flat]

    def master_view(self, lo: int, hi: int) -> torch.Tensor:
        """fp32 master values of shard elements [lo, hi) (with one rank: flat elements)."""
        if self.mixed:
            return self.master[lo:hi]
        return self.shard_params[lo:hi] if self.stage == 3 else self.flat_params[lo:hi]

    @torch.no_grad()
    def write_copies(self):
        """Mixed precision: the model-dtype params from the updated masters
        (what the fused Adam kernel does in its own pass)."""
        if self.mixed:
            for views in self.group_views:
                for master, copy in zip(views["params"], views["copies"]):
                    copy.copy_(master)

    # --- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step at an accumulation boundary. Decides on the
        device whether to apply it; the host learns the outcome later
        (self.step_control), except for rules that read it at once."""
        if closure is not None:
            raise RuntimeError("zerofuse's optimizer is stepped by the engine (engine.step()); closures are not supported")
        self.reducer.wait()
        control = self.step_control
        control.decide(self.norm_grad_views, self.placement.group if self.partition_world > 1 else None,
                       self.extra_stat_groups)
        self.rule.step(control)
        self._all_gather_params()
        if self.flat_grads is not None:
            self.flat_grads.zero_()  # the next accumulation window starts from zero
        control.publish()

    def _all_gather_params(self):
        """Every rank updated its chunk of each bucket; gather the rest (in place).
        ZeRO-3: what is gathered is out of date; the persistent parameters are
        gathered again, the others when next used."""
        if self.partitioned is not None:
            self.partitioned.after_step()
            return
        if self.partition_world == 1:
            return
        works = []
        for b, bucket in enumerate(self.layout.buckets):
            lo, hi = self.layout.chunk_range(b)
            COMMS_LOG.record("all_gather", (bucket.end - bucket.begin) * self.flat_params.element_size())
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
        """Bytes this rank holds for each part of the training state. ZeRO-3:
        "params" is the shard, "gathered_params_peak" the most gathered at
        once (persistent parameters included)."""
        el = torch.empty(0, dtype=self.model_dtype).element_size()
        if self.stage < 2:
            grads = self.flat_grads.numel() * el
        else:
            bucket = max((b.end - b.begin for b in self.layout.buckets), default=0)
            comm_el = torch.empty(0, dtype=self.reducer.comm_dtype).element_size()
            grads = self.shard_grads.numel() * el + self.reducer.peak_staging * bucket * comm_el
        report = {
            "params": (self.shard_params if self.stage == 3 else self.flat_params).numel() * el,
            "grads": grads,
            "master_params": 0 if self.master is None else self.master.numel() * 4,
            "optimizer_state": sum(t.numel() * t.element_size() for t in self.rule.state_tensors().values()),
        }
        if self.partitioned is not None:
            report["gathered_params_peak"] = self.partitioned.peak_gathered_elements * el
        return report

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

    def _piece_ranges(self):
        """(shard range, flat range) of each owned piece, in owned_pieces() order."""
        slots = self.layout.slots
        for s in self.layout.plan.shard_slices(self.layout.rank):
            flat_begin = slots[s.param_index].offset + s.param_begin
            yield slice(s.shard_offset, s.shard_offset + s.length), slice(flat_begin, flat_begin + s.length)

    def state_dict(self) -> dict:
        """This rank's share, named by parameter: "slices" (int64 [k, 3]: param
        index, first element, length of each owned piece), "master" and every
        per-element state tensor of the update rule ("exp_avg", "exp_avg_sq"
        for Adam) with the pieces concatenated, fp32, on the CPU;
        "state_names", "param_names", the param groups' hyper-parameters,
        per-group scalar state of a client optimizer, and the step control."""
        pieces = self.owned_pieces()
        index_of = {name: i for i, (name, _) in enumerate(self.named_trainable_parameters())}
        rule_state = self.rule.state_tensors()
        values = {"master": [], **{k: [] for k in rule_state}}
        for shard, flat in self._piece_ranges():
            values["master"].append(self.master[shard] if self.mixed else self.values(shard, flat))
            for k, t in rule_state.items():
                values[k].append(t[shard])
        state = {k: (torch.cat(v).float().cpu() if v else torch.zeros(0)) for k, v in values.items()}
        state["slices"] = torch.tensor([(index_of[p.name], p.first, p.length) for p in pieces],
                                       dtype=torch.int64).reshape(-1, 3)
        state["state_names"] = list(rule_state)
        state["param_names"] = [name for name, _ in self.named_trainable_parameters()]
        state["param_groups"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                                 for g in self.param_groups]
        state["scalar_state"] = self.rule.scalar_state() if hasattr(self.rule, "scalar_state") else None
        state["step_control"] = self.step_control.state_dict()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        """The inverse of state_dict() for this rank's owned_pieces() (a
        checkpoint of another world size is resharded into that order by the
        checkpoint module); then every rank's params are rebuilt from the
        masters. "param_groups", "scalar_state" and "step_control" are optional."""
        total = sum(p.length for p in self.owned_pieces())
        names = ["master", *state.get("state_names", self.rule.state_tensors().keys())]
        for k in names:
            if k not in state or state[k].numel() != total:
                raise ValueError(f"ZeroOptimizer.load_state_dict: '{k}' must hold {total} values (this rank's pieces), "
                                 f"got {tuple(state[k].shape) if k in state else 'none'}")
        device = self.placement.device
        shard_size = self.layout.shard_size
        rule_state = {k: torch.zeros(shard_size, dtype=torch.float32, device=device) for k in names[1:]}
        master = state["master"].to(device, torch.float32)
        cursor = 0
        for shard, flat in self._piece_ranges():
            piece = slice(cursor, cursor + (shard.stop - shard.start))
            if self.mixed:
                self.master[shard].copy_(master[piece])
            self.values(shard, flat).copy_(master[piece])
            for k, t in rule_state.items():
                t[shard] = state[k][piece].to(device)
            cursor = piece.stop
        if isinstance(self.rule, TorchOptimizerRule):
            self.rule.load_state_tensors(rule_state, state.get("scalar_state"))
        else:
            self.rule.load_state_tensors(rule_state)
        self._all_gather_params()
        saved_groups = state.get("param_groups")
        if saved_groups is not None and len(saved_groups) == len(self.param_groups):
            # Restored as torch's optimizers do; a checkpoint with another grouping
            # keeps the groups given now (the values above are named by parameter).
            for group, saved in zip(self.param_groups, saved_groups):
                group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                              if k in self.rule.hyperparameters or k == "initial_lr"})
        if state.get("step_control") is not None:
            self.step_control.load_state_dict(state["step_control"])

    @torch.no_grad()
    def refresh_master_from_params(self):
        """The fp32 masters take the (model-dtype) params' current values --
        after the model's weights were loaded from outside."""
        if self.mixed:
            if self.stage == 3:
                self.master.copy_(self.shard_params)
            else:
                self._copy_own_chunks(self.flat_params, self.master)

    @torch.no_grad()
    def reset_from_params(self):
        """A fresh optimizer for the current params: master = the params'
        values, fresh rule state, a new step state (load_module_only)."""
        self.refresh_master_from_params()
        self.rule.reset()
        self.step_control.reset()

    @torch.no_grad()
    def write_param_values(self, slot_index: int, values: torch.Tensor):
        """ZeRO-3: this rank's pieces of parameter `slot_index` (its optimizer
        order) and their masters take `values` (the whole parameter, any device
        and dtype) -- loading weights into partitioned parameters."""
        values = values.reshape(-1)
        for s in self._pieces_of(slot_index):
            piece = values[s.param_begin:s.param_begin + s.length].to(self.shard_params.device)
            self.shard_params[s.shard_offset:s.shard_offset + s.length].copy_(piece)
            if self.mixed:
                self.master[s.shard_offset:s.shard_offset + s.length].copy_(piece)

    def _pieces_of(self, slot_index: int):
        if not hasattr(self, "_pieces_by_slot"):
            self._pieces_by_slot = {}
            for s in self.layout.plan.shard_slices(self.layout.rank):
                self._pieces_by_slot.setdefault(s.param_index, []).append(s)
        return self._pieces_by_slot.get(slot_index, ())
