"""PipelineModule: a model written as a sequence of layers, of which each
pipeline stage builds and runs only its own (DeepSpeed's deepspeed.pipe API).

    layers = [LayerSpec(Embed, vocab, dim), *[LayerSpec(Block, dim) for _ in range(n)],
              LayerSpec(Head, dim, vocab)]
    model = PipelineModule(layers, num_stages=2, loss_fn=F.cross_entropy)
    engine, *_ = zerofuse.initialize(model=model, config=config)
    loss = engine.train_batch(data_iter)

Layer i's output is layer i+1's input (a tensor or a tuple of tensors); the
last stage applies loss_fn(output, labels). A layer is a LayerSpec (built
only on the stage that owns it), a TiedLayerSpec (one module shared by
several layers, e.g. the embedding and the LM head, even on different
stages: their gradients are summed between the owning stages and they are
updated as one parameter), an nn.Module, or any callable (a function of the
activation). Parameters are named as in the whole model (layer 3's weight is
"3.weight", a tied module's "tied_modules.<key>.weight"), so checkpoints
and optimizer state are named the same at any number of stages.
"""
import itertools
import random
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import distributed
from .partition import layer_type_name, partition_layers
from .topology import PipeDataParallelTopology, PipelineParallelGrid, ProcessTopology, grid_for


class PipelineError(Exception):
    """A misuse of the pipeline API (DeepSpeed's name)."""


