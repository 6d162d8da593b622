"""ZeRO-3: parameters that live partitioned and are gathered while used.

Each rank holds its shard of the model-dtype parameters (the optimizer's
shard_params). A unit (stage3/units.py: one module's own parameters) is
gathered into a fresh buffer -- all-gathers of its buckets -- when a module
that needs it is about to run, its parameters become views of the buffer, and
it is released (parameters empty again, the buffer dropped) when no module
needs it any more:
  forward   a module's pre-hook fetches its units, its post-hook lets them go;
  backward  an autograd node on the module's outputs fetches them again just
            before the module's backward; they are let go once every one of
            their parameters has received its gradient (autograd runs a
            parameter's accumulation after all of its uses), or at the end.
A buffer is never written once gathered, so a tensor autograd saved from it
stays valid however long it lives.

After the first iteration the order of fetches is known (fetch_trace.py):
upcoming units are gathered ahead, asynchronously, up to
stage3_prefetch_bucket_size elements in flight, and a unit that will be used
again within stage3_max_reuse_distance elements is kept rather than released;
stage3_max_live_parameters caps what is gathered at once (kept units go
first). Persistent units are gathered once and again after each step.
"""
import itertools
import warnings
from collections import defaultdict
from typing import Dict, List

import torch
import torch.distributed as dist

from .. import collectives
from ..comms_log import COMMS_LOG
from . import released
from .fetch_trace import FetchTrace
from .module_hooks import ModuleHooks
from .units import PERSISTENT

RELEASED, INFLIGHT, AVAILABLE = 0, 1, 2


class _UnitState:
    __slots__ = ("status", "buffer", "works", "refs", "held_for_backward", "grads_left", "kept")

    def __init__(self):
        self.status = RELEASED
        self.buffer = None
        self.works = []
        self.refs = 0                  # module activations (and GatheredParameters blocks) using it now
        self.held_for_backward = False
        self.grads_left = 0
        self.kept = False              # not in use, kept for a use expected soon


def _nothing():
    pass