class LayerSpec:
    """A layer to build later, only on the stage that owns it: LayerSpec(cls, *args, **kwargs)."""

    def __init__(self, typename, *module_args, **module_kwargs):
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(f"LayerSpec: 'typename' must be a torch.nn.Module class, got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self, log=False) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self):
        args = [repr(a) for a in self.module_args] + [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{self.typename.__name__}({', '.join(args)})"


class TiedLayerSpec(LayerSpec):
    """A layer sharing one module with every other TiedLayerSpec of the same
    `key`. forward_fn(module, x), when given, is what this layer computes
    (e.g. the LM head: lambda embed, x: x @ embed.weight.t()); otherwise the
    module's forward. tied_weight_attr: the attribute(s) tied across stages."""

    def __init__(self, key, typename, *module_args, forward_fn=None, tied_weight_attr="weight", **module_kwargs):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = str(key)
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


def _seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass


def _trainable_count(layer) -> int:
    """A layer's trainable parameters; a LayerSpec is built on the meta device to count them
    (no memory, the random generators untouched)."""
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    if isinstance(layer, LayerSpec):
        with torch.random.fork_rng(devices=[]):
            try:
                with torch.device("meta"):
                    module = layer.build()
            except Exception:  # a layer whose constructor needs real tensors
                module = layer.build()
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    return 0


class PipelineModule(nn.Module):
    def __init__(self, layers, num_stages: Optional[int] = None, topology: Optional[ProcessTopology] = None,
                 loss_fn: Optional[Callable] = None, seed_layers: bool = False, seed_fn: Optional[Callable] = None,
                 base_seed: int = 1234, partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Optional[Callable] = None, checkpointable_layers=None,
                 dynamic_shape: bool = False):
        super().__init__()
        if num_stages is None and topology is None:
            raise ValueError("PipelineModule: give 'num_stages' or 'topology'")
        if isinstance(activation_checkpoint_interval, bool) or not isinstance(activation_checkpoint_interval, int) \
                or activation_checkpoint_interval < 0:
            raise ValueError(f"PipelineModule: 'activation_checkpoint_interval' must be an int >= 0, got "
                             f"{activation_checkpoint_interval!r}")
        if checkpointable_layers is not None and not isinstance(checkpointable_layers, list):
            raise ValueError("PipelineModule: 'checkpointable_layers' must be a list of layer class names")
        self._layer_specs = list(layers)
        if not self._layer_specs:
            raise ValueError("PipelineModule: 'layers' is empty")
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = checkpointable_layers
        self.dynamic_shape = dynamic_shape

        distributed.join_launched_group()  # under torchrun: the world group, before the grid needs it
        world = dist.get_world_size() if dist.is_initialized() else 1
        if topology is None:
            if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
                raise ValueError(f"PipelineModule: 'num_stages' must be an int >= 1, got {num_stages!r}")
            if world % num_stages:
                raise ValueError(f"PipelineModule: num_stages ({num_stages}) must divide the world size ({world})")
            topology = PipeDataParallelTopology(num_pp=num_stages, num_dp=world // num_stages)
        elif "pipe" not in topology.get_axis_names():
            raise ValueError(f"PipelineModule: the topology needs a 'pipe' axis, has {topology.get_axis_names()}")
        self._topo = topology
        self._grid = grid_for(topology)
        self.num_stages = topology.get_dim("pipe")
        self.stage_id = self._grid.stage_id
        self.global_rank = self._grid.global_rank

        counts = [_trainable_count(layer) for layer in self._layer_specs] \
            if str(partition_method).lower() == "parameters" else [0] * len(self._layer_specs)
        self.parts = partition_layers(partition_method, self._layer_specs, self.num_stages, counts)
        self._param_counts = counts
        self._local_start, self._local_stop = self.parts[self.stage_id], self.parts[self.stage_id + 1]

        self.forward_funcs: List[Callable] = []
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: Dict[str, List[str]] = {}
        self._build()
        self.tied_comms = self._index_tied_modules()
        self._synchronize_tied_weights()

    # --- building ------------------------------------------------------------------------------------

    def _build(self):
        for idx in range(self._local_start, self._local_stop):
            layer = self._layer_specs[idx]
            if self.seed_layers:
                (self.seed_fn or _seed_everything)(self.base_seed + idx)
            if isinstance(layer, PipelineModule):
                raise PipelineError("PipelineModule: a PipelineModule cannot be a layer of another")
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = layer.build()
                    self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
                module = self.tied_modules[layer.key]
                self.forward_funcs.append(module if layer.forward_fn is None else partial(layer.forward_fn, module))
            elif isinstance(layer, (LayerSpec, nn.Module)):
                module = layer.build() if isinstance(layer, LayerSpec) else layer
                self.add_module(str(idx), module)
                self.forward_funcs.append(module)
            elif callable(layer):
                self.forward_funcs.append(layer)
            else:
                raise TypeError(f"PipelineModule: layer {idx} must be a LayerSpec, an nn.Module or a callable, "
                                f"got {type(layer).__name__}")

    def _index_tied_modules(self) -> Dict[str, dict]:
        """For each tied key spanning several stages: the process group of its
        owners (same data/model coordinates), created on every rank in the same
        order. The lowest owning stage is the primary: its copy counts in the
        gradient norm and is the one saved."""
        comms = {}
        keys = sorted({s.key for s in self._layer_specs if isinstance(s, TiedLayerSpec)})
        other_axes = [a for a in self._topo.get_axis_names() if a != "pipe"]
        for key in keys:
            stages = sorted({self.stage_owner(i) for i, s in enumerate(self._layer_specs)
                             if isinstance(s, TiedLayerSpec) and s.key == key})
            if len(stages) < 2:
                continue
            for fixed in _product([self._topo.get_dim(a) for a in other_axes]):
                coords = dict(zip(other_axes, fixed))
                ranks = [self._topo.get_rank(pipe=s, **coords) for s in stages]
                group = dist.new_group(ranks=ranks)
                if self.global_rank in ranks:
                    comms[key] = {"ranks": ranks, "group": group, "weight_attr": self.tied_weight_attrs[key],
                                  "module": self.tied_modules[key], "primary": self.global_rank == ranks[0]}
                    if self.global_rank != ranks[0]:
                        for p in self.tied_modules[key].parameters():
                            p.ds_pipe_replicated = True  # DeepSpeed's mark: counted once, on the primary
        return comms

    @torch.no_grad()
    def _synchronize_tied_weights(self):
        """The primary's values to every copy. The layers are still on the CPU
        here; the broadcast goes through this rank's device (NCCL takes device
        tensors only)."""
        device = distributed.local_device()
        for comm in self.tied_comms.values():
            for attr in comm["weight_attr"]:
                weight = self._tied_attr(comm["module"], attr)
                values = weight.detach().to(device)
                dist.broadcast(values, src=comm["ranks"][0], group=comm["group"])
                weight.copy_(values)

    @staticmethod
    def _tied_attr(module, dotted):
        for part in dotted.split("."):
            module = getattr(module, part)
        return module

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, forward_input):
        """This stage's layers in order. With activation_checkpoint_interval k,
        each run of k layers that holds parameters is recomputed in backward
        instead of keeping its activations."""
        k = self.activation_checkpoint_interval
        funcs = self.forward_funcs
        if k == 0:
            return _run_layers(funcs, forward_input)
        x = forward_input
        for start in range(0, len(funcs), k):
            chunk = funcs[start:start + k]
            if self._is_checkpointable(chunk) and torch.is_grad_enabled():
                args = x if isinstance(x, tuple) else (x,)
                if self.activation_checkpoint_func is not None:
                    x = self.activation_checkpoint_func(partial(_run_unpacked, chunk), *args)
                else:
                    x = torch.utils.checkpoint.checkpoint(partial(_run_unpacked, chunk), *args, use_reentrant=False)
            else:
                x = _run_layers(chunk, x)
        return x

    def _is_checkpointable(self, funcs) -> bool:
        if self.checkpointable_layers is not None:
            return all(type(f).__name__ in self.checkpointable_layers for f in funcs)
        return any(isinstance(f, nn.Module) and any(True for _ in f.parameters()) for f in funcs)

    # --- queries (DeepSpeed's) -----------------------------------------------------------------------

    def partitions(self) -> List[int]:
        return list(self.parts)

    def stage_owner(self, layer_idx: int) -> int:
        if not 0 <= layer_idx < len(self._layer_specs):
            raise ValueError(f"PipelineModule.stage_owner: layer {layer_idx} is outside "
                             f"0..{len(self._layer_specs) - 1}")
        for stage in range(self.num_stages):
            if self.parts[stage] <= layer_idx < self.parts[stage + 1]:
                return stage
        raise PipelineError(f"layer {layer_idx} is owned by no stage (parts {self.parts})")

    def topology(self) -> ProcessTopology:
        return self._topo

    def mpu(self) -> PipelineParallelGrid:
        return self._grid

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def get_tied_weights_and_groups(self):
        return [(self._tied_attr(c["module"], attr), c["group"]) for c in self.tied_comms.values()
                for attr in c["weight_attr"]]

    def tied_parameters_not_primary(self) -> List[nn.Parameter]:
        """Tied parameters whose primary copy is on another stage (left out of the norm and of saves)."""
        return [p for c in self.tied_comms.values() if not c["primary"]
                for attr in c["weight_attr"] for p in [self._tied_attr(c["module"], attr)]]

    def tied_copies_not_primary(self) -> List[nn.Parameter]:
        """Every parameter of a tied module whose primary copy is on another
        stage (the tied weights and the rest of that module): not saved here."""
        return [p for c in self.tied_comms.values() if not c["primary"] for p in c["module"].parameters()]

    def layer_modules(self):
        """(layer index, state_dict key prefix, module) of every layer this stage
        holds with state; a tied module once, at its first layer here, and only
        on its primary stage (the copies elsewhere are equal)."""
        out, seen = [], set()
        for idx in range(self._local_start, self._local_stop):
            spec = self._layer_specs[idx]
            if isinstance(spec, TiedLayerSpec):
                comm = self.tied_comms.get(spec.key)
                if spec.key not in seen and (comm is None or comm["primary"]):
                    seen.add(spec.key)
                    out.append((idx, f"tied_modules.{spec.key}.", self.tied_modules[spec.key]))
            elif str(idx) in self._modules:
                out.append((idx, f"{idx}.", self._modules[str(idx)]))
        return out

    def balance_report(self) -> str:
        """Layers and trainable parameters per stage (printed at start-up)."""
        counts = self._param_counts if any(self._param_counts) else [_trainable_count(l) for l in self._layer_specs]
        lines = []
        for s in range(self.num_stages):
            lo, hi = self.parts[s], self.parts[s + 1]
            names = ", ".join(f"{i}:{layer_type_name(self._layer_specs[i])}" for i in range(lo, hi))
            lines.append(f"stage {s}: layers [{lo}, {hi}) {sum(counts[lo:hi]):,} parameters ({names})")
        return "\n".join(lines)


def _product(dims):
    return itertools.product(*[range(max(d, 1)) for d in dims])


def _run_layers(funcs, x):
    for f in funcs:
        x = f(x)
    return x


def _run_unpacked(funcs, *inputs):
    """The checkpointed form: a single tensor travels unwrapped, as between layers."""
    return _run_layers(funcs, inputs[0] if len(inputs) == 1 else inputs)