class PartitionedParameters:
    def __init__(self, optimizer, model: torch.nn.Module, keys_of_module: Dict[int, List[str]], zero_config):
        self.opt = optimizer
        self.layout = L = optimizer.layout
        self.placement = optimizer.placement
        self.model = model
        self.units = L.units
        self.persistent = [unit.key[1] == PERSISTENT for unit in self.units]
        self.state = [_UnitState() for _ in self.units]
        self.unit_of_slot = [0] * len(L.slots)
        for u, unit in enumerate(self.units):
            for i in range(unit.first_slot, unit.end_slot):
                self.unit_of_slot[i] = u
        self.slot_of_param = {id(slot.param): i for i, slot in enumerate(L.slots)}
        self.trainable_in_unit = [sum(1 for s in L.slots[unit.first_slot:unit.end_slot] if s.numel > 0)
                                  for unit in self.units]
        units_of_key = defaultdict(list)
        for u, unit in enumerate(self.units):
            units_of_key[unit.key[1]].append(u)
        self.units_of_module = {m: [u for k in keys for u in units_of_key[k]] for m, keys in keys_of_module.items()}
        self.external: Dict[int, List[int]] = {}  # id(module) -> units it reads beyond its own
        self.element_size = torch.empty(0, dtype=optimizer.model_dtype).element_size()

        z = zero_config
        self.prefetch_elements = z.prefetch_bucket_size
        self.max_live = z.max_live_parameters
        self.max_reuse = z.max_reuse_distance
        self.live = 0            # elements gathered or being gathered, persistent ones included
        self.inflight = 0        # elements being gathered
        self.peak_gathered_elements = 0
        self.trace = FetchTrace([unit.numel for unit in self.units])
        self.module_stack = []   # [(module, units fetched by this activation)]
        self.iteration_open = False
        self.noted_external = set()

        with torch.no_grad():
            for i, slot in enumerate(L.slots):
                released.detach_owner(slot.param)  # an earlier owner's (zero.Init) hold ends here
                released.attach(slot.param, self, i, slot.shape)
                released.release(slot.param)
            for u in range(len(self.units)):
                if self.persistent[u]:
                    self._start_gather(u)
                    self._finish_gather(u)
        self.hooks = ModuleHooks(model, self)
        for module in model.modules():  # registered before the engine existed (zero.register_external_parameter)
            for p in module.__dict__.get("_external_params", {}).values():
                if id(p) in self.slot_of_param:
                    self.register_external(module, p)

    # --- gathering and releasing one unit ---------------------------------------------------------

    def _slots(self, u):
        unit = self.units[u]
        return self.layout.slots[unit.first_slot:unit.end_slot]

    def _start_gather(self, u):
        unit, st = self.units[u], self.state[u]
        buf = torch.empty(unit.numel, dtype=self.opt.model_dtype, device=self.placement.device)
        st.works = self._gather_into(u, buf, async_op=True)
        st.buffer, st.status = buf, INFLIGHT
        for slot in self._slots(u):
            released.mark_inflight(slot.param)
        self.live += unit.numel
        self.inflight += unit.numel
        self.peak_gathered_elements = max(self.peak_gathered_elements, self.live)

    def _gather_into(self, u, buf, async_op):
        """All-gather unit u's buckets from every rank's shard into buf."""
        unit, L = self.units[u], self.layout
        works = []
        for b in range(unit.first_bucket, unit.end_bucket):
            bucket = L.buckets[b]
            out = buf[bucket.begin - unit.begin:bucket.end - unit.begin]
            mine = self.opt.shard_params[bucket.shard_offset:bucket.shard_offset + bucket.chunk]
            if self.placement.world_size == 1:
                out.copy_(mine)
                continue
            COMMS_LOG.record("all_gather", out.numel() * self.element_size)
            work = collectives.all_gather(out, mine, group=self.placement.group, async_op=async_op)
            if async_op:
                works.append(work)
        return works

    def _finish_gather(self, u):
        unit, st = self.units[u], self.state[u]
        for work in st.works:
            work.wait()
        st.works = []
        for slot in self._slots(u):
            lo = slot.offset - unit.begin
            released.make_available(slot.param, st.buffer[lo:lo + slot.numel].view(slot.shape))
        st.status = AVAILABLE
        self.inflight -= unit.numel

    def _release(self, u):
        st = self.state[u]
        if st.status == RELEASED:
            return
        if st.status == INFLIGHT:
            self._finish_gather(u)
        for slot in self._slots(u):
            released.release(slot.param)
        st.buffer, st.status, st.kept = None, RELEASED, False
        self.live -= self.units[u].numel

    # --- use ----------------------------------------------------------------------------------------

    def fetch(self, u):
        """Unit u is needed now: gathered (or waited for) before this returns."""
        self.trace.fetched(u)
        st = self.state[u]
        st.kept = False
        if st.status == RELEASED:
            self._make_room(self.units[u].numel)
            self._start_gather(u)
        if st.status == INFLIGHT:
            self._finish_gather(u)
        self._prefetch()

    def let_go(self, u):
        """A user of unit u is done with it: release it unless someone else
        uses it, backward still needs it, or it will be used again soon."""
        st = self.state[u]
        if self.persistent[u] or st.refs > 0 or st.held_for_backward or st.status == RELEASED:
            return
        if self.trace.reuse_distance(u) <= self.max_reuse and self.live <= self.max_live:
            st.kept = True
            return
        self._release(u)

    def _make_room(self, elements):
        """Release kept units, those needed furthest ahead first, until
        `elements` more fit under stage3_max_live_parameters."""
        if self.live + elements <= self.max_live:
            return
        kept = sorted((u for u, st in enumerate(self.state) if st.kept),
                      key=self.trace.reuse_distance, reverse=True)
        for u in kept:
            if self.live + elements <= self.max_live:
                break
            self._release(u)

    def _prefetch(self):
        """Start gathering the units the trace says come next, up to
        stage3_prefetch_bucket_size elements in flight."""
        if self.prefetch_elements <= 0:
            return
        for v in itertools.islice(self.trace.upcoming(), 64):
            if self.inflight >= self.prefetch_elements:
                break
            if self.state[v].status != RELEASED:
                continue
            n = self.units[v].numel
            if (self.inflight > 0 and self.inflight + n > self.prefetch_elements) or self.live + n > self.max_live:
                break
            self._start_gather(v)

    def release_all(self):
        """Every unit not persistent and not in use goes (end of an iteration)."""
        for u, st in enumerate(self.state):
            if not self.persistent[u] and st.refs == 0:
                st.held_for_backward = False
                self._release(u)

    # --- iterations, forward and backward (called by module_hooks.py and the engine) --------------

    def begin_iteration(self):
        if self.iteration_open:  # a forward with gradients whose backward never came
            self.end_iteration()
        self.iteration_open = True
        self.trace.begin("train" if torch.is_grad_enabled() else "eval")

    def end_iteration(self):
        self.iteration_open = False
        self.trace.end()
        self.release_all()

    def module_starts(self, module):
        fetched = list(self.units_of_module.get(id(module), ())) + list(self.external.get(id(module), ()))
        self.module_stack.append((module, fetched))
        for u in fetched:
            self.state[u].refs += 1
            self.fetch(u)

    def module_ends(self, module) -> bool:
        """Returns whether the module's backward needs its units fetched."""
        _, fetched = self.module_stack.pop()
        for u in fetched:
            self.state[u].refs -= 1
            self.let_go(u)
        return bool(fetched)

    def hold_for_backward(self, module):
        """The module's outputs could not carry the backward fetch (no tensor
        in them): its units stay until their gradients are in."""
        for u in self._units_for(module):
            self.state[u].held_for_backward = True

    def _units_for(self, module):
        return list(self.units_of_module.get(id(module), ())) + list(self.external.get(id(module), ()))

    def before_module_backward(self, module):
        for u in self._units_for(module):
            self.fetch(u)
            self.state[u].held_for_backward = True

    def begin_backward(self):
        for u, st in enumerate(self.state):
            st.grads_left = self.trainable_in_unit[u]

    def gradient_arrived(self, slot_index):
        u = self.unit_of_slot[slot_index]
        st = self.state[u]
        st.grads_left -= 1
        if st.grads_left <= 0 and st.held_for_backward:
            st.held_for_backward = False
            self.let_go(u)

    def end_backward(self):
        if self.iteration_open:
            self.end_iteration()
        else:
            self.release_all()

    def on_access(self, param):
        """An operation reads a released parameter (released.py). Inside a
        module's forward: gather it for that module, now and in every later
        forward and backward (DeepSpeed's register_external_parameter, done
        when it is needed). Elsewhere: the operation sees the empty tensor."""
        if not self.module_stack:
            return None
        module, fetched = self.module_stack[-1]
        u = self.unit_of_slot[self.slot_of_param[id(param)]]
        self.register_external(module, param)
        self.state[u].refs += 1
        fetched.append(u)
        self.fetch(u)
        return _nothing

    def register_external(self, module, param):
        u = self.unit_of_slot[self.slot_of_param[id(param)]]
        if self.persistent[u] or u in self.units_of_module.get(id(module), ()):
            return
        units = self.external.setdefault(id(module), [])
        if u not in units:
            units.append(u)

    def unregister_external(self, module, param):
        u = self.unit_of_slot[self.slot_of_param[id(param)]]
        units = self.external.get(id(module), [])
        if u in units:
            units.remove(u)

    def after_step(self):
        """The shards changed: what is gathered is stale. Persistent units are
        gathered again in place; the others when next used."""
        if any(st.refs for st in self.state):
            warnings.warn("zerofuse: the optimizer stepped while parameters were gathered "
                          "(inside a forward or a GatheredParameters block); they keep their old values there")
        for u, st in enumerate(self.state):
            if self.persistent[u]:
                self._gather_into(u, st.buffer, async_op=False)
            elif st.refs == 0:
                st.held_for_backward = False
                self._release(u)

    # --- whole parameters on request ------------------------------------------------------------------

    def units_of_params(self, params) -> List[int]:
        units = []
        for p in params:
            i = self.slot_of_param.get(id(p))
            if i is not None and self.unit_of_slot[i] not in units:
                units.append(self.unit_of_slot[i])
        return units

    def acquire(self, units):
        for u in units:
            self.state[u].refs += 1
            self.fetch(u)

    @torch.no_grad()
    def let_go_all(self, units, discard: bool = False):
        """discard: the values may have been changed and the changes must go
        (GatheredParameters without a modifier rank): released, or gathered
        again if persistent -- unless a module still uses them."""
        for u in units:
            st = self.state[u]
            st.refs -= 1
            if discard and st.refs == 0 and not st.held_for_backward:
                if self.persistent[u]:
                    self._gather_into(u, st.buffer, async_op=False)
                else:
                    self._release(u)
            else:
                self.let_go(u)

    @torch.no_grad()
    def keep_changes(self, units, from_rank):
        """Rank `from_rank`'s values of the gathered units become everyone's:
        broadcast, and each rank's chunk written into its shard and master.
        from_rank None: every rank made the same change; nothing is sent."""
        L, rank = self.layout, self.placement.rank
        for u in units:
            unit, buf = self.units[u], self.state[u].buffer
            if self.placement.world_size > 1 and from_rank is not None:
                COMMS_LOG.record("broadcast", buf.numel() * self.element_size)
                dist.broadcast(buf, src=dist.get_global_rank(self.placement.group, from_rank),
                               group=self.placement.group)
            for b in range(unit.first_bucket, unit.end_bucket):
                bucket = L.buckets[b]
                lo = bucket.begin - unit.begin + rank * bucket.chunk
                shard = slice(bucket.shard_offset, bucket.shard_offset + bucket.chunk)
                self.opt.shard_params[shard].copy_(buf[lo:lo + bucket.chunk])
                if self.opt.mixed:
                    self.opt.master[shard].copy_(buf[lo:lo + bucket.chunk])

    def full_values(self, param) -> torch.Tensor:
        """A copy of `param`'s whole values (a collective: every rank calls it)."""
        units = self.units_of_params([param])
        self.acquire(units)
        try:
            return param.detach().clone()
        finally:
            self.let_go_all(units)

    def stop(self, param):
        """`param` leaves this engine, whole (another engine takes the model over)."""
        values = self.full_values(param) if released.is_released(param) else param.detach().clone()
        released.detach_owner(param)
        param.data = values

    # --- the model's state, whole ------------------------------------------------------------------------

    @torch.no_grad()
    def consolidated_state_dict(self, keep: bool, exclude_frozen_parameters: bool = False):
        """module.state_dict() with every parameter whole, on the CPU, gathered
        one unit at a time (a collective: every rank calls it). keep=False:
        take part without keeping anything (returns None)."""
        out = {} if keep else None
        copies = {}  # id(tensor) -> its CPU copy: tied parameters stay one tensor
        current = None
        frozen = {id(p) for p in self.model.parameters() if not p.requires_grad}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if exclude_frozen_parameters and id(value) in frozen:
                continue
            i = self.slot_of_param.get(id(value))
            if i is not None:
                u = self.unit_of_slot[i]
                if u != current:
                    if current is not None:
                        self.let_go_all([current])
                    self.acquire([u])
                    current = u
            if keep:
                if id(value) not in copies:
                    copies[id(value)] = value.detach().to("cpu", copy=True)
                out[key] = copies[id(value)]
        if current is not None:
            self.let_go_all([current])
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict, strict: bool = True):
        """module.load_state_dict for a model whose trainable parameters are
        partitioned: those are written into this rank's shard (and master)
        straight from `state_dict`, the rest loaded by torch."""
        keys_of = defaultdict(list)  # slot -> its state_dict keys (tied parameters have several)
        for key, value in self.model.state_dict(keep_vars=True).items():
            i = self.slot_of_param.get(id(value))
            if i is not None:
                keys_of[i].append(key)
        ours = {k for keys in keys_of.values() for k in keys}
        result = self.model.load_state_dict({k: v for k, v in state_dict.items() if k not in ours}, strict=False)
        missing = [k for k in result.missing_keys if k not in ours] + sorted(k for k in ours if k not in state_dict)
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self.model).__name__}: missing keys "
                               f"{missing}, unexpected keys {unexpected}")
        for i, keys in keys_of.items():
            given = [k for k in keys if k in state_dict]
            if not given:
                continue
            slot, value = self.layout.slots[i], state_dict[given[0]]
            if tuple(value.shape) != tuple(slot.shape):
                raise RuntimeError(f"size mismatch for {given[0]}: copying a param with shape {tuple(value.shape)} "
                                   f"from checkpoint, the shape in current model is {tuple(slot.shape)}")
            self.opt.write_param_values(i, value.to(self.opt.model_dtype))
        self.after_step()  # what was gathered is stale
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def remove(self):
        """Stop managing the model (engine.destroy): hooks off; parameters stay partitioned."""
        self.hooks.remove()
